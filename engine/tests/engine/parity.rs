//! The engine computes what the trainer's forward pass and PEFT compute.

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use loraops_engine::adapters::AdapterWeights;
use loraops_engine::base::{Base, Quantize};
use loraops_engine::forward::{Segment, step};
use loraops_engine::kv::{KvCache, KvShape};
use loraops_model::adapter::{adapter_config, load_adapter, save_safetensors};
use loraops_model::linear::lora::LoraConfig;
use loraops_model::llama::{BaseFormat, Llama, LoadOptions};
use loraops_model::tiny::TinySpec;

use crate::helpers::{Shape, engine, fixtures, greedy, random_adapter, run, spec, tiny};

fn shape_of(base: &Base) -> KvShape {
    KvShape {
        layers: base.config.num_hidden_layers,
        kv_heads: base.config.num_key_value_heads,
        head_dim: base.config.head_dim,
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits after every token of `ids`, fed one token per step (the decode path).
fn logits_by_decode(base: &Base, ids: &[u32], adapter: Option<&AdapterWeights>) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(shape_of(base), ids.len());
    ids.iter()
        .map(|t| {
            let mut segs = [Segment {
                tokens: std::slice::from_ref(t),
                cache: &mut cache,
                adapter,
                logits: true,
            }];
            step(base, &mut segs).remove(0)
        })
        .collect()
}

/// Logits after the last token of `ids`, fed in one step (the prefill path).
fn logits_by_prefill(base: &Base, ids: &[u32], adapter: Option<&AdapterWeights>) -> Vec<f32> {
    let mut cache = KvCache::new(shape_of(base), ids.len());
    let mut segs = [Segment {
        tokens: ids,
        cache: &mut cache,
        adapter,
        logits: true,
    }];
    step(base, &mut segs).remove(0)
}

/// The fixture recorded by scripts/reference/trainer_reference.py: transformers' and PEFT's
/// logits for a batch on a generated model, and the adapter's tensors.
fn reference() -> (HashMap<String, Tensor>, serde_json::Value) {
    let t = candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu)
        .unwrap();
    let meta =
        serde_json::from_slice(&std::fs::read(fixtures().join("reference.json")).unwrap()).unwrap();
    (t, meta)
}

/// The PEFT adapter of the fixture, with or without rsLoRA, as a directory.
fn fixture_adapter(
    dir: &std::path::Path,
    t: &HashMap<String, Tensor>,
    rslora: bool,
) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let tensors = t
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("lora.").map(|k| (k.to_string(), v.clone())))
        .collect();
    save_safetensors(&dir.join("adapter_model.safetensors"), &tensors).unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: rslora,
        targets: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    };
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec(&adapter_config(&cfg, "tiny")).unwrap(),
    )
    .unwrap();
    dir.to_path_buf()
}

#[test]
fn logits_match_transformers_and_peft_at_every_position() {
    let (t, meta) = reference();
    let s = &meta["tiny"];
    let u = |k: &str| s[k].as_u64().unwrap() as usize;
    let m = tiny(&TinySpec {
        layers: u("layers"),
        hidden: u("hidden"),
        heads: u("heads"),
        kv_heads: u("kv_heads"),
        vocab: u("vocab"),
        intermediate: None,
        seed: s["seed"].as_u64().unwrap(),
    });
    let base = Base::load(&m.dir, Quantize::None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ids = t["input_ids"].to_vec2::<i64>().unwrap();
    let mask = t["attention_mask"].to_vec2::<i64>().unwrap();
    let cases = [
        ("base_logits", None),
        ("lora_logits", Some(false)),
        ("rslora_logits", Some(true)),
    ];
    for (key, rslora) in cases {
        let adapter = rslora.map(|rs| {
            let dir = fixture_adapter(&tmp.path().join(key), &t, rs);
            AdapterWeights::read(key, &dir, &base.config).unwrap()
        });
        let theirs = &t[key];
        let mut worst = 0f32;
        for (row, (ids, mask)) in ids.iter().zip(&mask).enumerate() {
            let n = mask.iter().filter(|&&m| m == 1).count();
            let ids: Vec<u32> = ids[..n].iter().map(|&x| x as u32).collect();
            let ours = logits_by_decode(&base, &ids, adapter.as_ref());
            for (p, l) in ours.iter().enumerate() {
                let want = theirs.i((row, p)).unwrap().to_vec1::<f32>().unwrap();
                worst = worst.max(max_diff(l, &want));
            }
            let last = logits_by_prefill(&base, &ids, adapter.as_ref());
            worst = worst.max(max_diff(&last, &ours[n - 1]));
        }
        eprintln!("{key}: max |engine - reference| = {worst:e}");
        assert!(worst <= 1e-4, "{key}: logits differ by {worst}");
    }
}

/// The trainer's forward pass, greedily, one whole sequence per token (as `loraops model
/// generate` runs it).
fn trainer_greedy(model: &Llama, prompt: &[u32], n: usize, eos: &[u32]) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        let next = model.greedy_next(&ids).unwrap();
        if eos.contains(&next) {
            break;
        }
        ids.push(next);
    }
    ids[prompt.len()..].to_vec()
}

