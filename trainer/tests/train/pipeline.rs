//! The SFT pipeline end to end on a generated tiny model.

use candle_core::Device;
use loraops_model::Error as ModelError;
use loraops_model::llama::{BaseFormat, Llama, LoadOptions};
use loraops_model::tiny::TinySpec;
use loraops_model::tokenizer::Tokenizer;
use loraops_registry::api::{MANIFEST_FORMAT, TrainingManifest};
use loraops_registry::peft::{AdapterConfig, ModelDims, SafetensorsHeader, check_tensors};
use loraops_trainer::Error;
use loraops_trainer::data::{IGNORE, load_sft, make_batch, make_packed_batch, pack, tokenize_row};
use loraops_trainer::sft::{Event, SftConfig, loss_sum, train_sft};
use serde_json::json;

use crate::common::{fixtures, max_abs_diff, tiny_model};

fn config(dir: &std::path::Path, out: &std::path::Path) -> SftConfig {
    SftConfig {
        model: dir.to_path_buf(),
        data: fixtures().join("sft_small.jsonl"),
        out: out.to_path_buf(),
        steps: 4,
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        lr: 1e-2,
        batch_size: 2,
        max_len: 64,
        ..Default::default()
    }
}

fn adapter_bytes(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn init_tiny_is_deterministic_and_loads() {
    let spec = TinySpec {
        seed: 3,
        ..Default::default()
    };
    let (_a, da) = tiny_model(&spec);
    let (_b, db) = tiny_model(&spec);
    let (_c, dc) = tiny_model(&TinySpec {
        seed: 4,
        ..spec.clone()
    });
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "config.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(da.join(f)).unwrap(),
            std::fs::read(db.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_ne!(
        std::fs::read(da.join("model.safetensors")).unwrap(),
        std::fs::read(dc.join("model.safetensors")).unwrap()
    );
    let tok = Tokenizer::load(&da).unwrap();
    let ids = tok
        .encode("The capital of France is Paris.<|im_end|>")
        .unwrap();
    assert_eq!(
        tok.decode(&ids).unwrap(),
        "The capital of France is Paris.<|im_end|>"
    );
    assert_eq!(ids.last().copied(), tok.eos_id);
    assert!(
        ids.len() < 20,
        "merges compress English text: {} tokens",
        ids.len()
    );
    let model = Llama::load(&da, &LoadOptions::default()).unwrap();
    assert_eq!(model.config.num_key_value_heads, 2);
}

#[test]
fn only_completion_and_assistant_tokens_are_labelled() {
    let (_t, dir) = tiny_model(&TinySpec::default());
    let tok = Tokenizer::load(&dir).unwrap();
    let row = json!({"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]});
    let (ex, truncated) = tokenize_row(&row, &tok, 512).unwrap();
    assert!(!truncated);
    let labelled: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.labels)
        .filter(|(_, l)| **l != IGNORE)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(
        tok.decode(&labelled).unwrap(),
        "Hello<|im_end|>\nCiao<|im_end|>\n"
    );
    let full = tok.decode(&ex.ids).unwrap();
    assert!(
        full.starts_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        "{full}"
    );

    let (ex, _) = tokenize_row(
        &json!({"prompt": "2 + 2 =", "completion": " 4", "weight": 2.5}),
        &tok,
        512,
    )
    .unwrap();
    let labelled: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.labels)
        .filter(|(_, l)| **l != IGNORE)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(tok.decode(&labelled).unwrap(), " 4<|im_end|>");
    assert_eq!(ex.weight, 2.5);

    let (ex, _) = tokenize_row(
        &json!({"instruction": "Say yes", "input": "", "output": "yes"}),
        &tok,
        512,
    )
    .unwrap();
    let text = tok.decode(&ex.ids).unwrap();
    assert!(
        text.contains("### Instruction:\nSay yes\n\n### Response:\nyes"),
        "{text}"
    );
    assert!(tokenize_row(&json!({"text": "x"}), &tok, 512).is_err());
}

#[test]
fn rows_without_completion_tokens_are_counted_not_trained() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let tok = Tokenizer::load(&dir).unwrap();
    let data = tmp.path().join("d.jsonl");
    let long_prompt = "word ".repeat(40);
    std::fs::write(
        &data,
        format!(
            "{}\n{}\n",
            json!({"prompt": long_prompt, "completion": " ok"}),
            json!({"prompt": "a", "completion": " b"})
        ),
    )
    .unwrap();
    let (rows, stats) = load_sft(&data, &tok, 16).unwrap();
    assert_eq!(
        (stats.rows, stats.kept, stats.truncated, stats.no_completion),
        (2, 1, 1, 1)
    );
    assert_eq!(stats.no_completion_lines, vec![1]);
    assert_eq!(rows.len(), 1);
    std::fs::write(
        &data,
        format!("{}\n", json!({"prompt": long_prompt, "completion": " ok"})),
    )
    .unwrap();
    assert!(matches!(
        load_sft(&data, &tok, 16),
        Err(Error::NoTrainableRows { rows: 1, .. })
    ));
    std::fs::write(&data, "{\"prompt\": 1}\n").unwrap();
    let e = load_sft(&data, &tok, 16).unwrap_err().to_string();
    assert!(e.contains("line 1"), "{e}");
}

#[test]
fn sft_learns_and_writes_a_peft_adapter_with_manifest() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let out = tmp.path().join("out");
    let mut cfg = config(&dir, &out);
    cfg.steps = 12;
    cfg.batch_size = 6;
    cfg.lr = 3e-2;
    cfg.val_data = Some(fixtures().join("sft_small.jsonl"));
    cfg.eval_every = 4;
    let mut losses = Vec::new();
    let o = train_sft(&cfg, &Device::Cpu, &mut |e| {
        if let Event::Step(m) = e {
            losses.push(m.loss)
        }
    })
    .unwrap();
    assert_eq!(o.steps_done, 12);
    assert!(losses[11] < losses[0] * 0.7, "loss should fall: {losses:?}");
    let acfg =
        AdapterConfig::parse(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((acfg.r, acfg.lora_alpha), (4, 8.0));
    assert_eq!(acfg.base_model_name_or_path, dir.display().to_string());
    let bytes = adapter_bytes(&out);
    let header = SafetensorsHeader::parse(&bytes).unwrap();
    let model_cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let summary =
        check_tensors(&acfg, &header, Some(&ModelDims::from_hf_config(&model_cfg))).unwrap();
    assert_eq!(summary.target_modules.len(), 7);
    let m: TrainingManifest =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m.format, MANIFEST_FORMAT);
    assert_eq!(m.method, "sft");
    assert!(m.base_model_digest.unwrap().starts_with("sha256:"));
    assert_eq!(m.datasets.len(), 2);
    assert_eq!(m.metrics["steps"], 12.0);
    assert!(m.metrics["best_val_loss"] < losses[0]);
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 12);
    assert_eq!(lines.lines().filter(|l| l.contains("val_loss")).count(), 3);
}

