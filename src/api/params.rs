//! Parsing and checking of request parameters, each error naming the
//! parameter and what it accepts. Values reach SQL only as bind parameters;
//! these checks exist to answer a mistake with a clear 400 instead of an
//! empty result or a database error.

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, Utc};
use ipnet::IpNet;

use super::allowlist::parse_network;
use super::error::ApiError;

/// Largest page of the log and alert searches.
pub const MAX_LIMIT: u64 = 1000;

/// `limit`: absent → `default`; 1..=`max` else 400.
pub fn limit(value: Option<u64>, default: u64, max: u64) -> Result<i64, ApiError> {
    match value {
        None => Ok(default as i64),
        Some(n) if (1..=max).contains(&n) => Ok(n as i64),
        Some(n) => Err(ApiError::bad_request("invalid_limit", format!("limit must be between 1 and {max}, got {n}"))),
    }
}

/// A timestamp: RFC 3339 (`2026-11-27T10:00:00Z`, any offset) or a plain
/// date (`2026-11-27`, midnight UTC).
pub fn timestamp(name: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    let parsed = DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| NaiveDate::parse_from_str(value, "%Y-%m-%d").map(|d| d.and_time(NaiveTime::MIN).and_utc()));
    match parsed {
        Ok(t) if (1970..=9999).contains(&t.date_naive().year_ce().1) => Ok(t),
        _ => Err(ApiError::bad_request(
            "invalid_timestamp",
            format!(
                "{name} must be an RFC 3339 timestamp (2026-11-27T10:00:00Z) or a date (2026-11-27) between 1970 and 9999"
            ),
        )),
    }
}

pub fn optional_timestamp(name: &str, value: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    value.map(|v| timestamp(name, v)).transpose()
}

/// A calendar date, `YYYY-MM-DD`.
pub fn date(name: &str, value: &str) -> Result<NaiveDate, ApiError> {
    NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .ok()
        .filter(|d| (1970..=9999).contains(&d.year_ce().1))
        .ok_or_else(|| ApiError::bad_request("invalid_date", format!("{name} must be a date such as 2026-11-27")))
}

/// `from` < `to` when both are given.
pub fn check_range(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> Result<(), ApiError> {
    match (from, to) {
        (Some(f), Some(t)) if f >= t => Err(ApiError::bad_request("invalid_range", "from must be earlier than to")),
        _ => Ok(()),
    }
}

/// `ip`: an address (matches that address) or a CIDR network (matches the
/// addresses in it).
pub fn ip_filter(value: &str) -> Result<IpNet, ApiError> {
    parse_network(value).map_err(|e| ApiError::bad_request("invalid_ip", format!("ip: {e}")))
}

/// `action`: an exact action (`FAILED_AUTH_LOGIN`) or a prefix ending in
/// `*` (`SECURITY_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionFilter {
    Exact(String),
    Prefix(String),
}

impl ActionFilter {
    pub fn parse(value: &str) -> Result<ActionFilter, ApiError> {
        let (body, prefix) = match value.strip_suffix('*') {
            Some(body) => (body, true),
            None => (value, false),
        };
        // Actions are identifiers (AUTH_LOGIN, SECURITY_*, ADMIN_*): anything
        // else is a typo or an attack, and said so rather than matched.
        let valid = !body.is_empty()
            && body.len() <= 128
            && body.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        if !valid {
            return Err(ApiError::bad_request(
                "invalid_action",
                "action must be an action name (letters, digits, _ . : -), optionally ending in * for a prefix",
            ));
        }
        Ok(if prefix { ActionFilter::Prefix(body.to_owned()) } else { ActionFilter::Exact(body.to_owned()) })
    }

    /// The half-open range [low, high) of actions with this prefix, in the
    /// "C" collation of audit_logs.action, so that a B-tree serves it.
    pub fn prefix_range(prefix: &str) -> (String, String) {
        let mut high = prefix.as_bytes().to_vec();
        // Validated ASCII: the last byte is below 0x7f and increments.
        if let Some(last) = high.last_mut() {
            *last += 1;
        }
        (prefix.to_owned(), String::from_utf8_lossy(&high).into_owned())
    }
}

/// A free-text filter (user id, session id, rule, subject): bounded length,
/// no control characters.
pub fn text(name: &str, value: &str, max_len: usize) -> Result<String, ApiError> {
    if value.is_empty() || value.len() > max_len || value.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            format!("{name} must be 1 to {max_len} bytes without control characters"),
        ));
    }
    Ok(value.to_owned())
}

pub fn optional_text(name: &str, value: Option<&str>, max_len: usize) -> Result<Option<String>, ApiError> {
    value.map(|v| text(name, v, max_len)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_dates() {
        assert_eq!(timestamp("from", "2026-11-27").unwrap().to_rfc3339(), "2026-11-27T00:00:00+00:00");
        assert_eq!(timestamp("from", "2026-11-27T10:00:00+02:00").unwrap().to_rfc3339(), "2026-11-27T08:00:00+00:00");
        for bad in ["yesterday", "2026-13-01", "2026-11-27 10:00", "0001-01-01", "1e9", "'; DROP TABLE audit_logs; --"]
        {
            assert_eq!(timestamp("from", bad).unwrap_err().code(), "invalid_timestamp", "{bad}");
        }
        assert_eq!(date("date", "2026-02-30").unwrap_err().code(), "invalid_date");
    }

    #[test]
    fn actions_and_prefix_ranges() {
        assert_eq!(ActionFilter::parse("SECURITY_*").unwrap(), ActionFilter::Prefix("SECURITY_".into()));
        assert_eq!(ActionFilter::parse("AUTH_LOGIN").unwrap(), ActionFilter::Exact("AUTH_LOGIN".into()));
        for bad in ["*", "", "AUTH LOGIN", "A'--", "SEC*URITY", "%"] {
            assert!(ActionFilter::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(ActionFilter::prefix_range("SECURITY_"), ("SECURITY_".into(), "SECURITY`".into()));
    }

    #[test]
    fn limits() {
        assert_eq!(limit(None, 100, MAX_LIMIT).unwrap(), 100);
        assert_eq!(limit(Some(1000), 100, MAX_LIMIT).unwrap(), 1000);
        assert_eq!(limit(Some(1_000_000_000), 100, MAX_LIMIT).unwrap_err().code(), "invalid_limit");
        assert_eq!(limit(Some(0), 100, MAX_LIMIT).unwrap_err().code(), "invalid_limit");
    }
}
