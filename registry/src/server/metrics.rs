//! Prometheus metrics of the registry: HTTP requests and latency by route and status, upload
//! bytes, versions created, rollout transitions (rollbacks by adapter, for alerting), webhook
//! deliveries.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

use super::AppState;

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub upload_bytes: IntCounter,
    pub versions_created: IntCounter,
    /// Rollout transitions by action (start, advance, promote, rollback, abort, …).
    pub rollout_transitions: IntCounterVec,
    /// Rollbacks by adapter: what the "canary rolled back" alert watches.
    pub rollouts_rolled_back: IntCounterVec,
    /// Webhook delivery attempts by result (delivered, failed, gave_up).
    pub webhook_deliveries: IntCounterVec,
    /// Rollout analyses that panicked (caught; the rollout is retried next tick).
    pub rollout_panics: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "loraops_registry_http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["route", "method", "status"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "loraops_registry_http_request_duration_seconds",
                "HTTP request latency by route and method",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                120.0,
            ]),
            &["route", "method"],
        )
        .expect("valid metric");
        let upload_bytes = IntCounter::new(
            "loraops_registry_upload_bytes_total",
            "Bytes received in version uploads",
        )
        .expect("valid metric");
        let versions_created = IntCounter::new(
            "loraops_registry_versions_created_total",
            "Adapter versions created",
        )
        .expect("valid metric");
        let rollout_transitions = IntCounterVec::new(
            Opts::new(
                "loraops_registry_rollout_transitions_total",
                "Rollout transitions by action, made by this replica",
            ),
            &["action"],
        )
        .expect("valid metric");
        let rollouts_rolled_back = IntCounterVec::new(
            Opts::new(
                "loraops_registry_rollouts_rolled_back_total",
                "Canaries the controller of this replica rolled back, by adapter",
            ),
            &["adapter"],
        )
        .expect("valid metric");
        let webhook_deliveries = IntCounterVec::new(
            Opts::new(
                "loraops_registry_webhook_deliveries_total",
                "Webhook delivery attempts made by this replica, by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let rollout_panics = IntCounter::new(
            "loraops_registry_rollout_analysis_panics_total",
            "Rollout analyses that panicked and were retried",
        )
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(rollout_panics.clone()),
            Box::new(rollout_transitions.clone()),
            Box::new(rollouts_rolled_back.clone()),
            Box::new(webhook_deliveries.clone()),
            Box::new(latency.clone()),
            Box::new(upload_bytes.clone()),
            Box::new(versions_created.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Self {
            registry,
            requests,
            latency,
            upload_bytes,
            versions_created,
            rollout_transitions,
            rollouts_rolled_back,
            webhook_deliveries,
            rollout_panics,
        }
    }

    pub fn render(&self) -> String {
        let enc = prometheus::TextEncoder::new();
        enc.encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The method as a label: the standard methods by name, anything else as `other`, so a
/// client inventing method tokens cannot create series without bound.
fn method_label(m: &actix_web::http::Method) -> String {
    use actix_web::http::Method;
    let known = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
    ];
    if known.contains(m) {
        m.as_str().to_string()
    } else {
        "other".to_string()
    }
}

/// Middleware: count and time every request under its route pattern (not its raw path, so
/// label cardinality stays bounded).
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let start = std::time::Instant::now();
    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
    let method = method_label(req.method());
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let res = next.call(req).await?;
    if let Some(state) = state {
        let status = res.status().as_u16().to_string();
        state
            .metrics
            .requests
            .with_label_values(&[&route, &method, &status])
            .inc();
        state
            .metrics
            .latency
            .with_label_values(&[&route, &method])
            .observe(start.elapsed().as_secs_f64());
    }
    Ok(res)
}