#[test]
fn greedy_tokens_equal_the_trainer_forward_for_64_tokens() {
    let m = tiny(&spec());
    let tmp = tempfile::tempdir().unwrap();
    let adapter_dir = random_adapter(&tmp.path().join("a"), &m.config, 11, &Shape::default());
    let e = engine(&m.dir);
    let prompt = e.encode_text("What is the capital of France?").unwrap();
    let eos: Vec<u32> = m.config.eos_token_id.into_iter().collect();
    for (format, quantize) in [
        (BaseFormat::F32, Quantize::None),
        (BaseFormat::Nf4, Quantize::Nf4),
    ] {
        let mut opts = loraops_engine::EngineOptions::new(&m.dir);
        opts.quantize = quantize;
        let e = loraops_engine::Engine::start(opts).unwrap();
        let mut model = Llama::load(
            &m.dir,
            &LoadOptions {
                format,
                ..Default::default()
            },
        )
        .unwrap();
        let want_base = trainer_greedy(&model, &prompt, 64, &eos);
        load_adapter(&adapter_dir, &mut model).unwrap();
        let want_adapted = trainer_greedy(&model, &prompt, 64, &eos);
        assert_ne!(want_base, want_adapted, "the adapter changes the answer");
        let a = e.load_adapter("a@1", &adapter_dir).unwrap();
        let got_base = run(&e, prompt.clone(), None, greedy(64));
        let got_adapted = run(&e, prompt.clone(), Some(a), greedy(64));
        assert_eq!(got_base.ids, want_base, "{format:?} base");
        assert_eq!(got_adapted.ids, want_adapted, "{format:?} adapted");
        assert!(want_adapted.len() >= 16, "a long enough comparison");
    }
    drop(e);
}

/// Eight rows (four adapters of different shapes and the base, prompts of different lengths)
/// in one batch: each row's logits at every step equal what it gets alone.
#[test]
fn a_mixed_batch_gives_every_row_what_it_gets_alone() {
    let m = tiny(&spec());
    let base = Base::load(&m.dir, Quantize::None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let shapes = [
        Shape::default(),
        Shape {
            r: 8,
            alpha: 4.0,
            rslora: true,
            targets: vec!["q_proj", "v_proj"],
            ..Default::default()
        },
        Shape {
            targets: vec!["gate_proj", "up_proj", "down_proj"],
            ..Default::default()
        },
        Shape {
            patterns: vec![
                (r"layers\.1\.self_attn\.q_proj", 2, 16.0),
                ("down_proj", 6, 3.0),
            ],
            ..Default::default()
        },
    ];
    let adapters: Vec<AdapterWeights> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let dir = random_adapter(&tmp.path().join(i.to_string()), &m.config, i as u64, s);
            AdapterWeights::read(&i.to_string(), &dir, &base.config).unwrap()
        })
        .collect();
    // (adapter, prompt): grouped by adapter, as the scheduler orders them.
    let rows: Vec<(Option<&AdapterWeights>, Vec<u32>)> = vec![
        (None, vec![5, 9, 200, 3]),
        (None, vec![7; 11]),
        (Some(&adapters[0]), vec![1, 2, 3]),
        (Some(&adapters[0]), vec![40, 41, 42, 43, 44, 45, 46]),
        (Some(&adapters[1]), vec![300, 12]),
        (Some(&adapters[2]), (0..20).collect()),
        (Some(&adapters[3]), vec![99, 98, 97, 96, 95]),
        (Some(&adapters[3]), vec![8]),
    ];
    let steps = 6;
    let solo: Vec<Vec<Vec<f32>>> = rows
        .iter()
        .map(|(a, p)| {
            let mut cache = KvCache::new(shape_of(&base), p.len() + steps);
            let mut out = vec![];
            let mut tokens = p.clone();
            for s in 0..steps {
                let mut segs = [Segment {
                    tokens: &tokens,
                    cache: &mut cache,
                    adapter: *a,
                    logits: true,
                }];
                let l = step(&base, &mut segs).remove(0);
                tokens = vec![(s as u32 * 31 + 7) % 500];
                out.push(l);
            }
            out
        })
        .collect();
    let mut caches: Vec<KvCache> = rows
        .iter()
        .map(|(_, p)| KvCache::new(shape_of(&base), p.len() + steps))
        .collect();
    let mut worst = 0f32;
    for s in 0..steps {
        let feed: Vec<Vec<u32>> = rows
            .iter()
            .map(|(_, p)| {
                if s == 0 {
                    p.clone()
                } else {
                    vec![((s - 1) as u32 * 31 + 7) % 500]
                }
            })
            .collect();
        let mut segs: Vec<Segment> = caches
            .iter_mut()
            .zip(&rows)
            .zip(&feed)
            .map(|((cache, (a, _)), tokens)| Segment {
                tokens,
                cache,
                adapter: *a,
                logits: true,
            })
            .collect();
        let batched = step(&base, &mut segs);
        for (r, (l, alone)) in batched.iter().zip(&solo).enumerate() {
            worst = worst.max(max_diff(l, &alone[s]));
            assert_eq!(
                loraops_engine::sampling::argmax(l),
                loraops_engine::sampling::argmax(&alone[s]),
                "row {r} step {s}: greedy token"
            );
        }
    }
    eprintln!("mixed batch vs alone: max logits difference {worst:e}");
    assert!(worst <= 1e-4, "{worst}");
    // The adapters matter: the same prompt gives other logits with another adapter.
    let p = [1u32, 2, 3];
    let with = logits_by_prefill(&base, &p, Some(&adapters[3]));
    let without = logits_by_prefill(&base, &p, None);
    assert!(max_diff(&with, &without) > 1e-2);
}

