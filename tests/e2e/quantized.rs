//! A pre-quantised base through the CLI: `model quantize` writes the bitsandbytes 4-bit form,
//! and QLoRA training on it runs on the stored NF4 weights (where such a base used to fail with
//! a shape error), then the adapter serves on the trainer's forward.

use std::process::Command;

use serde_json::Value;

use crate::helpers::{chat_data, exe, init_tiny, run_ok};

#[test]
fn qlora_trains_on_a_base_quantised_by_model_quantize() {
    let tmp = tempfile::tempdir().unwrap();
    let base = init_tiny(&tmp.path().join("tiny"));
    let quantised = tmp.path().join("tiny-bnb-4bit");
    let out = run_ok(Command::new(exe()).args([
        "--json",
        "model",
        "quantize",
        base.to_str().unwrap(),
        "--out",
        quantised.to_str().unwrap(),
    ]));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["quantized"], 14, "{report}");
    assert!(report["bytes_after"].as_u64() < report["bytes_before"].as_u64());
    let config: Value =
        serde_json::from_slice(&std::fs::read(quantised.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["quantization_config"]["quant_method"],
        "bitsandbytes"
    );
    assert_eq!(
        config["quantization_config"]["bnb_4bit_use_double_quant"],
        true
    );
    // The tokenizer travels with the weights.
    assert!(quantised.join("tokenizer.json").exists());

    // Quantising into a directory that holds something is refused, and leaves it as it was.
    let again = Command::new(exe())
        .args(["model", "quantize", base.to_str().unwrap(), "--out"])
        .arg(&quantised)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    let data = chat_data(
        &tmp.path().join("train.jsonl"),
        16,
        |i| format!("order {i}?"),
        "shipped",
    );
    let adapter = tmp.path().join("adapter");
    run_ok(Command::new(exe()).args([
        "train",
        "sft",
        "--model",
        quantised.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        adapter.to_str().unwrap(),
        "--steps",
        "3",
    ]));
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(adapter.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["config"]["quantize"], "nf4", "{manifest}");
    let bytes = manifest["metrics"]["nf4_bytes_per_param"].as_f64().unwrap();
    assert!(bytes > 0.5 && bytes < 0.6, "{bytes}");
    assert!(adapter.join("adapter_model.safetensors").exists());
    let out = run_ok(Command::new(exe()).args([
        "model",
        "generate",
        quantised.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        "order 3?",
        "--max-tokens",
        "4",
    ]));
    assert!(!out.stdout.is_empty());
}
