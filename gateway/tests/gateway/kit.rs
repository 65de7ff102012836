//! Test data shared by the gateway's tests and its benchmark programs (`examples/` include this
//! file with `#[path]`): evidence that passes the default gate. Random PEFT adapters come from
//! the shared test kit (`loraops-testkit`), as the registry's and the end-to-end tests' do.

use loraops_registry::api::{
    Comparison, EngineIdentity, Name, NewEvidence, NewSuite, SuiteManifest, SuiteRef,
};
use loraops_registry::client::RegistryClient;
use serde_json::Value;

/// The one-case smoke suite evidence cites (the registry must hold a suite to take evidence).
pub async fn smoke_suite(c: &RegistryClient) -> SuiteRef {
    let manifest = SuiteManifest {
        name: Name::parse("smoke").unwrap(),
        version: "1".into(),
        description: None,
        scorer: serde_json::json!({"type": "contains"}),
        thresholds: vec![loraops_registry::api::SuiteThreshold {
            metric: "accuracy".into(),
            op: Comparison::Ge,
            value: 0.0,
        }],
        decoding: Value::Null,
    };
    let pushed = c
        .push_suite(&NewSuite {
            manifest,
            cases: "{\"prompt\": \"hi\", \"expected\": \"\"}\n".into(),
            digest: None,
        })
        .await
        .unwrap();
    SuiteRef {
        name: "smoke".into(),
        version: Some("1".into()),
        digest: pushed.suite.digest,
    }
}

/// Evidence for `adapter@version`'s digest on the smoke suite, enough for the built-in "any
/// evidence" gate.
pub async fn post_evidence(c: &RegistryClient, adapter: &str, version: u32, producer: &str) {
    let v = c.version(adapter, version).await.unwrap();
    let now = chrono::Utc::now();
    let suite = smoke_suite(c).await;
    c.post_evidence(
        adapter,
        version,
        &NewEvidence {
            adapter_digest: v.digest,
            suite,
            engine: EngineIdentity {
                engine: "mistral.rs".into(),
                engine_version: loraops_gateway::engine::mistral::MISTRALRS_VERSION.into(),
                model_digest: None,
                decoding: Value::Null,
            },
            metrics: [("accuracy".to_string(), 1.0)].into(),
            cases: 1,
            cases_digest: None,
            produced_by: Some(producer.into()),
            started_at: now,
            finished_at: now,
        },
    )
    .await
    .unwrap();
}
