//! `loraops data …`: dataset curation and synthetic data. The pipelines live in
//! `loraops_data` (`curate`, `synth`); this module maps flags onto their configuration (the
//! file's `[curate]` / `[synth]` table < flags) and prints.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use loraops_data::curate::{CurateConfig, Progress, curate};
use loraops_data::format::FormatChoice;
use loraops_data::synth::{Round, SynthConfig, synth};

use super::{ConfigError, Global, UsageError};

#[derive(Debug, Subcommand)]
pub enum DataCmd {
    /// Validate, normalise, PII-mask, deduplicate (exact + MinHash), filter, balance, mix and
    /// split JSONL datasets into train/val/holdout/regression with report.json.
    Curate(CurateArgs),
    /// Generate synthetic SFT rows from seed rows through the gateway (self-instruct), filter,
    /// judge, deduplicate and MMR-select them, with provenance in every row.
    Synth(SynthArgs),
}

#[derive(Debug, Args)]
pub struct CurateArgs {
    /// Input JSONL files (SFT, preference or KTO rows).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output directory for the splits, rejected.jsonl and report.json.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the split assignment.
    #[arg(long)]
    seed: Option<u64>,
    /// Dataset family (default: the first valid row's).
    #[arg(long, value_parser = ["auto", "sft", "preference", "kto"])]
    format: Option<String>,
    /// JSONL rows pinned as the regression split.
    #[arg(long)]
    regression_file: Option<PathBuf>,
    /// Jaccard similarity at which rows count as near duplicates.
    #[arg(long)]
    near_dup_threshold: Option<f64>,
    /// Split fractions train,val,holdout[,regression].
    #[arg(long, value_delimiter = ',')]
    fractions: Option<Vec<f64>>,
    /// Do not mask PII.
    #[arg(long)]
    no_pii: bool,
    /// Keep only N train rows, picked by maximal marginal relevance (`select.train_rows`).
    #[arg(long, value_name = "N")]
    select: Option<usize>,
    /// MMR trade-off: 1 relevance only, 0 diversity only (`select.lambda`).
    #[arg(long, value_name = "L")]
    mmr_lambda: Option<f64>,
    /// The field balancing and proportions group rows by (`balance.field`, default source).
    #[arg(long, value_name = "FIELD")]
    balance_field: Option<String>,
    /// Target shares of the domain rows per value, summing to 1: web=0.5,forum=0.3,docs=0.2
    /// (`balance.proportions`; the largest seeded sample meeting them is kept).
    #[arg(long, value_delimiter = ',', value_name = "VALUE=SHARE")]
    proportions: Option<Vec<String>>,
    /// With --proportions: the sample size wanted (`balance.total`).
    #[arg(long, value_name = "N")]
    balance_total: Option<u64>,
    /// General-purpose JSONL files to mix into the inputs (`mix.general`).
    #[arg(long, num_args = 1.., value_name = "FILE")]
    general: Option<Vec<PathBuf>>,
    /// general:domain ratio of the mix, e.g. 1:3 (`mix.ratio`).
    #[arg(long, value_name = "G:D")]
    mix_ratio: Option<String>,
    /// Score every kept row with an LLM judge: this model behind an OpenAI-compatible API
    /// (`judge.model`; enables the judge). Bearer token from LORAOPS_TOKEN.
    #[arg(long, value_name = "MODEL")]
    judge_model: Option<String>,
    /// The judge's API base, e.g. a gateway's http://HOST:PORT/v1 (`judge.url`).
    #[arg(long, value_name = "URL")]
    judge_url: Option<String>,
    /// Rows the judge scores below this (1 to 10) are dropped (`judge.threshold`, default 6).
    #[arg(long, value_name = "SCORE")]
    judge_threshold: Option<f64>,
    /// Rows scoring at least --judge-threshold but below this are kept, down-weighted instead
    /// of dropped: their "weight" (the factor of their loss in training) is multiplied by
    /// --judge-weight (`judge.weight_below`).
    #[arg(long, value_name = "SCORE")]
    judge_weight_below: Option<f64>,
    /// The factor for rows under --judge-weight-below, in [0, 1] (`judge.weight`, default 0.5).
    #[arg(long, value_name = "W")]
    judge_weight: Option<f64>,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Seed JSONL files (SFT rows: messages, prompt/completion or instruction/output).
    #[arg(required = true)]
    seeds: Vec<PathBuf>,
    /// Output directory for synthetic.jsonl, rejected.jsonl and report.json.
    #[arg(long)]
    out: PathBuf,
    /// The model that writes: the base model's name, ADAPTER or ADAPTER@V.
    #[arg(long)]
    model: Option<String>,
    /// Rows to write.
    #[arg(long, value_name = "N")]
    rows: Option<usize>,
    /// Gateway base URL (OpenAI API under /v1).
    #[arg(long, env = "LORAOPS_GATEWAY_URL")]
    gateway: Option<String>,
    /// Bearer token for the gateway (default: LORAOPS_TOKEN).
    #[arg(long, env = "LORAOPS_GATEWAY_TOKEN", hide_env_values = true)]
    gateway_token: Option<String>,
    /// Seed rows shown as examples per candidate.
    #[arg(long, value_name = "K")]
    few_shot: Option<usize>,
    /// Candidates generated per round.
    #[arg(long, value_name = "N")]
    per_round: Option<usize>,
    /// Rounds at most.
    #[arg(long, value_name = "N")]
    max_rounds: Option<usize>,
    /// Candidates generated in all, at most (default 20 × rows).
    #[arg(long, value_name = "N")]
    max_candidates: Option<usize>,
    /// Requests in flight at once.
    #[arg(long, value_name = "N")]
    concurrency: Option<usize>,
    /// Sampling temperature of both requests.
    #[arg(long)]
    temperature: Option<f64>,
    /// `max_tokens` of each answer.
    #[arg(long, value_name = "N")]
    max_tokens: Option<u64>,
    /// Seed of the example draws.
    #[arg(long)]
    seed: Option<u64>,
    /// MMR trade-off for the final pick: 1 relevance (judge score) only, 0 diversity only.
    #[arg(long, value_name = "L")]
    mmr_lambda: Option<f64>,
    /// Judge every candidate with this model (on the same gateway) and drop low scores.
    #[arg(long, value_name = "MODEL")]
    judge_model: Option<String>,
    /// Candidates the judge scores below this (1 to 10) are rejected.
    #[arg(long, value_name = "SCORE")]
    judge_threshold: Option<f64>,
    /// Jaccard similarity at which candidates count as near duplicates.
    #[arg(long)]
    near_dup_threshold: Option<f64>,
    /// Do not mask PII.
    #[arg(long)]
    no_pii: bool,
}

