//! The mistral.rs engine on its own: adapters pulled into the hub-cache layout, merged at load.

use futures_util::StreamExt;
use loraops_gateway::adapters::{AdapterError, AdapterStore};
use loraops_gateway::engine::mistral::{LoadSpec, MistralEngine};
use loraops_gateway::engine::{Engine, Event, GenerateRequest, Prompt, Sampling};
use loraops_gateway::settings::EngineKind;
use loraops_registry::client::no_progress;

use crate::helpers::{ADAPTER, BASE, TestGateway, fixture, spawn_gateway_with, spawn_registry};

async fn greedy(e: &MistralEngine) -> String {
    let mut events = e.generate(GenerateRequest {
        prompt: Prompt::Text("The capital of France is".into()),
        sampling: Sampling {
            max_tokens: 8,
            ..Sampling::default()
        },
    });
    let mut text = String::new();
    while let Some(ev) = events.next().await {
        match ev.unwrap() {
            Event::Delta(d) => text.push_str(&d),
            Event::Done { usage, .. } => {
                assert!(usage.completion_tokens > 0 && usage.prompt_tokens > 0);
                return text;
            }
            Event::Logprobs(_) => {}
        }
    }
    panic!("stream ended without Done");
}

/// mistral.rs 0.8.1 remembers applied adapters per thread: without clearing, the last "base"
/// load would come out as base + v1 + v2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_v1_v2_base_loaded_in_sequence_each_give_their_own_output() {
    let f = fixture();
    let reg = spawn_registry().await;
    let store = AdapterStore::new(f.hub_cache.clone(), Some(reg.client()));
    let name = ADAPTER.parse().unwrap();
    let mut ids = Vec::new();
    for v in reg.client().versions(ADAPTER).await.unwrap() {
        store.ensure(&name, v.version, &v.digest).await.unwrap();
        ids.push(AdapterStore::hub_id(&v.digest));
    }
    assert_eq!(ids.len(), 2);
    let base_dir = std::fs::canonicalize(&f.base).unwrap();
    let mut outs = Vec::new();
    for id in [None, Some(ids[0].clone()), Some(ids[1].clone()), None] {
        let e = MistralEngine::load(LoadSpec {
            base_dir: base_dir.clone(),
            adapter_id: id,
            dtype: mistralrs::ModelDType::F32,
            max_num_seqs: 4,
            isq: None,
        })
        .await
        .unwrap();
        outs.push(greedy(&e).await);
    }
    assert!(!outs[0].is_empty());
    assert_eq!(
        outs[0], outs[3],
        "base after adapters must still be the base"
    );
    assert_ne!(outs[0], outs[1], "v1 must change the output");
    assert_ne!(outs[0], outs[2], "v2 must change the output");
    assert_ne!(outs[1], outs[2], "v2 must not inherit v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_mistralrs_cannot_apply_are_refused_and_digests_are_checked() {
    let f = fixture();
    let reg = spawn_registry().await;
    let client = reg.client();
    client
        .push_dir(&f.dora, "dora-bot", Some(BASE), no_progress())
        .await
        .unwrap();
    let v = client.version("dora-bot", 1).await.unwrap();
    let store = AdapterStore::new(f.hub_cache.clone(), Some(client.clone()));
    let name = "dora-bot".parse().unwrap();
    let dir = store.ensure(&name, 1, &v.digest).await.unwrap();
    let err = AdapterStore::check_mergeable(&dir, &name, 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AdapterError::Unsupported { message, .. } if message.contains("use_dora")),
        "{err}"
    );
    // Through the gateway, the version answers 503 naming the cause.
    let gw = spawn_gateway_with(Some(&reg), |s| s.engine = EngineKind::Mistralrs).await;
    let res = gw
        .post(
            "/v1/chat/completions",
            &serde_json::json!({"model": "dora-bot@1", "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(res.status(), 503);
    assert!(res.text().await.unwrap().contains("use_dora"));

    let wrong = "sha256:".to_string() + &"0".repeat(64);
    let err = store
        .ensure(&ADAPTER.parse().unwrap(), 1, &wrong)
        .await
        .unwrap_err();
    assert!(matches!(err, AdapterError::DigestMismatch { .. }), "{err}");
}

/// An adapter made by Python PEFT, pushed to the registry and served through the gateway,
/// gives transformers + PEFT's greedy text (recorded by scripts/reference/gateway_reference.py);
/// so does the base model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_peft_adapter_serves_what_transformers_and_peft_generate() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("reference.json")).unwrap()).unwrap();
    let reg = spawn_registry().await;
    let client = reg.client();
    client
        .push_dir(
            &fixtures.join("peft-adapter"),
            "peft-bot",
            Some(BASE),
            no_progress(),
        )
        .await
        .unwrap();
    reg.route("peft-bot", Some(1), None).await;
    let rev = client.routing(None, 0).await.unwrap().revision;
    let gw = spawn_gateway_with(Some(&reg), |s| s.engine = EngineKind::Mistralrs).await;
    gw.wait_revision(rev).await;
    let max_tokens = reference["max_new_tokens"].as_u64().unwrap();
    let mut changed = 0;
    for (model, key) in [(BASE, "base"), ("peft-bot", "adapter")] {
        for case in reference[key].as_array().unwrap() {
            let res = gw
                .post(
                    "/v1/chat/completions",
                    &serde_json::json!({"model": model, "temperature": 0, "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": case["prompt"]}]}),
                )
                .await;
            assert_eq!(res.status(), 200);
            let v: serde_json::Value = res.json().await.unwrap();
            let got = v["choices"][0]["message"]["content"].as_str().unwrap();
            // A stream that ends inside a multi-byte character drops the partial character.
            let want = case["text"].as_str().unwrap().trim_end_matches('\u{FFFD}');
            assert_eq!(got, want, "{model}: {}", case["prompt"]);
            if key == "adapter" {
                let i = reference["adapter"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .position(|c| c == case)
                    .unwrap();
                changed += usize::from(reference["base"][i]["ids"] != case["ids"]);
            }
        }
    }
    assert!(changed > 0, "the adapter must change some greedy output");
}

