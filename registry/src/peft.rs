//! The PEFT LoRA adapter format: `adapter_config.json` and the tensor layout of
//! `adapter_model.safetensors`. Shared by the registry (validation on push), the
//! gateway (what it can serve) and the trainer (what it writes), so all three agree.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const README_FILE: &str = "README.md";

/// The Llama-family linear layers LoRA can target, with the block they live in.
pub const LINEAR_MODULES: [(&str, &str); 7] = [
    ("q_proj", "self_attn"),
    ("k_proj", "self_attn"),
    ("v_proj", "self_attn"),
    ("o_proj", "self_attn"),
    ("gate_proj", "mlp"),
    ("up_proj", "mlp"),
    ("down_proj", "mlp"),
];

/// `target_modules` is a list of names or a single regex string in PEFT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

impl TargetModules {
    /// Resolve to the set of Llama linear-layer names it selects.
    pub fn resolve(&self) -> Result<BTreeSet<String>, AdapterError> {
        match self {
            TargetModules::List(names) => {
                let mut out = BTreeSet::new();
                for n in names {
                    if n == "all-linear" {
                        out.extend(LINEAR_MODULES.iter().map(|(m, _)| m.to_string()));
                    } else if LINEAR_MODULES.iter().any(|(m, _)| m == n) {
                        out.insert(n.clone());
                    } else {
                        return Err(AdapterError::config(
                            "target_modules",
                            format!(
                                "unsupported target module {n:?}; supported: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                            ),
                        ));
                    }
                }
                if out.is_empty() {
                    return Err(AdapterError::config("target_modules", "is empty"));
                }
                Ok(out)
            }
            TargetModules::Regex(s) if s == "all-linear" => {
                Ok(LINEAR_MODULES.iter().map(|(m, _)| m.to_string()).collect())
            }
            TargetModules::Regex(s) => Err(AdapterError::config(
                "target_modules",
                format!("regex target_modules ({s:?}) are not supported; list the module names"),
            )),
        }
    }
}

/// `adapter_config.json` of a PEFT LoRA adapter. Fields loraops does not interpret are kept
/// in `extra`, so a config round-trips unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    pub base_model_name_or_path: String,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rank_pattern: BTreeMap<String, Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub alpha_pattern: BTreeMap<String, Value>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

fn default_bias() -> String {
    "none".into()
}

impl AdapterConfig {
    /// A config as PEFT writes it for a causal LM.
    pub fn new_lora(
        base_model: impl Into<String>,
        r: usize,
        lora_alpha: f64,
        targets: Vec<String>,
    ) -> Self {
        let mut extra = BTreeMap::new();
        extra.insert("inference_mode".into(), Value::Bool(true));
        extra.insert("init_lora_weights".into(), Value::Bool(true));
        extra.insert("revision".into(), Value::Null);
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules: TargetModules::List(targets),
            base_model_name_or_path: base_model.into(),
            bias: "none".into(),
            use_rslora: false,
            use_dora: false,
            fan_in_fan_out: false,
            modules_to_save: None,
            layers_to_transform: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            extra,
        }
    }

    /// Parse and check the fields every LoRA adapter must have.
    pub fn parse(bytes: &[u8]) -> Result<Self, AdapterError> {
        let cfg: AdapterConfig =
            serde_json::from_slice(bytes).map_err(|e| AdapterError::Config {
                field: json_field_hint(&e),
                message: e.to_string(),
            })?;
        cfg.check()?;
        Ok(cfg)
    }

    pub fn check(&self) -> Result<(), AdapterError> {
        if self.peft_type != "LORA" {
            return Err(AdapterError::config(
                "peft_type",
                format!("is {:?}, only \"LORA\" is supported", self.peft_type),
            ));
        }
        if self.r == 0 {
            return Err(AdapterError::config("r", "must be at least 1"));
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(AdapterError::config(
                "lora_alpha",
                "must be a positive number",
            ));
        }
        if self.base_model_name_or_path.trim().is_empty() {
            return Err(AdapterError::config("base_model_name_or_path", "is empty"));
        }
        if self.fan_in_fan_out {
            return Err(AdapterError::config(
                "fan_in_fan_out",
                "true is not supported for Llama-family models",
            ));
        }
        self.target_modules.resolve()?;
        Ok(())
    }