pub fn run(cmd: DataCmd, global: &Global) -> anyhow::Result<()> {
    match cmd {
        DataCmd::Curate(a) => curate_cmd(a, global),
        DataCmd::Synth(a) => synth_cmd(a, global),
    }
}

/// `VALUE=SHARE` pairs into a map; duplicates and malformed pairs are usage errors.
pub fn parse_proportions(pairs: &[String]) -> Result<BTreeMap<String, f64>, UsageError> {
    let mut out = BTreeMap::new();
    for p in pairs.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let bad = || {
            UsageError(format!(
                "--proportions: {p:?} is not VALUE=SHARE (e.g. web=0.5)"
            ))
        };
        let (k, v) = p.split_once('=').ok_or_else(bad)?;
        let v: f64 = v.trim().parse().map_err(|_| bad())?;
        if k.trim().is_empty() {
            return Err(bad());
        }
        if out.insert(k.trim().to_string(), v).is_some() {
            return Err(UsageError(format!(
                "--proportions: {:?} is given twice",
                k.trim()
            )));
        }
    }
    if out.is_empty() {
        return Err(UsageError("--proportions: no VALUE=SHARE pairs".into()));
    }
    Ok(out)
}

/// Map a curation error onto the CLI's exit codes: 2 for configuration and bad input (an
/// input file that cannot be read, a request the endpoint refuses, nothing left to keep), 1
/// for the rest (an unwritable output, an unreachable endpoint).
fn cli_error(e: loraops_data::Error, inputs: &[PathBuf]) -> anyhow::Error {
    use loraops_data::Error as E;
    match e {
        E::Config(_) => anyhow::Error::new(ConfigError(e.to_string())),
        E::Parse { .. } | E::NothingKept { .. } => anyhow::Error::new(UsageError(e.to_string())),
        E::Io { ref path, .. } if inputs.contains(path) => {
            anyhow::Error::new(UsageError(e.to_string()))
        }
        ref e if e.refused() => anyhow::Error::new(UsageError(e.to_string())),
        // The message already ends with its cause; a chain would print the cause twice.
        e @ (E::Io { .. } | E::Endpoint { .. }) => anyhow::Error::msg(e.to_string()),
    }
}

