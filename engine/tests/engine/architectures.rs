//! Architectures beyond Llama/Mistral/Qwen2: Qwen3 is served (its q/k norms) with
//! transformers' logits at every position; Gemma 2/3 are refused naming what is missing.

use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp};
use loraops_engine::EngineError;
use loraops_engine::base::{Base, Quantize};
use loraops_engine::forward::{Segment, step};
use loraops_engine::kv::{KvCache, KvShape};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/fixtures")
        .join(name)
}

#[test]
fn qwen3_decode_logits_match_transformers() {
    let dir = fixture("qwen3-tiny");
    let base = Base::load(&dir, Quantize::None).unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids: Vec<u32> = reference["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let expected = reference["logits"].i(0).unwrap();
    let c = &base.config;
    let mut cache = KvCache::new(
        KvShape {
            layers: c.num_hidden_layers,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        },
        ids.len(),
    );
    let mut worst = 0f32;
    for (i, t) in ids.iter().enumerate() {
        let mut segs = [Segment {
            tokens: std::slice::from_ref(t),
            cache: &mut cache,
            adapter: None,
            logits: true,
        }];
        let got = step(&base, &mut segs).remove(0);
        let want: Vec<f32> = expected.i(i).unwrap().to_vec1().unwrap();
        for (a, b) in got.iter().zip(&want) {
            worst = worst.max((a - b).abs());
        }
    }
    println!("qwen3-tiny engine decode: max |engine - transformers| = {worst:e}");
    assert!(worst <= 1e-4, "{worst}");
}

#[test]
fn gemma_is_refused_naming_what_is_missing() {
    for name in ["gemma2-tiny", "gemma3-tiny"] {
        let err = match Base::load(&fixture(name), Quantize::None) {
            Err(e) => e,
            Ok(_) => panic!("{name} was loaded"),
        };
        assert!(
            matches!(err, EngineError::UnsupportedArchitecture { .. }),
            "{name}: {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("Gemma") && msg.contains("sliding-window attention"),
            "{name}: {msg}"
        );
    }
    let msg = Base::load(&fixture("gemma2-tiny"), Quantize::None)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("soft-capping"), "{msg}");
}