    /// Features some engines cannot apply exactly; the gateway refuses these rather than
    /// serve them wrong.
    pub fn unsupported_for_merge(&self) -> Option<&'static str> {
        if self.use_rslora {
            Some("use_rslora")
        } else if self.use_dora {
            Some("use_dora")
        } else if !self.rank_pattern.is_empty() {
            Some("rank_pattern")
        } else if !self.alpha_pattern.is_empty() {
            Some("alpha_pattern")
        } else if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            Some("modules_to_save")
        } else if self
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            Some("layers_to_transform")
        } else if self.bias != "none" {
            Some("bias")
        } else {
            None
        }
    }

    /// The rank PEFT gives the module at `path` (`model.layers.N.self_attn.q_proj`):
    /// `rank_pattern`'s value for it, else `r`.
    pub fn rank_of(&self, path: &str) -> Result<usize, AdapterError> {
        match pattern_value(&self.rank_pattern, path, "rank_pattern")? {
            Some(v) => v.as_u64().map(|r| r as usize).ok_or_else(|| {
                AdapterError::config("rank_pattern", format!("{v} is not an integer"))
            }),
            None => Ok(self.r),
        }
    }

    /// The scale PEFT applies to B·A of the module at `path` with rank `r`: its alpha
    /// (`alpha_pattern`'s value, else `lora_alpha`) over r, or over √r with rsLoRA.
    pub fn scale_of(&self, path: &str, r: usize) -> Result<f64, AdapterError> {
        let alpha = match pattern_value(&self.alpha_pattern, path, "alpha_pattern")? {
            Some(v) => v.as_f64().ok_or_else(|| {
                AdapterError::config("alpha_pattern", format!("{v} is not a number"))
            })?,
            None => self.lora_alpha,
        };
        Ok(if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        })
    }

    /// The LoRA scale applied to B·A: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

fn json_field_hint(e: &serde_json::Error) -> String {
    // serde's "missing field `r`" names the field; keep it for the error's `field`.
    let msg = e.to_string();
    msg.split('`')
        .nth(1)
        .unwrap_or("adapter_config.json")
        .to_string()
}

/// Known dimensions of a base model, for shape checks. Fields may be unknown.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelDims {
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: Option<usize>,
}

impl ModelDims {
    /// Read the dimensions from a Hugging Face `config.json`.
    pub fn from_hf_config(cfg: &Value) -> Self {
        let get = |k: &str| cfg.get(k).and_then(Value::as_u64).map(|v| v as usize);
        Self {
            hidden_size: get("hidden_size"),
            intermediate_size: get("intermediate_size"),
            num_hidden_layers: get("num_hidden_layers"),
            num_attention_heads: get("num_attention_heads"),
            num_key_value_heads: get("num_key_value_heads").or_else(|| get("num_attention_heads")),
            head_dim: get("head_dim"),
            vocab_size: get("vocab_size"),
        }
    }

    fn head_dim(&self) -> Option<usize> {
        self.head_dim
            .or_else(|| Some(self.hidden_size? / self.num_attention_heads?))
    }

    /// (in_features, out_features) of a Llama linear layer, when known.
    pub fn linear_shape(&self, module: &str) -> (Option<usize>, Option<usize>) {
        let h = self.hidden_size;
        let i = self.intermediate_size;
        let q = self
            .num_attention_heads
            .zip(self.head_dim())
            .map(|(n, d)| n * d);
        let kv = self
            .num_key_value_heads
            .zip(self.head_dim())
            .map(|(n, d)| n * d);
        match module {
            "q_proj" => (h, q),
            "k_proj" | "v_proj" => (h, kv),
            "o_proj" => (q, h),
            "gate_proj" | "up_proj" => (h, i),
            "down_proj" => (i, h),
            _ => (None, None),
        }
    }
}

/// One tensor as described by a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// A parsed and checked safetensors header.
#[derive(Debug, Clone)]
pub struct SafetensorsHeader {
    /// 8 + the JSON header's length: where tensor data starts.
    pub data_start: u64,
    /// Bytes of tensor data the header accounts for.
    pub data_len: u64,
    pub tensors: Vec<TensorMeta>,
}

/// The longest header loraops accepts (the safetensors reference limit).
/// Largest safetensors header accepted. A LoRA's header is a few hundred bytes per tensor
/// (a rank-64 adapter on every projection of an 80-layer model is about 200 KiB); the bound
/// keeps a push from making the registry buffer and parse a huge header.
pub const MAX_HEADER_LEN: u64 = 8 * 1024 * 1024;

