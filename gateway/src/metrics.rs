//! Prometheus metrics of the gateway, per adapter version and arm.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub ttft: HistogramVec,
    pub overhead: Histogram,
    pub tokens: IntCounterVec,
    pub engine_load_seconds: Histogram,
    pub engines_loaded: IntGauge,
    pub registry_up: IntGauge,
    pub routing_revision: IntGauge,
    pub rejected: IntCounterVec,
    /// Online judge outcomes: scored, failed, skipped (the judge was busy).
    pub judged: IntCounterVec,
    /// Shadow-phase mirroring outcomes: mirrored, failed, skipped (too many in flight).
    pub shadowed: IntCounterVec,
}

const LABELS: [&str; 3] = ["adapter", "version", "arm"];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let latency_buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let requests = IntCounterVec::new(
            Opts::new(
                "loraops_gateway_requests_total",
                "Inference requests by adapter version, arm and HTTP status",
            ),
            &["adapter", "version", "arm", "status"],
        )
        .expect("metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "loraops_gateway_request_duration_seconds",
                "Time from request to last byte",
            )
            .buckets(latency_buckets.clone()),
            &LABELS,
        )
        .expect("metric");
        let ttft = HistogramVec::new(
            HistogramOpts::new(
                "loraops_gateway_time_to_first_token_seconds",
                "Time from request to the first generated text",
            )
            .buckets(latency_buckets),
            &LABELS,
        )
        .expect("metric");
        let overhead = Histogram::with_opts(
            HistogramOpts::new(
                "loraops_gateway_overhead_seconds",
                "Request time spent outside the engine (validation, routing, serialisation)",
            )
            .buckets(vec![
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05,
            ]),
        )
        .expect("metric");
        let tokens = IntCounterVec::new(
            Opts::new(
                "loraops_gateway_tokens_total",
                "Tokens by adapter version, arm and kind (prompt, completion)",
            ),
            &["adapter", "version", "arm", "kind"],
        )
        .expect("metric");
        let engine_load_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "loraops_gateway_engine_load_seconds",
                "Time to load an engine (base, or base merged with one adapter version)",
            )
            .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]),
        )
        .expect("metric");
        let engines_loaded =
            IntGauge::new("loraops_gateway_engines_loaded", "Engines loaded").expect("metric");
        let registry_up = IntGauge::new(
            "loraops_gateway_registry_up",
            "1 when the last routing poll reached the registry",
        )
        .expect("metric");
        let routing_revision = IntGauge::new(
            "loraops_gateway_routing_revision",
            "Revision of the routing table being served",
        )
        .expect("metric");
        let rejected = IntCounterVec::new(
            Opts::new(
                "loraops_gateway_rejected_total",
                "Requests refused before inference, by reason",
            ),
            &["reason"],
        )
        .expect("metric");
        let judged = IntCounterVec::new(
            Opts::new(
                "loraops_gateway_judge_total",
                "Answers sampled for the online judge, by outcome",
            ),
            &["outcome"],
        )
        .expect("metric");
        let shadowed = IntCounterVec::new(
            Opts::new(
                "loraops_gateway_shadow_total",
                "Stable requests mirrored to a shadow-phase candidate, by outcome",
            ),
            &["outcome"],
        )
        .expect("metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(judged.clone()),
            Box::new(shadowed.clone()),
            Box::new(latency.clone()),
            Box::new(ttft.clone()),
            Box::new(overhead.clone()),
            Box::new(tokens.clone()),
            Box::new(engine_load_seconds.clone()),
            Box::new(engines_loaded.clone()),
            Box::new(registry_up.clone()),
            Box::new(routing_revision.clone()),
            Box::new(rejected.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        Self {
            registry,
            requests,
            latency,
            ttft,
            overhead,
            tokens,
            engine_load_seconds,
            engines_loaded,
            registry_up,
            routing_revision,
            rejected,
            judged,
            shadowed,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
