//! `loraops up` as the end-to-end tests run it: registry and gateway on free ports over one
//! data dir, ready once the gateway's base engine is loaded, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{SECRET, exe, free_port};

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
                "--listen",
                &format!("127.0.0.1:{rp}"),
                "--gateway-listen",
                &format!("127.0.0.1:{gp}"),
                "--base-model",
                base.to_str().unwrap(),
            ])
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
