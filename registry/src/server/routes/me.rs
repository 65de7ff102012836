//! `/me`: the caller as the registry sees it (roles after any claim mapping, adapter scope),
//! so a client such as the console shows only what the token may do.

use actix_web::{HttpResponse, web};

use crate::api::Me;
use crate::server::AppState;
use crate::server::caller::Caller;

#[utoipa::path(get, path = "/api/v1/me", responses((status = 200, body = Me), (status = 401, body = crate::api::ErrorBody)))]
pub async fn me(
    state: web::Data<AppState>,
    caller: Caller,
) -> Result<HttpResponse, crate::server::error::ApiError> {
    let me = match &caller.0 {
        Some(p) => Me {
            sub: p.sub.clone(),
            roles: p.roles.iter().copied().collect(),
            adapters: p.adapters.clone(),
        },
        None => {
            caller.require_serving_read(&state, None)?;
            Me {
                sub: caller.sub().to_string(),
                roles: Vec::new(),
                adapters: None,
            }
        }
    };
    Ok(HttpResponse::Ok().json(me))
}