#[test]
fn gradient_accumulation_equals_one_big_batch() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let mut a = config(&dir, &tmp.path().join("a"));
    a.steps = 2;
    a.batch_size = 4;
    let mut b = config(&dir, &tmp.path().join("b"));
    b.steps = 2;
    b.batch_size = 2;
    b.grad_accum = 2;
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    train_sft(&a, &Device::Cpu, &mut |e| {
        if let Event::Step(m) = e {
            la.push(m.loss)
        }
    })
    .unwrap();
    train_sft(&b, &Device::Cpu, &mut |e| {
        if let Event::Step(m) = e {
            lb.push(m.loss)
        }
    })
    .unwrap();
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() < 1e-5, "{la:?} vs {lb:?}");
    }
}

#[test]
fn resume_continues_exactly_and_dropout_is_seeded() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let mut full = config(&dir, &tmp.path().join("full"));
    full.dropout = 0.1;
    full.steps = 4;
    train_sft(&full, &Device::Cpu, &mut |_| {}).unwrap();
    let again = SftConfig {
        out: tmp.path().join("again"),
        ..full.clone()
    };
    train_sft(&again, &Device::Cpu, &mut |_| {}).unwrap();
    assert!(
        adapter_bytes(&full.out) == adapter_bytes(&again.out),
        "same seed, same bytes"
    );

    let first = SftConfig {
        out: tmp.path().join("part"),
        stop_after: Some(2),
        ..full.clone()
    };
    let o = train_sft(&first, &Device::Cpu, &mut |_| {}).unwrap();
    assert_eq!(o.steps_done, 2);
    assert!(first.out.join("checkpoint").exists());
    assert!(adapter_bytes(&full.out) != adapter_bytes(&first.out));
    let part = SftConfig {
        resume: true,
        ..full.clone()
    };
    let part = SftConfig {
        out: first.out.clone(),
        ..part
    };
    let o = train_sft(&part, &Device::Cpu, &mut |_| {}).unwrap();
    assert_eq!(o.steps_done, 4);
    assert!(
        adapter_bytes(&full.out) == adapter_bytes(&part.out),
        "resumed run matches the uninterrupted one"
    );
    assert_eq!(
        std::fs::read_to_string(part.out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        4
    );
}

