//! JWT auth: who is calling and with which roles. HS256 with a shared secret for embedded
//! use (generated into the data dir on first start); for production, public keys: a PEM, a
//! JWKS file, or an identity provider's JWKS URL (cached, refreshed when a token names an
//! unknown `kid`, at most once per `jwks_min_refresh_secs`), with RS256, PS256, ES256 and
//! EdDSA. `aud` may be a string or an array; roles come from a configurable claim path
//! (`roles`, `realm_access.roles`, `groups`) through an optional mapping of IdP groups to
//! loraops roles; tokens may live at most `max_token_lifetime_secs`. Minted tokens carry a
//! `jti` that `revoked_tokens_file` can revoke everywhere; an HS256 secret rotates through
//! `hs256_previous_secret_files`, which verify but never sign. The registry and the
//! gateway verify with [`Verifier`]; `loraops token issue` mints with [`Signer`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    /// HS256 secrets that still verify but no longer sign, one file each: during a rotation,
    /// the old secret goes here and the new one in `hs256_secret_file`, so tokens minted
    /// before it keep working until they expire or the old file is dropped.
    pub hs256_previous_secret_files: Vec<PathBuf>,
    /// Revoked tokens: a file of `jti` values, one per line (`#` starts a comment). Read
    /// again when it changes (checked at most once a second), so a revocation reaches every
    /// registry and gateway replica that mounts it without a restart.
    pub revoked_tokens_file: Option<PathBuf>,
    /// PEM public key (see `public_key_alg`).
    pub public_key_file: Option<PathBuf>,
    /// `RS256` (default), `PS256`, `ES256` or `EdDSA`.
    pub public_key_alg: Option<String>,
    /// JWKS file with public keys, selected by `kid`.
    pub jwks_file: Option<PathBuf>,
    /// PEM private key used by `loraops token issue` with RS256/ES256.
    pub signing_key_file: Option<PathBuf>,
    /// JWKS URL of an identity provider (e.g. Keycloak's `…/protocol/openid-connect/certs`).
    pub jwks_url: Option<String>,
    /// Keys fetched from `jwks_url` are used for this long before they are fetched again.
    pub jwks_cache_secs: u64,
    /// Fetch `jwks_url` at most this often, however many tokens name unknown keys.
    pub jwks_min_refresh_secs: u64,
    /// Required `aud` claim (the token's `aud` may be this string or an array holding it).
    pub audience: String,
    /// Required `iss` claim, when set.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Where the roles are in the claims, as a dot path: `roles` (default),
    /// `realm_access.roles` (Keycloak), `groups`. A list of strings, or one space-separated
    /// string.
    pub roles_claim: String,
    /// IdP role or group names mapped to loraops roles (`"ml-platform" = ["deployer"]`).
    /// Names not in the map are taken as loraops role names.
    pub role_mapping: std::collections::BTreeMap<String, Vec<String>>,
    /// Longest lifetime (`exp - iat`, or `exp - now` without `iat`) a token may have; longer
    /// ones are refused, and `token issue` will not mint them. 0: no limit.
    pub max_token_lifetime_secs: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            hs256_secret: None,
            hs256_secret_file: None,
            hs256_previous_secret_files: Vec::new(),
            revoked_tokens_file: None,
            public_key_file: None,
            public_key_alg: None,
            jwks_file: None,
            signing_key_file: None,
            jwks_url: None,
            jwks_cache_secs: 300,
            jwks_min_refresh_secs: 30,
            audience: "loraops".into(),
            issuer: None,
            leeway_secs: 30,
            roles_claim: "roles".into(),
            role_mapping: Default::default(),
            max_token_lifetime_secs: 0,
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
    /// The token's own id, which `revoked_tokens_file` names to revoke it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
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
        Ok(text) => secret_text(&path, &text),
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

fn secret_text(path: &Path, text: &str) -> Result<Vec<u8>, AuthError> {
    let t = text.trim();
    if t.len() < 16 {
        return Err(AuthError::Config(format!(
            "{}: secret must be at least 16 bytes",
            path.display()
        )));
    }
    Ok(t.as_bytes().to_vec())
}

/// The revoked token ids of `revoked_tokens_file`, read again when the file changes.
struct Revoked {
    path: PathBuf,
    state: Mutex<RevokedState>,
}

