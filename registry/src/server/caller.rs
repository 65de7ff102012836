//! Who is calling: the bearer token verified into a [`Principal`], and the role checks
//! handlers make before they act.

use std::future::{Ready, ready};

use actix_web::{FromRequest, HttpRequest, dev::Payload, web};

use super::{AppState, error::ApiError};
use crate::api::Role;
use crate::auth::{AuthError, Principal};

/// The verified caller, or `None` for a request without a token. A token that is present but
/// invalid (expired, forged, wrong audience, alg `none`) is rejected here with 401.
pub struct Caller(pub Option<Principal>);

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(extract(req))
    }
}

fn extract(req: &HttpRequest) -> Result<Caller, ApiError> {
    let Some(value) = req.headers().get(actix_web::http::header::AUTHORIZATION) else {
        return Ok(Caller(None));
    };
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::internal("no app state"))?;
    let text = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("Authorization header is not text"))?;
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::unauthorized("Authorization must be `Bearer <token>`"))?;
    Ok(Caller(Some(state.verifier.verify(token.trim())?)))
}

impl Caller {
    /// The subject, for audit columns (`anonymous` for open reads).
    pub fn sub(&self) -> &str {
        self.0
            .as_ref()
            .map(|p| p.sub.as_str())
            .unwrap_or("anonymous")
    }

    /// Reads: open without a token when configured; with one, it needs a role that reads the
    /// registry (`viewer`, or `publisher`, `evaluator`, `deployer`, `admin`, which include it),
    /// and a token limited to some adapters sees only those (`adapter`: what the read is of;
    /// others answer 404 as if absent). A `gateway`-only token reads only what serving needs
    /// ([`Self::require_serving_read`]); an `inference` token reads nothing.
    pub fn require_read(&self, state: &AppState, adapter: Option<&str>) -> Result<(), ApiError> {
        if let Some(p) = &self.0
            && is_gateway_only(p)
        {
            return Err(ApiError::forbidden(
                "a gateway token reads only routing, adapters, their versions and files, and base models",
            ));
        }
        self.require_serving_read(state, adapter)
    }

    /// Reads the data plane needs (routing, adapters and versions and their files, base
    /// models): like [`Self::require_read`], and open to `gateway` tokens too.
    pub fn require_serving_read(
        &self,
        state: &AppState,
        adapter: Option<&str>,
    ) -> Result<(), ApiError> {
        let Some(p) = &self.0 else {
            return if state.settings.registry.anonymous_reads {
                Ok(())
            } else {
                Err(AuthError::Missing.into())
            };
        };
        if !p.roles.iter().any(|r| r.reads_registry()) {
            return Err(ApiError::forbidden(
                "reading the registry needs the viewer role (or publisher, evaluator, deployer, admin, gateway)",
            ));
        }
        if let Some(a) = adapter
            && !p.may_touch(a)
        {
            return Err(ApiError::not_found(format!("adapter {a:?} not found")));
        }
        Ok(())
    }

    /// Whether this caller may see `adapter` in a listing.
    pub fn may_see(&self, adapter: &str) -> bool {
        self.0.as_ref().is_none_or(|p| p.may_touch(adapter))
    }

    /// Whether the caller sees every adapter (no token, or one without adapter patterns).
    pub fn sees_all(&self) -> bool {
        self.0.as_ref().is_none_or(|p| p.adapters.is_none())
    }

    /// Writes: the role, and (when the token lists adapter patterns) the adapter.
    pub fn require(&self, role: Role, adapter: Option<&str>) -> Result<&Principal, ApiError> {
        let p = self.0.as_ref().ok_or(ApiError::from(AuthError::Missing))?;
        if !p.has(role) {
            return Err(ApiError::forbidden(format!(
                "this action needs the {role} role"
            )));
        }
        if let Some(a) = adapter
            && !p.may_touch(a)
        {
            return Err(ApiError::forbidden(format!(
                "this token may not act on adapter {a:?}"
            )));
        }
        Ok(p)
    }
}

/// A token whose only role is `gateway`.
fn is_gateway_only(p: &Principal) -> bool {
    !p.roles.is_empty() && p.roles.iter().all(|r| *r == Role::Gateway)
}