/// NF4 on the engine is the trainer's NF4: the same quantised weights, the same logits.
#[test]
fn nf4_logits_equal_the_trainer_nf4_forward() {
    let m = tiny(&spec());
    let base = Base::load(&m.dir, Quantize::Nf4).unwrap();
    let model = Llama::load(
        &m.dir,
        &LoadOptions {
            format: BaseFormat::Nf4,
            ..Default::default()
        },
    )
    .unwrap();
    let ids: Vec<u32> = vec![3, 14, 15, 92, 65, 35, 89, 79];
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let theirs = model
        .logits(&input, None)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let ours = logits_by_decode(&base, &ids, None);
    let mut worst = 0f32;
    for (p, l) in ours.iter().enumerate() {
        worst = worst.max(max_diff(
            l,
            &theirs.i((0, p)).unwrap().to_vec1::<f32>().unwrap(),
        ));
    }
    assert!(worst <= 1e-4, "{worst}");
    // The decoder's linears (what NF4 quantises) take at most 0.52 bytes per weight.
    let (bytes, params) =
        base.layers
            .iter()
            .flat_map(|l| l.linears.iter())
            .fold((0, 0), |(b, p), l| {
                let (o, i) = l.weight.dims();
                (b + l.weight.bytes(), p + o * i)
            });
    let per_param = bytes as f64 / params as f64;
    assert!(per_param <= 0.52, "{per_param} bytes per weight");
}

#[test]
fn adapters_the_engine_cannot_apply_exactly_are_refused_by_name() {
    let m = tiny(&TinySpec::default());
    let tmp = tempfile::tempdir().unwrap();
    let dir = random_adapter(&tmp.path().join("a"), &m.config, 1, &Shape::default());
    let cfg_path = dir.join("adapter_config.json");
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    for (field, value, named) in [
        ("use_dora", serde_json::json!(true), "use_dora"),
        (
            "modules_to_save",
            serde_json::json!(["lm_head"]),
            "modules_to_save",
        ),
        ("bias", serde_json::json!("all"), "bias"),
    ] {
        let mut c = original.clone();
        c[field] = value;
        std::fs::write(&cfg_path, c.to_string()).unwrap();
        let e = match AdapterWeights::read("x", &dir, &m.config) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{field} accepted"),
        };
        assert!(e.contains(named), "{field}: {e}");
    }
    // A pair whose shapes do not fit the model.
    std::fs::write(&cfg_path, original.to_string()).unwrap();
    let other = tiny(&TinySpec {
        hidden: 32,
        heads: 2,
        kv_heads: 1,
        ..TinySpec::default()
    });
    let e = AdapterWeights::read("x", &dir, &other.config)
        .err()
        .unwrap();
    assert!(e.to_string().contains("do not fit"), "{e}");
}