impl SafetensorsHeader {
    /// How many leading bytes of the file the header needs, from its first 8 bytes.
    pub fn header_len(prefix: &[u8; 8]) -> Result<u64, AdapterError> {
        let n = u64::from_le_bytes(*prefix);
        if n == 0 || n > MAX_HEADER_LEN {
            return Err(AdapterError::weights(format!(
                "header length {n} is not plausible: not a safetensors file"
            )));
        }
        Ok(8 + n)
    }

    /// Parse the header from the file's first `8 + n` bytes and check that the tensors'
    /// data offsets are contiguous and match their dtype and shape.
    pub fn parse(head: &[u8]) -> Result<Self, AdapterError> {
        if head.len() < 8 {
            return Err(AdapterError::weights(
                "file is shorter than a safetensors header",
            ));
        }
        let data_start = Self::header_len(head[..8].try_into().expect("8 bytes"))?;
        if (head.len() as u64) < data_start {
            return Err(AdapterError::weights(
                "file ends inside the safetensors header",
            ));
        }
        let json = &head[8..data_start as usize];
        let meta: safetensors::tensor::Metadata = serde_json::from_slice(json)
            .map_err(|e| AdapterError::weights(format!("safetensors header is not valid: {e}")))?;
        let mut infos: Vec<(String, &safetensors::tensor::TensorInfo)> =
            meta.tensors().into_iter().collect();
        infos.sort_by_key(|(_, i)| i.data_offsets);
        let mut cursor = 0usize;
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, info) in infos {
            let (s, e) = info.data_offsets;
            if s != cursor || e < s {
                return Err(AdapterError::tensor(
                    &name,
                    "data offsets are not contiguous",
                ));
            }
            let n: Option<usize> = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let bytes = n.and_then(|n| n.checked_mul(info.dtype.bitsize() / 8));
            if bytes != Some(e - s) {
                return Err(AdapterError::tensor(
                    &name,
                    format!(
                        "{:?} {:?} does not fill {} bytes",
                        info.dtype,
                        info.shape,
                        e - s
                    ),
                ));
            }
            cursor = e;
            tensors.push(TensorMeta {
                name,
                dtype: format!("{:?}", info.dtype),
                shape: info.shape.clone(),
            });
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            data_start,
            data_len: cursor as u64,
            tensors,
        })
    }

    /// The size the whole file must have.
    pub fn file_len(&self) -> u64 {
        self.data_start + self.data_len
    }
}

/// The key of a `rank_pattern` / `alpha_pattern` map that applies to `path`: an exact key
/// first, else the first key matching the path's end as a regular expression (PEFT's
/// `get_pattern_key`).
fn pattern_value<'a>(
    patterns: &'a BTreeMap<String, Value>,
    path: &str,
    field: &str,
) -> Result<Option<&'a Value>, AdapterError> {
    if let Some(v) = patterns.get(path) {
        return Ok(Some(v));
    }
    for (key, v) in patterns {
        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
            AdapterError::config(field, format!("{key:?} is not a regular expression: {e}"))
        })?;
        if re.is_match(path) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// The module's path in the model as PEFT matches patterns against it:
/// `model.layers.N.{self_attn|mlp}.{module}`.
pub fn module_path(layer: usize, module: &str) -> String {
    let block = LINEAR_MODULES
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, b)| *b)
        .unwrap_or("self_attn");
    format!("model.layers.{layer}.{block}.{module}")
}

/// Where a LoRA tensor sits: `base_model.model.model.layers.N.{block}.{module}.lora_{A|B}.weight`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraKey {
    pub layer: usize,
    pub module: String,
    pub is_a: bool,
}

pub fn lora_key(layer: usize, module: &str, is_a: bool) -> String {
    let block = LINEAR_MODULES
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, b)| *b)
        .unwrap_or("self_attn");
    format!(
        "base_model.model.model.layers.{layer}.{block}.{module}.lora_{}.weight",
        if is_a { "A" } else { "B" }
    )
}

impl LoraKey {
    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix("base_model.model.model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer = layer.parse().ok()?;
        let (block, rest) = rest.split_once('.')?;
        let (module, rest) = rest.split_once('.')?;
        let is_a = match rest {
            "lora_A.weight" => true,
            "lora_B.weight" => false,
            _ => return None,
        };
        let expected_block = LINEAR_MODULES.iter().find(|(m, _)| *m == module)?.1;
        (block == expected_block).then(|| Self {
            layer,
            module: module.to_string(),
            is_a,
        })
    }
}

