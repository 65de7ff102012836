//! Where a routed request meets an engine: the request path, the online judge and shadow
//! mirroring all go through [`dispatch`], so whatever backend serves them serves them alike.

use std::time::Instant;

use crate::engine::{EngineError, EngineInfo, EngineKey, EventStream, GenerateRequest};
use crate::http::AppState;

/// A generation under way.
pub struct Dispatched {
    /// What serves it (`x-loraops-engine*` headers).
    pub identity: EngineInfo,
    pub events: EventStream,
    /// When the engine took the request (after any load).
    pub started: Instant,
}

/// Start generating `req` on `key` (the backend loads the version first if it must).
pub async fn dispatch(
    state: &AppState,
    key: &EngineKey,
    req: GenerateRequest,
) -> Result<Dispatched, EngineError> {
    let events = state.backend.generate(key.clone(), req).await?;
    Ok(Dispatched {
        identity: state.backend.identity().clone(),
        events,
        started: Instant::now(),
    })
}
