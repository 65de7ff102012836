//! A trivial OpenAI-compatible upstream for the gateway-overhead benchmark (bench/gateway):
//! answers every chat completion at once with a fixed reply, streamed (SSE) or not.
//!
//!     cargo run --example echo_upstream -- 127.0.0.1:9100

use actix_web::{App, HttpResponse, HttpServer, web};
use serde_json::{Value, json};

async fn chat(body: web::Json<Value>) -> HttpResponse {
    let model = body["model"].as_str().unwrap_or("echo").to_string();
    let usage = json!({"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14});
    if body["stream"].as_bool() == Some(true) {
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "chatcmpl-echo", "object": "chat.completion.chunk", "created": 0, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        let mut out = String::new();
        for v in [
            chunk(
                json!({"role": "assistant", "content": "Hello there"}),
                Value::Null,
            ),
            chunk(json!({}), json!("stop")),
            json!({"id": "chatcmpl-echo", "object": "chat.completion.chunk", "created": 0, "model": model,
                   "choices": [], "usage": usage}),
        ] {
            out.push_str(&format!("data: {v}\n\n"));
        }
        out.push_str("data: [DONE]\n\n");
        return HttpResponse::Ok()
            .content_type("text/event-stream")
            .body(out);
    }
    HttpResponse::Ok().json(json!({
        "id": "chatcmpl-echo", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "finish_reason": "stop"}],
        "usage": usage
    }))
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9100".into());
    let workers = std::env::var("WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(1);
    eprintln!("echo upstream on http://{addr}/v1");
    HttpServer::new(|| {
        App::new()
            .route("/v1/chat/completions", web::post().to(chat))
            .route(
                "/v1/models",
                web::get().to(|| async {
                    HttpResponse::Ok().json(json!({"object": "list", "data": []}))
                }),
            )
    })
    .workers(workers)
    .bind(addr)?
    .run()
    .await
}
