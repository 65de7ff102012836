//! PII masking with typed placeholders: e-mail addresses, phone numbers (Korean and
//! international), payment cards (Luhn-checked), IPv4/IPv6 addresses, IBANs (mod-97-checked),
//! Korean resident registration numbers and US social security numbers.
//!
//! Every match is replaced by its placeholder (`<EMAIL>`, `<PHONE>`, …); afterwards any
//! remaining occurrence of a masked value (for example the same number written inside a longer
//! token) is replaced as well, so the masked text never contains an original value.

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// The kinds of PII, in the order they are masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PiiKind {
    Email,
    Iban,
    KrRrn,
    UsSsn,
    Card,
    Ip,
    Phone,
}

impl PiiKind {
    pub const ALL: [PiiKind; 7] = [
        PiiKind::Email,
        PiiKind::Iban,
        PiiKind::KrRrn,
        PiiKind::UsSsn,
        PiiKind::Card,
        PiiKind::Ip,
        PiiKind::Phone,
    ];

    /// The placeholder written in place of a value.
    pub fn placeholder(self) -> &'static str {
        match self {
            PiiKind::Email => "<EMAIL>",
            PiiKind::Iban => "<IBAN>",
            PiiKind::KrRrn => "<KR_RRN>",
            PiiKind::UsSsn => "<US_SSN>",
            PiiKind::Card => "<CARD>",
            PiiKind::Ip => "<IP>",
            PiiKind::Phone => "<PHONE>",
        }
    }

    /// The name used in reports and configuration.
    pub fn name(self) -> &'static str {
        match self {
            PiiKind::Email => "EMAIL",
            PiiKind::Iban => "IBAN",
            PiiKind::KrRrn => "KR_RRN",
            PiiKind::UsSsn => "US_SSN",
            PiiKind::Card => "CARD",
            PiiKind::Ip => "IP",
            PiiKind::Phone => "PHONE",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Which kinds are masked (`[curate.pii]`; all on by default).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PiiConfig {
    /// Master switch.
    pub enabled: bool,
    pub email: bool,
    pub phone: bool,
    pub card: bool,
    pub ip: bool,
    pub iban: bool,
    /// Korean resident registration numbers (YYMMDD-NNNNNNN).
    pub kr_rrn: bool,
    /// US social security numbers (NNN-NN-NNNN).
    pub us_ssn: bool,
}

impl Default for PiiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            email: true,
            phone: true,
            card: true,
            ip: true,
            iban: true,
            kr_rrn: true,
            us_ssn: true,
        }
    }
}

impl PiiConfig {
    pub fn is_on(&self, k: PiiKind) -> bool {
        self.enabled
            && match k {
                PiiKind::Email => self.email,
                PiiKind::Iban => self.iban,
                PiiKind::KrRrn => self.kr_rrn,
                PiiKind::UsSsn => self.us_ssn,
                PiiKind::Card => self.card,
                PiiKind::Ip => self.ip,
                PiiKind::Phone => self.phone,
            }
    }
}

/// Counts of masked values per kind (indexed like [`PiiKind::ALL`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PiiCounts(pub [u64; 7]);

impl PiiCounts {
    pub fn get(&self, k: PiiKind) -> u64 {
        self.0[k.index()]
    }
    pub fn add(&mut self, other: &PiiCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)[a-z0-9][a-z0-9._%+\-]*@[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?)*\.[a-z]{2,24}").unwrap()
});
static IBAN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?-u:\b)[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{1,4}){3,8}(?-u:\b)").unwrap()
});
static KR_RRN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?-u:\b)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])[- ]?[1-8][0-9]{6}(?-u:\b)",
    )
    .unwrap()
});
static US_SSN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?-u:\b)[0-9]{3}-[0-9]{2}-[0-9]{4}(?-u:\b)").unwrap());
static CARD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?-u:\b)[0-9](?:[ -]?[0-9]){12,18}(?-u:\b)").unwrap());
static IPV4: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?-u:\b)(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(?-u:\b)").unwrap()
});
static IPV6: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}").unwrap());
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        // international: +CC, optional (0)/(area), groups separated by space, dot or dash
        r"(?-u)\+[0-9]{1,3}[ .\-]?(?:\(0?[0-9]{1,4}\)[ .\-]?)?[0-9]{1,5}(?:[ .\-]?[0-9]{2,5}){1,4}",
        // Korean mobile: 010-1234-5678, 01012345678, 010 1234 5678
        r"|\b01[016789][ .\-]?[0-9]{3,4}[ .\-]?[0-9]{4}\b",
        // Korean landline: 02-123-4567, 031-1234-5678, (02) 1234-5678; nationwide 1588-1234
        r"|\(0[2-6][0-9]?\) ?[0-9]{3,4}[ .\-][0-9]{4}\b",
        r"|\b0(?:2|[3-6][1-5]|70)[ .\-][0-9]{3,4}[ .\-][0-9]{4}\b",
        r"|\b(?:15(?:44|66|77|88|99)|16(?:00|44|61|66|70|88)|18(?:00|11|33|55|77|99))-[0-9]{4}\b",
        // North American: (555) 123-4567, 555-123-4567, 555.123.4567
        r"|\([2-9][0-9]{2}\) ?[0-9]{3}[ .\-][0-9]{4}\b",
        r"|\b[2-9][0-9]{2}[.\-][0-9]{3}[.\-][0-9]{4}\b",
    ))
    .unwrap()
});