/// Lay the flags over the file's (or the default) configuration.
fn apply_curate_flags(a: &CurateArgs, cfg: &mut CurateConfig) -> Result<(), UsageError> {
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    if let Some(f) = &a.format {
        cfg.format = match f.as_str() {
            "sft" => FormatChoice::Sft,
            "preference" => FormatChoice::Preference,
            "kto" => FormatChoice::Kto,
            _ => FormatChoice::Auto,
        };
    }
    if let Some(r) = &a.regression_file {
        cfg.splits.regression_file = Some(r.clone());
    }
    if let Some(t) = a.near_dup_threshold {
        cfg.dedup.threshold = t;
    }
    if let Some(f) = &a.fractions {
        if !(3..=4).contains(&f.len()) {
            return Err(UsageError(
                "--fractions takes train,val,holdout[,regression]".into(),
            ));
        }
        cfg.splits.train = f[0];
        cfg.splits.val = f[1];
        cfg.splits.holdout = f[2];
        cfg.splits.regression = f.get(3).copied().unwrap_or(0.0);
    }
    if a.no_pii {
        cfg.pii.enabled = false;
    }
    if let Some(n) = a.select {
        cfg.select.train_rows = Some(n);
    }
    if let Some(l) = a.mmr_lambda {
        cfg.select.lambda = l;
    }
    if let Some(f) = &a.balance_field {
        cfg.balance.field = f.clone();
    }
    if let Some(p) = &a.proportions {
        cfg.balance.proportions = parse_proportions(p)?;
    }
    if let Some(t) = a.balance_total {
        cfg.balance.total = Some(t);
    }
    if let Some(g) = &a.general {
        cfg.mix.general = g.clone();
    }
    if let Some(r) = &a.mix_ratio {
        cfg.mix.ratio = Some(r.clone());
    }
    if let Some(m) = &a.judge_model {
        cfg.judge.enabled = true;
        cfg.judge.model = m.clone();
        if cfg.judge.api_key_env.is_none() {
            cfg.judge.api_key = std::env::var("LORAOPS_TOKEN")
                .ok()
                .filter(|t| !t.is_empty());
        }
    }
    if let Some(u) = &a.judge_url {
        cfg.judge.url = api_base(u);
    }
    if let Some(t) = a.judge_threshold {
        cfg.judge.threshold = t;
    }
    if let Some(t) = a.judge_weight_below {
        cfg.judge.weight_below = Some(t);
    }
    if let Some(w) = a.judge_weight {
        cfg.judge.weight = w;
    }
    Ok(())
}

fn curate_cmd(a: CurateArgs, global: &Global) -> anyhow::Result<()> {
    let mut cfg = match &global.config {
        Some(p) => CurateConfig::from_toml_file(p)
            .map_err(|e| anyhow::Error::new(ConfigError(e.to_string())))?,
        None => CurateConfig::default(),
    };
    apply_curate_flags(&a, &mut cfg)?;

    let bar = if global.json {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template(
                "{bar:30} {bytes}/{total_bytes}  {msg}  {bytes_per_sec}  ETA {eta}",
            )
            .expect("valid template"),
        );
        b
    };
    let mut inputs = a.inputs.clone();
    inputs.extend(cfg.splits.regression_file.clone());
    inputs.extend(cfg.mix.general.iter().cloned());
    let result = curate(&a.inputs, &a.out, &cfg, &mut |p: Progress| {
        bar.set_length(p.total);
        bar.set_position(p.bytes);
        bar.set_message(format!("{} rows", p.rows));
    });
    bar.finish_and_clear();
    let report = result.map_err(|e| cli_error(e, &inputs))?;
    if global.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.summary());
        println!("report: {}", a.out.join("report.json").display());
    }
    Ok(())
}

