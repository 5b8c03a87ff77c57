//! Bearer-token authorization: client tokens may send messages, admin tokens may do everything.

use axum::http::{header, HeaderMap, StatusCode};
use outpost_core::config::AuthConfig;

use crate::error::ApiError;

/// What an endpoint needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Sending messages: a client or an admin token.
    Client,
    /// Reading state and every admin endpoint: an admin token.
    Admin,
}

/// Checks the request's `Authorization` header against the configured tokens. No `[auth]` section
/// means no checks.
pub fn authorize(auth: Option<&AuthConfig>, headers: &HeaderMap, needed: Access) -> Result<(), ApiError> {
    let Some(auth) = auth else { return Ok(()) };
    let token = bearer_token(headers).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing `Authorization: Bearer TOKEN` header; this node requires a token",
        )
    })?;
    let is_admin = auth.admin_tokens.iter().any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
    let is_client = auth.client_tokens.iter().any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
    match (needed, is_admin, is_client) {
        (_, true, _) | (Access::Client, _, true) => Ok(()),
        (Access::Admin, false, true) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this endpoint needs an admin token; the token given is a client token",
        )),
        _ => Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token")),
    }
}

/// The token of an `Authorization: Bearer TOKEN` header, if there is one.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Compares without an early exit on the first differing byte, so response timing does not reveal
/// how much of a token was right.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_table() {
        let auth = AuthConfig { client_tokens: vec!["c".into()], admin_tokens: vec!["a".into()] };
        let cases = [
            (None, Access::Client, None),
            (None, Access::Admin, None),
            (Some("Bearer c"), Access::Client, Some(None)),
            (Some("Bearer c"), Access::Admin, Some(Some(403))),
            (Some("Bearer a"), Access::Admin, Some(None)),
            (Some("Bearer a"), Access::Client, Some(None)),
            (Some("Bearer x"), Access::Client, Some(Some(401))),
            (Some("Basic c"), Access::Client, Some(Some(401))),
        ];
        for (header_value, needed, expected) in cases {
            let mut headers = HeaderMap::new();
            if let Some(v) = header_value {
                headers.insert(header::AUTHORIZATION, v.parse().unwrap());
            }
            let got = authorize(Some(&auth), &headers, needed).err().map(|e| e.status.as_u16());
            let want = match expected {
                None => Some(401),
                Some(w) => w,
            };
            assert_eq!(got, want, "{header_value:?} {needed:?}");
            assert!(authorize(None, &headers, needed).is_ok());
        }
    }
}