fn digits(s: &str) -> impl Iterator<Item = u32> + '_ {
    s.chars().filter_map(|c| c.to_digit(10))
}

/// The Luhn checksum of a card number (separators ignored).
pub fn luhn_valid(s: &str) -> bool {
    let ds: Vec<u32> = digits(s).collect();
    if !(13..=19).contains(&ds.len()) {
        return false;
    }
    let sum: u32 = ds
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// ISO 13616 mod-97 check of an IBAN (spaces ignored).
pub fn iban_valid(s: &str) -> bool {
    let c: Vec<u8> = s.bytes().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&c.len()) || !c[..2].iter().all(u8::is_ascii_uppercase) {
        return false;
    }
    let mut r: u32 = 0;
    for &b in c[4..].iter().chain(&c[..4]) {
        let v = match b {
            b'0'..=b'9' => (b - b'0') as u32,
            b'A'..=b'Z' => (b - b'A') as u32 + 10,
            _ => return false,
        };
        r = if v >= 10 {
            (r * 100 + v) % 97
        } else {
            (r * 10 + v) % 97
        };
    }
    r == 1
}

/// A payment card: 13 to 19 digits, a known leading digit (2 to 6), the Luhn check, and when
/// written with separators, the usual grouping (4-4-4-4[-3], 4-6-4 or 4-6-5).
pub fn card_valid(s: &str) -> bool {
    if !luhn_valid(s) || !matches!(s.as_bytes()[0], b'2'..=b'6') {
        return false;
    }
    let groups: Vec<usize> = s.split([' ', '-']).map(str::len).collect();
    if groups.len() == 1 {
        return true;
    }
    let fours = groups[..groups.len() - 1].iter().all(|g| *g == 4)
        && matches!(groups[groups.len() - 1], 3 | 4);
    fours || groups == [4, 6, 4] || groups == [4, 6, 5]
}

fn ssn_valid(s: &str) -> bool {
    let area = &s[0..3];
    area != "000"
        && area != "666"
        && !area.starts_with('9')
        && &s[4..6] != "00"
        && &s[7..] != "0000"
}

fn phone_valid(s: &str) -> bool {
    // "1800-1850" is a range of years, not a nationwide number.
    if s.len() == 9 && s.as_bytes()[4] == b'-' {
        let (a, b) = (s[..4].parse::<u32>(), s[5..].parse::<u32>());
        if let (Ok(a), Ok(b)) = (a, b)
            && b > a
            && b <= 2099
        {
            return false;
        }
    }
    (8..=15).contains(&digits(s).count())
}

fn ipv6_valid(s: &str) -> bool {
    s.matches(':').count() >= 2
        && s.bytes().any(|b| b.is_ascii_hexdigit())
        && s.parse::<std::net::Ipv6Addr>().is_ok()
}

/// The byte before `start` and the byte at `end` are not letters, digits or joiners that
/// would make the match part of a longer token.
fn isolated(text: &str, start: usize, end: usize, joiners: &[u8]) -> bool {
    let b = text.as_bytes();
    let before_ok = start == 0 || {
        let c = b[start - 1];
        !c.is_ascii_alphanumeric() && !joiners.contains(&c)
    };
    let after_ok = end >= b.len() || {
        let c = b[end];
        let joined = joiners.contains(&c) && b.get(end + 1).is_some_and(u8::is_ascii_alphanumeric);
        !(c.is_ascii_alphanumeric() || joined)
    };
    before_ok && after_ok
}

