//! Serving benchmark (bench/serving/run.sh runs it): the native engine and mistral.rs side by
//! side in one run, on the CPU, on the generated tiny model and a generated ~100M-parameter
//! one, printing one table of the figures the native engine is held to. Memory is measured in
//! child processes (this program re-run with `rss …`), one configuration each.
//!
//!     cargo run --example bench_serving -- [all|tiny|100m|constrained]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use loraops_engine::{
    AdapterWeights, Constraint, Engine, EngineOptions, Event, Quantize, Request, SamplingParams,
};
use loraops_gateway::engine::mistral::{LoadSpec, MistralEngine};
use loraops_gateway::engine::{Engine as _, GenerateRequest, Prompt, Sampling};
use loraops_model::adapter::save_safetensors;
use loraops_model::config::ModelConfig;
use loraops_model::tiny::{TinySpec, init_tiny};
use loraops_registry::peft::{AdapterConfig, LINEAR_MODULES, lora_key};

const PROMPT: &str = "Once upon a time, in a land far away, there lived";
/// Tokens each stream decodes.
const DECODE: usize = 96;
const RANK: usize = 16;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// A random PEFT adapter with rank RANK on all seven linear modules.
fn write_adapter(dir: &Path, config: &ModelConfig, seed: u64) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05
    };
    let mut tensors = std::collections::BTreeMap::new();
    for layer in 0..config.num_hidden_layers {
        for (m, _) in LINEAR_MODULES {
            let (in_f, out_f) = config.linear_shape(m).unwrap();
            for (is_a, rows, cols) in [(true, RANK, in_f), (false, out_f, RANK)] {
                let v: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
                let t = candle_core::Tensor::from_vec(v, (rows, cols), &candle_core::Device::Cpu)
                    .unwrap();
                tensors.insert(lora_key(layer, m, is_a), t);
            }
        }
    }
    let weights = dir.join("adapter_model.safetensors");
    save_safetensors(&weights, &tensors).unwrap();
    let cfg = AdapterConfig::new_lora(
        "bench",
        RANK,
        32.0,
        LINEAR_MODULES.iter().map(|(m, _)| m.to_string()).collect(),
    );
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec(&cfg).unwrap(),
    )
    .unwrap();
    std::fs::metadata(&weights).unwrap().len()
}

struct Setup {
    name: &'static str,
    model: PathBuf,
    adapters: Vec<PathBuf>,
    adapter_bytes: u64,
}

fn setup(root: &Path, name: &'static str, spec: &TinySpec, adapters: usize) -> Setup {
    let model = root.join(name).join("model");
    if !model.join("config.json").exists() {
        eprintln!("generating the {name} model");
        init_tiny(&model, spec).unwrap();
    }
    let config = ModelConfig::from_file(&model.join("config.json")).unwrap();
    let mut paths = Vec::new();
    let mut bytes = 0;
    for i in 0..adapters {
        let dir = root.join(name).join(format!("adapter-{i}"));
        bytes = if dir.join("adapter_config.json").exists() {
            std::fs::metadata(dir.join("adapter_model.safetensors"))
                .unwrap()
                .len()
        } else {
            write_adapter(&dir, &config, i as u64 + 1)
        };
        paths.push(dir);
    }
    Setup {
        name,
        model,
        adapters: paths,
        adapter_bytes: bytes,
    }
}

fn native(model: &Path, quantize: Quantize) -> Engine {
    let mut o = EngineOptions::new(model);
    o.quantize = quantize;
    o.kv_cache_bytes = 2 << 30;
    o.slots.max_adapters = 128;
    o.slots.max_bytes = 8 << 30;
    Engine::start(o).unwrap()
}

/// Greedy, never ending early: every stream decodes all its tokens.
fn greedy(e: &Engine, max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.0,
        logit_bias: e
            .tokenizer()
            .eos_id
            .into_iter()
            .map(|t| (t, -1e9))
            .collect(),
        ..Default::default()
    }
}

/// Arrival times of each token of one request.
fn token_times(rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> Vec<Instant> {
    let mut rx = rx;
    let mut times = Vec::new();
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::Token { id: Some(_), .. } => times.push(Instant::now()),
            Event::Token { .. } => {}
            Event::Done { .. } => break,
            Event::Error(e) => panic!("{e}"),
        }
    }
    times
}

fn submit(
    e: &Engine,
    prompt: Vec<u32>,
    adapter: Option<Arc<AdapterWeights>>,
    max_tokens: usize,
) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
    submit_constrained(e, prompt, adapter, max_tokens, None)
}

