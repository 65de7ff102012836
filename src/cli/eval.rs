//! `loraops eval run --suite NAME[@VERSION]|DIR --adapter NAME@V` and
//! `loraops eval suite push DIR | list | from-split FILE --name NAME --out DIR | redteam --out DIR`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use loraops_registry::api::{
    AdapterRef, Comparison, EngineIdentity, Name, NewEvidence, SuiteManifest, SuiteRef,
};
use loraops_registry::client::{RegistryClient, no_progress};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{ClientArgs, Global, UsageError, runtime};
use crate::eval::runner::{self, CaseResult, Gateway, RunOptions};
use crate::eval::scorers::Scorer;
use crate::eval::suite::{LoadedSuite, cases_jsonl, perplexity_cases, regression_cases};
use crate::eval::{perplexity, producer, redteam};
use crate::output::emit;

#[derive(Debug, Subcommand)]
pub enum EvalCmd {
    /// Run a suite against an adapter version through the gateway and post the evidence.
    Run(RunArgs),
    /// Upload, list and build evaluation suites.
    #[command(subcommand)]
    Suite(SuiteCmd),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A suite in the registry (`NAME` for its latest version, `NAME@VERSION`) or a suite
    /// directory (suite.json + cases.jsonl, or templates.json), uploaded before the run.
    #[arg(long)]
    pub suite: String,
    /// The adapter version to evaluate, `NAME@V`; the gateway serves it pinned.
    #[arg(long, required_unless_present = "base", conflicts_with = "base")]
    pub adapter: Option<String>,
    /// Evaluate this base model itself (no adapter), as the gateway serves it: the baseline
    /// of gate rules with `vs: base`.
    #[arg(long)]
    pub base: Option<String>,
    /// Gateway base URL (OpenAI API).
    #[arg(
        long,
        env = "LORAOPS_GATEWAY_URL",
        default_value = "http://127.0.0.1:8500"
    )]
    pub gateway: String,
    /// Bearer token for the gateway (default: the registry token).
    #[arg(long, env = "LORAOPS_GATEWAY_TOKEN", hide_env_values = true)]
    pub gateway_token: Option<String>,
    /// Cases in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// `max_tokens` per answer, unless the suite's manifest or a case sets it.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u64,
    /// Directory for results.jsonl, evidence.json and summary.json
    /// (default ./loraops-eval/NAME@V/SUITE-TIMESTAMP).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run and save results only: upload no suite and post no evidence.
    #[arg(long)]
    pub no_post: bool,
    /// Perplexity suites: the base model's Hugging Face directory. They run base + adapter
    /// through the trainer's forward pass here (checked against the registered weights digest).
    #[arg(long, env = "LORAOPS_BASE_DIR")]
    pub base_dir: Option<PathBuf>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Subcommand)]
