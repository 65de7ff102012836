//! The remote engine against a real upstream: a second loraops gateway running the native
//! engine, which the front gateway places versions on through the LoRA control contract.

use loraops_gateway::settings::EngineKind;
use loraops_registry::api::Role;
use loraops_registry::auth::{AuthSettings, Signer};
use serde_json::{Value, json};

use crate::helpers::{ADAPTER, BASE, SECRET, TestGateway, spawn_gateway_with, spawn_registry};

fn auth() -> AuthSettings {
    AuthSettings {
        hs256_secret: Some(SECRET.into()),
        ..AuthSettings::default()
    }
}

async fn greedy(gw: &TestGateway, token: Option<&str>, model: &str) -> (u16, Value) {
    let mut req = gw
        .http
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(
            &json!({"model": model, "temperature": 0, "max_tokens": 8, "stream": true,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
        );
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let body = res.text().await.unwrap();
    if status != 200 {
        return (status, serde_json::from_str(&body).unwrap_or(Value::Null));
    }
    let text: String = crate::helpers::sse_events(&body)
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    (status, json!(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_serves_through_a_native_upstream_placing_versions_on_it() {
    let reg = spawn_registry().await;
    reg.route(ADAPTER, Some(1), None).await;
    let rev = reg.client().routing(None, 0).await.unwrap().revision;
    let dir = tempfile::tempdir().unwrap();
    let admin = Signer::from_settings(&auth(), dir.path())
        .unwrap()
        .issue("front-gateway", &[Role::Admin], 600, None)
        .unwrap();
    // The upstream: native, authenticated, following the same registry.
    let upstream = spawn_gateway_with(Some(&reg), |s| s.auth = Some(auth())).await;
    upstream.wait_revision(rev).await;
    let front = spawn_gateway_with(Some(&reg), |s| {
        s.engine = EngineKind::Remote;
        s.upstream_url = Some(format!("{}/v1", upstream.url));
        s.upstream_api_key = Some(admin.clone());
    })
    .await;
    front.wait_revision(rev).await;

    for model in [BASE, "bot", "bot@2"] {
        let direct = greedy(
            &upstream,
            Some(&admin),
            if model == "bot" { "bot@1" } else { model },
        )
        .await;
        let through = greedy(&front, None, model).await;
        assert_eq!(direct.0, 200, "{model}: {}", direct.1);
        assert_eq!(through, direct, "{model}");
    }
    // The OpenAI surface passes through: a forced tool call, a JSON schema, log-probabilities.
    let tools = json!([{"type": "function", "function": {"name": "lookup",
        "parameters": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 8}},
            "required": ["q"], "additionalProperties": false}}}]);
    let v: Value = front
        .post(
            "/v1/chat/completions",
            &json!({"model": "bot", "max_tokens": 150, "tools": tools, "tool_choice": "required",
                "parallel_tool_calls": false, "messages": [{"role": "user", "content": "find it"}]}),
        )
        .await
        .json()
        .await
        .unwrap();
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "lookup", "{v}");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["q"].is_string(), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer", "maximum": 999}}, "required": ["n"],
        "additionalProperties": false});
    let v: Value = front
        .post(
            "/v1/chat/completions",
            &json!({"model": BASE, "max_tokens": 60, "logprobs": true, "top_logprobs": 2,
                "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
                "messages": [{"role": "user", "content": "a number"}]}),
        )
        .await
        .json()
        .await
        .unwrap();
    let answer: Value =
        serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(answer["n"].is_i64(), "{v}");
    let lps = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        lps.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        "{v}"
    );
    assert_eq!(lps[0]["top_logprobs"].as_array().unwrap().len(), 2, "{v}");
    // The versions were placed on the upstream through its control endpoint.
    let listed: Value = upstream
        .http
        .get(format!("{}/v1/models", upstream.url))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert!(ids.contains(&"bot@2"), "{ids:?}");
    let ready: Value = front.get("/readyz").await.json().await.unwrap();
    assert!(
        ready["checks"]["adapters"]
            .as_str()
            .unwrap()
            .contains("bot@2"),
        "{ready}"
    );
}

/// An upstream that refuses the API key, or cannot be reached, answers with the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_name_their_cause() {
    let reg = spawn_registry().await;
    reg.route(ADAPTER, Some(1), None).await;
    let rev = reg.client().routing(None, 0).await.unwrap().revision;
    let upstream = spawn_gateway_with(Some(&reg), |s| s.auth = Some(auth())).await;
    upstream.wait_revision(rev).await;
    let wrong_key = spawn_gateway_with(Some(&reg), |s| {
        s.engine = EngineKind::Remote;
        s.upstream_url = Some(format!("{}/v1", upstream.url));
        s.upstream_api_key = Some("not-a-token".into());
    })
    .await;
    wrong_key.wait_revision(rev).await;
    let (status, body) = greedy(&wrong_key, None, "bot@1").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("401"),
        "{body}"
    );

    let gone = spawn_gateway_with(Some(&reg), |s| {
        s.engine = EngineKind::Remote;
        s.upstream_url = Some("http://127.0.0.1:9/v1".into());
    })
    .await;
    let (status, body) = greedy(&gone, None, BASE).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:9"),
        "{body}"
    );
}