/// A transformers 5.x base (rope_theta only under rope_parameters) serves, quantised in place
/// with ISQ; and under a memory budget that holds only the base, the base keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transformers_5_base_serves_with_isq_and_under_a_memory_budget() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join(BASE);
    std::fs::create_dir_all(&base).unwrap();
    for e in std::fs::read_dir(&f.base).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), base.join(e.file_name())).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base.join("config.json")).unwrap()).unwrap();
    let theta = cfg.as_object_mut().unwrap().remove("rope_theta").unwrap();
    cfg.as_object_mut().unwrap().remove("rope_scaling");
    cfg["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": theta});
    std::fs::write(base.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let f32_engine = loraops_gateway::base::engine_bytes(
        loraops_gateway::base::parameters(&base).unwrap(),
        "f32",
        None,
    );
    assert!(
        f32_engine < (1 << 20) && 2 * f32_engine > (1 << 20),
        "one f32 engine of the tiny model fits 1 MiB, two do not: {f32_engine}"
    );

    let reg = spawn_registry().await;
    reg.route(ADAPTER, Some(1), None).await;
    let rev = reg.client().routing(None, 0).await.unwrap().revision;
    let serve = |gw: &TestGateway, model: &'static str| {
        let gw = gw.clone();
        async move {
            let res = gw
                .post(
                    "/v1/chat/completions",
                    &serde_json::json!({"model": model, "max_tokens": 4, "temperature": 0,
                        "messages": [{"role": "user", "content": "hi"}]}),
                )
                .await;
            assert_eq!(res.status(), 200, "{model}");
            let v: serde_json::Value = res.json().await.unwrap();
            assert!(
                v["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
                "{v}"
            );
        }
    };
    let quantised = spawn_gateway_with(Some(&reg), |s| {
        s.engine = EngineKind::Mistralrs;
        s.base_model_dir = base.clone();
        s.isq = Some("q8_0".into());
    })
    .await;
    quantised.wait_revision(rev).await;
    for model in [BASE, "bot@1"] {
        serve(&quantised, model).await;
    }

    // A budget that holds one engine holds the base, which is never evicted: the routed
    // version is refused by name, the base keeps serving.
    let budgeted = spawn_gateway_with(Some(&reg), |s| {
        s.engine = EngineKind::Mistralrs;
        s.base_model_dir = base.clone();
        s.memory_budget_mb = Some(1);
    })
    .await;
    budgeted.wait_revision(rev).await;
    serve(&budgeted, BASE).await;
    let res = budgeted
        .post(
            "/v1/chat/completions",
            &serde_json::json!({"model": "bot@1", "max_tokens": 4,
                "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(res.status(), 503);
    assert!(res.text().await.unwrap().contains("none can be evicted"));
    let metrics = budgeted.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("loraops_gateway_engines_loaded 1"),
        "{metrics}"
    );
    serve(&budgeted, BASE).await;
    // The user's directory is untouched; the engines loaded a normalised view of it.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("rope_theta").is_none());
}
