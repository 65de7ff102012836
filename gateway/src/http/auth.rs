//! Bearer-token checks for inference: with a verifier configured every inference call needs a
//! valid JWT (any role), and an adapter-scoped token may only use the adapters it names.

use actix_web::HttpRequest;
use loraops_registry::auth::Principal;

use super::AppState;
use crate::error::ApiError;

pub fn caller(state: &AppState, req: &HttpRequest) -> Result<Option<Principal>, ApiError> {
    let Some(verifier) = &state.verifier else {
        return Ok(None);
    };
    let header = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized(
                "You didn't provide an API key: send a loraops JWT as `Authorization: Bearer TOKEN`.",
            )
        })?;
    verifier
        .verify(token)
        .map(Some)
        .map_err(|e| ApiError::unauthorized(format!("Invalid token: {e}")))
}

/// 403 when a token limited to some adapters asks for another one.
pub fn may_use(p: Option<&Principal>, adapter: &str) -> Result<(), ApiError> {
    match p {
        Some(p) if !p.may_touch(adapter) => Err(ApiError::forbidden(format!(
            "this token may not use adapter {adapter}"
        ))),
        _ => Ok(()),
    }
}
