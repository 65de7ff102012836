//! Test data shared by the gateway's tests and its benchmark programs (`examples/` include this
//! file with `#[path]`): random PEFT adapters for a base model, and evidence that passes the
//! default gate.

use std::collections::BTreeMap;
use std::path::Path;

use loraops_registry::api::{
    Comparison, EngineIdentity, Name, NewEvidence, NewSuite, SuiteManifest, SuiteRef,
};
use loraops_registry::client::RegistryClient;
use loraops_registry::peft::AdapterConfig;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;

/// A LoRA adapter with uniform random A and B in ±`amplitude`/2 on q_proj and v_proj.
pub struct RandomAdapter<'a> {
    pub base_model: &'a str,
    pub seed: u64,
    pub r: usize,
    pub alpha: f64,
    pub amplitude: f32,
    pub dora: bool,
}

/// Write `a` into `dir` for the base whose `config.json` is `cfg`.
pub fn write_random_adapter(dir: &Path, cfg: &Value, a: &RandomAdapter<'_>) {
    std::fs::create_dir_all(dir).unwrap();
    let dim = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let (hidden, layers) = (dim("hidden_size"), dim("num_hidden_layers"));
    let (heads, kv) = (dim("num_attention_heads"), dim("num_key_value_heads"));
    let head_dim = hidden / heads;
    // xorshift: the same bytes for a seed on every machine, without a rand dependency.
    let mut state = a.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * a.amplitude
    };
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for l in 0..layers {
        for (m, out) in [("q_proj", heads * head_dim), ("v_proj", kv * head_dim)] {
            for (ab, shape) in [("A", vec![a.r, hidden]), ("B", vec![out, a.r])] {
                let n: usize = shape.iter().product();
                let bytes: Vec<u8> = (0..n).flat_map(|_| next().to_le_bytes()).collect();
                tensors.insert(
                    format!("base_model.model.model.layers.{l}.self_attn.{m}.lora_{ab}.weight"),
                    (shape, bytes),
                );
            }
        }
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (s, b))| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
    let mut c = AdapterConfig::new_lora(
        a.base_model,
        a.r,
        a.alpha,
        vec!["q_proj".into(), "v_proj".into()],
    );
    c.use_dora = a.dora;
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec_pretty(&c).unwrap(),
    )
    .unwrap();
}

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
