//! License allow-list and quality / safety heuristics.

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::report::Reason;

/// What to do with a row that has no `license` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MissingLicense {
    /// Keep it silently (counted in the report).
    #[default]
    Keep,
    /// Drop it (listed as rejected).
    Drop,
    /// Keep it and list it in the report as flagged.
    Flag,
}

/// `[curate.license]`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct LicenseConfig {
    /// Allowed `license` values (case-insensitive, e.g. SPDX ids). Empty: every value allowed.
    pub allow: Vec<String>,
    pub missing: MissingLicense,
}

/// The license verdict on one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LicenseVerdict {
    Allowed,
    Missing,
    NotAllowed(String),
}

impl LicenseConfig {
    pub fn check(&self, license: Option<&str>) -> LicenseVerdict {
        match license {
            None => LicenseVerdict::Missing,
            Some(l)
                if self.allow.is_empty()
                    || self.allow.iter().any(|a| a.eq_ignore_ascii_case(l)) =>
            {
                LicenseVerdict::Allowed
            }
            Some(l) => LicenseVerdict::NotAllowed(l.to_string()),
        }
    }
}

/// `[curate.filters]`: heuristics on the row's whole text.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilterConfig {
    /// Bounds on the text length in characters.
    pub min_chars: usize,
    pub max_chars: usize,
    /// Reject when more than this fraction of the word 3-grams are repeats (0 to 1).
    pub max_repeated_ngram_fraction: f64,
    /// Reject when one character repeats this many times in a row.
    pub max_char_run: usize,
    /// Allowed languages (ISO 639-3 codes as whatlang names them: eng, kor, jpn, …). Empty: all.
    pub languages: Vec<String>,
    /// Minimum whatlang confidence before a language verdict rejects a row.
    pub min_language_confidence: f64,
    /// Terms that reject a row (case-insensitive, whole words).
    pub banned_terms: Vec<String>,
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            min_chars: 1,
            max_chars: 200_000,
            max_repeated_ngram_fraction: 0.5,
            max_char_run: 64,
            languages: Vec::new(),
            min_language_confidence: 0.5,
            banned_terms: Vec::new(),
        }
    }
}

/// Compiled filters.
#[derive(Debug, Clone)]
pub struct Filters {
    cfg: FilterConfig,
    banned: Option<Regex>,
    langs: Vec<whatlang::Lang>,
}

impl Filters {
    pub fn new(cfg: FilterConfig) -> Result<Self, String> {
        let banned = if cfg.banned_terms.is_empty() {
            None
        } else {
            let alts: Vec<String> = cfg
                .banned_terms
                .iter()
                .map(|t| regex::escape(t.trim()))
                .collect();
            Some(
                Regex::new(&format!(r"(?i)(?:^|\b)(?:{})(?:\b|$)", alts.join("|")))
                    .map_err(|e| format!("banned_terms: {e}"))?,
            )
        };
        let langs = cfg
            .languages
            .iter()
            .map(|l| {
                whatlang::Lang::from_code(l.as_str()).ok_or_else(|| {
                    format!("languages: unknown language code {l:?} (use ISO 639-3, e.g. eng, kor)")
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { cfg, banned, langs })
    }

    /// `Err((reason, detail))` when the text fails a filter.
    pub fn check(&self, text: &str) -> Result<(), (Reason, String)> {
        let n = text.chars().count();
        if n < self.cfg.min_chars {
            return Err((
                Reason::TooShort,
                format!("{n} characters < min_chars {}", self.cfg.min_chars),
            ));
        }
        if n > self.cfg.max_chars {
            return Err((
                Reason::TooLong,
                format!("{n} characters > max_chars {}", self.cfg.max_chars),
            ));
        }
        let mut run = 0usize;
        let mut prev = None;
        for c in text.chars() {
            if Some(c) == prev && !c.is_whitespace() {
                run += 1;
                if run >= self.cfg.max_char_run {
                    return Err((
                        Reason::CharRun,
                        format!("{c:?} repeated {run} times in a row"),
                    ));
                }
            } else {
                run = 1;
                prev = Some(c);
            }
        }
        let frac = repeated_ngram_fraction(text);
        if frac > self.cfg.max_repeated_ngram_fraction {
            return Err((
                Reason::Repetition,
                format!("{:.0}% of word 3-grams are repeats", frac * 100.0),
            ));
        }
        if let Some(re) = &self.banned
            && let Some(m) = re.find(text)
        {
            return Err((
                Reason::BannedTerm,
                format!("contains banned term {:?}", m.as_str().trim()),
            ));
        }
        if !self.langs.is_empty() {
            let sample: String = text.chars().take(2000).collect();
            if let Some(info) = whatlang::detect(&sample)
                && info.confidence() >= self.cfg.min_language_confidence
                && !self.langs.contains(&info.lang())
            {
                return Err((
                    Reason::Language,
                    format!(
                        "language {} not in {:?}",
                        info.lang().code(),
                        self.cfg.languages
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The fraction of word 3-grams that repeat an earlier one (0 for texts under 12 words).
pub fn repeated_ngram_fraction(text: &str) -> f64 {
    let words: Vec<u64> = text
        .split_whitespace()
        .map(|w| {
            w.bytes().fold(0xcbf29ce484222325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100000001b3)
            })
        })
        .collect();
    if words.len() < 12 {
        return 0.0;
    }
    let mut grams: Vec<u64> = words
        .windows(3)
        .map(|w| super::dedup::mix64(super::dedup::mix64(w[0] ^ 1) ^ w[1]) ^ w[2].rotate_left(17))
        .collect();
    let n = grams.len();
    grams.sort_unstable();
    grams.dedup();
    (n - grams.len()) as f64 / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heuristics_reject_with_reasons() {
        let f = Filters::new(FilterConfig {
            min_chars: 5,
            max_chars: 200,
            banned_terms: vec!["forbidden word".into()],
            languages: vec!["eng".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(
            f.check("A perfectly ordinary sentence about the weather today.")
                .is_ok()
        );
        assert_eq!(f.check("hey").unwrap_err().0, "too_short");
        assert_eq!(f.check(&"word ".repeat(30)).unwrap_err().0, "repetition");
        assert_eq!(
            f.check(&format!("ok {}", "!".repeat(70))).unwrap_err().0,
            "char_run"
        );
        assert_eq!(
            f.check("This has a Forbidden Word in it, sadly.")
                .unwrap_err()
                .0,
            "banned_term"
        );
        assert_eq!(
            f.check(
                "오늘은 날씨가 정말 좋아서 공원에 산책을 다녀왔습니다. 내일도 맑았으면 좋겠어요."
            )
            .unwrap_err()
            .0,
            "language"
        );
    }

    #[test]
    fn license_allow_list_is_case_insensitive() {
        let c = LicenseConfig {
            allow: vec!["MIT".into(), "Apache-2.0".into()],
            missing: MissingLicense::Flag,
        };
        assert_eq!(c.check(Some("mit")), LicenseVerdict::Allowed);
        assert_eq!(
            c.check(Some("GPL-3.0")),
            LicenseVerdict::NotAllowed("GPL-3.0".into())
        );
        assert_eq!(c.check(None), LicenseVerdict::Missing);
    }
}
