//! Bad input: each gets a 4xx naming the problem, and nothing becomes visible.

use serde_json::{Value, json};

use crate::backends;
use crate::helpers::{Blobs, Db, TestApp, adapter, error_of, spawn_app};

async fn rejected(app: &TestApp, name: &str, files: Vec<(String, Vec<u8>)>) -> (u16, Value) {
    error_of(app.push_files(name, &files, &app.publisher).await).await
}

fn with(files: &[(String, Vec<u8>)], name: &str, bytes: Vec<u8>) -> Vec<(String, Vec<u8>)> {
    files
        .iter()
        .map(|(n, b)| {
            if n == name {
                (n.clone(), bytes.clone())
            } else {
                (n.clone(), b.clone())
            }
        })
        .collect()
}

async fn bad_adapters_are_rejected_with_the_reason(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let good = adapter(1, 4, &["q_proj", "v_proj"]);
    let files = good.files();

    // Missing part.
    let (s, e) = rejected(&app, "x", vec![files[0].clone()]).await;
    assert_eq!(s, 400);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("adapter_model.safetensors"),
        "{e}"
    );

    // Unknown part.
    let mut extra = files.clone();
    extra.push(("evil.sh".into(), b"rm -rf /".to_vec()));
    let (s, e) = rejected(&app, "x", extra).await;
    assert_eq!(s, 400);
    assert!(e["message"].as_str().unwrap().contains("evil.sh"), "{e}");

    // Not a safetensors file.
    let (s, e) = rejected(
        &app,
        "x",
        with(
            &files,
            "adapter_model.safetensors",
            b"PK\x03\x04 definitely a zip".to_vec(),
        ),
    )
    .await;
    assert_eq!(s, 422);
    assert_eq!(e["details"]["file"], "adapter_model.safetensors");

    // Truncated safetensors.
    let mut st = good.safetensors();
    st.truncate(st.len() - 10);
    let (s, e) = rejected(&app, "x", with(&files, "adapter_model.safetensors", st)).await;
    assert_eq!(s, 422);
    assert!(e["message"].as_str().unwrap().contains("truncated"), "{e}");

    // Config is not LoRA.
    let mut cfg = good.config.clone();
    cfg["peft_type"] = json!("IA3");
    let (s, e) = rejected(
        &app,
        "x",
        with(
            &files,
            "adapter_config.json",
            serde_json::to_vec(&cfg).unwrap(),
        ),
    )
    .await;
    assert_eq!(s, 422);
    assert_eq!(e["details"]["field"], "peft_type");

    // Config misses a field.
    let mut cfg = good.config.clone();
    cfg.as_object_mut().unwrap().remove("lora_alpha");
    let (s, e) = rejected(
        &app,
        "x",
        with(
            &files,
            "adapter_config.json",
            serde_json::to_vec(&cfg).unwrap(),
        ),
    )
    .await;
    assert_eq!(s, 422);
    assert_eq!(e["details"]["field"], "lora_alpha");

    // Config is not JSON.
    let (s, _) = rejected(
        &app,
        "x",
        with(&files, "adapter_config.json", b"r = 4".to_vec()),
    )
    .await;
    assert_eq!(s, 422);

    // Tensors for a module not in target_modules.
    let mut cfg = good.config.clone();
    cfg["target_modules"] = json!(["q_proj"]);
    let (s, e) = rejected(
        &app,
        "x",
        with(
            &files,
            "adapter_config.json",
            serde_json::to_vec(&cfg).unwrap(),
        ),
    )
    .await;
    assert_eq!(s, 422);
    assert!(
        e["details"]["tensor"].as_str().unwrap().contains("v_proj"),
        "{e}"
    );

    // Shape disagrees with the base model (hidden 64): an adapter built for hidden 96.
    let mut wrong = good.clone();
    wrong.tensors[0].1 = vec![4, 96];
    wrong.tensors[0].2 = vec![0.0; 4 * 96];
    let (s, e) = rejected(&app, "x", wrong.files()).await;
    assert_eq!(s, 422);
    assert!(e["message"].as_str().unwrap().contains("64"), "{e}");
    assert_eq!(e["details"]["tensor"], wrong.tensors[0].0.as_str());

    // Unknown base model.
    let mut cfg = good.config.clone();
    cfg["base_model_name_or_path"] = json!("meta-llama/Llama-3-8B");
    let (s, e) = rejected(
        &app,
        "x",
        with(
            &files,
            "adapter_config.json",
            serde_json::to_vec(&cfg).unwrap(),
        ),
    )
    .await;
    assert_eq!(s, 422);
    assert_eq!(e["code"], "unknown_base_model");

    // Manifest that is not an object.
    let mut m = good.clone();
    m.manifest = Some(json!([1, 2]));
    let (s, e) = rejected(&app, "x", m.files()).await;
    assert_eq!(s, 422);
    assert_eq!(e["details"]["file"], "manifest.json");

    // Not multipart at all.
    let res = app
        .http
        .post(app.url("/api/v1/adapters/x/versions"))
        .bearer_auth(&app.publisher)
        .body("hello")
        .send()
        .await
        .unwrap();
    let (s, _) = error_of(res).await;
    assert_eq!(s, 400);

    // Nothing of all that is visible, and no blobs are left.
    assert!(
        app.get_json("/api/v1/adapters").await["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(
        loraops_registry::server::blobs::list_uploads(&app.state.store)
            .await
            .unwrap()
            .is_empty()
    );
    app.cleanup().await;
}
backends!(bad_adapters_are_rejected_with_the_reason);