/// The OpenAI API base of a gateway URL (`…/v1`).
fn api_base(gateway: &str) -> String {
    let g = gateway.trim_end_matches('/');
    if g.ends_with("/v1") {
        g.to_string()
    } else {
        format!("{g}/v1")
    }
}

/// Lay the flags over the file's (or the default) configuration.
fn apply_synth_flags(a: &SynthArgs, cfg: &mut SynthConfig) {
    if let Some(m) = &a.model {
        cfg.model = m.clone();
    }
    if let Some(g) = &a.gateway {
        cfg.url = api_base(g);
    }
    // The gateway token, else the one the other client commands use.
    cfg.api_key = a
        .gateway_token
        .clone()
        .or_else(|| std::env::var("LORAOPS_TOKEN").ok())
        .filter(|t| !t.is_empty());
    if let Some(n) = a.rows {
        cfg.rows = n;
    }
    if let Some(k) = a.few_shot {
        cfg.few_shot = k;
    }
    if let Some(n) = a.per_round {
        cfg.per_round = n;
    }
    if let Some(n) = a.max_rounds {
        cfg.max_rounds = n;
    }
    if let Some(n) = a.max_candidates {
        cfg.max_candidates = Some(n);
    }
    if let Some(n) = a.concurrency {
        cfg.concurrency = n;
    }
    if let Some(t) = a.temperature {
        cfg.temperature = t;
    }
    if let Some(n) = a.max_tokens {
        cfg.answer_max_tokens = n;
    }
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    if let Some(l) = a.mmr_lambda {
        cfg.lambda = l;
    }
    if let Some(m) = &a.judge_model {
        cfg.judge.enabled = true;
        cfg.judge.model = Some(m.clone());
    }
    if let Some(t) = a.judge_threshold {
        cfg.judge.threshold = t;
    }
    if let Some(t) = a.near_dup_threshold {
        cfg.dedup.threshold = t;
    }
    if a.no_pii {
        cfg.pii.enabled = false;
    }
}

