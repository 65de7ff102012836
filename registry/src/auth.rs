//! JWT auth: who is calling and with which roles. HS256 with a shared secret for embedded
//! use (generated into the data dir on first start), RS256/ES256 public keys (PEM or a JWKS
//! file) for production. The registry and the gateway verify with [`Verifier`];
//! `loraops token issue` mints with [`Signer`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, jwk::JwkSet};
use serde::{Deserialize, Serialize};

use crate::api::Role;

/// `[auth]` configuration section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// HS256 shared secret, inline (prefer `hs256_secret_file` or the environment).
    pub hs256_secret: Option<String>,
    /// HS256 shared secret file. Default: `<data_dir>/jwt-secret`, generated when missing and
    /// no public key is configured.
    pub hs256_secret_file: Option<PathBuf>,
    /// PEM public key for RS256 or ES256 (see `public_key_alg`).
    pub public_key_file: Option<PathBuf>,
    /// `RS256` (default) or `ES256`.
    pub public_key_alg: Option<String>,
    /// JWKS file with RS256/ES256 public keys, selected by `kid`.
    pub jwks_file: Option<PathBuf>,
    /// PEM private key used by `loraops token issue` with RS256/ES256.
    pub signing_key_file: Option<PathBuf>,
    /// Required `aud` claim.
    pub audience: String,
    /// Required `iss` claim, when set.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            hs256_secret: None,
            hs256_secret_file: None,
            public_key_file: None,
            public_key_alg: None,
            jwks_file: None,
            signing_key_file: None,
            audience: "loraops".into(),
            issuer: None,
            leeway_secs: 30,
        }
    }
}

/// The claims loraops reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default)]
    pub roles: Vec<String>,
    pub aud: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    pub exp: i64,
    pub iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Optional adapter-name patterns (`*` wildcard) the token's writes are limited to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapters: Option<Vec<String>>,
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub sub: String,
    pub roles: BTreeSet<Role>,
    pub adapters: Option<Vec<String>>,
}

impl Principal {
    /// `admin` holds every role.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role) || self.roles.contains(&Role::Admin)
    }

    /// Whether the token's adapter patterns (if any) allow acting on `adapter`.
    pub fn may_touch(&self, adapter: &str) -> bool {
        match &self.adapters {
            None => true,
            Some(patterns) => patterns.iter().any(|p| glob_match(p, adapter)),
        }
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || s.len() < first.len() + last.len() || !s.ends_with(last) {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("auth configuration: {0}")]
    Config(String),
}

/// The HS256 secret in effect: configured inline, read from a file, or generated into the
/// data dir on first start.
fn hs256_secret(s: &AuthSettings, data_dir: &Path, create: bool) -> Result<Vec<u8>, AuthError> {
    if let Some(secret) = &s.hs256_secret {
        if secret.len() < 16 {
            return Err(AuthError::Config(
                "hs256_secret must be at least 16 bytes".into(),
            ));
        }
        return Ok(secret.as_bytes().to_vec());
    }
    let path = s
        .hs256_secret_file
        .clone()
        .unwrap_or_else(|| data_dir.join("jwt-secret"));
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let t = text.trim();
            if t.len() < 16 {
                return Err(AuthError::Config(format!(
                    "{}: secret must be at least 16 bytes",
                    path.display()
                )));
            }
            Ok(t.as_bytes().to_vec())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let secret: [u8; 32] = rand::random();
            let text = hex::encode(secret);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| AuthError::Config(format!("{}: {e}", dir.display())))?;
            }
            write_private(&path, text.as_bytes())
                .map_err(|e| AuthError::Config(format!("{}: {e}", path.display())))?;
            Ok(text.into_bytes())
        }
        Err(e) => Err(AuthError::Config(format!("{}: {e}", path.display()))),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)?.write_all(bytes)
}