/// What validation learned about an adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdapterSummary {
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: Vec<String>,
    pub layers: usize,
    pub trainable_params: u64,
}

/// Check that the tensors agree with the config (rank, target modules) and, where the base
/// model's dimensions are known, with the base model.
pub fn check_tensors(
    cfg: &AdapterConfig,
    header: &SafetensorsHeader,
    dims: Option<&ModelDims>,
) -> Result<AdapterSummary, AdapterError> {
    let targets = cfg.target_modules.resolve()?;
    let mut seen: HashMap<(usize, String), [Option<&TensorMeta>; 2]> = HashMap::new();
    let mut params = 0u64;
    for t in &header.tensors {
        let key = LoraKey::parse(&t.name).ok_or_else(|| {
            AdapterError::tensor(&t.name, "is not a LoRA tensor name (expected base_model.model.model.layers.N.<self_attn|mlp>.<module>.lora_<A|B>.weight)")
        })?;
        if !targets.contains(&key.module) {
            return Err(AdapterError::tensor(
                &t.name,
                format!("module {} is not in target_modules", key.module),
            ));
        }
        if let Some(n) = dims.and_then(|d| d.num_hidden_layers)
            && key.layer >= n
        {
            return Err(AdapterError::tensor(
                &t.name,
                format!(
                    "layer {} does not exist: the base model has {n} layers",
                    key.layer
                ),
            ));
        }
        if t.shape.len() != 2 {
            return Err(AdapterError::tensor(
                &t.name,
                format!("has shape {:?}, expected 2 dimensions", t.shape),
            ));
        }
        let (want_in, want_out) = dims
            .map(|d| d.linear_shape(&key.module))
            .unwrap_or((None, None));
        let (rank_dim, other, want, what) = if key.is_a {
            (t.shape[0], t.shape[1], want_in, "in_features")
        } else {
            (t.shape[1], t.shape[0], want_out, "out_features")
        };
        let r = cfg.rank_of(&module_path(key.layer, &key.module))?;
        if rank_dim != r {
            return Err(AdapterError::tensor(
                &t.name,
                format!("has shape {:?} but r = {r}", t.shape),
            ));
        }
        if let Some(w) = want
            && w != other
        {
            return Err(AdapterError::tensor(
                &t.name,
                format!(
                    "has shape {:?} but the base model's {} {what} is {w}",
                    t.shape, key.module
                ),
            ));
        }
        params += (t.shape[0] * t.shape[1]) as u64;
        let slot = seen.entry((key.layer, key.module.clone())).or_default();
        slot[usize::from(!key.is_a)] = Some(t);
    }
    if seen.is_empty() {
        return Err(AdapterError::weights("contains no LoRA tensors"));
    }
    for ((layer, module), pair) in &seen {
        match pair {
            [Some(_), Some(_)] => {}
            [None, _] => {
                return Err(AdapterError::tensor(
                    &lora_key(*layer, module, true),
                    "is missing (its lora_B is present)",
                ));
            }
            [_, None] => {
                return Err(AdapterError::tensor(
                    &lora_key(*layer, module, false),
                    "is missing (its lora_A is present)",
                ));
            }
        }
    }
    let layers = seen.keys().map(|(l, _)| *l).collect::<BTreeSet<_>>().len();
    let present: BTreeSet<String> = seen.keys().map(|(_, m)| m.clone()).collect();
    Ok(AdapterSummary {
        r: cfg.r,
        lora_alpha: cfg.lora_alpha,
        target_modules: present.into_iter().collect(),
        layers,
        trainable_params: params,
    })
}

/// What is wrong with an adapter, naming the file and the field or tensor.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum AdapterError {
    #[error("adapter_config.json: {field}: {message}")]
    Config { field: String, message: String },
    #[error("adapter_model.safetensors: {0}")]
    Weights(String),
    #[error("adapter_model.safetensors: tensor {tensor}: {message}")]
    Tensor { tensor: String, message: String },
}

impl AdapterError {
    pub fn config(field: &str, message: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn weights(message: impl Into<String>) -> Self {
        Self::Weights(message.into())
    }
    pub fn tensor(tensor: &str, message: impl Into<String>) -> Self {
        Self::Tensor {
            tensor: tensor.into(),
            message: message.into(),
        }
    }
}
