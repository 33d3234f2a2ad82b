//! Path, query-string and JSON-body extractors whose rejections are [`ApiError`]s,
//! so that a malformed request gets the API's JSON error (never axum's
//! plain-text one). The target types use `deny_unknown_fields`: a misspelt
//! parameter is an error, not silently ignored.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::Ctx;
use super::error::ApiError;

/// `axum::extract::Query` with the API's errors.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| ApiQuery(q.0))
            .map_err(|rejection| ApiError::bad_request("invalid_query", rejection.body_text()))
    }
}

/// `axum::extract::Path` with the API's errors (a segment that is not
/// valid percent-encoded UTF-8, say).
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|rejection| ApiError::bad_request("invalid_path", rejection.body_text()))
    }
}

/// `axum::Json` with the API's errors: 413 past the body limit, 415
/// without a JSON content type, 400 for anything that does not parse into
/// the target type.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Ctx> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Ctx) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(json) => Ok(ApiJson(json.0)),
            Err(rejection) => Err(match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit: state.config.api.max_body_bytes },
                StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(rejection.body_text()),
                _ => ApiError::bad_request("invalid_body", rejection.body_text()),
            }),
        }
    }
}
