//! Signed webhooks on version, evidence and rollout events.
//!
//! An event is queued as one `webhook_deliveries` row per endpoint that wants it, on the
//! transaction that makes the event: a committed event is never lost (a restart resumes its
//! delivery), a rolled-back one is never sent. A background task on every replica claims due
//! rows (a guarded update, so two replicas never send one attempt twice), POSTs them, and
//! retries failures with exponential backoff until `webhook_max_attempts`.
//!
//! Every POST carries `x-loraops-event` (the type), `x-loraops-delivery` (the event id, the same
//! on every retry and endpoint: receivers deduplicate on it), `x-loraops-timestamp` (Unix
//! seconds) and `x-loraops-signature: sha256=HEX`, the HMAC-SHA256 of `TIMESTAMP.BODY` under
//! the endpoint's secret. Binding the timestamp lets receivers refuse replayed requests.

use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use chrono::Utc;
use hmac::{Hmac, Mac};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};
use serde_json::{Value, json};
use sha2::Sha256;

use super::AppState;
use super::entities::webhook_delivery::{self, Column};
use super::settings::WebhookSettings;

/// Every event type the registry emits.
pub const EVENT_TYPES: &[&str] = &[
    "version.created",
    "version.deleted",
    "evidence.created",
    "rollout.start",
    "rollout.hold",
    "rollout.advance",
    "rollout.analysis_failed",
    "rollout.promote",
    "rollout.rollback",
    "rollout.pause",
    "rollout.resume",
    "rollout.abort",
    "rollout.await_approval",
    "rollout.approve",
    "rollout.rollback_promotion",
    "gate.updated",
];

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Rows one pass claims at most.
const BATCH: u64 = 16;
/// How often an idle delivery task looks for due rows.
const POLL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum WebhookConfigError {
    #[error("registry.webhooks[{index}]: url {url:?} {why}")]
    Url {
        index: usize,
        url: String,
        why: String,
    },
    #[error("registry.webhooks[{index}] ({url}): {why}")]
    Secret {
        index: usize,
        url: String,
        why: String,
    },
    #[error(
        "registry.webhooks[{index}] ({url}): unknown event {event:?}; known: {known}, a family such as rollout.*, or *"
    )]
    Event {
        index: usize,
        url: String,
        event: String,
        known: String,
    },
}

struct Endpoint {
    url: String,
    secret: Vec<u8>,
    events: Vec<String>,
}

impl Endpoint {
    fn wants(&self, ty: &str) -> bool {
        self.events.iter().any(|p| matches(p, ty))
    }
}

/// `*`, `family.*` or an exact type.
fn matches(pattern: &str, ty: &str) -> bool {
    pattern == "*"
        || pattern == ty
        || pattern
            .strip_suffix(".*")
            .is_some_and(|family| ty.split_once('.').is_some_and(|(f, _)| f == family))
}

/// The configured endpoints; cheap to clone.
#[derive(Clone, Default)]
pub struct Webhooks {
    endpoints: Arc<Vec<Endpoint>>,
}