#[derive(Default)]
struct RevokedState {
    ids: std::collections::HashSet<String>,
    /// The file's modification time and length when `ids` was read.
    seen: Option<(std::time::SystemTime, u64)>,
    checked: Option<Instant>,
}

impl Revoked {
    fn load(path: &Path) -> Result<Self, AuthError> {
        let r = Self {
            path: path.to_path_buf(),
            state: Mutex::default(),
        };
        // A file that cannot be read at start is a configuration error; later, the last list
        // read stays in force.
        r.refresh(&mut r.state.lock().expect("revoked lock"))?;
        Ok(r)
    }

    fn refresh(&self, st: &mut RevokedState) -> Result<(), AuthError> {
        let err = |e: std::io::Error| AuthError::Config(format!("{}: {e}", self.path.display()));
        let meta = std::fs::metadata(&self.path).map_err(err)?;
        let stamp = (meta.modified().map_err(err)?, meta.len());
        st.checked = Some(Instant::now());
        if st.seen == Some(stamp) {
            return Ok(());
        }
        let text = std::fs::read_to_string(&self.path).map_err(err)?;
        st.ids = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        st.seen = Some(stamp);
        Ok(())
    }

    fn contains(&self, jti: &str) -> bool {
        let mut st = self.state.lock().expect("revoked lock");
        if st
            .checked
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            && let Err(e) = self.refresh(&mut st)
        {
            tracing::warn!(error = %e, "revoked tokens file; keeping the last list read");
        }
        st.ids.contains(jti)
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
        "PS256" => Ok(Algorithm::PS256),
        "ES256" => Ok(Algorithm::ES256),
        "EdDSA" => Ok(Algorithm::EdDSA),
        other => Err(AuthError::Config(format!(
            "public_key_alg {other:?}: expected RS256, PS256, ES256 or EdDSA"
        ))),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|e| AuthError::Config(format!("{}: {e}", path.display())))
}

type Key = (Option<String>, Algorithm, DecodingKey);

/// The keys of a JWKS document, each with the algorithms it verifies: its own `alg` when it
/// names one, else by key type (an RSA key serves RS256 and PS256).
fn jwks_keys(set: &JwkSet, origin: &str) -> Result<Vec<Key>, AuthError> {
    use jsonwebtoken::jwk::AlgorithmParameters as P;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if matches!(
            jwk.common.public_key_use,
            Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
        ) {
            continue;
        }
        let algs: Vec<Algorithm> = match &jwk.common.key_algorithm {
            Some(a) => match a.to_string().parse::<Algorithm>() {
                Ok(alg) => vec![alg],
                // An algorithm loraops does not verify with.
                Err(_) => continue,
            },
            None => match &jwk.algorithm {
                P::RSA(_) => vec![Algorithm::RS256, Algorithm::PS256],
                P::EllipticCurve(_) => vec![Algorithm::ES256],
                P::OctetKeyPair(_) => vec![Algorithm::EdDSA],
                // Shared secrets are never taken from a key set.
                _ => continue,
            },
        };
        if algs.contains(&Algorithm::HS256) {
            continue;
        }
        let key =
            DecodingKey::from_jwk(jwk).map_err(|e| AuthError::Config(format!("{origin}: {e}")))?;
        for alg in algs {
            keys.push((jwk.common.key_id.clone(), alg, key.clone()));
        }
    }
    Ok(keys)
}

/// Keys from an identity provider's JWKS URL.
struct Remote {
    url: String,
    cache_for: Duration,
    min_refresh: Duration,
    state: Mutex<RemoteState>,
}

#[derive(Default)]
struct RemoteState {
    keys: Vec<Key>,
    fetched: Option<Instant>,
    tried: Option<Instant>,
}

impl Remote {
    /// The keys, fetched again when stale or when `want_kid` is unknown, but never more often
    /// than `min_refresh`; a failed fetch keeps the old keys.
    fn keys(&self, want_kid: Option<&str>) -> Vec<Key> {
        let mut st = self.state.lock().expect("jwks lock");
        let stale = st.fetched.is_none_or(|t| t.elapsed() >= self.cache_for);
        let unknown =
            want_kid.is_some_and(|k| !st.keys.iter().any(|(kid, _, _)| kid.as_deref() == Some(k)));
        let may = st.tried.is_none_or(|t| t.elapsed() >= self.min_refresh);
        if (stale || unknown) && may {
            st.tried = Some(Instant::now());
            match fetch_jwks(&self.url) {
                Ok(keys) => {
                    st.keys = keys;
                    st.fetched = Some(Instant::now());
                }
                Err(e) => {
                    tracing::warn!(url = %self.url, error = %e, "cannot refresh the JWKS; keeping the keys in hand")
                }
            }
        }
        st.keys.clone()
    }
}

