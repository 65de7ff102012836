//! bitsandbytes' 4-bit checkpoints, as transformers saves a `load_in_4bit` model (the
//! `*-bnb-4bit` bases most QLoRA users download): reading their NF4 linears as they are, and
//! writing the same form (`loraops model quantize`).
//!
//! A quantised linear `P.weight` is stored as the packed codes (uint8, `(n/2, 1)`) beside
//! `P.weight.absmax` (f32, or uint8 codes when double-quantised), `P.weight.quant_map` (the 16
//! NF4 values), with double quantisation `P.weight.nested_absmax` and
//! `P.weight.nested_quant_map`, and `P.weight.quant_state.bitsandbytes__nf4`: the rest of the
//! state (shape, block sizes, dtype, the absmax offset) as JSON bytes in a uint8 tensor.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use safetensors::tensor::{Dtype, TensorView, View};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::linear::nf4::{ABSMAX_BLOCK, Absmax, NF4_BLOCK, NF4_CODE, Nf4Tensor, dynamic_map};

/// What a checkpoint's `quantization_config` says, when it is bitsandbytes NF4.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bnb4bit {
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype` as written (loraops computes in its own compute dtype).
    pub compute_dtype: String,
}

impl Bnb4bit {
    /// Read `quantization_config` from a config.json: `None` without one; an error that names
    /// the method for every quantisation loraops does not load, so such weights are never
    /// read as if they were plain ones.
    pub fn from_config(config: &Value) -> Result<Option<Self>> {
        let Some(q) = config.get("quantization_config") else {
            return Ok(None);
        };
        let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
        let flag = |k: &str| q.get(k).and_then(Value::as_bool).unwrap_or(false);
        if method != "bitsandbytes" {
            return Err(Error::Unsupported(format!(
                "quantization_config.quant_method {method:?}: loraops loads bitsandbytes NF4 \
                 checkpoints only (or the unquantised model, which it can quantise itself)"
            )));
        }
        if flag("load_in_8bit") || !flag("load_in_4bit") {
            return Err(Error::Unsupported(
                "bitsandbytes 8-bit (LLM.int8) checkpoints; use the unquantised model or a \
                 4-bit NF4 one"
                    .into(),
            ));
        }
        let quant_type = q
            .get("bnb_4bit_quant_type")
            .and_then(Value::as_str)
            .unwrap_or("fp4");
        if quant_type != "nf4" {
            return Err(Error::Unsupported(format!(
                "bitsandbytes 4-bit type {quant_type:?}: loraops holds NF4 only"
            )));
        }
        Ok(Some(Self {
            double_quant: flag("bnb_4bit_use_double_quant"),
            compute_dtype: q
                .get("bnb_4bit_compute_dtype")
                .and_then(Value::as_str)
                .unwrap_or("float32")
                .to_string(),
        }))
    }

    /// The `quantization_config` transformers writes for this form.
    fn to_config(&self) -> Value {
        json!({
            "_load_in_4bit": true,
            "_load_in_8bit": false,
            "bnb_4bit_compute_dtype": self.compute_dtype,
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "llm_int8_enable_fp32_cpu_offload": false,
            "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": null,
            "llm_int8_threshold": 6.0,
            "load_in_4bit": true,
            "load_in_8bit": false,
            "quant_method": "bitsandbytes",
        })
    }
}

/// The JSON part of a quantised weight's state, with bitsandbytes' keys in its order.
#[derive(Debug, Serialize, Deserialize)]
struct QuantState {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nested_blocksize: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nested_dtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nested_offset: Option<f64>,
}

const STATE_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";

fn floats(st: &MmapedSafetensors, name: &str) -> Result<Vec<f32>> {
    let t = st
        .load(name, &Device::Cpu)
        .map_err(|_| Error::MissingWeight { name: name.into() })?;
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn raw<'a>(st: &'a MmapedSafetensors, name: &str) -> Result<TensorView<'a>> {
    st.get(name)
        .map_err(|_| Error::MissingWeight { name: name.into() })
}

/// A code book stored in the checkpoint must be the one loraops decodes with.
fn check_code(name: &str, stored: &[f32], expected: &[f32]) -> Result<()> {
    let same = stored.len() == expected.len()
        && stored
            .iter()
            .zip(expected)
            .all(|(a, b)| (a - b).abs() <= 1e-6);
    if same {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "{name}: a code book other than bitsandbytes' NF4 / dynamic 8-bit one"
        )))
    }
}

/// The NF4 weight `weight` (e.g. `model.layers.0.mlp.up_proj.weight`) as the checkpoint stores
/// it, held on `device`; `None` when that weight is not quantised.
pub fn read_nf4(
    st: &MmapedSafetensors,
    weight: &str,
    device: &Device,
) -> Result<Option<Nf4Tensor>> {
    let Ok(state) = st.get(&format!("{weight}{STATE_SUFFIX}")) else {
        if st
            .get(&format!("{weight}.quant_state.bitsandbytes__fp4"))
            .is_ok()
        {
            return Err(Error::Unsupported(format!(
                "{weight}: bitsandbytes FP4; loraops holds NF4 only"
            )));
        }
        return Ok(None);
    };
    let bad = |m: String| Error::Config(format!("{weight}: {m}"));
    let meta: QuantState = serde_json::from_slice(state.data())
        .map_err(|e| bad(format!("quant_state is not bitsandbytes' JSON: {e}")))?;
    let [out_f, in_f] = meta.shape[..] else {
        return Err(bad(format!("quantised shape {:?} is not 2-D", meta.shape)));
    };
    if meta.blocksize != NF4_BLOCK {
        return Err(Error::Unsupported(format!(
            "{weight}: NF4 block size {} (loraops uses {NF4_BLOCK}, bitsandbytes' default)",
            meta.blocksize
        )));
    }
    let n = out_f * in_f;
    let blocks = n.div_ceil(NF4_BLOCK);
    // Whatever the storage dtype (`bnb_4bit_quant_storage`), the bytes are the packed codes.
    let packed = raw(st, weight)?.data().to_vec();
    if packed.len() != n.div_ceil(2) {
        return Err(bad(format!(
            "{} packed bytes for a {out_f}x{in_f} weight (expected {})",
            packed.len(),
            n.div_ceil(2)
        )));
    }
    check_code(
        &format!("{weight}.quant_map"),
        &floats(st, &format!("{weight}.quant_map"))?,
        &NF4_CODE,
    )?;
    let absmax_name = format!("{weight}.absmax");
    let absmax = match meta.nested_offset {
        None => Absmax::F32(floats(st, &absmax_name)?),
        Some(offset) => {
            if meta.nested_blocksize != Some(ABSMAX_BLOCK) {
                return Err(Error::Unsupported(format!(
                    "{weight}: nested block size {:?} (loraops uses {ABSMAX_BLOCK})",
                    meta.nested_blocksize
                )));
            }
            check_code(
                &format!("{weight}.nested_quant_map"),
                &floats(st, &format!("{weight}.nested_quant_map"))?,
                &dynamic_map(),
            )?;
            let absmax2 = floats(st, &format!("{weight}.nested_absmax"))?;
            if absmax2.len() != blocks.div_ceil(ABSMAX_BLOCK) {
                return Err(bad(format!("{} nested absmax values", absmax2.len())));
            }
            Absmax::Double {
                q: raw(st, &absmax_name)?.data().to_vec(),
                absmax2,
                offset: offset as f32,
            }
        }
    };
    let count = match &absmax {
        Absmax::F32(a) => a.len(),
        Absmax::Double { q, .. } => q.len(),
    };
    if count != blocks {
        return Err(bad(format!(
            "{count} absmax values for {blocks} blocks of {NF4_BLOCK}"
        )));
    }
    Ok(Some(Nf4Tensor::from_parts(
        [out_f, in_f],
        packed,
        absmax,
        device,
    )?))
}

/// A tensor to write: one of the source's, unchanged, or a new one.
enum OutTensor<'a> {
    Kept(TensorView<'a>),
    New {
        dtype: Dtype,
        shape: Vec<usize>,
        data: Vec<u8>,
    },
}

impl OutTensor<'_> {
    fn u8(data: Vec<u8>, shape: Vec<usize>) -> Self {
        Self::New {
            dtype: Dtype::U8,
            shape,
            data,
        }
    }
    fn f32(v: &[f32]) -> Self {
        Self::New {
            dtype: Dtype::F32,
            shape: vec![v.len()],
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

impl View for &OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            OutTensor::Kept(t) => t.dtype(),
            OutTensor::New { dtype, .. } => *dtype,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            OutTensor::Kept(t) => t.shape(),
            OutTensor::New { shape, .. } => shape,
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            OutTensor::Kept(t) => Cow::Borrowed(t.data()),
            OutTensor::New { data, .. } => Cow::Borrowed(data),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            OutTensor::Kept(t) => t.data().len(),
            OutTensor::New { data, .. } => data.len(),
        }
    }
}

fn torch_dtype(d: Dtype) -> &'static str {
    match d {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    }
}

/// The tensors bitsandbytes stores for one quantised weight.
fn nf4_tensors(name: &str, q: Nf4Tensor, dtype: Dtype) -> Vec<(String, OutTensor<'static>)> {
    let packed_len = q.packed.len();
    let mut state = QuantState {
        quant_type: "nf4".into(),
        blocksize: NF4_BLOCK,
        dtype: torch_dtype(dtype).into(),
        shape: q.shape.to_vec(),
        nested_blocksize: None,
        nested_dtype: None,
        nested_offset: None,
    };
    let mut out = vec![
        (
            name.to_string(),
            OutTensor::u8(q.packed, vec![packed_len, 1]),
        ),
        (format!("{name}.quant_map"), OutTensor::f32(&NF4_CODE)),
    ];
    match q.absmax {
        Absmax::F32(a) => out.push((format!("{name}.absmax"), OutTensor::f32(&a))),
        Absmax::Double {
            q: codes,
            absmax2,
            offset,
        } => {
            state.nested_blocksize = Some(ABSMAX_BLOCK);
            state.nested_dtype = Some("float32".into());
            state.nested_offset = Some(offset as f64);
            let len = codes.len();
            out.push((format!("{name}.absmax"), OutTensor::u8(codes, vec![len])));
            out.push((format!("{name}.nested_absmax"), OutTensor::f32(&absmax2)));
            out.push((
                format!("{name}.nested_quant_map"),
                OutTensor::f32(&dynamic_map()),
            ));
        }
    }
    // bitsandbytes reads the state back with json.loads.
    let bytes = serde_json::to_vec(&state).expect("plain struct");
    let len = bytes.len();
    out.push((
        format!("{name}{STATE_SUFFIX}"),
        OutTensor::u8(bytes, vec![len]),
    ));
    out
}

/// What `loraops model quantize` did.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    pub out: PathBuf,
    /// Decoder linears written as NF4, and their parameters.
    pub quantized: usize,
    pub quantized_params: usize,
    /// Tensors written unchanged (embeddings, norms, lm_head, biases).
    pub kept: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub files: Vec<String>,
}

/// Quantise a Hugging Face model directory's decoder linears to NF4 and write the
/// bitsandbytes form into `out` (which must not exist or be empty): config.json gains
/// transformers' `quantization_config`, the other files are copied. Embeddings, norms and
/// lm_head stay as they are, as bitsandbytes leaves them. The directory appears whole or not
/// at all. Shards of at most `max_shard_bytes`.
pub fn quantize_dir(
    src: &Path,
    out: &Path,
    double_quant: bool,
    max_shard_bytes: u64,
) -> Result<QuantizeReport> {
    let config_path = src.join("config.json");
    let mut config: Value = serde_json::from_slice(&crate::error::read(&config_path)?)
        .map_err(|e| Error::parse(&config_path, e))?;
    if config.get("quantization_config").is_some() {
        return Err(Error::parse(
            &config_path,
            "the model is already quantised (it has a quantization_config)",
        ));
    }
    let model = ModelConfig::from_json(&config).map_err(|e| match e {
        Error::Config(m) => Error::parse(&config_path, m),
        other => other,
    })?;
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .next()
            .is_some()
    {
        return Err(Error::Config(format!(
            "output directory {} exists and is not empty",
            out.display()
        )));
    }
    let files = crate::llama::weight_files(src)?;
    // SAFETY: read-only maps of files loraops does not write while it reads them.
    let st = unsafe { MmapedSafetensors::multi(&files)? };
    let linear: std::collections::HashSet<String> = (0..model.num_hidden_layers)
        .flat_map(|i| {
            model.linear_modules().iter().map(move |m| {
                let block = match *m {
                    "gate_proj" | "up_proj" | "down_proj" => "mlp",
                    _ => "self_attn",
                };
                format!("model.layers.{i}.{block}.{m}.weight")
            })
        })
        .collect();
    let mut dtype = Dtype::F32;
    let mut tensors: Vec<(String, OutTensor)> = Vec::new();
    let (mut quantized, mut quantized_params, mut kept, mut bytes_before) = (0, 0, 0, 0u64);
    let mut names: Vec<(String, TensorView)> = st.tensors();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, view) in names {
        bytes_before += view.data().len() as u64;
        if linear.contains(&name) && view.shape().len() == 2 {
            dtype = view.dtype();
            let w = st.load(&name, &Device::Cpu)?;
            let q = Nf4Tensor::quantize(&w, double_quant)?;
            quantized += 1;
            quantized_params += q.shape[0] * q.shape[1];
            tensors.extend(nf4_tensors(&name, q, view.dtype()));
        } else {
            kept += 1;
            tensors.push((name, OutTensor::Kept(view)));
        }
    }
    if quantized == 0 {
        return Err(Error::Config(format!(
            "{}: no decoder linear weights to quantise",
            src.display()
        )));
    }
    let bnb = Bnb4bit {
        double_quant,
        compute_dtype: torch_dtype(dtype).into(),
    };
    config["quantization_config"] = bnb.to_config();

    // Written next to `out` and renamed into place, so no half-written model is ever visible.
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".quantize-")
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))?;
    for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let entry = entry.map_err(|e| Error::io(src, e))?;
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        let skip = name_str == "config.json"
            || name_str.ends_with(".safetensors")
            || name_str == "model.safetensors.index.json";
        if !skip && entry.path().is_file() {
            let to = tmp.path().join(&name);
            std::fs::copy(entry.path(), &to).map_err(|e| Error::io(&to, e))?;
        }
    }
    let written = write_shards(&tensors, tmp.path(), max_shard_bytes)?;
    let config_out = tmp.path().join("config.json");
    crate::error::write(
        &config_out,
        serde_json::to_vec_pretty(&config).expect("JSON value"),
    )?;
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
    }
    let tmp = tmp.keep();
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    let bytes_after = written
        .iter()
        .map(|f| std::fs::metadata(out.join(f)).map(|m| m.len()).unwrap_or(0))
        .sum();
    Ok(QuantizeReport {
        out: out.to_path_buf(),
        quantized,
        quantized_params,
        kept,
        bytes_before,
        bytes_after,
        files: written,
    })
}

/// `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards with the index
/// transformers reads, keeping each weight's tensors in one shard. Returns the file names.
fn write_shards(
    tensors: &[(String, OutTensor)],
    dir: &Path,
    max_shard_bytes: u64,
) -> Result<Vec<String>> {
    // Group by weight: a quantised weight's state travels with its codes.
    let mut groups: BTreeMap<&str, Vec<&(String, OutTensor)>> = BTreeMap::new();
    for t in tensors {
        // `P.weight` and its `P.weight.absmax`, `P.weight.quant_map`, … share the key `P`.
        let key = t.0.split_once(".weight").map_or(t.0.as_str(), |(p, _)| p);
        groups.entry(key).or_default().push(t);
    }
    let mut shards: Vec<Vec<&(String, OutTensor)>> = vec![Vec::new()];
    let mut size = 0u64;
    for group in groups.into_values() {
        let bytes: u64 = group.iter().map(|t| (&t.1).data_len() as u64).sum();
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("one shard").extend(group);
    }
    let n = shards.len();
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let mut names = Vec::with_capacity(n);
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let path = dir.join(&file);
        safetensors::serialize_to_file(
            shard.iter().map(|(name, t)| (name.as_str(), t)),
            metadata.clone(),
            &path,
        )
        .map_err(|e| Error::io(&path, std::io::Error::other(e)))?;
        for (name, t) in shard.iter().map(|t| (&t.0, &t.1)) {
            total += t.data_len() as u64;
            weight_map.insert(name.clone(), file.clone());
        }
        names.push(file);
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        crate::error::write(
            &dir.join("model.safetensors.index.json"),
            serde_json::to_vec_pretty(&index).expect("JSON value"),
        )?;
    }
    Ok(names)
}
