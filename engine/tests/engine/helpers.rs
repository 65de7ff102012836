//! A generated tiny model, random PEFT adapters for it, and running requests to the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use loraops_engine::{
    AdapterWeights, Engine, EngineOptions, Event, FinishReason, Request, SamplingParams, Usage,
};
use loraops_model::adapter::save_safetensors;
use loraops_model::config::ModelConfig;
use loraops_model::tiny::{TinySpec, init_tiny};
use loraops_registry::peft::{AdapterConfig, lora_key};

pub struct Tiny {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub config: ModelConfig,
}

pub fn tiny(spec: &TinySpec) -> Tiny {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    init_tiny(&dir, spec).unwrap();
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    Tiny {
        _tmp: tmp,
        dir,
        config,
    }
}

/// A spec with more layers than the default, still small: GQA, and every linear's input a
/// multiple of NF4's block, so NF4 decoding takes the engine's row kernels.
pub fn spec() -> TinySpec {
    TinySpec {
        layers: 3,
        hidden: 128,
        heads: 4,
        kv_heads: 2,
        vocab: 512,
        intermediate: Some(384),
        seed: 3,
    }
}

/// What a random adapter looks like.
#[derive(Clone)]
pub struct Shape {
    pub r: usize,
    pub alpha: f64,
    pub targets: Vec<&'static str>,
    pub rslora: bool,
    /// `rank_pattern` / `alpha_pattern` entries: (pattern, rank, alpha).
    pub patterns: Vec<(&'static str, usize, f64)>,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            r: 4,
            alpha: 8.0,
            targets: vec![
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            rslora: false,
            patterns: Vec::new(),
        }
    }
}

/// Write a PEFT adapter with seeded random A and B (B non-zero, so it changes the output).
pub fn random_adapter(dir: &Path, config: &ModelConfig, seed: u64, shape: &Shape) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut tensors = BTreeMap::new();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut cfg = AdapterConfig::new_lora(
        "tiny",
        shape.r,
        shape.alpha,
        shape.targets.iter().map(|s| s.to_string()).collect(),
    );
    cfg.use_rslora = shape.rslora;
    for &(p, r, a) in &shape.patterns {
        cfg.rank_pattern.insert(p.into(), r.into());
        cfg.alpha_pattern.insert(p.into(), a.into());
    }
    for layer in 0..config.num_hidden_layers {
        for &m in &shape.targets {
            let (in_f, out_f) = config.linear_shape(m).unwrap();
            let path = loraops_registry::peft::module_path(layer, m);
            let r = cfg.rank_of(&path).unwrap();
            let mut t = |rows: usize, cols: usize, amp: f32| {
                let v: Vec<f32> = (0..rows * cols).map(|_| next() * amp).collect();
                Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
            };
            tensors.insert(lora_key(layer, m, true), t(r, in_f, 0.5));
            tensors.insert(lora_key(layer, m, false), t(out_f, r, 0.5));
        }
    }
    save_safetensors(&dir.join("adapter_model.safetensors"), &tensors).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec_pretty(&cfg).unwrap(),
    )
    .unwrap();
    dir.to_path_buf()
}

pub fn engine(dir: &Path) -> Engine {
    Engine::start(EngineOptions::new(dir)).unwrap()
}

pub fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.0,
        ..Default::default()
    }
}

/// Everything a request produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ids: Vec<u32>,
    pub text: String,
    pub finish: Option<FinishReason>,
    pub usage: Usage,
    pub error: Option<String>,
}

pub fn run(
    engine: &Engine,
    prompt: Vec<u32>,
    adapter: Option<Arc<AdapterWeights>>,
    sampling: SamplingParams,
) -> Outcome {
    let rx = engine
        .generate(Request {
            prompt,
            adapter,
            sampling,
            constraint: None,
        })
        .unwrap();
    collect(rx)
}

pub fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> Outcome {
    let mut o = Outcome::default();
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::Token { id, text, .. } => {
                o.ids.extend(id);
                o.text.push_str(&text);
            }
            Event::Done { finish, usage } => {
                o.finish = Some(finish);
                o.usage = usage;
            }
            Event::Error(e) => o.error = Some(e),
        }
    }
    o
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../trainer/tests/fixtures")
}