#[test]
fn early_stopping_stops_and_keeps_the_best_adapter() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let mut cfg = config(&dir, &tmp.path().join("out"));
    cfg.steps = 40;
    cfg.lr = 0.3; // diverges on purpose
    cfg.max_grad_norm = 0.0;
    cfg.val_data = Some(fixtures().join("sft_small.jsonl"));
    cfg.eval_every = 1;
    cfg.patience = 2;
    let mut stopped = None;
    let o = train_sft(&cfg, &Device::Cpu, &mut |e| {
        if let Event::EarlyStop { step, .. } = e {
            stopped = Some(step)
        }
    })
    .unwrap();
    let step = stopped.expect("early stop");
    assert!(step < 40 && o.steps_done == step);
}

#[test]
fn merged_model_equals_base_plus_adapter() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let mut cfg = config(&dir, &tmp.path().join("out"));
    cfg.merge = Some(tmp.path().join("merged"));
    train_sft(&cfg, &Device::Cpu, &mut |_| {}).unwrap();
    let ids = candle_core::Tensor::new(&[[1u32, 50, 99, 7, 300, 2]], &Device::Cpu).unwrap();
    let mut with = Llama::load(&dir, &LoadOptions::default()).unwrap();
    loraops_model::adapter::load_adapter(&cfg.out, &mut with).unwrap();
    let merged = Llama::load(cfg.merge.as_ref().unwrap(), &LoadOptions::default()).unwrap();
    let base = Llama::load(&dir, &LoadOptions::default()).unwrap();
    let a = with.logits(&ids, None).unwrap();
    assert!(max_abs_diff(&a, &merged.logits(&ids, None).unwrap()) < 1e-4);
    assert!(max_abs_diff(&a, &base.logits(&ids, None).unwrap()) > 1e-3);
    assert!(cfg.merge.as_ref().unwrap().join("tokenizer.json").exists());
}