fn submit_constrained(
    e: &Engine,
    prompt: Vec<u32>,
    adapter: Option<Arc<AdapterWeights>>,
    max_tokens: usize,
    constraint: Option<Constraint>,
) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
    e.generate(Request {
        prompt,
        adapter,
        sampling: greedy(e, max_tokens),
        constraint,
    })
    .unwrap()
}

/// Decode tokens/s of one stream: tokens after the first over the time they took.
fn native_single(e: &Engine, adapter: Option<Arc<AdapterWeights>>) -> f64 {
    native_single_constrained(e, adapter, None)
}

/// The same, the answer constrained (e.g. a `json_schema` response format).
fn native_single_constrained(
    e: &Engine,
    adapter: Option<Arc<AdapterWeights>>,
    constraint: Option<Constraint>,
) -> f64 {
    let prompt = e.encode_text(PROMPT).unwrap();
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let rx = submit_constrained(
            e,
            prompt.clone(),
            adapter.clone(),
            DECODE,
            constraint.clone(),
        );
        let t = token_times(rx);
        let rate = (t.len() - 1) as f64 / (t[t.len() - 1] - t[0]).as_secs_f64();
        best = best.max(rate);
    }
    best
}

/// Aggregate tokens/s of streams started together, one adapter each (None: the base): over
/// the whole burst (prompts read, ramp-up and ramp-down included), and over the window in
/// which every stream is decoding (from the last stream's first token to the first stream's
/// last), the rate of that many concurrent streams.
fn native_aggregate(e: &Engine, adapters: &[Option<Arc<AdapterWeights>>]) -> Aggregate {
    let prompt = e.encode_text(PROMPT).unwrap();
    let start = Instant::now();
    let handles: Vec<_> = adapters
        .iter()
        .map(|a| {
            let rx = submit(e, prompt.clone(), a.clone(), DECODE);
            std::thread::spawn(move || token_times(rx))
        })
        .collect();
    let times: Vec<Vec<Instant>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let total: usize = times.iter().map(Vec::len).sum();
    let burst = total as f64 / start.elapsed().as_secs_f64();
    let from = times.iter().map(|t| t[0]).max().unwrap();
    let to = times.iter().map(|t| t[t.len() - 1]).min().unwrap();
    assert!(to > from, "the streams never all decoded at once");
    let inside = times
        .iter()
        .flatten()
        .filter(|&&t| t > from && t <= to)
        .count();
    Aggregate {
        burst,
        steady: inside as f64 / (to - from).as_secs_f64(),
    }
}

#[derive(Default, Clone, Copy)]
struct Aggregate {
    burst: f64,
    steady: f64,
}

impl Aggregate {
    fn best(self, o: Aggregate) -> Aggregate {
        Aggregate {
            burst: self.burst.max(o.burst),
            steady: self.steady.max(o.steady),
        }
    }
}

/// p99 of the gaps between tokens of 16 decoding streams, over a window in which, with
/// `long_prompt`, a 2,000-token prompt arrives (once every stream is decoding).
fn inter_token_p99(e: &Engine, long_prompt: bool) -> f64 {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let prompt = e.encode_text(PROMPT).unwrap();
    let decoding = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let mut rx = submit(e, prompt.clone(), None, 400);
            let decoding = decoding.clone();
            std::thread::spawn(move || {
                let mut times = Vec::new();
                while let Some(ev) = rx.blocking_recv() {
                    match ev {
                        Event::Token { id: Some(_), .. } => {
                            if times.is_empty() {
                                decoding.fetch_add(1, Ordering::SeqCst);
                            }
                            times.push(Instant::now());
                        }
                        Event::Done { .. } => break,
                        _ => {}
                    }
                }
                times
            })
        })
        .collect();
    while decoding.load(Ordering::SeqCst) < 16 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let arrival = Instant::now();
    let long = long_prompt.then(|| {
        let ids: Vec<u32> = (0..2000).map(|i| 10 + (i * 7) % 200).collect();
        let rx = submit(e, ids, None, 8);
        std::thread::spawn(move || token_times(rx))
    });
    let times: Vec<Vec<Instant>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let long_done = long.map(|l| *l.join().unwrap().last().unwrap());
    // The window: from the arrival until the long prompt's answer ends (or as long without it).
    let end = long_done.unwrap_or(arrival + Duration::from_secs(3600));
    let mut gaps: Vec<f64> = times
        .iter()
        .flat_map(|t| {
            t.windows(2)
                .filter(|w| w[1] >= arrival && w[0] <= end)
                .map(|w| (w[1] - w[0]).as_secs_f64())
                .collect::<Vec<_>>()
        })
        .collect();
    gaps.sort_by(f64::total_cmp);
    gaps[((gaps.len() as f64 * 0.99) as usize).min(gaps.len() - 1)]
}