fn synth_cmd(a: SynthArgs, global: &Global) -> anyhow::Result<()> {
    let mut cfg = match &global.config {
        Some(p) => SynthConfig::from_toml_file(p)
            .map_err(|e| anyhow::Error::new(ConfigError(e.to_string())))?,
        None => SynthConfig::default(),
    };
    apply_synth_flags(&a, &mut cfg);

    let bar = if global.json {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} accepted  {msg}  {elapsed}")
                .expect("valid template"),
        );
        b
    };
    let result = synth(&a.seeds, &a.out, &cfg, &mut |r: Round| {
        bar.set_length(r.target as u64);
        bar.set_position(r.accepted.min(r.target) as u64);
        bar.set_message(format!("round {}, {} generated", r.round, r.generated));
    });
    bar.finish_and_clear();
    let report = result.map_err(|e| {
        // Errors of the generator or the judge name their endpoint.
        let remote = matches!(&e, loraops_data::Error::Endpoint { .. });
        let e = cli_error(e, &a.seeds);
        if remote {
            e.context(format!("data synth through the gateway at {}", cfg.url))
        } else {
            e
        }
    })?;
    if global.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.summary());
        println!("report: {}", a.out.join("report.json").display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Data {
        #[command(subcommand)]
        cmd: DataCmd,
    }

    fn parse(args: &[&str]) -> DataCmd {
        Data::try_parse_from(std::iter::once("data").chain(args.iter().copied()))
            .unwrap()
            .cmd
    }

    #[test]
    fn curate_flags_override_the_file() {
        let file = CurateConfig {
            select: loraops_data::curate::SelectConfig {
                train_rows: Some(5),
                lambda: 0.9,
                relevance_field: None,
            },
            ..Default::default()
        };
        let DataCmd::Curate(a) = parse(&[
            "curate",
            "in.jsonl",
            "--out",
            "o",
            "--select",
            "7",
            "--proportions",
            "web=0.6,docs=0.4",
            "--balance-total",
            "50",
            "--general",
            "g1.jsonl",
            "g2.jsonl",
            "--mix-ratio",
            "1:3",
        ]) else {
            panic!("curate")
        };
        let mut cfg = file.clone();
        apply_curate_flags(&a, &mut cfg).unwrap();
        assert_eq!(cfg.select.train_rows, Some(7));
        assert_eq!(cfg.select.lambda, 0.9, "the file's lambda stays");
        assert_eq!(cfg.balance.proportions.get("docs"), Some(&0.4));
        assert_eq!(cfg.balance.total, Some(50));
        assert_eq!(cfg.mix.general.len(), 2);
        assert_eq!(cfg.mix.ratio.as_deref(), Some("1:3"));
        let DataCmd::Curate(a) =
            parse(&["curate", "in.jsonl", "--out", "o", "--mmr-lambda", "0.2"])
        else {
            panic!("curate")
        };
        let mut cfg = file.clone();
        apply_curate_flags(&a, &mut cfg).unwrap();
        assert_eq!((cfg.select.train_rows, cfg.select.lambda), (Some(5), 0.2));
        assert!(cfg.balance.proportions.is_empty() && cfg.mix.general.is_empty());
        assert!(!cfg.judge.enabled);
        let DataCmd::Curate(a) = parse(&[
            "curate",
            "in.jsonl",
            "--out",
            "o",
            "--judge-model",
            "judge@2",
            "--judge-url",
            "http://gw:8500",
            "--judge-threshold",
            "3",
            "--judge-weight-below",
            "7",
            "--judge-weight",
            "0.25",
        ]) else {
            panic!("curate")
        };
        let mut cfg = file.clone();
        apply_curate_flags(&a, &mut cfg).unwrap();
        assert!(cfg.judge.enabled);
        assert_eq!(cfg.judge.model, "judge@2");
        assert_eq!(cfg.judge.url, "http://gw:8500/v1");
        assert_eq!(cfg.judge.threshold, 3.0);
        assert_eq!(
            (cfg.judge.weight_below, cfg.judge.weight),
            (Some(7.0), 0.25)
        );
    }

    #[test]
    fn synth_flags_override_the_file() {
        let file = SynthConfig {
            url: "http://file:1/v1".into(),
            model: "from-file".into(),
            rows: 9,
            lambda: 0.7,
            ..Default::default()
        };
        let DataCmd::Synth(a) = parse(&[
            "synth",
            "seeds.jsonl",
            "--out",
            "o",
            "--gateway",
            "http://gw:8500",
            "--rows",
            "3",
            "--judge-model",
            "judge@2",
            "--mmr-lambda",
            "0.1",
            "--gateway-token",
            "t",
        ]) else {
            panic!("synth")
        };
        let mut cfg = file.clone();
        apply_synth_flags(&a, &mut cfg);
        assert_eq!(cfg.url, "http://gw:8500/v1");
        assert_eq!(cfg.model, "from-file");
        assert_eq!((cfg.rows, cfg.lambda), (3, 0.1));
        assert!(cfg.judge.enabled);
        assert_eq!(cfg.judge.model.as_deref(), Some("judge@2"));
        assert_eq!(cfg.api_key.as_deref(), Some("t"));
    }

    #[test]
    fn proportions_and_gateway_urls_are_parsed() {
        let p = parse_proportions(&["web=0.5".into(), " forum = 0.5 ".into()]).unwrap();
        assert_eq!(p.get("web"), Some(&0.5));
        assert_eq!(p.get("forum"), Some(&0.5));
        for bad in [
            vec!["web"],
            vec!["=0.5"],
            vec!["web=x"],
            vec!["a=1", "a=0"],
            vec![""],
        ] {
            let v: Vec<String> = bad.iter().map(|s| s.to_string()).collect();
            assert!(parse_proportions(&v).is_err(), "{bad:?}");
        }
        assert_eq!(api_base("http://gw:8500"), "http://gw:8500/v1");
        assert_eq!(api_base("http://gw:8500/v1/"), "http://gw:8500/v1");
    }
}
