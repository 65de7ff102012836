//! Screening: what every row goes through before dedup, input rows and synthetic candidates
//! alike. [`Screen`] normalises and PII-masks a row's texts, filters its text and fingerprints
//! it for dedup; `Stage` is curation's per-row step on top of it (parse, schema, family,
//! license), run in parallel over a batch.

use serde_json::{Map, Value};

use super::config::CurateConfig;
use super::dedup::{self, DedupConfig, MinHasher};
use super::filters::{FilterConfig, Filters, LicenseVerdict, MissingLicense};
use super::judge::RowJudge;
use super::pii::{Masker, PiiConfig, PiiCounts};
use super::report::Reason;
use crate::format::{self, Family, Split, UnicodeForm};
use crate::{Error, Result};

/// Normalisation, PII masking, the quality filters and dedup fingerprints, as configured.
pub struct Screen {
    unicode: UnicodeForm,
    masker: Masker,
    filters: Filters,
    hasher: MinHasher,
}

impl Screen {
    pub fn new(
        unicode: UnicodeForm,
        pii: &PiiConfig,
        filters: &FilterConfig,
        dedup: &DedupConfig,
    ) -> Result<Self> {
        Ok(Self {
            unicode,
            masker: Masker::new(pii.clone()),
            filters: Filters::new(filters.clone()).map_err(Error::Config)?,
            hasher: MinHasher::new(dedup),
        })
    }

    /// One text normalised and masked, counting what was masked.
    pub fn clean_str(&self, s: &str, pii: &mut PiiCounts) -> String {
        let n = format::normalize_str(s, self.unicode);
        self.masker.mask(&n, pii).unwrap_or(n)
    }

    /// Every text of a row normalised and masked (see [`format::map_text`]).
    pub fn clean(&self, obj: &mut Map<String, Value>, pii: &mut PiiCounts) {
        format::map_text(obj, &mut |s: &mut String| *s = self.clean_str(s, pii));
    }

    /// The quality filters on a row's text.
    pub fn filter(&self, content: &str) -> std::result::Result<(), (Reason, String)> {
        self.filters.check(content)
    }

    /// The MinHash signature of a text.
    pub fn signature(&self, text: &str) -> Vec<u32> {
        self.hasher.signature(&dedup::dedup_text(text))
    }

    /// The exact-dedup key of a text and, when asked, its MinHash signature.
    pub fn fingerprint(&self, text: &str, signature: bool) -> (u64, Option<Vec<u32>>) {
        let t = dedup::dedup_text(text);
        (
            dedup::exact_key(&t),
            signature.then(|| self.hasher.signature(&t)),
        )
    }
}

/// The per-row result of the parallel stage.
pub(super) enum Outcome {
    Blank,
    Invalid(String),
    Rejected {
        family: Family,
        reason: Reason,
        detail: String,
        license: Option<String>,
    },
    Keep(Box<Kept>),
}

/// A row the parallel stage kept, with what the sequential stages need of it.
pub(super) struct Kept {
    pub family: Family,
    /// The row as written.
    pub line: String,
    pub key: u64,
    pub sig: Option<Vec<u32>>,
    pub pii: PiiCounts,
    pub split: Option<Split>,
    pub license: Option<String>,
    /// Its value of `balance.field`.
    pub balance: String,
    pub label: Option<bool>,
    /// The row's text for the judge (empty when there is none).
    pub content: String,
    /// From a general file (`[curate.mix]`).
    pub general: bool,
}

/// Curation's per-row stage, and what the later stages share with it (the judge, the hasher).
pub(super) struct Stage {
    pub cfg: CurateConfig,
    pub screen: Screen,
    pub judge: Option<RowJudge>,
}

impl Stage {
    pub fn new(cfg: &CurateConfig) -> Result<Self> {
        Ok(Self {
            screen: Screen::new(cfg.unicode, &cfg.pii, &cfg.filters, &cfg.dedup)?,
            judge: if cfg.judge.enabled {
                Some(RowJudge::new(&cfg.judge).map_err(Error::Config)?)
            } else {
                None
            },
            cfg: cfg.clone(),
        })
    }

    /// Parse, validate, normalise, mask, filter and hash one line. `pinned` rows skip the
    /// license and quality filters; `general` rows come from a file mixed in.
    pub fn process(&self, raw: &[u8], pinned: bool, general: bool) -> Outcome {
        let Ok(text) = std::str::from_utf8(raw) else {
            return Outcome::Invalid("not valid UTF-8".into());
        };
        let text = text.trim();
        if text.is_empty() {
            return Outcome::Blank;
        }
        let v: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return Outcome::Invalid(format!("not JSON: {e}")),
        };
        let mut row = match format::validate(v) {
            Ok(r) => r,
            Err(e) => return Outcome::Invalid(e),
        };
        if let Some(f) = self.cfg.format.family()
            && f != row.family
        {
            return Outcome::Invalid(format!(
                "a {} row, but the format is {}",
                row.family.describe(),
                f.describe()
            ));
        }
        let mut pii = PiiCounts::default();
        self.screen.clean(&mut row.obj, &mut pii);
        if format::chosen_equals_rejected(&row) {
            return Outcome::Invalid("chosen and rejected are identical".into());
        }
        let content = format::content_text(&row);
        if !pinned {
            if let Some((detail, license)) = self.license_refusal(row.license.as_deref()) {
                return Outcome::Rejected {
                    family: row.family,
                    reason: Reason::License,
                    detail,
                    license,
                };
            }
            if let Err((reason, detail)) = self.screen.filter(&content) {
                return Outcome::Rejected {
                    family: row.family,
                    reason,
                    detail,
                    license: row.license,
                };
            }
        }
        let (key, sig) = self.screen.fingerprint(&content, self.cfg.dedup.near);
        // Pinned regression rows stay as given; every other row says where it came from.
        if self.cfg.mix.enabled() && !pinned {
            let origin = if general { "general" } else { "domain" };
            row.obj
                .insert(self.cfg.mix.origin_field.clone(), Value::from(origin));
        }
        let balance = row
            .obj
            .get(&self.cfg.balance.field)
            .map(|v| match v {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            })
            .unwrap_or_else(|| "(none)".into());
        let line = serde_json::to_string(&Value::Object(row.obj)).expect("JSON serialises");
        Outcome::Keep(Box::new(Kept {
            family: row.family,
            line,
            key,
            sig,
            pii,
            split: row.split,
            license: row.license,
            balance,
            label: row.label,
            content: if self.judge.is_some() {
                content
            } else {
                String::new()
            },
            general,
        }))
    }

    /// Why the license policy refuses a row (the detail, and the license to count it under).
    fn license_refusal(&self, license: Option<&str>) -> Option<(String, Option<String>)> {
        match self.cfg.license.check(license) {
            LicenseVerdict::NotAllowed(l) => {
                Some((format!("license {l:?} is not in the allow-list"), Some(l)))
            }
            LicenseVerdict::Missing if self.cfg.license.missing == MissingLicense::Drop => {
                Some(("no license (policy: drop)".into(), None))
            }
            _ => None,
        }
    }
}
