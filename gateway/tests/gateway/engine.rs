//! The embedded engine on its own: adapters pulled into the hub-cache layout, merged at load.

use futures_util::StreamExt;
use loraops_gateway::adapters::{AdapterError, AdapterStore};
use loraops_gateway::engine::mistral::{LoadSpec, MistralEngine};
use loraops_gateway::engine::{Engine, Event, GenerateRequest, Prompt, Sampling};
use loraops_registry::client::no_progress;

use crate::helpers::{ADAPTER, BASE, fixture, spawn_registry};

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
        }
    }
    panic!("stream ended without Done");
}

/// mistral.rs 0.8.1 remembers applied adapters per thread: without clearing, the last "base"
/// load would come out as base + v1 + v2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known failure: a mistral.rs engine with a merged adapter closes its response stream without finishing (issue 5); base-model serving passes"]
async fn base_v1_v2_base_loaded_in_sequence_each_give_their_own_output() {
    let f = fixture();
    let reg = spawn_registry().await;
    let store = AdapterStore::new(f.hub_cache.clone(), Some(reg.client()));
    let name = ADAPTER.parse().unwrap();
    let mut ids = Vec::new();
    for v in reg.client().versions(ADAPTER).await.unwrap() {
        ids.push(store.ensure(&name, v.version, &v.digest).await.unwrap());
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
    let err = store
        .ensure(&"dora-bot".parse().unwrap(), 1, &v.digest)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AdapterError::Unsupported { message, .. } if message.contains("use_dora")),
        "{err}"
    );
    assert!(
        !f.hub_cache
            .join(format!(
                "models--loraops--{}",
                v.digest.trim_start_matches("sha256:")
            ))
            .exists()
    );

    let wrong = "sha256:".to_string() + &"0".repeat(64);
    let err = store
        .ensure(&ADAPTER.parse().unwrap(), 1, &wrong)
        .await
        .unwrap_err();
    assert!(matches!(err, AdapterError::DigestMismatch { .. }), "{err}");
}
