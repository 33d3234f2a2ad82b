//! Opaque keyset cursors: the (time, id) of the last row of a page, so that
//! the next page starts strictly after it in (time DESC, id DESC) order.
//! Rows inserted meanwhile are newer than the cursor (they appear on a new
//! search, not in the middle of this one), so every row is returned once.
//! The kind tag keeps a log cursor from being replayed on alerts.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Datelike, Utc};

use super::error::ApiError;

const VERSION: &str = "v1";

pub fn encode(kind: &str, at: DateTime<Utc>, id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{VERSION}|{kind}|{}|{id}", at.timestamp_micros()))
}

/// The (time, id) of a cursor made by [`encode`] with the same `kind`.
pub fn decode(kind: &str, cursor: &str) -> Result<(DateTime<Utc>, String), ApiError> {
    let invalid = || ApiError::bad_request("invalid_cursor", "cursor is not one returned by this endpoint");
    if cursor.len() > 256 {
        return Err(invalid());
    }
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let mut parts = text.splitn(4, '|');
    let (Some(VERSION), Some(k), Some(micros), Some(id)) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid());
    };
    if k != kind {
        return Err(invalid());
    }
    // Only times this API hands out (and PostgreSQL takes): a crafted
    // cursor far outside them is refused here, not by the database.
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .filter(|t| (1970..=9999).contains(&t.date_naive().year_ce().1))
        .ok_or_else(invalid)?;
    Ok((at, id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let at = DateTime::from_timestamp_micros(1_790_000_000_123_456).unwrap();
        let c = encode("logs", at, "0b4e6f1c-0000-4000-8000-000000000001");
        assert_eq!(decode("logs", &c).unwrap(), (at, "0b4e6f1c-0000-4000-8000-000000000001".to_owned()));
        assert!(decode("alerts", &c).is_err());
        assert!(decode("logs", "not-a-cursor!").is_err());
        assert!(decode("logs", &URL_SAFE_NO_PAD.encode("v1|logs|x|y")).is_err());
        // Year −250,000 and 300,000: valid for chrono, not for PostgreSQL.
        for micros in ["-8000000000000000000", "9400000000000000000"] {
            let crafted = URL_SAFE_NO_PAD.encode(format!("v1|logs|{micros}|0b4e6f1c-0000-4000-8000-000000000001"));
            assert_eq!(decode("logs", &crafted).unwrap_err().code(), "invalid_cursor", "{micros}");
        }
    }
}