fn public_alg(s: &AuthSettings) -> Result<Algorithm, AuthError> {
    match s.public_key_alg.as_deref().unwrap_or("RS256") {
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        other => Err(AuthError::Config(format!(
            "public_key_alg {other:?}: expected RS256 or ES256"
        ))),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|e| AuthError::Config(format!("{}: {e}", path.display())))
}

/// Verifies bearer tokens.
pub struct Verifier {
    keys: Vec<(Option<String>, Algorithm, DecodingKey)>,
    audience: String,
    issuer: Option<String>,
    leeway: u64,
}

impl Verifier {
    /// Build from settings. With no public key or JWKS configured, uses HS256 and creates the
    /// secret under `data_dir` when `create_secret` is set.
    pub fn from_settings(
        s: &AuthSettings,
        data_dir: &Path,
        create_secret: bool,
    ) -> Result<Self, AuthError> {
        let mut keys = Vec::new();
        if let Some(p) = &s.jwks_file {
            let set: JwkSet = serde_json::from_slice(&read(p)?)
                .map_err(|e| AuthError::Config(format!("{}: {e}", p.display())))?;
            for jwk in &set.keys {
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| AuthError::Config(format!("{}: {e}", p.display())))?;
                let alg = match jwk.common.key_algorithm.map(|a| a.to_string()).as_deref() {
                    Some("ES256") => Algorithm::ES256,
                    _ => match &jwk.algorithm {
                        jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => {
                            Algorithm::ES256
                        }
                        _ => Algorithm::RS256,
                    },
                };
                keys.push((jwk.common.key_id.clone(), alg, key));
            }
        }
        if let Some(p) = &s.public_key_file {
            let alg = public_alg(s)?;
            let pem = read(p)?;
            let key = match alg {
                Algorithm::ES256 => DecodingKey::from_ec_pem(&pem),
                _ => DecodingKey::from_rsa_pem(&pem),
            }
            .map_err(|e| AuthError::Config(format!("{}: {e}", p.display())))?;
            keys.push((None, alg, key));
        }
        if keys.is_empty() || s.hs256_secret.is_some() || s.hs256_secret_file.is_some() {
            let secret = hs256_secret(s, data_dir, create_secret)?;
            keys.push((None, Algorithm::HS256, DecodingKey::from_secret(&secret)));
        }
        Ok(Self {
            keys,
            audience: s.audience.clone(),
            issuer: s.issuer.clone(),
            leeway: s.leeway_secs,
        })
    }

    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let mut last = AuthError::Invalid(format!("no key accepts algorithm {:?}", header.alg));
        for (kid, alg, key) in &self.keys {
            if *alg != header.alg || (kid.is_some() && header.kid.is_some() && kid != &header.kid) {
                continue;
            }
            let mut v = Validation::new(*alg);
            v.set_audience(&[&self.audience]);
            if let Some(iss) = &self.issuer {
                v.set_issuer(&[iss]);
            }
            v.validate_nbf = true;
            v.leeway = self.leeway;
            v.set_required_spec_claims(&["exp", "sub", "aud"]);
            match jsonwebtoken::decode::<Claims>(token, key, &v) {
                Ok(data) => return principal(data.claims),
                Err(e) => last = AuthError::Invalid(e.to_string()),
            }
        }
        Err(last)
    }
}

fn principal(c: Claims) -> Result<Principal, AuthError> {
    let roles = c
        .roles
        .iter()
        .filter_map(|r| r.parse::<Role>().ok())
        .collect::<BTreeSet<_>>();
    Ok(Principal {
        sub: c.sub,
        roles,
        adapters: c.adapters,
    })
}

/// Mints tokens with the configured key.
pub struct Signer {
    alg: Algorithm,
    key: EncodingKey,
    audience: String,
    issuer: Option<String>,
}

