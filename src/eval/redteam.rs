//! The red-team smoke suite: attack templates × fill-ins (`suites/redteam-smoke/templates.json`,
//! also built into the binary) expanded deterministically into refusal cases.
//!
//! Template file: `{"manifest": {…}, "categories": [{"category", "system"?, "forbidden"?,
//! "templates": [..."{fill}"...], "fills": [...]}]}`. Each template is combined with each
//! fill-in, in file order. In `system` and `forbidden`, `{secret}` becomes a per-case canary
//! string (derived from the case id), so a leak of the system prompt is detected exactly.

use loraops_registry::api::SuiteManifest;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::suite::{Case, cases_jsonl};

/// The shipped templates.
pub const SMOKE_TEMPLATES: &str = include_str!("../../suites/redteam-smoke/templates.json");

#[derive(Debug, Deserialize)]
struct Templates {
    manifest: SuiteManifest,
    categories: Vec<Category>,
}

#[derive(Debug, Deserialize)]
struct Category {
    category: String,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    forbidden: Vec<String>,
    templates: Vec<String>,
    fills: Vec<String>,
    #[serde(default)]
    max_tokens: Option<u64>,
}

/// A canary string for one case: stable across runs and machines.
fn secret(id: &str) -> String {
    let h = hex::encode(Sha256::digest(id.as_bytes()));
    format!("CANARY-{}", h[..10].to_uppercase())
}

/// Expand a template file into a manifest and cases JSONL.
pub fn expand(templates_json: &str) -> anyhow::Result<(SuiteManifest, String)> {
    let t: Templates = serde_json::from_str(templates_json)?;
    let mut cases = Vec::new();
    for cat in &t.categories {
        anyhow::ensure!(
            !cat.templates.is_empty() && !cat.fills.is_empty(),
            "category {:?} needs templates and fills",
            cat.category
        );
        for (ti, template) in cat.templates.iter().enumerate() {
            anyhow::ensure!(
                template.contains("{fill}"),
                "category {:?}, template {}: no {{fill}} slot",
                cat.category,
                ti + 1
            );
            for (fi, fill) in cat.fills.iter().enumerate() {
                let id = format!("{}-{:02}-{:02}", cat.category, ti + 1, fi + 1);
                let s = secret(&id);
                cases.push(Case {
                    category: Some(cat.category.clone()),
                    system: cat.system.as_ref().map(|x| x.replace("{secret}", &s)),
                    prompt: Some(template.replace("{fill}", fill)),
                    forbidden: cat
                        .forbidden
                        .iter()
                        .map(|f| f.replace("{secret}", &s))
                        .collect(),
                    max_tokens: cat.max_tokens,
                    id: Some(id),
                    ..Case::default()
                });
            }
        }
    }
    Ok((t.manifest, cases_jsonl(&cases)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::suite::LoadedSuite;
    use std::collections::BTreeMap;

    #[test]
    fn the_smoke_suite_expands_deterministically() {
        let (m, cases) = expand(SMOKE_TEMPLATES).unwrap();
        let (m2, cases2) = expand(SMOKE_TEMPLATES).unwrap();
        assert_eq!((&m, &cases), (&m2, &cases2));
        let s = LoadedSuite::new(m, &cases).unwrap();
        assert_eq!(s.manifest.name.as_str(), "redteam-smoke");
        assert_eq!(s.scorer.primary_metric(), "refusal_rate");
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &s.cases {
            *per.entry(c.category.as_deref().unwrap()).or_default() += 1;
        }
        assert_eq!(
            per.keys().copied().collect::<Vec<_>>(),
            [
                "harmful_instructions",
                "jailbreak_roleplay",
                "pii_extraction",
                "prompt_injection",
                "system_prompt_extraction"
            ]
        );
        assert!(per.values().all(|n| *n >= 16), "{per:?}");
        assert!(s.cases.len() >= 100);
        // Ids are unique; every extraction case carries its own canary in the system prompt.
        let ids: std::collections::BTreeSet<_> = s.cases.iter().map(|c| c.id.clone()).collect();
        assert_eq!(ids.len(), s.cases.len());
        for c in s
            .cases
            .iter()
            .filter(|c| c.category.as_deref() == Some("system_prompt_extraction"))
        {
            let secret = &c.forbidden[0];
            assert!(secret.starts_with("CANARY-"));
            assert!(c.system.as_ref().unwrap().contains(secret.as_str()));
            assert!(!c.prompt.as_ref().unwrap().contains("{fill}"));
        }
        // The file in the repository and the built-in copy are the same suite.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("suites/redteam-smoke");
        assert_eq!(LoadedSuite::from_dir(&dir).unwrap().digest, s.digest);
    }

    #[test]
    fn templates_need_a_slot() {
        let bad = r#"{"manifest": {"name": "x", "version": "1", "scorer": {"type": "refusal"}},
            "categories": [{"category": "c", "templates": ["no slot"], "fills": ["a"]}]}"#;
        assert!(expand(bad).unwrap_err().to_string().contains("{fill}"));
    }
}
