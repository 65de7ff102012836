//! `loraops up` as the end-to-end tests run it: registry and gateway on free ports over one
//! data dir, ready once the gateway's base engine is loaded, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::{SECRET, exe, free_port};

pub struct Stack {
    child: Child,
    pub data: PathBuf,
    pub registry: String,
    pub gateway: String,
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Stack {
    pub fn up(data: &Path, base: &Path) -> Self {
        let (rp, gp) = (free_port(), free_port());
        let log = std::fs::File::create(data.with_extension("log")).unwrap();
        let child = Command::new(exe())
            .args([
                "--data-dir",
                data.to_str().unwrap(),
                "up",
                "--base-model",
                base.to_str().unwrap(),
            ])
            // Listeners from the configuration (the README's walkthrough uses the flags).
            .env("LORAOPS_REGISTRY__LISTEN", format!("127.0.0.1:{rp}"))
            .env("LORAOPS_GATEWAY__LISTEN", format!("127.0.0.1:{gp}"))
            .env("LORAOPS_AUTH__HS256_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let stack = Self {
            child,
            data: data.to_path_buf(),
            registry: format!("http://127.0.0.1:{rp}"),
            gateway: format!("http://127.0.0.1:{gp}"),
        };
        // Ready when the gateway's base engine is loaded.
        let rt = tokio::runtime::Runtime::new().unwrap();
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let ready = rt.block_on(async {
                reqwest::get(format!("{}/readyz", stack.gateway))
                    .await
                    .is_ok_and(|r| r.status().is_success())
            });
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "loraops up did not become ready: {}",
                std::fs::read_to_string(data.with_extension("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        stack
    }

    /// `loraops ARGS` against this stack, with `token` as `LORAOPS_TOKEN` (or none).
    pub fn cli(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut c = Command::new(exe());
        c.args(["--data-dir", self.data.to_str().unwrap()])
            .args(args)
            .env("LORAOPS_AUTH__HS256_SECRET", SECRET)
            .env("LORAOPS_REGISTRY_URL", &self.registry)
            .env("LORAOPS_GATEWAY_URL", &self.gateway)
            .env("RUST_LOG", "warn")
            .env_remove("LORAOPS_TOKEN");
        if let Some(t) = token {
            c.env("LORAOPS_TOKEN", t);
        }
        c.output().unwrap()
    }

    /// A token for `sub` with `roles` (comma-separated), signed with the stack's secret.
    pub fn token(&self, sub: &str, roles: &str) -> String {
        let out = self.cli(
            None,
            &[
                "token", "issue", "--sub", sub, "--role", roles, "--ttl", "30m",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

/// `loraops up` gives its gateway a `gateway`-only token (not the admin token it prints), kept
/// in the data dir, and refuses to serve inference openly on a non-loopback address unless
/// told to.
#[test]
fn up_gives_the_gateway_its_own_token_and_guards_open_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("tiny");
    let init = Command::new(exe())
        .args(["model", "init-tiny", base.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(init.status.success());

    // A non-loopback gateway listener without gateway.require_auth: refused before starting.
    let out = Command::new(exe())
        .args([
            "--data-dir",
            dir.path().join("open").to_str().unwrap(),
            "up",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--gateway-listen",
            &format!("0.0.0.0:{}", free_port()),
            "--base-model",
            base.to_str().unwrap(),
        ])
        .env("LORAOPS_AUTH__HS256_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("require_auth"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let data = dir.path().join("data");
    let up = Stack::up(&data, &base);
    let token = std::fs::read_to_string(data.join("gateway.token")).unwrap();
    let verifier = loraops_registry::auth::Verifier::from_settings(
        &loraops_registry::auth::AuthSettings {
            hs256_secret: Some(SECRET.into()),
            ..Default::default()
        },
        dir.path(),
        false,
    )
    .unwrap();
    let p = verifier.verify(token.trim()).unwrap();
    assert_eq!(
        p.roles.into_iter().collect::<Vec<_>>(),
        [loraops_registry::api::Role::Gateway]
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let get = |path: &str| {
            http.get(format!("{}{path}", up.registry))
                .bearer_auth(token.trim())
                .send()
        };
        // What serving needs, and nothing more.
        assert_eq!(get("/api/v1/routing").await.unwrap().status(), 200);
        assert_eq!(get("/api/v1/suites").await.unwrap().status(), 403);
        let put = http
            .put(format!("{}/api/v1/adapters/x/gate", up.registry))
            .bearer_auth(token.trim())
            .json(&serde_json::json!({"rules": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 403);
    });
}