/// The hub-cache layout mistral.rs 0.8.1 loads adapters from, for one adapter directory.
fn hub_adapter(hub: &Path, dir: &Path, tag: &str) -> String {
    let repo = hub.join(format!("models--bench--{tag}"));
    let snap = repo.join("snapshots").join(tag);
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let to = snap.join(f);
        if !to.exists() {
            std::fs::copy(dir.join(f), to).unwrap();
        }
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), tag).unwrap();
    format!("bench/{tag}")
}

async fn mistral(model: &Path, adapter_id: Option<String>) -> MistralEngine {
    MistralEngine::load(LoadSpec {
        base_dir: std::fs::canonicalize(model).unwrap(),
        adapter_id,
        dtype: mistralrs::ModelDType::F32,
        max_num_seqs: 32,
        isq: None,
    })
    .await
    .unwrap()
}

/// Decode tokens/s of one mistral.rs stream (best of three), as for the native engine.
async fn mistral_single(e: &MistralEngine) -> f64 {
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let mut ev = e.generate(GenerateRequest {
            prompt: Prompt::Text(PROMPT.into()),
            sampling: Sampling {
                max_tokens: DECODE,
                temperature: 0.0,
                ..Sampling::default()
            },
        });
        let (mut first, mut last, mut n) = (None, Instant::now(), 0u64);
        while let Some(x) = ev.next().await {
            match x.unwrap() {
                loraops_gateway::engine::Event::Delta(_) => {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = now;
                }
                loraops_gateway::engine::Event::Done { usage, .. } => n = usage.completion_tokens,
                loraops_gateway::engine::Event::Logprobs(_) => {}
            }
        }
        let rate = (n.saturating_sub(1)) as f64 / (last - first.unwrap()).as_secs_f64();
        best = best.max(rate);
    }
    best
}

/// Child process: load an engine with N adapters, serve one request on each, print the RSS.
fn rss_child(args: &[String]) {
    let (engine, model, n, adapters_root) = (&args[0], &args[1], &args[2], &args[3]);
    let n: usize = n.parse().unwrap();
    let model = PathBuf::from(model);
    let root = PathBuf::from(adapters_root);
    match engine.as_str() {
        "native" | "native-nf4" => {
            let q = if engine == "native-nf4" {
                Quantize::Nf4
            } else {
                Quantize::None
            };
            let e = native(&model, q);
            let prompt = e.encode_text(PROMPT).unwrap();
            token_times(submit(&e, prompt.clone(), None, 4));
            for i in 0..n {
                let a = e
                    .load_adapter(&format!("a{i}"), &root.join(format!("adapter-{i}")))
                    .unwrap();
                token_times(submit(&e, prompt.clone(), Some(a), 2));
            }
            println!("{}", rss_bytes());
        }
        "mistralrs" => {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let hub = root.join("hub");
                let id = (n > 0).then(|| hub_adapter(&hub, &root.join("adapter-0"), "a0"));
                // SAFETY: set before the engine's threads read it.
                unsafe { std::env::set_var("HF_HUB_CACHE", &hub) };
                let e = mistral(&model, id).await;
                mistral_single(&e).await;
                println!("{}", rss_bytes());
            });
        }
        other => panic!("unknown engine {other}"),
    }
}

fn child_rss(engine: &str, s: &Setup, n: usize) -> u64 {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["rss", engine])
        .arg(&s.model)
        .arg(n.to_string())
        .arg(s.model.parent().unwrap())
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

struct Row {
    figure: String,
    native: String,
    other: String,
    ratio: String,
    goal: &'static str,
}