/// Fetch and parse a JWKS document. Verification is synchronous (request extractors), so the
/// fetch runs on its own thread and runtime, bounded by a timeout; it happens at most once
/// per `jwks_min_refresh_secs`.
fn fetch_jwks(url: &str) -> Result<Vec<Key>, AuthError> {
    let url = url.to_string();
    let fetched = std::thread::spawn(move || -> Result<Vec<u8>, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let res = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| e.to_string())?
                .get(&url)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !res.status().is_success() {
                return Err(format!("answered {}", res.status()));
            }
            res.bytes()
                .await
                .map(|b| b.to_vec())
                .map_err(|e| e.to_string())
        })
    })
    .join()
    .map_err(|_| AuthError::Config("JWKS fetch thread panicked".into()))?
    .map_err(AuthError::Config)?;
    let set: JwkSet =
        serde_json::from_slice(&fetched).map_err(|e| AuthError::Config(format!("JWKS: {e}")))?;
    jwks_keys(&set, "JWKS")
}

/// Verifies bearer tokens.
pub struct Verifier {
    keys: Vec<Key>,
    remote: Option<Remote>,
    revoked: Option<Revoked>,
    audience: String,
    issuer: Option<String>,
    leeway: u64,
    roles_claim: Vec<String>,
    role_mapping: std::collections::BTreeMap<String, Vec<String>>,
    max_lifetime: Option<i64>,
}

