//! Test fixtures shared by the registry's, the gateway's and the end-to-end tests (and the
//! gateway's benchmark programs): PEFT LoRA adapters with seeded random weights, shaped for a
//! base model. A dev-dependency only; it knows the PEFT file layout, not loraops' crates.

use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{Value, json};

/// The shapes a LoRA adapter's tensors take for a base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shapes {
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    /// Output features of q_proj (heads × head dim); o_proj's input features.
    pub q_out: usize,
    /// Output features of k_proj and v_proj (KV heads × head dim).
    pub kv_out: usize,
}

impl Shapes {
    /// From a Hugging Face `config.json` (Llama layout; `head_dim` when given, else
    /// hidden / heads; `intermediate_size` 2 × hidden when absent).
    pub fn of_config(cfg: &Value) -> Self {
        let dim = |k: &str| cfg[k].as_u64().map(|v| v as usize);
        let hidden = dim("hidden_size").expect("config.json has hidden_size");
        let heads = dim("num_attention_heads").expect("config.json has num_attention_heads");
        let kv_heads = dim("num_key_value_heads").unwrap_or(heads);
        let head_dim = dim("head_dim").unwrap_or(hidden / heads);
        Self {
            layers: dim("num_hidden_layers").expect("config.json has num_hidden_layers"),
            hidden,
            intermediate: dim("intermediate_size").unwrap_or(2 * hidden),
            q_out: heads * head_dim,
            kv_out: kv_heads * head_dim,
        }
    }

    /// The model `loraops model init-tiny` writes with its default spec: 2 layers, hidden 64,
    /// 4 heads and 2 KV heads of 16, intermediate 128.
    pub fn tiny() -> Self {
        Self {
            layers: 2,
            hidden: 64,
            intermediate: 128,
            q_out: 64,
            kv_out: 32,
        }
    }

    /// (input, output) features of a projection.
    pub fn features(&self, module: &str) -> (usize, usize) {
        match module {
            "q_proj" => (self.hidden, self.q_out),
            "k_proj" | "v_proj" => (self.hidden, self.kv_out),
            "o_proj" => (self.q_out, self.hidden),
            "gate_proj" | "up_proj" => (self.hidden, self.intermediate),
            "down_proj" => (self.intermediate, self.hidden),
            m => panic!("no shape for module {m}"),
        }
    }

    /// The block a projection lives in.
    fn block(module: &str) -> &'static str {
        match module {
            "gate_proj" | "up_proj" | "down_proj" => "mlp",
            _ => "self_attn",
        }
    }
}

/// A LoRA adapter to generate: A and B uniform in ±`amplitude`/2, drawn from `seed`.
#[derive(Debug, Clone, Copy)]
pub struct Lora<'a> {
    /// `base_model_name_or_path`: the registered base model's name, or its directory.
    pub base_model: &'a str,
    pub targets: &'a [&'a str],
    pub r: usize,
    pub alpha: f64,
    pub seed: u64,
    pub amplitude: f32,
    pub dora: bool,
}

/// A PEFT LoRA adapter in memory: `adapter_config.json`, the tensors of
/// `adapter_model.safetensors` (name, shape, f32 values) and an optional `manifest.json`.
/// Tests change any part before writing it, to build a bad adapter.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub config: Value,
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    pub manifest: Option<Value>,
}

impl PeftAdapter {
    /// `lora`'s adapter for a base of `shapes`: per layer, per target in order, A then B,
    /// all from one xorshift stream (the same bytes for a seed on every machine).
    pub fn random(lora: &Lora<'_>, shapes: &Shapes) -> Self {
        let mut state = lora.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * lora.amplitude
        };
        let mut tensors = Vec::new();
        for layer in 0..shapes.layers {
            for m in lora.targets {
                let (fan_in, fan_out) = shapes.features(m);
                let block = Shapes::block(m);
                for (ab, shape) in [("A", vec![lora.r, fan_in]), ("B", vec![fan_out, lora.r])] {
                    let n: usize = shape.iter().product();
                    tensors.push((
                        format!(
                            "base_model.model.model.layers.{layer}.{block}.{m}.lora_{ab}.weight"
                        ),
                        shape,
                        (0..n).map(|_| next()).collect(),
                    ));
                }
            }
        }
        Self {
            config: adapter_config(lora),
            tensors,
            manifest: None,
        }
    }

    /// `adapter_model.safetensors`.
    pub fn safetensors(&self) -> Vec<u8> {
        let bytes: Vec<(&str, &[usize], Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(n, s, v)| {
                (
                    n.as_str(),
                    s.as_slice(),
                    v.iter().flat_map(|f| f.to_le_bytes()).collect(),
                )
            })
            .collect();
        let views: Vec<(&str, TensorView<'_>)> = bytes
            .iter()
            .map(|(n, s, b)| (*n, TensorView::new(Dtype::F32, s.to_vec(), b).unwrap()))
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    /// The files a push sends: the config, the weights and the manifest when there is one.
    pub fn files(&self) -> Vec<(String, Vec<u8>)> {
        let mut f = vec![
            (
                "adapter_config.json".to_string(),
                serde_json::to_vec_pretty(&self.config).unwrap(),
            ),
            ("adapter_model.safetensors".to_string(), self.safetensors()),
        ];
        if let Some(m) = &self.manifest {
            f.push(("manifest.json".to_string(), serde_json::to_vec(m).unwrap()));
        }
        f
    }

    /// Write [`PeftAdapter::files`] into `dir` (created if need be).
    pub fn write(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, bytes) in self.files() {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}

/// The `adapter_config.json` Python PEFT writes for a plain LoRA on `lora.targets`.
pub fn adapter_config(lora: &Lora<'_>) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": lora.targets,
        "base_model_name_or_path": lora.base_model,
        "bias": "none",
        "use_rslora": false,
        "use_dora": lora.dora,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "revision": null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapters_are_shaped_for_the_base_and_seeded() {
        let lora = Lora {
            base_model: "tiny",
            targets: &["q_proj", "down_proj"],
            r: 4,
            alpha: 8.0,
            seed: 3,
            amplitude: 1.0,
            dora: false,
        };
        let a = PeftAdapter::random(&lora, &Shapes::tiny());
        let shapes: Vec<&[usize]> = a.tensors.iter().map(|t| t.1.as_slice()).collect();
        assert_eq!(
            shapes[..4],
            [&[4, 64][..], &[64, 4][..], &[4, 128][..], &[64, 4][..]]
        );
        assert_eq!(a.tensors.len(), 2 * 2 * 2);
        assert!(a.tensors[3].0.contains("layers.0.mlp.down_proj.lora_B"));
        assert_eq!(
            a.safetensors(),
            PeftAdapter::random(&lora, &Shapes::tiny()).safetensors()
        );
        let other = PeftAdapter::random(&Lora { seed: 4, ..lora }, &Shapes::tiny());
        assert_ne!(a.safetensors(), other.safetensors());
        let cfg = json!({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128});
        assert_eq!(Shapes::of_config(&cfg), Shapes::tiny());
    }
}