async fn names_with_separators_are_rejected(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let files = adapter(1, 4, &["q_proj"]).files();
    for bad in ["a..b", "-lead", "a%2Fb", "a%5Cb", "a%2F..%2Fb", "x@2"] {
        let (s, e) = error_of(app.push_files(bad, &files, &app.publisher).await).await;
        assert_eq!(s, 400, "{bad}: {e}");
        assert_eq!(e["code"], "invalid_name", "{bad}: {e}");
    }
    // A raw slash or `..` segment never reaches the handler as a name: no such route.
    for bad in ["a/b", ".."] {
        let (s, e) = error_of(app.push_files(bad, &files, &app.publisher).await).await;
        assert_eq!((s, e["code"].as_str()), (404, Some("not_found")), "{bad}");
    }
    app.cleanup().await;
}
backends!(names_with_separators_are_rejected);

async fn a_version_must_keep_its_base_model(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let res = app
        .http
        .post(app.url("/api/v1/base-models"))
        .bearer_auth(&app.admin)
        .json(&json!({"name": "other-base", "dims": {"hidden_size": 64}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(
        app.push("pinned", &adapter(1, 4, &["q_proj"]))
            .await
            .status(),
        201
    );
    let mut other = adapter(2, 4, &["q_proj"]);
    other.config["base_model_name_or_path"] = json!("other-base");
    let (s, e) = error_of(app.push("pinned", &other).await).await;
    assert_eq!((s, e["code"].as_str()), (422, Some("base_model_mismatch")));
    // Duplicate base model registration.
    let res = app
        .http
        .post(app.url("/api/v1/base-models"))
        .bearer_auth(&app.admin)
        .json(&json!({"name": "other-base"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(res).await.0, 409);
    // Malformed JSON body.
    let res = app
        .http
        .post(app.url("/api/v1/base-models"))
        .bearer_auth(&app.admin)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(res).await.0, 400);
    app.cleanup().await;
}
backends!(a_version_must_keep_its_base_model);

/// What the registry stores and lists per version, and what it buffers to parse, is small:
/// a config over 64 KiB is refused, and so is a safetensors header over 8 MiB (however
/// valid), before anything is parsed.
async fn oversized_configs_and_headers_are_refused(db: Db, blobs: Blobs) {
    let app = spawn_app(db, blobs).await;
    app.register_base().await;
    let mut big = adapter(31, 4, &["q_proj"]);
    big.config["padding"] = serde_json::json!("x".repeat(100 << 10));
    let (status, _) = error_of(app.push("big-config", &big).await).await;
    assert_eq!(status, 413);

    // A valid file whose header is padded (as the format allows) to 9 MiB.
    let a = adapter(32, 4, &["q_proj"]);
    let file = a.safetensors();
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let mut header = file[8..8 + n].to_vec();
    header.resize(9 << 20, b' ');
    let mut padded = (header.len() as u64).to_le_bytes().to_vec();
    padded.extend_from_slice(&header);
    padded.extend_from_slice(&file[8 + n..]);
    let files = vec![
        (
            "adapter_config.json".to_string(),
            serde_json::to_vec(&a.config).unwrap(),
        ),
        ("adapter_model.safetensors".to_string(), padded),
    ];
    let (status, err) = error_of(app.push_files("big-header", &files, &app.publisher).await).await;
    assert_eq!(status, 422, "{err}");
    app.cleanup().await;
}
backends!(oversized_configs_and_headers_are_refused);