#[test]
fn label_smoothing_and_row_weights_scale_the_loss_as_defined() {
    let (_t, dir) = tiny_model(&TinySpec::default());
    let tok = Tokenizer::load(&dir).unwrap();
    let model = Llama::load(&dir, &LoadOptions::default()).unwrap();
    let (mut ex, _) =
        tokenize_row(&json!({"prompt": "a b", "completion": " c d"}), &tok, 64).unwrap();
    let batch = make_batch(&[&ex], tok.pad_id, &Device::Cpu).unwrap();
    let plain = loss_sum(&model, &batch, 0.0, &mut None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    ex.weight = 3.0;
    let batch3 = make_batch(&[&ex], tok.pad_id, &Device::Cpu).unwrap();
    let weighted = loss_sum(&model, &batch3, 0.0, &mut None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((weighted - 3.0 * plain).abs() < 1e-4);
    // ε-smoothing: (1-ε)·nll + ε·mean(-log p); computed here from the logits directly.
    let eps = 0.1;
    let smoothed = loss_sum(&model, &batch, eps, &mut None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let logits = model
        .logits(&batch.input_ids, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let logp = loraops_model::llama::log_softmax(&logits)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut want = 0f64;
    for (p, t) in batch
        .positions
        .to_vec1::<u32>()
        .unwrap()
        .iter()
        .zip(batch.targets.to_vec1::<u32>().unwrap())
    {
        let row = &logp[*p as usize];
        let mean = row.iter().map(|&x| -(x as f64)).sum::<f64>() / row.len() as f64;
        want += (1.0 - eps) * -(row[t as usize] as f64) + eps * mean;
    }
    assert!((smoothed - want).abs() < 1e-4, "{smoothed} vs {want}");
}

#[test]
fn bf16_and_nf4_bases_train() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    for (q, d) in [("none", "bf16"), ("nf4", "f32")] {
        let mut cfg = config(&dir, &tmp.path().join(q));
        cfg.quantize = q.into();
        cfg.base_dtype = d.into();
        cfg.steps = 6;
        cfg.batch_size = 6;
        cfg.lr = 3e-2;
        let mut losses = Vec::new();
        train_sft(&cfg, &Device::Cpu, &mut |e| {
            if let Event::Step(m) = e {
                losses.push(m.loss)
            }
        })
        .unwrap();
        assert!(losses[5] < losses[0], "{q}/{d}: {losses:?}");
    }
    let f32m = Llama::load(&dir, &LoadOptions::default()).unwrap();
    let nf4 = Llama::load(
        &dir,
        &LoadOptions {
            format: BaseFormat::Nf4,
            ..Default::default()
        },
    )
    .unwrap();
    let (a, b) = (
        &f32m.layers[0].mlp.down_proj.base.weight,
        &nf4.layers[0].mlp.down_proj.base.weight,
    );
    assert!(
        b.storage_bytes() * 7 < a.storage_bytes(),
        "NF4 stores about 4.1 bits per weight"
    );
}

#[test]
fn clear_errors() {
    let (tmp, dir) = tiny_model(&TinySpec::default());
    let mut cfg = config(&dir, &tmp.path().join("out"));
    cfg.targets = vec!["qkv_proj".into()];
    let e = train_sft(&cfg, &Device::Cpu, &mut |_| {}).unwrap_err();
    assert!(
        matches!(&e, Error::Model(ModelError::TargetModuleNotFound { module, .. }) if module == "qkv_proj"),
        "{e}"
    );

    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let cfg = config(&dir, &tmp.path().join("out"));
    assert!(matches!(
        train_sft(&cfg, &Device::Cpu, &mut |_| {}),
        Err(Error::Model(ModelError::MissingTokenizer { .. }))
    ));

    let conf = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&conf).unwrap()).unwrap();
    v["architectures"] = json!(["BertModel"]);
    std::fs::write(&conf, v.to_string()).unwrap();
    let e = Llama::load(&dir, &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(&e, ModelError::UnknownArchitecture(a) if a == "BertModel"),
        "{e}"
    );
}

#[test]
fn packed_rows_give_the_same_loss_and_gradients_as_padded_rows() {
    let (_t, dir) = tiny_model(&TinySpec::default());
    let tok = Tokenizer::load(&dir).unwrap();
    let mut model = Llama::load(&dir, &LoadOptions::default()).unwrap();
    let lora = loraops_model::linear::lora::LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        use_rslora: false,
        targets: ["q_proj", "v_proj"].iter().map(|s| s.to_string()).collect(),
    };
    model
        .add_lora(
            &lora,
            &mut loraops_model::linear::lora::derived_rng(1, 1, 1),
        )
        .unwrap();
    for (_, v) in model.lora_params() {
        v.set(&(v.as_tensor().ones_like().unwrap() * 0.05).unwrap())
            .unwrap();
    }
    let rows = [
        json!({"prompt": "What is the capital of France?", "completion": " Paris", "weight": 2.0}),
        json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}),
        json!({"prompt": "2 + 2 =", "completion": " 4"}),
    ];
    let ex: Vec<_> = rows
        .iter()
        .map(|r| tokenize_row(r, &tok, 256).unwrap().0)
        .collect();
    let packed = pack(&ex, 256);
    assert_eq!(packed.len(), 1);
    assert_eq!(packed[0].segments.iter().max(), Some(&3));
    let padded = make_batch(&ex.iter().collect::<Vec<_>>(), tok.pad_id, &Device::Cpu).unwrap();
    let one_row = make_packed_batch(&[&packed[0]], tok.pad_id, &Device::Cpu).unwrap();
    assert_eq!(padded.n_targets, one_row.n_targets);
    let params: Vec<_> = model.lora_params().into_iter().map(|(_, v)| v).collect();
    let l1 = loss_sum(&model, &padded, 0.0, &mut None).unwrap();
    let l2 = loss_sum(&model, &one_row, 0.0, &mut None).unwrap();
    let (a, b) = (
        l1.to_scalar::<f32>().unwrap(),
        l2.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() < 1e-4 * a.abs(), "{a} vs {b}");
    let g1 = loraops_trainer::sft::collect_grads(&model, &l1, &params).unwrap();
    let g2 = loraops_trainer::sft::collect_grads(&model, &l2, &params).unwrap();
    for (x, y) in g1.iter().zip(&g2) {
        assert!(max_abs_diff(x, y) < 1e-5);
    }
    // Packing two rows of 200 tokens into rows of 256 keeps them apart.
    let long: Vec<_> = (0..2)
        .map(|_| loraops_trainer::data::Example {
            ids: vec![5; 200],
            labels: vec![5; 200],
            weight: 1.0,
        })
        .collect();
    assert_eq!(pack(&long, 256).len(), 2);
}

#[test]
fn nf4_stays_under_052_bytes_per_param_and_bf16_compute_wants_a_gpu() {
    let (_t, dir) = tiny_model(&TinySpec::default());
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SftConfig {
        quantize: "nf4".into(),
        steps: 2,
        ..config(&dir, &tmp.path().join("nf4"))
    };
    let o = train_sft(&cfg, &Device::Cpu, &mut |_| {}).unwrap();
    let bpp = o.nf4_bytes_per_param.expect("an NF4 run reports its size");
    assert!(bpp <= 0.52, "{bpp} bytes/param");
    assert_eq!(o.peak_gpu_bytes, None);
    let bf16 = SftConfig {
        compute_dtype: "bf16".into(),
        ..cfg
    };
    let e = train_sft(&bf16, &Device::Cpu, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("needs a GPU"), "{e}");
}

#[test]
fn devices_are_chosen_by_name() {
    assert!(loraops_model::select_device("cpu").unwrap().is_cpu());
    assert!(loraops_model::select_device("tpu").is_err());
    if !cfg!(feature = "cuda") {
        let e = loraops_model::select_device("cuda:0").unwrap_err();
        assert!(e.to_string().contains("cuda feature"), "{e}");
    }
}