fn run(s: &Setup, rows: &mut Vec<Row>, rt: &tokio::runtime::Runtime) {
    let tag = s.name;
    let e = native(&s.model, Quantize::None);
    let adapters: Vec<Arc<AdapterWeights>> = s
        .adapters
        .iter()
        .take(32)
        .enumerate()
        .map(|(i, d)| e.load_adapter(&format!("a{i}"), d).unwrap())
        .collect();
    // (1) One stream, native unmerged vs mistral.rs merged, f32.
    let n1 = native_single(&e, Some(adapters[0].clone()));
    let m1 = rt.block_on(async {
        let hub = s.model.parent().unwrap().join("hub");
        let id = hub_adapter(&hub, &s.adapters[0], "a0");
        // SAFETY: no engine thread reads the environment concurrently here.
        unsafe { std::env::set_var("HF_HUB_CACHE", &hub) };
        mistral_single(&mistral(&s.model, Some(id)).await).await
    });
    rows.push(Row {
        figure: format!("{tag}: 1-stream decode tok/s (adapter, f32)"),
        native: format!("{n1:.1}"),
        other: format!("{m1:.1} (mistral.rs merged)"),
        ratio: format!("{:.2}x", n1 / m1),
        goal: ">= 1.0x",
    });
    batching(&e, &adapters, tag, rows);
    // (6) Adapter load, files cached.
    let mut loads: Vec<f64> = (0..20)
        .map(|i| {
            let d = &s.adapters[i % s.adapters.len()];
            let start = Instant::now();
            e.load_adapter(&format!("load-{i}"), d).unwrap();
            let t = start.elapsed().as_secs_f64() * 1000.0;
            e.unload_adapter(&format!("load-{i}"));
            t
        })
        .collect();
    loads.sort_by(f64::total_cmp);
    rows.push(Row {
        figure: format!("{tag}: adapter load p50 (cached files), ms"),
        native: format!("{:.1}", loads[loads.len() / 2]),
        other: String::new(),
        ratio: String::new(),
        goal: "< 50 ms (100M)",
    });
    constrained(&e, tag, rows);
    // (7) A 2,000-token prompt arriving while 16 streams decode.
    let quiet = inter_token_p99(&e, false);
    let busy = inter_token_p99(&e, true);
    rows.push(Row {
        figure: format!("{tag}: inter-token p99, 16 streams + 2k prompt, ms"),
        native: format!("{:.1}", busy * 1000.0),
        other: format!("{:.1} (no prompt)", quiet * 1000.0),
        ratio: format!("{:.2}x", busy / quiet),
        goal: "<= 3x",
    });
    drop(e);
    // (5) NF4 vs f32: decode rate in-process, memory in children.
    nf4_decode(s, tag, rows);
    let rss_f32 = child_rss("native", s, 0);
    let rss_nf4 = child_rss("native-nf4", s, 0);
    rows.push(Row {
        figure: format!("{tag}: NF4 vs f32 base, RSS MiB"),
        native: format!("{:.0}", mib(rss_nf4)),
        other: format!("{:.0} (f32)", mib(rss_f32)),
        ratio: format!("{:.2}x", rss_nf4 as f64 / rss_f32 as f64),
        goal: "<= 0.3x",
    });
    // (4) RSS with 1 / 10 / 100 adapters.
    let m_one = child_rss("mistralrs", s, 1);
    for n in [1, 10, 100].into_iter().filter(|&n| n <= s.adapters.len()) {
        let rss = child_rss("native", s, n);
        let bound = rss_f32 as f64 + 1.2 * (n as u64 * s.adapter_bytes) as f64;
        rows.push(Row {
            figure: format!(
                "{tag}: RSS with {n} adapters (r={RANK}, {:.1} MiB each), MiB",
                mib(s.adapter_bytes)
            ),
            native: format!("{:.0}", mib(rss)),
            other: format!(
                "{:.0} (mistral.rs: {n} x {:.0})",
                mib(m_one) * n as f64,
                mib(m_one)
            ),
            ratio: format!("{:.2} of bound", rss as f64 / bound),
            goal: "<= base + 1.2 x adapters",
        });
    }
}

/// (2) 32 streams over 32 adapters vs 32 on the base; (3) the batching gain, 32 vs 1 stream:
/// both while all the streams decode. Best of 3 each, the three measured in turn each round,
/// so that a slow spell of this shared machine does not land on one side only.
fn batching(e: &Engine, adapters: &[Arc<AdapterWeights>], tag: &str, rows: &mut Vec<Row>) {
    let mixed: Vec<_> = adapters.iter().map(|a| Some(a.clone())).collect();
    let on_base = vec![None; 32];
    let [mut one, mut base, mut adapted] = [Aggregate::default(); 3];
    for _ in 0..3 {
        one = one.best(native_aggregate(e, &on_base[..1]));
        base = base.best(native_aggregate(e, &on_base));
        adapted = adapted.best(native_aggregate(e, &mixed));
    }
    rows.push(Row {
        figure: format!("{tag}: 32 streams, 32 adapters vs base, tok/s"),
        native: format!("{:.1}", adapted.steady),
        other: format!("{:.1} (base)", base.steady),
        ratio: format!("{:.2}x", adapted.steady / base.steady),
        goal: ">= 0.8x",
    });
    rows.push(Row {
        figure: format!("{tag}: batching gain, 32 vs 1 stream tok/s"),
        native: format!("{:.1}", base.steady),
        other: format!("{:.1} (1 stream)", one.steady),
        ratio: format!("{:.2}x", base.steady / one.steady),
        goal: ">= 6x",
    });
    // The same over whole bursts: 32 prompts arriving at once are read a chunk per step while
    // the first streams decode, so the rate includes the ramp up and down.
    rows.push(Row {
        figure: format!("{tag}: burst of 32 vs 1 stream, prompts included, tok/s"),
        native: format!("{:.1}", base.burst),
        other: format!("{:.1} (1 stream)", one.burst),
        ratio: format!("{:.2}x", base.burst / one.burst),
        goal: "(reference)",
    });
}

