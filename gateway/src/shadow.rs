//! Shadow traffic. While a rollout is in its shadow phase the routing table names the
//! candidate as the adapter's `shadow` with a share; no user is routed to it. The gateway
//! mirrors that share of the adapter's stable-arm requests to the candidate once the user's
//! request has ended, off the request path, and discards the candidate's answers. They are
//! counted as the `shadow` arm (errors, latency, tokens, users) for the registry, which
//! analyses it against the stable arm like a canary; with an online judge configured, the
//! judge also rates how far each shadow answer agrees with the stable one.
//!
//! Mirroring goes through [`dispatch`], like every request. At most [`MAX_IN_FLIGHT`] mirrored
//! generations run at once; beyond that a sample is skipped rather than queued.

use std::sync::Arc;
use std::time::Instant;

use actix_web::web;
use futures_util::StreamExt;
use loraops_registry::api::Name;
use tokio::sync::Semaphore;

use crate::dispatch::dispatch;
use crate::engine::EngineKey;
use crate::engine::{EngineError, Event, GenerateRequest};
use crate::http::AppState;
use crate::judge;
use crate::routing::{Arm, Target};

/// Mirrored generations running at once.
pub const MAX_IN_FLIGHT: usize = 4;

/// The gateway's mirroring capacity.
pub struct Mirror {
    slots: Arc<Semaphore>,
}

impl Default for Mirror {
    fn default() -> Self {
        Self {
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }
}

/// One stable request to mirror.
pub struct Job {
    route: Name,
    key: EngineKey,
    version: u32,
    user: String,
    request: GenerateRequest,
    /// The request as the judge reads it, when a judge will compare the answers.
    question: Option<String>,
}

impl Job {
    /// Whether the stable answer's text is needed (for the judge's agreement).
    pub fn wants_answer(&self) -> bool {
        self.question.is_some()
    }
}

/// Whether to mirror this request: a stable-arm request of an adapter in its shadow phase,
/// sampled at the phase's share.
pub fn pick(state: &AppState, target: &Target, user: &str, req: &GenerateRequest) -> Option<Job> {
    if target.arm != Arm::Stable {
        return None;
    }
    let route = target.route.as_ref()?;
    let (key, version, percent) = state.router.shadow_of(route)?;
    if percent < 100.0 && rand::random::<f64>() * 100.0 >= percent {
        return None;
    }
    let question = state
        .judge
        .as_ref()
        .filter(|j| j.sample(user))
        .map(|_| judge::question(&req.prompt));
    Some(Job {
        route: route.clone(),
        key,
        version,
        user: user.to_string(),
        request: req.clone(),
        question,
    })
}

/// Run `job` in the background; `stable_answer` is what the user got (for the judge).
pub fn spawn(state: web::Data<AppState>, job: Job, stable_answer: Option<String>) {
    let Ok(slot) = state.shadow.slots.clone().try_acquire_owned() else {
        state.metrics.shadowed.with_label_values(&["skipped"]).inc();
        return;
    };
    tokio::spawn(async move {
        let _slot = slot;
        let start = Instant::now();
        let (status, tokens, text) = match dispatch(&state, &job.key, job.request).await {
            Err(e) => {
                tracing::warn!(candidate = %job.key, error = %e, "shadow candidate unavailable");
                (503, None, None)
            }
            Ok(d) => {
                let mut events = d.events;
                let mut text = String::new();
                let mut out = (500, None, None);
                while let Some(ev) = events.next().await {
                    match ev {
                        Ok(Event::Delta(t)) => text.push_str(&t),
                        Ok(Event::Logprobs(_)) => {}
                        Ok(Event::Done { usage, .. }) => {
                            out = (200, Some(usage.completion_tokens), Some(text));
                            break;
                        }
                        Err(EngineError::Rejected(_)) => {
                            out = (400, None, None);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                out
            }
        };
        state.recorder.record(
            &job.route,
            job.version,
            "shadow",
            status,
            start.elapsed(),
            tokens,
            &job.user,
        );
        let outcome = if status == 200 { "mirrored" } else { "failed" };
        state.metrics.shadowed.with_label_values(&[outcome]).inc();
        if let (Some(q), Some(stable), Some(candidate)) = (job.question, stable_answer, text) {
            match judge::agreement(&state, &q, &stable, &candidate).await {
                Some(Ok(score)) => {
                    state
                        .recorder
                        .record_agreement(&job.route, job.version, score);
                    state.metrics.judged.with_label_values(&["scored"]).inc();
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "online judge failed on a shadow answer");
                    state.metrics.judged.with_label_values(&["failed"]).inc();
                }
                None => {}
            }
        }
    });
}