impl Verifier {
    /// Build from settings. With no public key, JWKS file or URL configured, uses HS256 and
    /// creates the secret under `data_dir` when `create_secret` is set.
    pub fn from_settings(
        s: &AuthSettings,
        data_dir: &Path,
        create_secret: bool,
    ) -> Result<Self, AuthError> {
        let mut keys = Vec::new();
        if let Some(p) = &s.jwks_file {
            let set: JwkSet = serde_json::from_slice(&read(p)?)
                .map_err(|e| AuthError::Config(format!("{}: {e}", p.display())))?;
            keys.extend(jwks_keys(&set, &p.display().to_string())?);
        }
        if let Some(p) = &s.public_key_file {
            let alg = public_alg(s)?;
            let pem = read(p)?;
            let key = match alg {
                Algorithm::ES256 => DecodingKey::from_ec_pem(&pem),
                Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                _ => DecodingKey::from_rsa_pem(&pem),
            }
            .map_err(|e| AuthError::Config(format!("{}: {e}", p.display())))?;
            keys.push((None, alg, key));
        }
        let remote = match &s.jwks_url {
            None => None,
            Some(u) => {
                if !(u.starts_with("https://") || u.starts_with("http://")) {
                    return Err(AuthError::Config(format!(
                        "jwks_url {u:?}: expected an http(s) URL"
                    )));
                }
                Some(Remote {
                    url: u.clone(),
                    cache_for: Duration::from_secs(s.jwks_cache_secs.max(1)),
                    min_refresh: Duration::from_secs(s.jwks_min_refresh_secs),
                    state: Mutex::default(),
                })
            }
        };
        if (keys.is_empty() && remote.is_none())
            || s.hs256_secret.is_some()
            || s.hs256_secret_file.is_some()
        {
            let secret = hs256_secret(s, data_dir, create_secret)?;
            keys.push((None, Algorithm::HS256, DecodingKey::from_secret(&secret)));
        }
        for p in &s.hs256_previous_secret_files {
            let text = std::fs::read_to_string(p)
                .map_err(|e| AuthError::Config(format!("{}: {e}", p.display())))?;
            let secret = secret_text(p, &text)?;
            keys.push((None, Algorithm::HS256, DecodingKey::from_secret(&secret)));
        }
        let revoked = s
            .revoked_tokens_file
            .as_deref()
            .map(Revoked::load)
            .transpose()?;
        let roles_claim: Vec<String> = s
            .roles_claim
            .split('.')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        if roles_claim.is_empty() {
            return Err(AuthError::Config("roles_claim must name a claim".into()));
        }
        for (from, to) in &s.role_mapping {
            for r in to {
                r.parse::<Role>()
                    .map_err(|e| AuthError::Config(format!("role_mapping.{from}: {e}")))?;
            }
        }
        Ok(Self {
            keys,
            remote,
            revoked,
            audience: s.audience.clone(),
            issuer: s.issuer.clone(),
            leeway: s.leeway_secs,
            roles_claim,
            role_mapping: s.role_mapping.clone(),
            max_lifetime: (s.max_token_lifetime_secs > 0)
                .then(|| i64::try_from(s.max_token_lifetime_secs).unwrap_or(i64::MAX)),
        })
    }

    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let remote = self
            .remote
            .as_ref()
            .map(|r| r.keys(header.kid.as_deref()))
            .unwrap_or_default();
        let mut last = AuthError::Invalid(format!("no key accepts algorithm {:?}", header.alg));
        for (kid, alg, key) in self.keys.iter().chain(remote.iter()) {
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
            match jsonwebtoken::decode::<serde_json::Value>(token, key, &v) {
                Ok(data) => return self.principal(&data.claims),
                Err(e) => last = AuthError::Invalid(e.to_string()),
            }
        }
        Err(last)
    }

    fn principal(&self, c: &serde_json::Value) -> Result<Principal, AuthError> {
        let sub = c["sub"]
            .as_str()
            .ok_or_else(|| AuthError::Invalid("sub is not a string".into()))?
            .to_string();
        if let (Some(revoked), Some(jti)) = (&self.revoked, c["jti"].as_str())
            && revoked.contains(jti)
        {
            return Err(AuthError::Invalid(format!("token {jti} is revoked")));
        }
        if let Some(max) = self.max_lifetime {
            let exp = c["exp"].as_i64().unwrap_or(i64::MAX);
            let from = c["iat"]
                .as_i64()
                .unwrap_or_else(|| chrono::Utc::now().timestamp());
            let lifetime = exp.saturating_sub(from);
            if lifetime > max.saturating_add(self.leeway as i64) {
                return Err(AuthError::Invalid(format!(
                    "token lifetime {lifetime} s exceeds the maximum of {max} s"
                )));
            }
        }
        let mut at = c;
        for part in &self.roles_claim {
            at = &at[part.as_str()];
        }
        let names: Vec<&str> = match at {
            serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_str()).collect(),
            serde_json::Value::String(s) => s.split_whitespace().collect(),
            _ => Vec::new(),
        };
        let mut roles = BTreeSet::new();
        for n in names {
            match self.role_mapping.get(n) {
                Some(mapped) => roles.extend(mapped.iter().filter_map(|r| r.parse::<Role>().ok())),
                None => roles.extend(n.parse::<Role>().ok()),
            }
        }
        let adapters = match &c["adapters"] {
            serde_json::Value::Array(a) => Some(
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
            ),
            _ => None,
        };
        Ok(Principal {
            sub,
            roles,
            adapters,
        })
    }
}

/// Mints tokens with the configured key.
pub struct Signer {
    alg: Algorithm,
    key: EncodingKey,
    audience: String,
    issuer: Option<String>,
    max_lifetime: u64,
}

impl Signer {
    pub fn from_settings(s: &AuthSettings, data_dir: &Path) -> Result<Self, AuthError> {
        let (alg, key) = if let Some(p) = &s.signing_key_file {
            let alg = public_alg(s)?;
            let pem = read(p)?;
            let key = match alg {
                Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
                Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
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
            max_lifetime: s.max_token_lifetime_secs,
        })
    }

    pub fn issue(
        &self,
        sub: &str,
        roles: &[Role],
        ttl_secs: i64,
        adapters: Option<Vec<String>>,
    ) -> Result<String, AuthError> {
        Ok(self.issue_claims(sub, roles, ttl_secs, adapters)?.0)
    }

