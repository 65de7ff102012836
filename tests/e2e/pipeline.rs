//! The standard pipeline through the registry: SFT, push, DPO continuing from the pushed SFT
//! version (`--init-adapter NAME@V`, pulled and verified), push; the second version's lineage
//! names the first.

use std::path::Path;

use serde_json::{Value, json};

use crate::helpers::{Registry, ok_json};

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| r.to_string() + "\n").collect();
    std::fs::write(path, text).unwrap();
}

fn first_step(out: &Path) -> Value {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

#[test]
fn dpo_continues_from_the_pushed_sft_version_and_its_lineage_names_it() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let base = crate::helpers::init_tiny(&dir.path().join("tiny"));
    let sft_data = dir.path().join("sft.jsonl");
    write_jsonl(
        &sft_data,
        &(0..12)
            .map(|i| {
                json!({"messages": [{"role": "user", "content": format!("order {i}: where is it?")},
                    {"role": "assistant", "content": "It ships within two days."}]})
            })
            .collect::<Vec<_>>(),
    );
    let dpo_data = dir.path().join("prefs.jsonl");
    write_jsonl(
        &dpo_data,
        &(0..8)
            .map(|i| {
                json!({"prompt": [{"role": "user", "content": format!("order {i}: where is it?")}],
                    "chosen": [{"role": "assistant", "content": "It ships within two days."}],
                    "rejected": [{"role": "assistant", "content": "No idea."}],
                    "weight": if i == 7 { 0.0 } else { 1.0 }})
            })
            .collect::<Vec<_>>(),
    );
    let admin = reg.token("admin");
    let publisher = reg.token("publisher");
    ok_json(reg.cli(
        Some(&admin),
        &["--json", "base-model", "add", base.to_str().unwrap()],
    ));

    let (base_s, sft_out, dpo_out) = (
        base.to_str().unwrap(),
        dir.path().join("sft"),
        dir.path().join("dpo"),
    );
    let trained = reg.cli(
        Some(&publisher),
        &[
            "train",
            "sft",
            "--model",
            base_s,
            "--data",
            sft_data.to_str().unwrap(),
            "--out",
            sft_out.to_str().unwrap(),
            "--steps",
            "6",
            "--r",
            "8",
            "--alpha",
            "16",
            "--dropout",
            "0",
            "--lr",
            "0.02",
        ],
    );
    assert!(
        trained.status.success(),
        "{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    let v1 = ok_json(reg.cli(
        Some(&publisher),
        &[
            "--json",
            "adapter",
            "push",
            sft_out.to_str().unwrap(),
            "--name",
            "helpdesk",
        ],
    ));
    assert_eq!(v1["version"], 1);

    let dpo = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "dpo",
            "--model",
            base_s,
            "--data",
            dpo_data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "3",
            "--lr",
            "0.02",
        ];
        args.extend_from_slice(extra);
        reg.cli(Some(&publisher), &args)
    };
    let trained = dpo(&dpo_out, &["--init-adapter", "helpdesk@1"]);
    assert!(
        trained.status.success(),
        "{}",
        String::from_utf8_lossy(&trained.stderr)
    );
    // The version was pulled into the cache, byte for byte.
    let cached = reg.data.join("cache/init-adapters/helpdesk/1");
    assert_eq!(
        std::fs::read(cached.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(sft_out.join("adapter_model.safetensors")).unwrap()
    );
    // Policy = reference at the first step: rewards 0, each pair's loss ln 2 (the batch of 4
    // may hold the pair of weight 0); the adapter's r and alpha, not the defaults.
    let step = first_step(&dpo_out);
    assert_eq!(
        (
            step["rewards/chosen"].as_f64(),
            step["rewards/margins"].as_f64()
        ),
        (Some(0.0), Some(0.0))
    );
    let pairs = step["loss"].as_f64().unwrap() / std::f64::consts::LN_2 * 4.0;
    assert!(
        (pairs - 4.0).abs() < 1e-5 || (pairs - 3.0).abs() < 1e-5,
        "{step}"
    );
    let acfg: Value =
        serde_json::from_slice(&std::fs::read(dpo_out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!((&acfg["r"], &acfg["lora_alpha"]), (&json!(8), &json!(16.0)));
    let parent = json!({"adapter": "helpdesk", "version": 1, "digest": v1["digest"]});
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dpo_out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["parent"], parent);
    assert_eq!(manifest["config"]["init_adapter"], "helpdesk@1");

    let v2 = ok_json(reg.cli(
        Some(&publisher),
        &[
            "--json",
            "adapter",
            "push",
            dpo_out.to_str().unwrap(),
            "--name",
            "helpdesk",
        ],
    ));
    assert_eq!(v2["version"], 2);
    let shown = ok_json(reg.cli(
        Some(&publisher),
        &["--json", "adapter", "show", "helpdesk@2"],
    ));
    assert_eq!(shown["lineage"]["parent"], parent, "{shown}");
    assert_eq!(shown["lineage"]["method"], "dpo");

    // A second run from the same version uses the verified cache; flags that contradict the
    // adapter and versions the registry does not have are refused, naming the problem.
    let pulled_at = |f: &str| {
        std::fs::metadata(cached.join(f))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = pulled_at("adapter_model.safetensors");
    let again = dpo(&dir.path().join("dpo2"), &["--init-adapter", "helpdesk@1"]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        pulled_at("adapter_model.safetensors"),
        before,
        "not pulled again"
    );
    // A cached copy whose bytes changed is pulled again.
    std::fs::write(cached.join("adapter_model.safetensors"), b"tampered").unwrap();
    let again = dpo(&dir.path().join("dpo3"), &["--init-adapter", "helpdesk@1"]);
    assert!(again.status.success());
    assert_eq!(
        std::fs::read(cached.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(sft_out.join("adapter_model.safetensors")).unwrap()
    );
    for (extra, want) in [
        (
            vec!["--init-adapter", "helpdesk@1", "--r", "4"],
            "r 8 (this run: 4)",
        ),
        (vec!["--init-adapter", "helpdesk@9"], "helpdesk@9"),
        (vec!["--init-adapter", "no such dir"], "no such directory"),
    ] {
        let failed = dpo(&dir.path().join("bad"), &extra);
        let err = String::from_utf8_lossy(&failed.stderr);
        assert!(
            !failed.status.success() && err.contains(want),
            "{extra:?}: {err}"
        );
    }
}
