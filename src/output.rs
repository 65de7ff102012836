//! Terminal output: progress bars for transfers, and `--json` vs human-readable results.

use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use loraops_registry::client::Progress;
use serde::Serialize;

/// A byte-transfer bar (hidden with `--json` or when stderr is not a terminal).
pub fn transfer_bar(total: u64, label: &str, json: bool) -> (ProgressBar, Progress) {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    let b = bar.clone();
    (bar, Arc::new(move |n| b.inc(n)))
}

/// Print `value` as JSON with `--json`, else the human text.
pub fn emit<T: Serialize>(json: bool, value: &T, human: impl FnOnce() -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("serialisable")
        );
    } else {
        println!("{}", human());
    }
}
