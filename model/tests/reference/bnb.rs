//! bitsandbytes 4-bit checkpoints (`*-bnb-4bit`) against what transformers + bitsandbytes
//! write and compute: `scripts/reference/bnb_reference.py` quantised a tiny Llama
//! (`llama-bnb4/source`) with `load_in_4bit` NF4, with and without double quantisation, saved
//! both (`nf4-dq`, `nf4`) and recorded their logits.

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use loraops_model::bnb::quantize_dir;
use loraops_model::linear::frozen::FrozenWeight;
use loraops_model::linear::nf4::{Absmax, dynamic_map};
use loraops_model::llama::{BaseFormat, Llama, LoadOptions};
use serde_json::Value;

use crate::{fixture, logits_diff, lora_steps, max_abs_diff, reference_ids};

fn root() -> std::path::PathBuf {
    fixture("llama-bnb4")
}

fn open(dir: &Path) -> MmapedSafetensors {
    let files = loraops_model::llama::weight_files(dir).unwrap();
    unsafe { MmapedSafetensors::multi(&files).unwrap() }
}

fn keys(st: &MmapedSafetensors) -> BTreeSet<String> {
    st.tensors().into_iter().map(|(k, _)| k).collect()
}

fn floats(st: &MmapedSafetensors, name: &str) -> Vec<f32> {
    st.load(name, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn bytes(st: &MmapedSafetensors, name: &str) -> Vec<u8> {
    st.get(name).unwrap().data().to_vec()
}

fn config(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn bnb_checkpoints_load_as_stored_and_match_transformers_logits() {
    for name in ["nf4-dq", "nf4"] {
        let dir = root().join(name);
        // f32 asked: the stored NF4 is kept anyway, never read as plain weights.
        let model = Llama::load(&dir, &LoadOptions::default()).unwrap();
        assert!(model.config.quantization.is_some());
        let down = &model.layers[0].mlp.down_proj.base.weight;
        let FrozenWeight::Nf4(q) = down else {
            panic!("{name}: down_proj is not NF4");
        };
        assert_eq!(q.shape, [72, 300]);
        assert_eq!(
            matches!(q.absmax, Absmax::Double { .. }),
            name == "nf4-dq",
            "{name}"
        );
        let d = logits_diff(&model, &root(), &format!("logits.{name}"), name);
        assert!(d <= 1e-4, "{name}: {d}");
    }
}

#[test]
fn lora_trains_on_a_bnb_checkpoint() {
    lora_steps(&root().join("nf4-dq"), &reference_ids(&root()), "nf4-dq");
}

/// `quantize_dir` writes the tensors, state and config transformers + bitsandbytes write.
#[test]
fn model_quantize_writes_the_bitsandbytes_form() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, double) in [("nf4", false), ("nf4-dq", true)] {
        let out = tmp.path().join(name);
        let report = quantize_dir(&root().join("source"), &out, double, u64::MAX).unwrap();
        assert_eq!((report.quantized, report.kept), (14, 7), "{name}");
        assert_eq!(report.files, vec!["model.safetensors".to_string()]);
        let (ours, theirs) = (open(&out), open(&root().join(name)));
        assert_eq!(keys(&ours), keys(&theirs), "{name}: tensor names");
        for key in keys(&theirs) {
            let (a, b) = (ours.get(&key).unwrap(), theirs.get(&key).unwrap());
            assert_eq!(a.dtype(), b.dtype(), "{key}");
            if key.ends_with("quant_state.bitsandbytes__nf4") {
                // JSON bytes: their length follows the offset's digits.
                let mut a: Value = serde_json::from_slice(a.data()).unwrap();
                let b: Value = serde_json::from_slice(b.data()).unwrap();
                // The absmax mean: summed in f64 here, in f32 by PyTorch.
                if let Some(off) = b.get("nested_offset").and_then(Value::as_f64) {
                    let ours = a["nested_offset"].as_f64().unwrap();
                    assert!((ours - off).abs() <= 1e-6 * off.abs(), "{key}");
                    a["nested_offset"] = b["nested_offset"].clone();
                }
                assert_eq!(a, b, "{key}");
                continue;
            }
            assert_eq!(a.shape(), b.shape(), "{key}");
            if double && key.ends_with(".absmax") {
                // bitsandbytes' CPU search picks a neighbour of the nearest 8-bit code for a
                // fraction of the values: at most one step, and rarely.
                let (a, b) = (a.data(), b.data());
                let off: Vec<_> = a.iter().zip(b).filter(|(x, y)| x != y).collect();
                assert!(off.iter().all(|(x, y)| x.abs_diff(**y) == 1), "{key}");
                assert!(off.len() * 50 <= a.len().max(50), "{key}: {}", off.len());
            } else if key.ends_with(".nested_absmax") {
                for (x, y) in floats(&ours, &key).iter().zip(floats(&theirs, &key)) {
                    assert!((x - y).abs() <= 1e-6 * y.abs(), "{key}");
                }
            } else {
                // Codes, plain absmax, code books and every unquantised tensor: bit for bit.
                assert_eq!(a.data(), b.data(), "{key}");
            }
        }
        // The same quantization_config, so transformers loads the directory as its own.
        assert_eq!(
            config(&out)["quantization_config"],
            config(&root().join(name))["quantization_config"],
            "{name}"
        );
        let model = Llama::load(&out, &LoadOptions::default()).unwrap();
        let d = logits_diff(&model, &root(), &format!("logits.{name}"), name);
        // Plain NF4 is bit for bit; the few absmax codes one step off move the logits a little.
        let bound = if double { 5e-3 } else { 1e-4 };
        assert!(d <= bound, "{name}: {d}");
    }
    assert_eq!(
        bytes(
            &open(&tmp.path().join("nf4-dq")),
            "model.layers.1.mlp.up_proj.weight.nested_quant_map"
        ),
        dynamic_map()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<_>>()
    );
}

/// Quantising while loading (`--quantize nf4`) and loading what `model quantize` wrote hold the
/// same weights.
#[test]
fn quantize_on_load_equals_the_written_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    quantize_dir(&root().join("source"), &out, true, u64::MAX).unwrap();
    let opts = LoadOptions {
        format: BaseFormat::Nf4,
        ..LoadOptions::default()
    };
    let on_load = Llama::load(&root().join("source"), &opts).unwrap();
    let written = Llama::load(&out, &LoadOptions::default()).unwrap();
    let ids = reference_ids(&root());
    let (a, b) = (
        on_load.logits(&ids, None).unwrap(),
        written.logits(&ids, None).unwrap(),
    );
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn shards_and_their_index_load_like_one_file() {
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    let many = tmp.path().join("many");
    quantize_dir(&root().join("source"), &one, true, u64::MAX).unwrap();
    let report = quantize_dir(&root().join("source"), &many, true, 40_000).unwrap();
    assert!(report.files.len() > 2, "{:?}", report.files);
    assert!(many.join("model.safetensors.index.json").exists());
    assert_eq!(keys(&open(&one)), keys(&open(&many)));
    // A weight's codes and state sit in one shard.
    let index: Value =
        serde_json::from_slice(&std::fs::read(many.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    for (name, file) in map {
        if let Some((weight, _)) = name.split_once(".weight.") {
            assert_eq!(&map[&format!("{weight}.weight")], file, "{name}");
        }
    }
    let ids = reference_ids(&root());
    let a = Llama::load(&one, &LoadOptions::default()).unwrap();
    let b = Llama::load(&many, &LoadOptions::default()).unwrap();
    assert_eq!(
        max_abs_diff(
            &a.logits(&ids, None).unwrap(),
            &b.logits(&ids, None).unwrap()
        ),
        0.0
    );
}

/// What cannot be loaded right is refused with a message that names it.
#[test]
fn unsupported_quantisations_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (r#"{"quant_method": "gptq", "bits": 4}"#, "\"gptq\""),
        (
            r#"{"quant_method": "bitsandbytes", "load_in_8bit": true}"#,
            "8-bit",
        ),
        (
            r#"{"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "fp4"}"#,
            "\"fp4\"",
        ),
    ];
    for (i, (qc, needle)) in cases.iter().enumerate() {
        let dir = tmp.path().join(i.to_string());
        std::fs::create_dir(&dir).unwrap();
        let mut cfg = config(&root().join("nf4"));
        cfg["quantization_config"] = serde_json::from_str(qc).unwrap();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        std::fs::copy(
            root().join("nf4/model.safetensors"),
            dir.join("model.safetensors"),
        )
        .unwrap();
        let Err(err) = Llama::load(&dir, &LoadOptions::default()) else {
            panic!("{qc}: loaded");
        };
        let err = err.to_string();
        assert!(err.contains(needle), "{err}");
    }
    // Quantising twice, or into a directory that holds something, is refused too.
    let err = quantize_dir(&root().join("nf4"), &tmp.path().join("x"), true, u64::MAX)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already quantised"), "{err}");
    let err = quantize_dir(&root().join("source"), tmp.path(), true, u64::MAX)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not empty"), "{err}");
}
