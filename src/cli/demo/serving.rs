//! The demo's servers and users: the registry and the gateway each on a thread of their own
//! (an actix system apiece), so that the story's steps can run the same blocking code the
//! CLI commands run; and chat requests as applications and simulated users send them.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::ServerHandle;
use serde_json::{Value, json};

use super::content::SYSTEM;

/// A server started by [`serve`]: its port, and the handle that stops it.
pub struct Serving {
    pub port: u16,
    handle: ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The future that serves until the server is stopped.
pub type Run = Pin<Box<dyn Future<Output = std::io::Result<()>>>>;

/// Build a server inside an actix system on a new thread and run it there until stopped.
/// `start` returns the bound port, the stop handle and the future that serves.
pub fn serve<F, Fut>(name: &str, start: F) -> anyhow::Result<Serving>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<(u16, ServerHandle, Run)>>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("demo-{name}"))
        .spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                match start().await {
                    Ok((port, handle, run)) => {
                        let _ = tx.send(Ok((port, handle)));
                        if let Err(e) = run.await {
                            tracing::error!(error = %e, "demo server stopped");
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
        })?;
    let (port, handle) = rx.recv()??;
    Ok(Serving {
        port,
        handle,
        thread: Some(thread),
    })
}

impl Serving {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stop and wait for the thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(t) = self.thread.take() {
            let handle = self.handle.clone();
            // Not gracefully: the story is over, and a graceful stop would wait out the
            // keep-alive connections of its clients (30 s). The handle only sends a message;
            // any executor can await it.
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() {
                rt.block_on(handle.stop(false));
            }
            let _ = t.join();
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A support chat completion, greedy, as the demo's users send it.
pub async fn chat(
    http: &reqwest::Client,
    gateway: &str,
    model: &str,
    question: &str,
    user: &str,
) -> anyhow::Result<String> {
    let res = http
        .post(format!("{gateway}/v1/chat/completions"))
        .header("x-loraops-user", user)
        .json(&json!({"model": model, "temperature": 0, "max_tokens": 64,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": question}]}))
        .send()
        .await?;
    let status = res.status();
    let body: Value = res.json().await?;
    anyhow::ensure!(status.is_success(), "gateway answered {status}: {body}");
    Ok(body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// Users `user-0…user-199` asking support questions of `adapter` (its routing decides the
/// arm), `concurrency` at a time, until aborted.
pub async fn simulate_users(
    http: reqwest::Client,
    gateway: String,
    adapter: String,
    questions: Vec<&'static str>,
    concurrency: usize,
) {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let users = (0..concurrency).map(|_| {
        let (http, gateway, adapter, questions, next) = (
            http.clone(),
            gateway.clone(),
            adapter.clone(),
            questions.clone(),
            next.clone(),
        );
        async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let user = format!("user-{}", i % 200);
                let q = questions[i % questions.len()];
                if let Err(e) = chat(&http, &gateway, &adapter, q, &user).await {
                    tracing::warn!(error = %e, "simulated request failed");
                }
            }
        }
    });
    futures_util::future::join_all(users).await;
}

/// Wait until the gateway serves routing revision `revision` (or a later one): a rollout's
/// end is the registry's decision, and the gateway applies it when its feed next answers.
pub async fn gateway_applied(
    http: &reqwest::Client,
    gateway: &str,
    revision: i64,
) -> anyhow::Result<()> {
    const GAUGE: &str = "loraops_gateway_routing_revision";
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let text = http
            .get(format!("{gateway}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let served = text
            .lines()
            .find_map(|l| l.strip_prefix(GAUGE)?.trim().parse::<i64>().ok());
        if served.is_some_and(|r| r >= revision) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the gateway still serves routing revision {served:?}, 30 s after the registry moved to {revision}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