/// (5) NF4 vs f32 base, one stream's decode rate in-process (best of 3 each).
fn nf4_decode(s: &Setup, tag: &str, rows: &mut Vec<Row>) {
    let e4 = native(&s.model, Quantize::Nf4);
    let n4 = native_single(&e4, None);
    drop(e4);
    let ef = native(&s.model, Quantize::None);
    let nf = native_single(&ef, None);
    drop(ef);
    rows.push(Row {
        figure: format!("{tag}: NF4 vs f32 base, 1-stream decode tok/s"),
        native: format!("{n4:.1}"),
        other: format!("{nf:.1} (f32)"),
        ratio: format!("{:.2}x", n4 / nf),
        goal: ">= 1.5x",
    });
}

/// The ~100M-parameter model.
fn spec_100m() -> TinySpec {
    TinySpec {
        layers: 16,
        hidden: 768,
        heads: 12,
        kv_heads: 4,
        vocab: 512,
        intermediate: Some(2048),
        seed: 1,
    }
}

/// (8) The cost of constrained decoding: one stream answering to a `json_schema` (a long
/// string field, so that the whole answer is constrained JSON) vs unconstrained.
fn constrained(e: &Engine, tag: &str, rows: &mut Vec<Row>) {
    let schema = serde_json::json!({"type": "object",
        "properties": {"story": {"type": "string", "minLength": 2000}}, "required": ["story"]});
    let free = native_single(e, None);
    let json = native_single_constrained(e, None, Some(Constraint::JsonSchema(schema)));
    rows.push(Row {
        figure: format!("{tag}: json_schema vs free decode, 1 stream tok/s"),
        native: format!("{json:.1}"),
        other: format!("{free:.1} (unconstrained)"),
        ratio: format!("{:.2}x", json / free),
        goal: ">= 0.9x",
    });
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("rss") {
        rss_child(&args[1..]);
        return;
    }
    let which = args.first().cloned().unwrap_or_else(|| "all".into());
    let root = std::env::var("BENCH_SERVING_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("loraops-bench-serving"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut rows = Vec::new();
    if which == "constrained" {
        for (name, spec) in [("tiny", TinySpec::default()), ("100m", spec_100m())] {
            let s = setup(&root, name, &spec, 1);
            constrained(&native(&s.model, Quantize::None), name, &mut rows);
        }
    }
    if which == "batching" {
        for (name, spec) in [("tiny", TinySpec::default()), ("100m", spec_100m())] {
            let s = setup(&root, name, &spec, 32);
            let e = native(&s.model, Quantize::None);
            let adapters: Vec<_> = s
                .adapters
                .iter()
                .enumerate()
                .map(|(i, d)| e.load_adapter(&format!("a{i}"), d).unwrap())
                .collect();
            batching(&e, &adapters, name, &mut rows);
        }
    }
    if which == "nf4" {
        for (name, spec) in [("tiny", TinySpec::default()), ("100m", spec_100m())] {
            nf4_decode(&setup(&root, name, &spec, 1), name, &mut rows);
        }
    }
    if which == "all" || which == "tiny" {
        let s = setup(&root, "tiny", &TinySpec::default(), 100);
        run(&s, &mut rows, &rt);
    }
    if which == "all" || which == "100m" {
        let s = setup(&root, "100m", &spec_100m(), 100);
        run(&s, &mut rows, &rt);
    }
    println!(
        "threads: {}, decode {DECODE} tokens per stream, greedy",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "| {:<56} | {:>12} | {:>34} | {:>14} | {:<24} |",
        "figure", "native", "compared with", "ratio", "goal"
    );
    println!(
        "|{}|{}|{}|{}|{}|",
        "-".repeat(58),
        "-".repeat(14),
        "-".repeat(36),
        "-".repeat(16),
        "-".repeat(26)
    );
    for r in rows {
        println!(
            "| {:<56} | {:>12} | {:>34} | {:>14} | {:<24} |",
            r.figure, r.native, r.other, r.ratio, r.goal
        );
    }
}