/// The masker: compiled once, shared by all threads.
#[derive(Debug, Clone)]
pub struct Masker {
    cfg: PiiConfig,
}

impl Masker {
    pub fn new(cfg: PiiConfig) -> Self {
        Self { cfg }
    }

    /// Mask `text`, adding what was found to `counts`. Returns `None` when nothing changed.
    pub fn mask(&self, text: &str, counts: &mut PiiCounts) -> Option<String> {
        if !self.cfg.enabled {
            return None;
        }
        let ndig = text.bytes().filter(u8::is_ascii_digit).count();
        let mut cur: Option<String> = None;
        let mut originals: Vec<(PiiKind, String)> = Vec::new();
        for kind in PiiKind::ALL {
            if !self.cfg.is_on(kind) {
                continue;
            }
            let t = cur.as_deref().unwrap_or(text);
            let worth = match kind {
                PiiKind::Email => t.contains('@'),
                PiiKind::Ip => ndig >= 4 && (t.contains('.') || t.contains(':')),
                PiiKind::Iban => ndig >= 6,
                _ => ndig >= 7,
            };
            if !worth {
                continue;
            }
            if let Some(out) = self.mask_kind(kind, t, counts, &mut originals) {
                cur = Some(out);
            }
        }
        let mut out = cur?;
        // A masked value must not survive anywhere else in the text.
        for (kind, v) in &originals {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), kind.placeholder());
            }
        }
        Some(out)
    }

    fn mask_kind(
        &self,
        kind: PiiKind,
        t: &str,
        counts: &mut PiiCounts,
        originals: &mut Vec<(PiiKind, String)>,
    ) -> Option<String> {
        let mut spans: Vec<(usize, usize)> = Vec::new();
        match kind {
            PiiKind::Email => spans.extend(EMAIL.find_iter(t).map(|m| (m.start(), m.end()))),
            PiiKind::Iban => {
                for m in IBAN.find_iter(t) {
                    // The pattern may run into a following upper-case word: shorten by groups.
                    let mut s = m.as_str();
                    loop {
                        if iban_valid(s) {
                            spans.push((m.start(), m.start() + s.len()));
                            break;
                        }
                        match s.rfind(' ') {
                            Some(i) if i > 4 => s = &s[..i],
                            _ => break,
                        }
                    }
                }
            }
            PiiKind::KrRrn => spans.extend(
                KR_RRN
                    .find_iter(t)
                    .filter(|m| isolated(t, m.start(), m.end(), b"-"))
                    .map(|m| (m.start(), m.end())),
            ),
            PiiKind::UsSsn => spans.extend(
                US_SSN
                    .find_iter(t)
                    .filter(|m| ssn_valid(m.as_str()) && isolated(t, m.start(), m.end(), b"-"))
                    .map(|m| (m.start(), m.end())),
            ),
            PiiKind::Card => spans.extend(
                CARD.find_iter(t)
                    .filter(|m| card_valid(m.as_str()) && isolated(t, m.start(), m.end(), b"-"))
                    .map(|m| (m.start(), m.end())),
            ),
            PiiKind::Ip => {
                spans.extend(
                    IPV4.find_iter(t)
                        .filter(|m| isolated(t, m.start(), m.end(), b"."))
                        .map(|m| (m.start(), m.end())),
                );
                if t.contains(':') {
                    spans.extend(
                        IPV6.find_iter(t)
                            .filter(|m| {
                                ipv6_valid(m.as_str()) && isolated(t, m.start(), m.end(), b":")
                            })
                            .map(|m| (m.start(), m.end())),
                    );
                    spans.sort_unstable();
                    spans.dedup_by(|b, a| b.0 < a.1);
                }
            }
            PiiKind::Phone => spans.extend(
                PHONE
                    .find_iter(t)
                    .filter(|m| {
                        phone_valid(m.as_str())
                            && isolated(t, m.start(), m.end(), b"-.")
                            && (m.start() == 0 || t.as_bytes()[m.start() - 1] != b'+')
                    })
                    .map(|m| (m.start(), m.end())),
            ),
        }
        if spans.is_empty() {
            return None;
        }
        let mut out = String::with_capacity(t.len());
        let mut last = 0;
        for (s, e) in spans {
            out.push_str(&t[last..s]);
            out.push_str(kind.placeholder());
            originals.push((kind, t[s..e].to_string()));
            counts.0[kind.index()] += 1;
            last = e;
        }
        out.push_str(&t[last..]);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(s: &str) -> (String, PiiCounts) {
        let mut c = PiiCounts::default();
        let out = Masker::new(PiiConfig::default())
            .mask(s, &mut c)
            .unwrap_or_else(|| s.to_string());
        (out, c)
    }

    #[test]
    fn each_kind_is_masked_with_its_placeholder() {
        let cases = [
            (
                "mail me at kim.minsu+x@example.co.kr today",
                "mail me at <EMAIL> today",
                PiiKind::Email,
            ),
            ("call 010-1234-5678 now", "call <PHONE> now", PiiKind::Phone),
            ("call 01012345678 now", "call <PHONE> now", PiiKind::Phone),
            ("office (02) 3456-7890.", "office <PHONE>.", PiiKind::Phone),
            ("office 031-123-4567", "office <PHONE>", PiiKind::Phone),
            ("hotline 1588-1234.", "hotline <PHONE>.", PiiKind::Phone),
            (
                "intl +82 10-9876-5432 ok",
                "intl <PHONE> ok",
                PiiKind::Phone,
            ),
            (
                "intl +44 20 7946 0958 ok",
                "intl <PHONE> ok",
                PiiKind::Phone,
            ),
            ("us (415) 555-2671 ok", "us <PHONE> ok", PiiKind::Phone),
            (
                "card 4111 1111 1111 1111 ok",
                "card <CARD> ok",
                PiiKind::Card,
            ),
            ("card 5500-0000-0000-0004.", "card <CARD>.", PiiKind::Card),
            ("host 192.168.10.254 up", "host <IP> up", PiiKind::Ip),
            ("v6 2001:db8::8a2e:370:7334 up", "v6 <IP> up", PiiKind::Ip),
            (
                "iban DE89 3704 0044 0532 0130 00 THANKS",
                "iban <IBAN> THANKS",
                PiiKind::Iban,
            ),
            (
                "iban GB82WEST12345698765432.",
                "iban <IBAN>.",
                PiiKind::Iban,
            ),
            ("rrn 900101-1234567 end", "rrn <KR_RRN> end", PiiKind::KrRrn),
            ("ssn 123-45-6789 end", "ssn <US_SSN> end", PiiKind::UsSsn),
        ];
        for (input, want, kind) in cases {
            let (out, c) = mask(input);
            assert_eq!(out, want, "{input}");
            assert_eq!(c.get(kind), 1, "{input}: {c:?}");
            assert_eq!(c.total(), 1, "{input}: {c:?}");
        }
    }

    #[test]
    fn invalid_lookalikes_are_left_alone() {
        for s in [
            "card 4111 1111 1111 1112 fails Luhn",
            "iban DE89 3704 0044 0532 0130 01 fails mod 97",
            "rrn 901301-1234567 has month 13",
            "ssn 000-12-3456 and 666-12-3456 are never issued",
            "version 1.2.3.4.5 is not an address",
            "the time is 12:30:45",
            "order 12345 shipped in 2024",
            "it ran between 1987-2015 and 1800-1850",
            "ISBN 978-3-16-148410-0, tracking 4829104821, on 2024-03-15 at 14:30:05",
        ] {
            let (out, c) = mask(s);
            assert_eq!(out, s);
            assert_eq!(c.total(), 0, "{s}");
        }
    }

    #[test]
    fn repeated_value_is_masked_everywhere() {
        let (out, c) = mask("a@b.io wrote a@b.io; 010-2222-3333/010-2222-3333");
        assert_eq!(out, "<EMAIL> wrote <EMAIL>; <PHONE>/<PHONE>");
        assert_eq!(c.get(PiiKind::Email), 2);
        assert!(!out.contains("a@b.io") && !out.contains("2222"));
    }

    #[test]
    fn kinds_can_be_turned_off() {
        let cfg = PiiConfig {
            email: false,
            ..Default::default()
        };
        let mut c = PiiCounts::default();
        let out = Masker::new(cfg)
            .mask("x@y.com 010-1234-5678", &mut c)
            .unwrap();
        assert_eq!(out, "x@y.com <PHONE>");
    }
}