    /// A token and the claims it carries (its `jti`, to revoke it later).
    pub fn issue_claims(
        &self,
        sub: &str,
        roles: &[Role],
        ttl_secs: i64,
        adapters: Option<Vec<String>>,
    ) -> Result<(String, Claims), AuthError> {
        if self.max_lifetime > 0 && ttl_secs > 0 && ttl_secs as u64 > self.max_lifetime {
            return Err(AuthError::Config(format!(
                "a lifetime of {ttl_secs} s exceeds max_token_lifetime_secs ({} s)",
                self.max_lifetime
            )));
        }
        let now = chrono::Utc::now().timestamp();
        let exp = now.checked_add(ttl_secs).ok_or_else(|| {
            AuthError::Config(format!("a lifetime of {ttl_secs} s is out of range"))
        })?;
        let claims = Claims {
            sub: sub.to_string(),
            roles: roles.iter().map(Role::to_string).collect(),
            aud: self.audience.clone(),
            iss: self.issuer.clone(),
            exp,
            iat: now,
            nbf: Some(now),
            adapters,
            jti: Some(uuid::Uuid::new_v4().to_string()),
        };
        let token = jsonwebtoken::encode(&Header::new(self.alg), &claims, &self.key)
            .map_err(|e| AuthError::Config(e.to_string()))?;
        Ok((token, claims))
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

    /// A rotation: tokens of the previous secret verify while it is listed, new tokens are
    /// signed with the current one, and a secret that was never configured verifies nothing.
    #[test]
    fn hs256_secrets_rotate_without_breaking_live_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let old_file = dir.path().join("old-secret");
        let new_file = dir.path().join("new-secret");
        std::fs::write(&old_file, "old-secret-0123456789abcdef\n").unwrap();
        std::fs::write(&new_file, "new-secret-0123456789abcdef\n").unwrap();
        let before = AuthSettings {
            hs256_secret_file: Some(old_file.clone()),
            ..Default::default()
        };
        let during = AuthSettings {
            hs256_secret_file: Some(new_file.clone()),
            hs256_previous_secret_files: vec![old_file.clone()],
            ..Default::default()
        };
        let after = AuthSettings {
            hs256_secret_file: Some(new_file),
            ..Default::default()
        };
        let old_token = Signer::from_settings(&before, dir.path())
            .unwrap()
            .issue("ci", &[Role::Publisher], 600, None)
            .unwrap();
        let new_token = Signer::from_settings(&during, dir.path())
            .unwrap()
            .issue("ci", &[Role::Publisher], 600, None)
            .unwrap();
        let v = Verifier::from_settings(&during, dir.path(), false).unwrap();
        assert!(v.verify(&old_token).is_ok() && v.verify(&new_token).is_ok());
        let v = Verifier::from_settings(&after, dir.path(), false).unwrap();
        assert!(v.verify(&old_token).is_err() && v.verify(&new_token).is_ok());
        // The new token was signed with the new secret, not the previous one.
        let v = Verifier::from_settings(&before, dir.path(), false).unwrap();
        assert!(v.verify(&new_token).is_err());
        // A previous secret that is missing or too short is a configuration error.
        let short = dir.path().join("short");
        std::fs::write(&short, "tiny").unwrap();
        for bad in [dir.path().join("missing"), short] {
            let s = AuthSettings {
                hs256_previous_secret_files: vec![bad],
                ..during.clone()
            };
            assert!(matches!(
                Verifier::from_settings(&s, dir.path(), false),
                Err(AuthError::Config(_))
            ));
        }
    }

    /// Revocation by `jti`: refused as soon as the file names it (after at most a second),
    /// the others unaffected; tokens without a `jti` are not affected either.
    #[test]
    fn revoked_tokens_are_refused_once_the_file_names_them() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("revoked");
        std::fs::write(&list, "# revoked tokens\n").unwrap();
        let s = AuthSettings {
            revoked_tokens_file: Some(list.clone()),
            ..Default::default()
        };
        let signer = Signer::from_settings(&s, dir.path()).unwrap();
        let v = Verifier::from_settings(&s, dir.path(), false).unwrap();
        let (leaked, claims) = signer
            .issue_claims("ci", &[Role::Admin], 600, None)
            .unwrap();
        let kept = signer.issue("ci", &[Role::Admin], 600, None).unwrap();
        assert!(v.verify(&leaked).is_ok());
        let jti = claims.jti.unwrap();
        std::fs::write(
            &list,
            format!("# revoked tokens\n{jti}  # leaked in a CI log\n"),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let err = v.verify(&leaked).unwrap_err().to_string();
        assert!(err.contains(&jti) && err.contains("revoked"), "{err}");
        assert!(v.verify(&kept).is_ok());
        // A list that later cannot be read keeps the last one in force.
        std::fs::remove_file(&list).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert!(v.verify(&leaked).is_err() && v.verify(&kept).is_ok());
        // A list that cannot be read at start is a configuration error.
        assert!(matches!(
            Verifier::from_settings(&s, dir.path(), false),
            Err(AuthError::Config(_))
        ));
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