impl Signer {
    pub fn from_settings(s: &AuthSettings, data_dir: &Path) -> Result<Self, AuthError> {
        let (alg, key) = if let Some(p) = &s.signing_key_file {
            let alg = public_alg(s)?;
            let pem = read(p)?;
            let key = match alg {
                Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
                _ => EncodingKey::from_rsa_pem(&pem),
            }
            .map_err(|e| AuthError::Config(format!("{}: {e}", p.display())))?;
            (alg, key)
        } else {
            (
                Algorithm::HS256,
                EncodingKey::from_secret(&hs256_secret(s, data_dir, true)?),
            )
        };
        Ok(Self {
            alg,
            key,
            audience: s.audience.clone(),
            issuer: s.issuer.clone(),
        })
    }

    pub fn issue(
        &self,
        sub: &str,
        roles: &[Role],
        ttl_secs: i64,
        adapters: Option<Vec<String>>,
    ) -> Result<String, AuthError> {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: sub.to_string(),
            roles: roles.iter().map(Role::to_string).collect(),
            aud: self.audience.clone(),
            iss: self.issuer.clone(),
            exp: now + ttl_secs,
            iat: now,
            nbf: Some(now),
            adapters,
        };
        jsonwebtoken::encode(&Header::new(self.alg), &claims, &self.key)
            .map_err(|e| AuthError::Config(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_match("team-a-*", "team-a-bot"));
        assert!(!glob_match("team-a-*", "team-b-bot"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("a*c*e", "abcde"));
        assert!(!glob_match("a*c*e", "abde"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }

    #[test]
    fn hs256_round_trip_and_rejections() {
        let dir = tempfile::tempdir().unwrap();
        let s = AuthSettings::default();
        let signer = Signer::from_settings(&s, dir.path()).unwrap();
        let verifier = Verifier::from_settings(&s, dir.path(), false).unwrap();
        let t = signer.issue("ci", &[Role::Publisher], 60, None).unwrap();
        let p = verifier.verify(&t).unwrap();
        assert_eq!(p.sub, "ci");
        assert!(p.has(Role::Publisher) && !p.has(Role::Deployer));

        let expired = signer.issue("ci", &[Role::Publisher], -3600, None).unwrap();
        assert!(verifier.verify(&expired).is_err());

        let other = AuthSettings {
            audience: "someone-else".into(),
            ..AuthSettings::default()
        };
        let wrong_aud = Signer::from_settings(&other, dir.path())
            .unwrap()
            .issue("ci", &[Role::Admin], 60, None)
            .unwrap();
        assert!(verifier.verify(&wrong_aud).is_err());

        // alg "none": header {"alg":"none"} with the same claims and an empty signature.
        let mut parts = t.split('.');
        let (_, claims) = (parts.next(), parts.next().unwrap());
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.");
        assert!(verifier.verify(&none).is_err());
    }

    #[test]
    fn rs256_and_es256_public_keys() {
        let dir = tempfile::tempdir().unwrap();
        let data = concat!(env!("CARGO_MANIFEST_DIR"), "/src/testdata");
        for alg in ["RS256", "ES256"] {
            let lower = alg.to_lowercase();
            let signing = AuthSettings {
                signing_key_file: Some(format!("{data}/{lower}-private.pem").into()),
                public_key_alg: Some(alg.into()),
                ..AuthSettings::default()
            };
            let verifying = AuthSettings {
                public_key_file: Some(format!("{data}/{lower}-public.pem").into()),
                public_key_alg: Some(alg.into()),
                ..AuthSettings::default()
            };
            let token = Signer::from_settings(&signing, dir.path())
                .unwrap()
                .issue("prod-ci", &[Role::Deployer], 60, None)
                .unwrap();
            let v = Verifier::from_settings(&verifying, dir.path(), false).unwrap();
            assert_eq!(v.verify(&token).unwrap().sub, "prod-ci", "{alg}");
            // No shared secret is configured, so an HS256 token (algorithm confusion) fails.
            let hs = Signer::from_settings(&AuthSettings::default(), dir.path())
                .unwrap()
                .issue("x", &[Role::Admin], 60, None)
                .unwrap();
            assert!(v.verify(&hs).is_err(), "{alg}");
        }
    }
}
