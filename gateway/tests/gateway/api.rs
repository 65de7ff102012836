//! The OpenAI-compatible surface: response shapes, streaming, errors, auth and limits.

use loraops_gateway::settings::EngineKind;
use loraops_registry::api::Role;
use loraops_registry::auth::{AuthSettings, Signer};
use serde_json::{Value, json};

use crate::helpers::{
    BASE, SECRET, fixture, spawn_gateway, spawn_gateway_with, spawn_registry, sse_events,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_and_non_streaming_greedy_outputs_are_equal() {
    let gw = spawn_gateway(None).await;
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": BASE, "max_tokens": 6, "temperature": 0,
                   "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a short poem about the sea."}]}),
        ),
        (
            "/v1/completions",
            json!({"model": BASE, "max_tokens": 6, "temperature": 0, "prompt": "The quick brown fox"}),
        ),
    ] {
        let chat = path.contains("chat");
        let res = gw.post(path, &body).await;
        assert_eq!(res.status(), 200);
        let full: Value = res.json().await.unwrap();
        let text = if chat {
            assert_eq!(full["object"], "chat.completion");
            assert_eq!(full["choices"][0]["message"]["role"], "assistant");
            full["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        } else {
            assert_eq!(full["object"], "text_completion");
            full["choices"][0]["text"].as_str().unwrap().to_string()
        };
        assert!(!text.is_empty());
        let usage = &full["usage"];
        let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
        assert!((1..=6).contains(&completion_tokens), "{usage}");
        assert!(usage["prompt_tokens"].as_u64().unwrap() > 0, "{usage}");
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + completion_tokens
        );

        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        sbody["stream_options"] = json!({"include_usage": true});
        let res = gw.post(path, &sbody).await;
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        let events = sse_events(&res.text().await.unwrap());
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let id = chunks[0]["id"].clone();
        let mut streamed = String::new();
        for c in &chunks {
            assert_eq!(c["id"], id, "one id per stream");
            if chat {
                assert_eq!(c["object"], "chat.completion.chunk");
            }
            if let Some(choice) = c["choices"].get(0) {
                assert!(c["usage"].is_null(), "usage is null until the last chunk");
                let piece = if chat {
                    &choice["delta"]["content"]
                } else {
                    &choice["text"]
                };
                streamed.push_str(piece.as_str().unwrap_or(""));
            }
        }
        if chat {
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        }
        let n = chunks.len();
        assert!(chunks[n - 2]["choices"][0]["finish_reason"].is_string());
        let last = &chunks[n - 1];
        assert_eq!(last["choices"], json!([]), "usage chunk has no choices");
        assert_eq!(
            last["usage"], *usage,
            "streamed usage equals the non-streamed one"
        );
        assert_eq!(streamed, text, "{path}: stream and non-stream differ");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_with_the_right_status() {
    let gw = spawn_gateway_with(None, |s| s.limits.max_body_bytes = 4096).await;
    let msg = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (
            json!({"model": "nope", "messages": msg}),
            404,
            Some("model"),
        ),
        (
            json!({"model": "nope@3", "messages": msg}),
            404,
            Some("model"),
        ),
        (
            json!({"model": BASE, "messages": msg, "n": 99}),
            400,
            Some("n"),
        ),
        (
            json!({"model": BASE, "messages": msg, "top_k": 5}),
            400,
            Some("top_k"),
        ),
        (
            json!({"model": BASE, "messages": msg, "functions": [{"name": "f"}]}),
            400,
            Some("functions"),
        ),
        (
            json!({"model": BASE, "messages": msg, "tool_choice": "required"}),
            400,
            Some("tool_choice"),
        ),
        (
            json!({"model": BASE, "messages": msg, "guided_grammar": "start: \"a\" | ("}),
            400,
            None,
        ),
        (
            json!({"model": BASE, "messages": []}),
            400,
            Some("messages"),
        ),
        (
            json!({"model": BASE, "messages": [{"role": "wizard", "content": "x"}]}),
            400,
            Some("messages[0].role"),
        ),
        (
            json!({"model": BASE, "messages": msg, "temperature": 2.5}),
            400,
            Some("temperature"),
        ),
        (
            json!({"model": BASE, "messages": [{"role": "user", "content": "x".repeat(5000)}]}),
            413,
            None,
        ),
    ];
    for (body, status, param) in cases {
        let res = gw.post("/v1/chat/completions", &body).await;
        assert_eq!(res.status(), status, "{body}");
        let v: Value = res.json().await.unwrap();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e.get("code").is_some() && e.get("param").is_some(), "{v}");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{v}");
        }
    }
    let res = gw
        .http
        .post(format!("{}/v1/completions", gw.url))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(
        res.json::<Value>().await.unwrap()["error"]["type"],
        "invalid_request_error"
    );
    assert_eq!(gw.get("/v2/nothing").await.status(), 404);

    let models: Value = gw.get("/v1/models").await.json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], BASE);
    let ready: Value = gw.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["ready"], true, "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_needs_a_valid_token_when_auth_is_on() {
    let reg = spawn_registry().await;
    reg.route("bot", Some(1), None).await;
    let dir = tempfile::tempdir().unwrap();
    let auth = AuthSettings {
        hs256_secret: Some(SECRET.into()),
        ..AuthSettings::default()
    };
    let gw = spawn_gateway_with(Some(&reg), |s| {
        s.auth = Some(auth.clone());
        s.data_dir = dir.path().to_path_buf();
    })
    .await;
    let signer = Signer::from_settings(&auth, dir.path()).unwrap();
    let good = signer.issue("alice", &[Role::Viewer], 600, None).unwrap();
    let scoped = signer
        .issue("bob", &[Role::Viewer], 600, Some(vec!["other-*".into()]))
        .unwrap();
    let body =
        json!({"model": BASE, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    let send = |token: Option<&str>, body: Value| {
        let mut rb = gw
            .http
            .post(format!("{}/v1/chat/completions", gw.url))
            .json(&body);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send()
    };
    let res = send(None, body.clone()).await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_api_key"
    );
    assert_eq!(
        send(Some("garbage"), body.clone()).await.unwrap().status(),
        401
    );
    assert_eq!(send(Some(&good), body.clone()).await.unwrap().status(), 200);
    let mut pinned = body.clone();
    pinned["model"] = json!("bot@1");
    assert_eq!(send(Some(&scoped), pinned).await.unwrap().status(), 403);
    let res = gw
        .http
        .get(format!("{}/v1/models", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    // Health and metrics stay open for probes and scrapers.
    assert_eq!(gw.get("/healthz").await.status(), 200);
    assert_eq!(gw.get("/metrics").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_concurrency_limit_requests_get_429() {
    let reg = spawn_registry().await;
    let gw = spawn_gateway_with(Some(&reg), |s| {
        s.max_concurrent = 1;
        s.max_queued = 0;
    })
    .await;
    // A stream holds the only slot until its last token: once its headers are here, the
    // slot is taken for the 1500 tokens that follow (the end-of-sequence token banned).
    let config: Value =
        serde_json::from_slice(&std::fs::read(fixture().base.join("config.json")).unwrap())
            .unwrap();
    let eos = config["eos_token_id"].to_string();
    let mut slow = gw
        .post(
            "/v1/chat/completions",
            &json!({"model": "bot@2", "temperature": 0, "max_tokens": 1500, "stream": true,
                    "logit_bias": {eos: -100}, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(slow.status(), 200);
    let b = gw
        .post(
            "/v1/chat/completions",
            &json!({"model": BASE, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(b.status(), 429);
    assert!(b.headers().contains_key("retry-after"));
    assert_eq!(
        b.json::<Value>().await.unwrap()["error"]["type"],
        "rate_limit_error"
    );
    // The stream that held the slot is unharmed, and the slot comes back after it.
    let mut body = Vec::new();
    while let Some(chunk) = slow.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    assert!(
        String::from_utf8(body)
            .unwrap()
            .trim_end()
            .ends_with("data: [DONE]")
    );
    // The slot is released just after the last frame is written, so allow that moment.
    let mut status = 0;
    for _ in 0..50 {
        status = gw
            .post(
                "/v1/chat/completions",
                &json!({"model": BASE, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await
            .status()
            .as_u16();
        if status != 429 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200);
}

/// The official `openai` Python client, unmodified, against a real gateway on each in-process
/// engine: model listing, chat and completions, streaming with usage, and typed errors
/// (gateway/tests/openai_client.py).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works_unmodified() {
    for engine in [EngineKind::Native, EngineKind::Mistralrs] {
        openai_client_against(engine).await;
    }
}

async fn openai_client_against(engine: EngineKind) {
    let python = std::env::var("LORAOPS_TEST_OPENAI_PYTHON").expect(
        "LORAOPS_TEST_OPENAI_PYTHON is not set: run the tests with scripts/test, which installs the openai client",
    );
    let reg = spawn_registry().await;
    reg.route("bot", Some(1), None).await;
    let rev = reg.client().routing(None, 0).await.unwrap().revision;
    let gw = spawn_gateway_with(Some(&reg), |s| s.engine = engine).await;
    gw.wait_revision(rev).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let url = format!("{}/v1", gw.url);
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(script).args([url.as_str(), BASE, "bot"]);
    if engine == EngineKind::Mistralrs {
        cmd.arg("--no-seed");
    }
    let out = cmd.output().await.expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai client failed on {engine:?}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("client: ok"), "{stdout}");
    assert!(stdout.contains("bot arm: stable"), "{stdout}");
    if engine == EngineKind::Native {
        openai_node_client(&url).await;
    }
}

/// The official `openai` npm client, unmodified (gateway/tests/openai_client.cjs).
async fn openai_node_client(url: &str) {
    let modules = std::env::var("LORAOPS_TEST_OPENAI_NODE_PATH").expect(
        "LORAOPS_TEST_OPENAI_NODE_PATH is not set: run the tests with scripts/test, which installs the openai npm client",
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.cjs");
    let out = tokio::process::Command::new("node")
        .arg(script)
        .args([url, BASE, "bot"])
        .env("NODE_PATH", modules)
        .output()
        .await
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai npm client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("client: ok"), "{stdout}");
}