pub enum SuiteCmd {
    /// Upload a suite directory (suite.json + cases.jsonl, or templates.json).
    Push {
        dir: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the suites in the registry.
    List {
        /// Only this suite's versions.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Build a suite from a curation split: a regression suite (`exact`/`contains`: the
    /// expected answer is the last assistant turn or the completion) or a `perplexity` suite
    /// (usually from holdout.jsonl).
    FromSplit {
        /// The split, e.g. DIR/regression.jsonl from `loraops data curate`.
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "1")]
        version: String,
        #[arg(long, default_value = "exact", value_parser = ["exact", "contains", "perplexity"])]
        scorer: String,
        /// Directory to write suite.json and cases.jsonl into.
        #[arg(long)]
        out: PathBuf,
        /// Also upload it.
        #[arg(long)]
        push: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Write the built-in red-team smoke suite, expanded into cases, to a directory.
    Redteam {
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(cmd: EvalCmd, global: &Global) -> anyhow::Result<()> {
    match cmd {
        EvalCmd::Run(args) => run_suite(args, global),
        EvalCmd::Suite(cmd) => suite_cmd(cmd, global),
    }
}

fn load_dir(dir: &Path) -> anyhow::Result<LoadedSuite> {
    LoadedSuite::from_dir(dir).map_err(|e| UsageError(format!("{e:#}")).into())
}

fn suite_line(s: &LoadedSuite) -> String {
    format!(
        "{}@{} {} ({} cases, scorer {})",
        s.manifest.name,
        s.manifest.version,
        s.digest,
        s.cases.len(),
        s.scorer.primary_metric()
    )
}

fn suite_cmd(cmd: SuiteCmd, global: &Global) -> anyhow::Result<()> {
    let json = global.json;
    match cmd {
        SuiteCmd::Push { dir, client } => {
            let s = load_dir(&dir)?;
            let res = runtime()?.block_on(client.client().push_suite(&s.to_upload()))?;
            emit(json, &res, || {
                let verb = if res.created {
                    "uploaded"
                } else {
                    "already stored:"
                };
                format!("{verb} {}", suite_line(&s))
            });
        }
        SuiteCmd::List { name, client } => {
            let all = runtime()?.block_on(client.client().suites(name.as_deref()))?;
            emit(json, &all, || {
                let mut lines = vec!["NAME\tVERSION\tCASES\tSCORER\tDIGEST".to_string()];
                lines.extend(all.iter().map(|s| {
                    format!(
                        "{}\t{}\t{}\t{}\t{}",
                        s.name,
                        s.version,
                        s.cases,
                        s.manifest.scorer["type"].as_str().unwrap_or("?"),
                        s.digest
                    )
                }));
                lines.join("\n")
            });
        }
        SuiteCmd::FromSplit {
            file,
            name,
            version,
            scorer,
            out,
            push,
            client,
        } => {
            let s = suite_from_split(&file, &name, &version, &scorer)?;
            s.write_dir(&out)?;
            let pushed = if push {
                Some(runtime()?.block_on(client.client().push_suite(&s.to_upload()))?)
            } else {
                None
            };
            let value = json!({"dir": out, "name": s.manifest.name, "version": s.manifest.version,
                "digest": s.digest, "cases": s.cases.len(), "pushed": pushed.as_ref().map(|p| p.created)});
            emit(json, &value, || {
                let mut l = format!("wrote {} to {}", suite_line(&s), out.display());
                if pushed.is_some() {
                    l.push_str("\nuploaded to the registry");
                }
                l
            });
        }
        SuiteCmd::Redteam { out } => {
            let (m, cases) = redteam::expand(redteam::SMOKE_TEMPLATES)?;
            let s = LoadedSuite::new(m, &cases)?;
            s.write_dir(&out)?;
            let value = json!({"dir": out, "name": s.manifest.name, "version": s.manifest.version,
                "digest": s.digest, "cases": s.cases.len()});
            emit(json, &value, || {
                format!("wrote {} to {}", suite_line(&s), out.display())
            });
        }
    }
    Ok(())
}

/// `eval suite from-split`: a regression suite (`exact` / `contains`) or a `perplexity` suite
/// from a curation split.
pub fn suite_from_split(
    file: &Path,
    name: &str,
    version: &str,
    scorer: &str,
) -> anyhow::Result<LoadedSuite> {
    let name = Name::parse(name).map_err(|e| UsageError(format!("--name: {e}")))?;
    let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    let cases = if scorer == "perplexity" {
        perplexity_cases(&text)
    } else {
        regression_cases(&text)
    }
    .map_err(|e| UsageError(format!("{}: {e:#}", file.display())))?;
    let manifest = SuiteManifest {
        name,
        version: version.to_string(),
        description: Some(format!(
            "{} cases from {}",
            if scorer == "perplexity" {
                "Perplexity"
            } else {
                "Regression"
            },
            file.file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default()
        )),
        scorer: json!({"type": scorer}),
        thresholds: vec![],
        decoding: Value::Null,
    };
    Ok(LoadedSuite::new(manifest, &cases_jsonl(&cases))
        .map_err(|e| UsageError(format!("{e:#}")))?)
}

/// A suite directory, else `NAME[@VERSION]` from the registry (cases verified by digest).
async fn resolve_suite(
    spec: &str,
    rc: &RegistryClient,
    upload: bool,
) -> anyhow::Result<LoadedSuite> {
    let path = Path::new(spec);
    if path.is_dir() {
        let s = load_dir(path)?;
        if upload {
            let stored = rc.push_suite(&s.to_upload()).await?;
            anyhow::ensure!(
                stored.suite.digest == s.digest,
                "the registry stored suite digest {} but the directory hashes to {}",
                stored.suite.digest,
                s.digest
            );
        }
        return Ok(s);
    }
    let (name, version) = match spec.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    Name::parse(name).map_err(|e| {
        UsageError(format!(
            "--suite {spec:?} is neither a directory nor a suite name: {e}"
        ))
    })?;
    let s = rc.suite(name, version).await?;
    let text = rc.suite_cases(&s).await?;
    let loaded = LoadedSuite::new(s.manifest.clone(), &text)?;
    anyhow::ensure!(
        loaded.digest == s.digest,
        "suite {}@{}: the cases hash to {} but the registry says {}",
        s.name,
        s.version,
        loaded.digest,
        s.digest
    );
    Ok(loaded)
}

/// Generated-text suites: every case through the gateway's OpenAI API, `model = NAME@V`.
fn through_gateway(
    args: &RunArgs,
    rt: &tokio::runtime::Runtime,
    suite: &LoadedSuite,
    model: &str,
    model_digest: Option<String>,
    bar: &ProgressBar,
) -> anyhow::Result<(Vec<CaseResult>, BTreeMap<String, f64>, EngineIdentity)> {
    let gw = Gateway::new(
        &args.gateway,
        args.gateway_token.clone().or(args.client.token.clone()),
    );
    let models = rt
        .block_on(gw.models())
        .with_context(|| format!("the gateway at {} is not answering", gw.base_url()))?;
    let base_served = models["data"]
        .as_array()
        .and_then(|d| d.iter().find(|c| c["owned_by"] == "loraops"))
        .and_then(|c| c["id"].as_str())
        .map(str::to_string);
    let opts = RunOptions {
        model: model.to_string(),
        concurrency: args.concurrency,
        max_tokens: suite.max_tokens(args.max_tokens),
        arm: if args.base.is_some() {
            "base"
        } else {
            "pinned"
        },
    };
    let (results, info) = rt.block_on(runner::run(&gw, suite, &opts, || bar.inc(1)));
    let metrics = runner::summarise(&results, &suite.scorer);
    let header = |k: &str| info.engine_headers.get(k).cloned();
    let engine = EngineIdentity {
        engine: header("x-loraops-engine").unwrap_or_else(|| "loraops-gateway".into()),
        engine_version: header("x-loraops-engine-version")
            .or(header("server"))
            .unwrap_or_else(|| "unreported".into()),
        model_digest,
        decoding: json!({
            "temperature": 0.0,
            "max_tokens": opts.max_tokens,
            "stream": false,
            "model": model,
            "quantization": header("x-loraops-engine-quantization"),
            "base_model": base_served,
            "gateway": gw.base_url(),
        }),
    };
    Ok((results, metrics, engine))
}

fn holds(op: Comparison, x: f64, t: f64) -> bool {
    match op {
        Comparison::Ge => x >= t,
        Comparison::Gt => x > t,
        Comparison::Le => x <= t,
        Comparison::Lt => x < t,
    }
}

fn op_str(op: Comparison) -> String {
    serde_json::to_value(op)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn sha256_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Some `suite.json` thresholds were missed: the run is recorded, the exit status says so.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ThresholdsMissed(pub String);

/// What a run evaluates: an adapter version, or a base model alone.
enum Subject {
    Version { name: Name, version: u32 },
    Base(Name),
}

fn run_suite(args: RunArgs, global: &Global) -> anyhow::Result<()> {
    let json = global.json;
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    let Evaluation {
        model,
        suite,
        results,
        metrics,
        thresholds,
        cases_digest,
        results_path,
        posted,
        bound_digest,
        summary,
    } = evaluate(args, bar)?;
    emit(json, &summary, || {
        let errors = metrics.get("errors").copied().unwrap_or(0.0);
        let mut s = format!(
            "{}@{} ({}) on {model}: {} cases, {errors} errors\n",
            suite.manifest.name,
            suite.manifest.version,
            suite.digest,
            results.len()
        );
        for (k, v) in &metrics {
            if !k.contains('/') {
                s.push_str(&format!("  {k:<24} {v:.4}\n"));
            }
        }
        for t in &thresholds {
            s.push_str(&format!(
                "  threshold {} {} {}: {} (observed {})\n",
                t["metric"].as_str().unwrap_or_default(),
                t["op"].as_str().unwrap_or_default(),
                t["value"],
                if t["passed"] == true { "pass" } else { "FAIL" },
                t["observed"]
            ));
        }
        s.push_str(&format!(
            "  results {} ({cases_digest})\n",
            results_path.display()
        ));
        match &posted {
            Some((id, of)) => s.push_str(&format!(
                "  evidence #{id} posted for {of} ({bound_digest})"
            )),
            None => s.push_str("  evidence not posted (--no-post)"),
        }
        s
    });
    let missed: Vec<String> = thresholds
        .iter()
        .filter(|t| t["passed"] != true)
        .map(|t| {
            format!(
                "{} {} {} (observed {})",
                t["metric"].as_str().unwrap_or_default(),
                t["op"].as_str().unwrap_or_default(),
                t["value"],
                t["observed"]
            )
        })
        .collect();
    if !missed.is_empty() {
        return Err(ThresholdsMissed(format!(
            "{model} misses {} of suite {}@{}'s thresholds: {}",
            missed.len(),
            suite.manifest.name,
            suite.manifest.version,
            missed.join("; ")
        ))
        .into());
    }
    Ok(())
}

/// A finished `eval run`: what it wrote and posted.
pub struct Evaluation {
    /// `NAME@V`, or the base model's name.
    pub model: String,
    pub suite: LoadedSuite,
    pub results: Vec<CaseResult>,
    pub metrics: BTreeMap<String, f64>,
    /// The suite's thresholds with what was observed: `{metric, op, value, observed, passed}`.
    pub thresholds: Vec<Value>,
    pub cases_digest: String,
    pub results_path: PathBuf,
    /// The evidence's id and what it was posted for (None with `--no-post`).
    pub posted: Option<(i64, String)>,
    pub bound_digest: String,
    /// What `summary.json` holds.
    pub summary: Value,
}

/// `eval run` without the printing: run the suite, write results.jsonl, evidence.json and
/// summary.json, and post the evidence (`loraops demo` evaluates through this too). Must not
/// be called from inside an async runtime: it runs its own.
pub fn evaluate(args: RunArgs, bar: ProgressBar) -> anyhow::Result<Evaluation> {
    let subject = match (&args.adapter, &args.base) {
        (Some(a), _) => {
            let r: AdapterRef = a.parse().map_err(UsageError)?;
            let version = r.version.ok_or_else(|| {
                UsageError(format!(
                    "--adapter {a} needs a version (NAME@V): evidence binds to one version"
                ))
            })?;
            Subject::Version {
                name: r.name,
                version,
            }
        }
        (None, Some(b)) => Subject::Base(Name::parse(b).map_err(|e| UsageError(e.to_string()))?),
        (None, None) => {
            return Err(UsageError("name --adapter NAME@V or --base NAME".into()).into());
        }
    };
    if args.concurrency == 0 {
        return Err(UsageError("--concurrency must be at least 1".into()).into());
    }
    let rc = args.client.client();
    let rt = runtime()?;
    let suite = rt.block_on(resolve_suite(&args.suite, &rc, !args.no_post))?;
    let bases = rt.block_on(rc.base_models());
    let (model, base_name, bound_digest) = match &subject {
        Subject::Version { name, version } => {
            let ver = rt.block_on(rc.version(name.as_str(), *version))?;
            (format!("{name}@{version}"), ver.base_model, ver.digest)
        }
        Subject::Base(b) => {
            let all = bases.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
            let found = all
                .iter()
                .find(|x| &x.name == b)
                .ok_or_else(|| UsageError(format!("the registry has no base model {b}")))?;
            (
                b.to_string(),
                b.clone(),
                loraops_registry::api::base_evidence_digest(b, found.digest.as_deref()),
            )
        }
    };
    // The base model's weights digest, as the registry knows it.
    let model_digest = bases
        .ok()
        .and_then(|all| all.into_iter().find(|b| b.name == base_name))
        .and_then(|b| b.digest);

    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("loraops-eval").join(&model).join(format!(
            "{}-{}",
            suite.manifest.name,
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
        ))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("{}", out.display()))?;
    bar.set_length(suite.cases.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} cases {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("eval {} on {model}", suite.manifest.name));
    let started_at = chrono::Utc::now();
    let (results, metrics, engine) = match suite.scorer {
        Scorer::Perplexity { max_seq_len } => {
            let Subject::Version { name, version } = &subject else {
                return Err(UsageError(format!(
                    "suite {} scores perplexity, which compares an adapter with its base: name --adapter NAME@V",
                    suite.manifest.name
                ))
                .into());
            };
            let (name, version) = (name.clone(), *version);
            let base_dir = args.base_dir.as_deref().ok_or_else(|| {
                UsageError(format!(
                    "suite {} scores perplexity, which runs {model} through the trainer's forward pass: pass --base-dir with {}'s Hugging Face directory",
                    suite.manifest.name, base_name
                ))
            })?;
            let local_digest = crate::cli::base_model::weights_digest(base_dir)
                .with_context(|| format!("{}", base_dir.display()))?;
            if let (Some(want), Some(got)) = (&model_digest, &local_digest) {
                anyhow::ensure!(
                    want == got,
                    UsageError(format!(
                        "--base-dir {} is not the registered base model {}: its weights hash to {got}, the registry has {want}",
                        base_dir.display(),
                        base_name
                    ))
                );
            }
            let adapter_dir = out.join("adapter");
            rt.block_on(rc.pull(name.as_str(), version, &adapter_dir, no_progress()))?;
            let runner = perplexity::PerplexityRunner::load(base_dir, &adapter_dir, max_seq_len)?;
            let results: Vec<_> = suite
                .cases
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let res = runner.score(i, c);
                    bar.inc(1);
                    res
                })
                .collect();
            let engine = EngineIdentity {
                engine: "loraops-trainer".into(),
                engine_version: env!("CARGO_PKG_VERSION").into(),
                model_digest: local_digest.or(model_digest),
                decoding: json!({
                    "mode": "teacher-forced",
                    "dtype": "f32",
                    "max_seq_len": max_seq_len,
                    "model": model,
                }),
            };
            let metrics = perplexity::summarise(&results);
            (results, metrics, engine)
        }
        _ => through_gateway(&args, &rt, &suite, &model, model_digest, &bar)?,
    };
    let finished_at = chrono::Utc::now();
    bar.finish_and_clear();

    let results_text = runner::results_jsonl(&results);
    let results_path = out.join("results.jsonl");
    std::fs::write(&results_path, &results_text)
        .with_context(|| format!("{}", results_path.display()))?;
    let cases_digest = sha256_of(results_text.as_bytes());
    if let Some(first) = results.iter().find_map(|r| r.error.as_ref())
        && results.iter().all(|r| r.error.is_some())
    {
        anyhow::bail!(
            "every case failed, nothing to report (results in {}); first error: {first}",
            results_path.display()
        );
    }
    let body = NewEvidence {
        adapter_digest: bound_digest.clone(),
        suite: SuiteRef {
            name: suite.manifest.name.to_string(),
            version: Some(suite.manifest.version.clone()),
            digest: suite.digest.clone(),
        },
        engine,
        metrics: metrics.clone(),
        cases: results.len() as u64,
        cases_digest: Some(cases_digest.clone()),
        produced_by: Some(producer()),
        started_at,
        finished_at,
    };
    let thresholds: Vec<Value> = suite
        .manifest
        .thresholds
        .iter()
        .map(|t| {
            let observed = metrics.get(&t.metric).copied();
            json!({"metric": t.metric, "op": op_str(t.op), "value": t.value, "observed": observed,
                "passed": observed.is_some_and(|x| holds(t.op, x, t.value))})
        })
        .collect();
    std::fs::write(
        out.join("evidence.json"),
        serde_json::to_string_pretty(&body)? + "\n",
    )?;
    let posted: Option<(i64, String)> = if args.no_post {
        None
    } else {
        Some(match &subject {
            Subject::Version { name, version } => {
                let e = rt.block_on(rc.post_evidence(name.as_str(), *version, &body))?;
                (e.id, format!("{}@{}", e.adapter, e.version))
            }
            Subject::Base(b) => {
                let e = rt.block_on(rc.post_base_evidence(b.as_str(), &body))?;
                (e.id, format!("base model {}", e.base_model))
            }
        })
    };
    let summary = json!({
        "adapter": model,
        "suite": body.suite,
        "out": out,
        "results": results_path,
        "cases": results.len(),
        "cases_digest": cases_digest,
        "metrics": metrics,
        "thresholds": thresholds,
        "evidence": posted.as_ref().map(|(id, of)| json!({"id": id, "of": of, "adapter_digest": bound_digest})),
    });
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    Ok(Evaluation {
        model,
        suite,
        results,
        metrics,
        thresholds,
        cases_digest,
        results_path,
        posted,
        bound_digest,
        summary,
    })
}