impl Webhooks {
    /// Check every endpoint: an absolute http(s) URL, a non-empty secret (inline or from the
    /// named environment variable), known event types.
    pub fn from_settings(list: &[WebhookSettings]) -> Result<Self, WebhookConfigError> {
        let mut endpoints = Vec::new();
        for (index, w) in list.iter().enumerate() {
            let url = w.url.clone();
            match url::Url::parse(&url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                Ok(_) => {
                    return Err(WebhookConfigError::Url {
                        index,
                        url,
                        why: "is not an http(s) URL with a host".into(),
                    });
                }
                Err(e) => {
                    return Err(WebhookConfigError::Url {
                        index,
                        url,
                        why: e.to_string(),
                    });
                }
            }
            let secret = match (&w.secret, &w.secret_env) {
                (Some(s), None) => s.clone(),
                (None, Some(var)) => {
                    std::env::var(var).map_err(|_| WebhookConfigError::Secret {
                        index,
                        url: url.clone(),
                        why: format!("secret_env names {var}, which is not set"),
                    })?
                }
                (Some(_), Some(_)) => {
                    return Err(WebhookConfigError::Secret {
                        index,
                        url,
                        why: "set secret or secret_env, not both".into(),
                    });
                }
                (None, None) => {
                    return Err(WebhookConfigError::Secret {
                        index,
                        url,
                        why: "needs secret or secret_env: deliveries are always signed".into(),
                    });
                }
            };
            if secret.is_empty() {
                return Err(WebhookConfigError::Secret {
                    index,
                    url,
                    why: "the secret is empty".into(),
                });
            }
            for event in &w.events {
                if !EVENT_TYPES.iter().any(|t| matches(event, t)) {
                    return Err(WebhookConfigError::Event {
                        index,
                        url,
                        event: event.clone(),
                        known: EVENT_TYPES.join(", "),
                    });
                }
            }
            endpoints.push(Endpoint {
                url,
                secret: secret.into_bytes(),
                events: w.events.clone(),
            });
        }
        Ok(Self {
            endpoints: Arc::new(endpoints),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Queue event `ty` for every endpoint that wants it. `db` must be the transaction that
    /// makes the event, so both commit or neither does.
    pub async fn emit(
        &self,
        db: &impl ConnectionTrait,
        ty: &str,
        data: Value,
    ) -> Result<(), DbErr> {
        debug_assert!(EVENT_TYPES.contains(&ty), "unlisted event type {ty}");
        let targets: Vec<&Endpoint> = self.endpoints.iter().filter(|e| e.wants(ty)).collect();
        if targets.is_empty() {
            return Ok(());
        }
        let id = uuid::Uuid::new_v4().to_string();
        let now = Utc::now();
        let payload = json!({"id": id, "type": ty, "created_at": now, "data": data});
        for e in targets {
            webhook_delivery::ActiveModel {
                event_id: Set(id.clone()),
                event_type: Set(ty.to_string()),
                endpoint: Set(e.url.clone()),
                payload: Set(payload.clone()),
                attempts: Set(0),
                next_attempt_at: Set(Some(now)),
                delivered_at: Set(None),
                last_error: Set(None),
                created_at: Set(now),
                ..Default::default()
            }
            .insert(db)
            .await?;
        }
        Ok(())
    }

    fn secret_for(&self, url: &str) -> Option<&[u8]> {
        self.endpoints
            .iter()
            .find(|e| e.url == url)
            .map(|e| e.secret.as_slice())
    }
}

/// `sha256=HEX` of HMAC-SHA256(`secret`, `"{timestamp}.{body}"`).
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Start one supervised delivery loop per endpoint (none when no endpoint is configured):
/// a slow or dead endpoint delays only its own events.
pub fn spawn(state: web::Data<AppState>) -> Option<tokio::task::JoinHandle<()>> {
    if state.webhooks.is_empty() {
        return None;
    }
    let timeout = Duration::from_secs(state.settings.registry.webhook_timeout_secs.max(1));
    // Signed POSTs are never re-sent elsewhere: a redirect is a failed delivery.
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client");
    // A pass sends at most BATCH rows one after another.
    let stale_after = timeout * (BATCH as u32 + 2) + Duration::from_secs(30);
    let urls: Vec<String> = state
        .webhooks
        .endpoints
        .iter()
        .map(|e| e.url.clone())
        .collect();
    let handles: Vec<_> = urls
        .into_iter()
        .enumerate()
        .map(|(i, url)| {
            let state = state.clone();
            let http = http.clone();
            let supervisor = state.supervisor.clone();
            supervisor.spawn(format!("webhooks[{i}]"), stale_after, move || {
                let state = state.clone();
                let http = http.clone();
                let url = url.clone();
                async move {
                    let n = deliver_due_to(&state, &http, Some(&url)).await?;
                    Ok::<_, DbErr>(super::supervisor::Pass::Sleep(if n == 0 {
                        POLL
                    } else {
                        Duration::ZERO
                    }))
                }
            })
        })
        .collect();
    Some(tokio::spawn(async move {
        // Aborting this task stops every endpoint's loop.
        struct AbortAll(Vec<tokio::task::JoinHandle<()>>);
        impl Drop for AbortAll {
            fn drop(&mut self) {
                for h in &self.0 {
                    h.abort();
                }
            }
        }
        let all = AbortAll(handles);
        std::future::pending::<()>().await;
        drop(all);
    }))
}

/// One pass over every endpoint's due rows (tests and tools; the service runs
/// [`deliver_due_to`] per endpoint).
pub async fn deliver_due(state: &AppState, http: &reqwest::Client) -> Result<usize, DbErr> {
    deliver_due_to(state, http, None).await
}

/// Delete delivered and abandoned rows created before `cutoff`; returns how many went.
pub async fn prune(db: &impl ConnectionTrait, cutoff: chrono::DateTime<Utc>) -> Result<u64, DbErr> {
    Ok(webhook_delivery::Entity::delete_many()
        .filter(Column::NextAttemptAt.is_null())
        .filter(Column::CreatedAt.lt(cutoff))
        .exec(db)
        .await?
        .rows_affected)
}

/// One pass: claim and send the due deliveries (of one endpoint, or all). Returns how many
/// were attempted.
pub async fn deliver_due_to(
    state: &AppState,
    http: &reqwest::Client,
    endpoint: Option<&str>,
) -> Result<usize, DbErr> {
    let cfg = &state.settings.registry;
    let now = Utc::now();
    let mut due = webhook_delivery::Entity::find().filter(Column::NextAttemptAt.lte(now));
    if let Some(url) = endpoint {
        due = due.filter(Column::Endpoint.eq(url));
    }
    let due = due
        .order_by_asc(Column::NextAttemptAt)
        .limit(BATCH)
        .all(&state.db)
        .await?;
    let mut attempted = 0;
    for d in due {
        // Claim the attempt: bump `attempts` from the value read and push the next attempt
        // past this one's timeout, so another replica neither sends it concurrently nor loses
        // it if this one dies mid-send.
        let attempt = d.attempts + 1;
        let lease = now + Duration::from_secs(cfg.webhook_timeout_secs.max(1) * 2);
        let claimed = webhook_delivery::Entity::update_many()
            .col_expr(Column::Attempts, Expr::value(attempt))
            .col_expr(Column::NextAttemptAt, Expr::value(Some(lease)))
            .filter(Column::Id.eq(d.id))
            .filter(Column::Attempts.eq(d.attempts))
            .exec(&state.db)
            .await?;
        if claimed.rows_affected != 1 {
            continue;
        }
        attempted += 1;
        let outcome = post(http, &state.webhooks, &d).await;
        let done = webhook_delivery::Entity::update_many()
            .filter(Column::Id.eq(d.id))
            .filter(Column::Attempts.eq(attempt));
        let done = match outcome {
            Ok(()) => {
                state
                    .metrics
                    .webhook_deliveries
                    .with_label_values(&["delivered"])
                    .inc();
                done.col_expr(Column::DeliveredAt, Expr::value(Some(Utc::now())))
                    .col_expr(
                        Column::NextAttemptAt,
                        Expr::value(None::<chrono::DateTime<Utc>>),
                    )
                    .col_expr(Column::LastError, Expr::value(None::<String>))
            }
            Err(why) if attempt >= cfg.webhook_max_attempts.max(1) as i32 => {
                state
                    .metrics
                    .webhook_deliveries
                    .with_label_values(&["gave_up"])
                    .inc();
                tracing::warn!(event = %d.event_id, endpoint = %d.endpoint, attempts = attempt,
                    error = %why, "webhook delivery given up");
                done.col_expr(
                    Column::NextAttemptAt,
                    Expr::value(None::<chrono::DateTime<Utc>>),
                )
                .col_expr(Column::LastError, Expr::value(Some(why)))
            }
            Err(why) => {
                state
                    .metrics
                    .webhook_deliveries
                    .with_label_values(&["failed"])
                    .inc();
                let next = Utc::now() + backoff(cfg.webhook_retry_base_ms, attempt);
                done.col_expr(Column::NextAttemptAt, Expr::value(Some(next)))
                    .col_expr(Column::LastError, Expr::value(Some(why)))
            }
        };
        done.exec(&state.db).await?;
    }
    Ok(attempted)
}

/// `base · 2^(attempt-1)`, at most [`MAX_BACKOFF`].
fn backoff(base_ms: u64, attempt: i32) -> Duration {
    let factor = 1u64 << (attempt.clamp(1, 20) - 1);
    Duration::from_millis(base_ms.saturating_mul(factor)).min(MAX_BACKOFF)
}

async fn post(
    http: &reqwest::Client,
    hooks: &Webhooks,
    d: &webhook_delivery::Model,
) -> Result<(), String> {
    let secret = hooks
        .secret_for(&d.endpoint)
        .ok_or("the endpoint is no longer configured")?;
    let body = serde_json::to_vec(&d.payload).map_err(|e| e.to_string())?;
    let ts = Utc::now().timestamp();
    let res = http
        .post(&d.endpoint)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("x-loraops-event", &d.event_type)
        .header("x-loraops-delivery", &d.event_id)
        .header("x-loraops-timestamp", ts.to_string())
        .header("x-loraops-signature", signature(secret, ts, &body))
        .body(body)
        .send()
        .await
        .map_err(|e| format!("{e}"))?;
    if res.status().is_success() {
        Ok(())
    } else {
        Err(format!("answered {}", res.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(url: &str, secret: Option<&str>, events: &[&str]) -> WebhookSettings {
        WebhookSettings {
            url: url.into(),
            secret: secret.map(str::to_string),
            secret_env: None,
            events: events.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn patterns_select_event_types() {
        assert!(matches("*", "rollout.promote"));
        assert!(matches("rollout.*", "rollout.promote"));
        assert!(!matches("rollout.*", "version.created"));
        assert!(matches("version.created", "version.created"));
        assert!(!matches("version.*", "versions.created"));
    }

    #[test]
    fn bad_endpoints_are_refused_with_their_index() {
        let cases = [
            (hook("ftp://x/y", Some("k"), &["*"]), "webhooks[0]: url"),
            (hook("not a url", Some("k"), &["*"]), "webhooks[0]: url"),
            (hook("http://x/y", None, &["*"]), "needs secret"),
            (hook("http://x/y", Some(""), &["*"]), "empty"),
            (
                hook("http://x/y", Some("k"), &["rollout.promoted"]),
                "unknown event \"rollout.promoted\"",
            ),
            (hook("http://x/y", Some("k"), &["model.*"]), "unknown event"),
        ];
        for (w, needle) in cases {
            let err = Webhooks::from_settings(&[w])
                .err()
                .expect("refused")
                .to_string();
            assert!(err.contains(needle), "{err}");
        }
        assert!(
            Webhooks::from_settings(&[hook("https://h.example/x", Some("k"), &["rollout.*"])])
                .is_ok()
        );
    }

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_and_body() {
        // Computed independently (Python's hmac) with the key of RFC 4231's test case 2.
        let body = b"what do ya want for nothing?";
        assert_eq!(
            signature(b"Jefe", 1_700_000_000, body),
            "sha256=1cdd0650c8be1cb0974b1788d458b1e781206cfef59b85faafc582d2e182c57e"
        );
        assert_ne!(
            signature(b"Jefe", 1_700_000_001, body),
            signature(b"Jefe", 1_700_000_000, body)
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1000, 1), Duration::from_secs(1));
        assert_eq!(backoff(1000, 4), Duration::from_secs(8));
        assert_eq!(backoff(1000, 30), MAX_BACKOFF);
    }
}
