//! The end-to-end tests' harness: the `loraops` binary, a registry started as a process on a
//! free port, the CLI driving it, and fixtures (a tiny model, chat rows, a base model and a
//! PEFT adapter from the shared test kit).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use loraops_testkit::{Lora, PeftAdapter, Shapes};
use serde_json::{Value, json};

pub const SECRET: &str = "e2e-secret-0123456789abcdef";

pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_loraops")
}

pub struct Registry {
    pub child: Child,
    pub url: String,
    pub data: PathBuf,
    /// Deleted with the registry, when the registry made its own data dir.
    pub _owned: Option<tempfile::TempDir>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `GET /healthz` on the port answers 200.
pub fn answers_health(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Registry {
    /// A registry on a free port. Another test's server may take the port between picking it
    /// and binding it: then this one exits, and it is started again on another port.
    pub fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        Self::start_with(tmp.path().to_path_buf(), Some(tmp))
    }

    /// A registry over an existing data dir (which the caller owns).
    pub fn start_in(dir: &Path) -> Self {
        Self::start_with(dir.to_path_buf(), None)
    }

    pub fn start_with(data: PathBuf, owned: Option<tempfile::TempDir>) -> Self {
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(exe())
                .args([
                    "--data-dir",
                    data.to_str().unwrap(),
                    "registry",
                    "serve",
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                ])
                .env("LORAOPS_AUTH__HS256_SECRET", SECRET)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            let url = format!("http://127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                // Up when the port answers and the process that answers is still ours.
                if answers_health(port) {
                    std::thread::sleep(Duration::from_millis(50));
                    if child.try_wait().unwrap().is_none() {
                        return Self {
                            child,
                            url,
                            data,
                            _owned: owned,
                        };
                    }
                    break;
                }
                assert!(Instant::now() < deadline, "registry did not start");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("the registry could not bind a port in five tries");
    }

    /// Kill the registry (as a crash or an outage would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start it again on the same port and data dir.
    pub fn restart(&mut self) {
        self.kill();
        let port: u16 = self.url.rsplit(':').next().unwrap().parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.child = Command::new(exe())
                .args([
                    "--data-dir",
                    self.data.to_str().unwrap(),
                    "registry",
                    "serve",
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                ])
                .env("LORAOPS_AUTH__HS256_SECRET", SECRET)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            while self.child.try_wait().unwrap().is_none() {
                if answers_health(port) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(
                Instant::now() < deadline,
                "the registry did not restart on port {port}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    pub fn cli(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut c = Command::new(exe());
        c.args(["--data-dir", self.data.to_str().unwrap()])
            .args(args)
            .env("LORAOPS_AUTH__HS256_SECRET", SECRET)
            .env("LORAOPS_REGISTRY_URL", &self.url)
            .env_remove("LORAOPS_TOKEN");
        if let Some(t) = token {
            c.env("LORAOPS_TOKEN", t);
        }
        c.output().unwrap()
    }

    pub fn token(&self, roles: &str) -> String {
        let out = self.cli(
            None,
            &[
                "token", "issue", "--sub", "e2e", "--role", roles, "--ttl", "10m",
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

/// Run a command that must succeed; its output.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `loraops model init-tiny DIR`: a generated tiny model for a test.
pub fn init_tiny(dir: &Path) -> PathBuf {
    let out = Command::new(exe())
        .args(["model", "init-tiny", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.to_path_buf()
}

/// `rows` SFT chat rows at `path`: the question `ask(i)`, always answered with `answer`.
pub fn chat_data(path: &Path, rows: usize, ask: impl Fn(usize) -> String, answer: &str) -> PathBuf {
    let text: String = (0..rows)
        .map(|i| {
            json!({"messages": [{"role": "user", "content": ask(i)},
                {"role": "assistant", "content": answer}]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

pub fn ok_json(out: Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A base model directory (config.json + one weight file) and a LoRA adapter for it (from
/// the shared test kit).
pub fn fixtures(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("e2e-base");
    std::fs::create_dir_all(&base).unwrap();
    let config = json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100});
    std::fs::write(
        base.join("config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    std::fs::write(
        base.join("model.safetensors"),
        b"weights stand-in for the digest",
    )
    .unwrap();
    let adapter = dir.join("adapter");
    let lora = Lora {
        base_model: base.to_str().unwrap(),
        targets: &["q_proj", "v_proj"],
        r: 2,
        alpha: 4.0,
        seed: 1,
        amplitude: 1.0,
        dora: false,
    };
    PeftAdapter::random(&lora, &Shapes::of_config(&config)).write(&adapter);
    std::fs::write(adapter.join("README.md"), "# e2e adapter\n").unwrap();
    (base, adapter)
}
