//! `POST /api/v1/adapters/{name}/versions`: publish a PEFT adapter as a new immutable version.
//!
//! 1. Stream each multipart part to object storage under a fresh upload id, hashing as it
//!    goes (memory stays flat; the safetensors header is kept to validate the tensors).
//! 2. Validate: the LoRA config, the safetensors header against the file size, tensor names and
//!    shapes against the config and the registered base model.
//! 3. One transaction makes the version visible (number = the adapter's next), or finds the
//!    same bytes already registered and returns that version instead.
//!
//! Whatever fails before the commit is attempted, the upload's blobs are deleted; once it is
//! attempted they are never deleted here (a commit whose answer was lost may have made them a
//! version's): if it did not happen, the `uploads` row is still there and the sweep removes
//! them after the grace period, as it does after a crash. Nothing half-written is ever listed.
//! Identical bytes pushed again heal a version whose blobs went missing.

use std::collections::BTreeMap;

use actix_multipart::Multipart;
use actix_web::{HttpResponse, web};
use futures_util::TryStreamExt;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect, Set,
    TransactionTrait,
};
use serde_json::{Value, json};

use object_store::ObjectStoreExt;

use crate::api::{AdapterVersion, Name, PushResponse, Role, VersionFile, version_digest};
use crate::auth::Principal;
use crate::peft::{self, AdapterConfig, SafetensorsHeader};
use crate::server::AppState;
use crate::server::blobs::{self, HashingWriter};
use crate::server::caller::Caller;
use crate::server::entities::{adapter, adapter_version, base_model, upload, version_file};
use crate::server::error::ApiError;
use crate::server::records;

/// The most bytes each small part may have. The config and the manifest are stored with the
/// version and returned in listings, so they are kept small (real ones are a few KiB).
fn small_limit(part: &str) -> u64 {
    match part {
        peft::CONFIG_FILE => 64 << 10,
        peft::MANIFEST_FILE => 256 << 10,
        _ => 1 << 20,
    }
}

/// Parts a push may carry.
const PARTS: [&str; 4] = [
    peft::CONFIG_FILE,
    peft::WEIGHTS_FILE,
    peft::MANIFEST_FILE,
    peft::README_FILE,
];

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct PushQuery {
    /// Registered base model the adapter is for; default: matched from the config's
    /// `base_model_name_or_path` (exactly, or by its last path component).
    pub base_model: Option<String>,
}

struct Stored {
    file: VersionFile,
    key: String,
}

/// What the multipart body delivered, all of it already in object storage.
struct Received {
    files: BTreeMap<String, Stored>,
    config: Vec<u8>,
    manifest: Option<Vec<u8>>,
    weights_head: Vec<u8>,
}

#[utoipa::path(post, path = "/api/v1/adapters/{name}/versions", params(("name" = String, Path, description = "adapter, base model or suite name"), PushQuery),
    request_body(content_type = "multipart/form-data", description = "adapter_config.json, adapter_model.safetensors, optional manifest.json and README.md"),
    responses(
        (status = 201, description = "New version", body = PushResponse),
        (status = 200, description = "Identical bytes already registered: that version", body = PushResponse),
        (status = 400, body = crate::api::ErrorBody), (status = 401, body = crate::api::ErrorBody),
        (status = 403, body = crate::api::ErrorBody), (status = 413, body = crate::api::ErrorBody),
        (status = 422, body = crate::api::ErrorBody),
        (status = 507, description = "The adapter's storage quota (registry.max_adapter_bytes) would be passed", body = crate::api::ErrorBody)))]
pub async fn push(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    query: web::Query<PushQuery>,
    payload: Multipart,
) -> Result<HttpResponse, ApiError> {
    let name = Name::parse(&path)?;
    let who = caller
        .require(Role::Publisher, Some(name.as_str()))?
        .clone();
    let upload_id = uuid::Uuid::new_v4().to_string();
    upload::ActiveModel {
        id: Set(upload_id.clone()),
        adapter: Set(name.to_string()),
        started_at: Set(chrono::Utc::now()),
    }
    .insert(&state.db)
    .await?;

    // Set once this upload's blobs may belong to a version: from then on they stay.
    let mut kept = false;
    let outcome = async {
        let received = receive(&state, &name, &upload_id, payload).await?;
        publish(
            &state,
            &who,
            &name,
            &upload_id,
            received,
            query.base_model.as_deref(),
            &mut kept,
        )
        .await
    }
    .await;

    if !kept {
        discard_upload(&state, &name, &upload_id).await;
    }
    let (version, created) = outcome?;
    let location = format!(
        "/api/v1/adapters/{}/versions/{}",
        version.adapter, version.version
    );
    let mut res = if created {
        HttpResponse::Created()
    } else {
        HttpResponse::Ok()
    };
    Ok(res
        .insert_header(("Location", location))
        .json(PushResponse { created, version }))
}

/// Delete an upload's blobs and its pending row (best effort: the sweep retries).
async fn discard_upload(state: &AppState, name: &Name, upload_id: &str) {
    if let Err(e) = blobs::delete_prefix(
        &state.store,
        &blobs::version_prefix(name.as_str(), upload_id),
    )
    .await
    {
        tracing::warn!(upload_id, error = %e, "could not delete blobs of a failed upload; the sweep will retry");
        return;
    }
    let _ = upload::Entity::delete_by_id(upload_id.to_string())
        .exec(&state.db)
        .await;
}

fn part_name(field: &actix_multipart::Field) -> Option<String> {
    field
        .name()
        .filter(|n| PARTS.contains(n))
        .or_else(|| field.content_disposition().and_then(|cd| cd.get_filename()))
        .or(field.name())
        .map(str::to_string)
}

async fn receive(
    state: &AppState,
    name: &Name,
    upload_id: &str,
    mut payload: Multipart,
) -> Result<Received, ApiError> {
    let max = state.settings.registry.max_upload_bytes;
    let prefix = blobs::version_prefix(name.as_str(), upload_id);
    let mut total = 0u64;
    let mut out = Received {
        files: BTreeMap::new(),
        config: Vec::new(),
        manifest: None,
        weights_head: Vec::new(),
    };
    let multipart_err = |e: actix_multipart::MultipartError| {
        ApiError::bad_request(format!("malformed multipart body: {e}"))
    };

    // `uploads.started_at` is the upload's last sign of life: touched while bytes arrive, so
    // the sweep (which removes uploads silent for the grace period) never takes a live one.
    let grace = std::time::Duration::from_secs(state.settings.registry.orphan_grace_secs);
    let touch_every = (grace / 4).clamp(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(60),
    );
    let mut touched = std::time::Instant::now();
    while let Some(mut field) = payload.try_next().await.map_err(multipart_err)? {
        let part = part_name(&field)
            .ok_or_else(|| ApiError::bad_request("a multipart part has no name"))?;
        if !PARTS.contains(&part.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unexpected part {part:?}; expected {}",
                PARTS.join(", ")
            )));
        }
        if out.files.contains_key(&part) {
            return Err(ApiError::bad_request(format!(
                "part {part:?} appears twice"
            )));
        }
        let is_weights = part == peft::WEIGHTS_FILE;
        let mut writer = HashingWriter::new(&state.store, prefix.clone().join(part.as_str()));
        let mut small = Vec::new();
        let mut head_needed = 8u64;
        let result: Result<(), ApiError> = async {
            while let Some(chunk) = field.try_next().await.map_err(multipart_err)? {
                total += chunk.len() as u64;
                if total > max {
                    return Err(ApiError::too_large(format!(
                        "upload exceeds the limit of {max} bytes"
                    )));
                }
                state.metrics.upload_bytes.inc_by(chunk.len() as u64);
                if touched.elapsed() >= touch_every {
                    touched = std::time::Instant::now();
                    touch_upload(state, upload_id).await?;
                }
                if is_weights {
                    capture_head(&mut out.weights_head, &mut head_needed, &chunk)?;
                } else {
                    let limit = small_limit(&part);
                    if small.len() as u64 + chunk.len() as u64 > limit {
                        return Err(ApiError::too_large(format!("{part} exceeds {limit} bytes")));
                    }
                    small.extend_from_slice(&chunk);
                }
                writer.write(&chunk).await.map_err(|e| {
                    ApiError::unavailable(format!("writing {part} to object storage: {e}"))
                })?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            writer.abort().await;
            return Err(e);
        }
        let key = writer.key.to_string();
        let (sha256, size) = writer
            .finish()
            .await
            .map_err(|e| ApiError::unavailable(format!("writing {part} to object storage: {e}")))?;
        match part.as_str() {
            peft::CONFIG_FILE => out.config = small,
            peft::MANIFEST_FILE => out.manifest = Some(small),
            _ => {}
        }
        out.files.insert(
            part.clone(),
            Stored {
                file: VersionFile {
                    name: part,
                    sha256,
                    size,
                },
                key,
            },
        );
    }
    for required in [peft::CONFIG_FILE, peft::WEIGHTS_FILE] {
        if !out.files.contains_key(required) {
            return Err(ApiError::bad_request(format!("missing part {required:?}"))
                .with_details(json!({"file": required})));
        }
    }
    Ok(out)
}

/// Mark an upload alive; an upload the sweep already removed cannot come back.
async fn touch_upload(state: &AppState, upload_id: &str) -> Result<(), ApiError> {
    let res = upload::Entity::update_many()
        .col_expr(upload::Column::StartedAt, Expr::value(chrono::Utc::now()))
        .filter(upload::Column::Id.eq(upload_id))
        .exec(&state.db)
        .await?;
    if res.rows_affected != 1 {
        return Err(ApiError::conflict(
            "this upload expired (silent past the orphan grace period); push again",
        ));
    }
    Ok(())
}

/// Keep the file's first bytes until the whole safetensors header is in hand; reject a file
/// whose first 8 bytes announce an implausible header as soon as they arrive.
fn capture_head(head: &mut Vec<u8>, needed: &mut u64, chunk: &[u8]) -> Result<(), ApiError> {
    let mut rest = chunk;
    while (head.len() as u64) < *needed && !rest.is_empty() {
        let take = ((*needed - head.len() as u64) as usize).min(rest.len());
        head.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        if head.len() == 8 && *needed == 8 {
            *needed = SafetensorsHeader::header_len(head[..8].try_into().expect("8 bytes"))?;
        }
    }
    Ok(())
}

async fn resolve_base(
    db: &impl ConnectionTrait,
    cfg: &AdapterConfig,
    explicit: Option<&str>,
) -> Result<base_model::Model, ApiError> {
    let named = cfg.base_model_name_or_path.trim_end_matches('/');
    let candidates: Vec<&str> = match explicit {
        Some(b) => vec![b],
        None => {
            let last = named.rsplit(['/', '\\']).next().unwrap_or(named);
            if last == named {
                vec![named]
            } else {
                vec![named, last]
            }
        }
    };
    let found = base_model::Entity::find()
        .filter(base_model::Column::Name.is_in(candidates.clone()))
        .all(db)
        .await?;
    // Prefer the exact name over the last path component.
    for c in &candidates {
        if let Some(m) = found.iter().find(|m| m.name == *c) {
            return Ok(m.clone());
        }
    }
    let message = match explicit {
        Some(b) => format!("base model {b:?} is not registered"),
        None => format!(
            "adapter_config.json: base_model_name_or_path {named:?} names no registered base model; register it (POST /api/v1/base-models) or pass ?base_model=NAME"
        ),
    };
    Err(ApiError::unprocessable("unknown_base_model", message)
        .with_details(json!({"file": peft::CONFIG_FILE, "field": "base_model_name_or_path"})))
}

async fn publish(
    state: &AppState,
    who: &Principal,
    name: &Name,
    upload_id: &str,
    received: Received,
    explicit_base: Option<&str>,
    kept: &mut bool,
) -> Result<(AdapterVersion, bool), ApiError> {
    let cfg = AdapterConfig::parse(&received.config)?;
    let header = SafetensorsHeader::parse(&received.weights_head)?;
    let weights = &received.files[peft::WEIGHTS_FILE].file;
    if weights.size != header.file_len() {
        return Err(peft::AdapterError::weights(format!(
            "file is {} bytes but its header describes {} bytes (truncated or padded)",
            weights.size,
            header.file_len()
        ))
        .into());
    }
    let lineage: Option<Value> = match &received.manifest {
        None => None,
        Some(bytes) => match serde_json::from_slice::<Value>(bytes) {
            Ok(v @ Value::Object(_)) => Some(v),
            Ok(_) => {
                return Err(ApiError::unprocessable(
                    "invalid_manifest",
                    "manifest.json: must be a JSON object",
                )
                .with_details(json!({"file": peft::MANIFEST_FILE})));
            }
            Err(e) => {
                return Err(ApiError::unprocessable(
                    "invalid_manifest",
                    format!("manifest.json: {e}"),
                )
                .with_details(json!({"file": peft::MANIFEST_FILE})));
            }
        },
    };
    // A manifest written by `train --registry` names its run (a UUID); anything else is not
    // a link to follow.
    let run_id = lineage
        .as_ref()
        .and_then(|l| l.get("run_id"))
        .and_then(Value::as_str)
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
        .map(|u| u.to_string());
    let base = resolve_base(&state.db, &cfg, explicit_base).await?;
    let dims = serde_json::from_value(base.dims.clone()).unwrap_or_default();
    let summary = peft::check_tensors(&cfg, &header, Some(&dims))?;
    let files: Vec<VersionFile> = received.files.values().map(|s| s.file.clone()).collect();
    let digest = version_digest(&files);
    let size_bytes: u64 = files.iter().map(|f| f.size).sum();

    let txn = state.db.begin().await?;
    // Write first, so SQLite takes its write lock now rather than upgrading a read later.
    adapter::Entity::insert(adapter::ActiveModel {
        name: Set(name.to_string()),
        base_model: Set(base.name.clone()),
        latest_version: Set(0),
        created_by: Set(who.sub.clone()),
        created_at: Set(chrono::Utc::now()),
        ..Default::default()
    })
    .on_conflict_do_nothing_on([adapter::Column::Name])
    .exec_without_returning(&txn)
    .await?;
    let a = records::adapter_by_name(&txn, name.as_str()).await?;
    if a.base_model != base.name {
        return Err(ApiError::unprocessable(
            "base_model_mismatch",
            format!(
                "adapter {name:?} is for base model {:?}, this push is for {:?}",
                a.base_model, base.name
            ),
        ));
    }
    if let Some(existing) = version_by_digest(&txn, &a, &digest).await? {
        drop(txn);
        let v = heal_or_keep(state, &a, existing, upload_id, &received, kept).await?;
        return Ok((v, false));
    }
    adapter::Entity::update_many()
        .col_expr(
            adapter::Column::LatestVersion,
            Expr::col(adapter::Column::LatestVersion).add(1),
        )
        .filter(adapter::Column::Id.eq(a.id))
        .exec(&txn)
        .await?;
    // Checked while this transaction holds the adapter's row (the update above), so concurrent
    // pushes of one adapter cannot pass it together.
    check_quota(state, &txn, name, a.id, size_bytes).await?;
    let number = records::adapter_by_name(&txn, name.as_str())
        .await?
        .latest_version;
    let inserted = adapter_version::ActiveModel {
        adapter_id: Set(a.id),
        version: Set(number),
        digest: Set(digest.clone()),
        base_model: Set(base.name.clone()),
        config: Set(serde_json::to_value(&cfg).expect("config serialises")),
        summary: Set(serde_json::to_value(&summary).expect("summary serialises")),
        lineage: Set(lineage),
        run_id: Set(run_id),
        size_bytes: Set(size_bytes as i64),
        upload_id: Set(upload_id.to_string()),
        created_by: Set(who.sub.clone()),
        created_at: Set(chrono::Utc::now()),
        ..Default::default()
    }
    .insert(&txn)
    .await;
    let v = match inserted {
        Ok(v) => v,
        Err(e)
            if matches!(
                e.sql_err(),
                Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
            ) =>
        {
            // The same bytes won a race with us: answer with that version.
            txn.rollback().await?;
            let existing = version_by_digest(&state.db, &a, &digest)
                .await?
                .ok_or_else(|| {
                    ApiError::conflict("a concurrent push of this adapter conflicted; retry")
                })?;
            let v = heal_or_keep(state, &a, existing, upload_id, &received, kept).await?;
            return Ok((v, false));
        }
        Err(e) => return Err(e.into()),
    };
    let rows: Vec<version_file::ActiveModel> = file_rows(&received, v.id)
        .into_iter()
        .map(|f| version_file::ActiveModel {
            version_id: Set(f.version_id),
            name: Set(f.name),
            sha256: Set(f.sha256),
            size: Set(f.size),
            blob_key: Set(f.blob_key),
            ..Default::default()
        })
        .collect();
    version_file::Entity::insert_many(rows)
        .exec_without_returning(&txn)
        .await?;
    let claimed = upload::Entity::delete_by_id(upload_id.to_string())
        .exec(&txn)
        .await?;
    if claimed.rows_affected != 1 {
        // The sweep took this upload (it fell silent past the grace period) and may have
        // deleted blobs: never make a version of it.
        return Err(ApiError::conflict(
            "this upload expired before it completed (silent past the orphan grace period); push again",
        ));
    }
    state
        .webhooks
        .emit(
            &txn,
            "version.created",
            serde_json::json!({"adapter": name.as_str(), "version": number, "digest": digest,
                "base_model": base.name, "size_bytes": size_bytes, "created_by": who.sub}),
        )
        .await?;
    // Whatever the commit answers, it may have happened (a lost acknowledgement): the blobs
    // stay. If it did not, the `uploads` row remains and the sweep removes them later.
    *kept = true;
    txn.commit().await?;
    state.metrics.versions_created.inc();
    tracing::info!(adapter = %name, version = number, %digest, "published adapter version");
    // The answer is built from what is in hand: a read that fails now must not turn a
    // committed version into an error the client retries.
    Ok((
        records::to_api_version(&a, v, file_rows(&received, 0))?,
        true,
    ))
}

/// `registry.max_adapter_bytes`: the adapter's versions together, with this one, must fit.
async fn check_quota(
    state: &AppState,
    db: &impl ConnectionTrait,
    name: &Name,
    adapter_id: i32,
    size_bytes: u64,
) -> Result<(), ApiError> {
    let quota = state.settings.registry.max_adapter_bytes;
    if quota == 0 {
        return Ok(());
    }
    let sizes: Vec<i64> = adapter_version::Entity::find()
        .select_only()
        .column(adapter_version::Column::SizeBytes)
        .filter(adapter_version::Column::AdapterId.eq(adapter_id))
        .into_tuple()
        .all(db)
        .await?;
    let used: u64 = sizes.iter().map(|&s| u64::try_from(s).unwrap_or(0)).sum();
    if used.saturating_add(size_bytes) > quota {
        return Err(ApiError::new(
            actix_web::http::StatusCode::INSUFFICIENT_STORAGE,
            "quota_exceeded",
            format!(
                "adapter {name:?} holds {used} bytes in {} versions; this version's {size_bytes} \
                 bytes would pass its quota of {quota} bytes (registry.max_adapter_bytes)",
                sizes.len()
            ),
        )
        .with_details(
            json!({"used_bytes": used, "version_bytes": size_bytes, "quota_bytes": quota}),
        ));
    }
    Ok(())
}

/// The version-file rows of what was received (ordered by name, as reads order them).
fn file_rows(received: &Received, version_id: i32) -> Vec<version_file::Model> {
    received
        .files
        .values()
        .map(|s| version_file::Model {
            id: 0,
            version_id,
            name: s.file.name.clone(),
            sha256: s.file.sha256.clone(),
            size: s.file.size as i64,
            blob_key: s.key.clone(),
        })
        .collect()
}

/// The same bytes are already a version. If any of its blobs is missing from the store (lost
/// to an outage or a bug), point the version at this upload's identical blobs instead, so a
/// re-push repairs it; otherwise this upload is redundant.
async fn heal_or_keep(
    state: &AppState,
    a: &adapter::Model,
    existing: adapter_version::Model,
    upload_id: &str,
    received: &Received,
    kept: &mut bool,
) -> Result<AdapterVersion, ApiError> {
    let files = records::files_of(&state.db, existing.id).await?;
    let mut missing = false;
    for f in &files {
        match state
            .store
            .head(&object_store::path::Path::from(f.blob_key.as_str()))
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => missing = true,
            Err(e) => return Err(e.into()),
        }
    }
    if !missing {
        return records::to_api_version(a, existing, files);
    }
    tracing::warn!(adapter = %a.name, version = existing.version, "a version's blobs were missing; repaired from an identical push");
    let txn = state.db.begin().await?;
    for f in &files {
        let Some(s) = received.files.get(&f.name) else {
            return Err(ApiError::internal(format!(
                "{}@{}: file {} is not in an upload with the same digest",
                a.name, existing.version, f.name
            )));
        };
        version_file::Entity::update_many()
            .col_expr(version_file::Column::BlobKey, Expr::value(s.key.clone()))
            .filter(version_file::Column::Id.eq(f.id))
            .exec(&txn)
            .await?;
    }
    adapter_version::Entity::update_many()
        .col_expr(
            adapter_version::Column::UploadId,
            Expr::value(upload_id.to_string()),
        )
        .filter(adapter_version::Column::Id.eq(existing.id))
        .exec(&txn)
        .await?;
    let claimed = upload::Entity::delete_by_id(upload_id.to_string())
        .exec(&txn)
        .await?;
    if claimed.rows_affected != 1 {
        return Err(ApiError::conflict(
            "this upload expired before it completed (silent past the orphan grace period); push again",
        ));
    }
    *kept = true;
    txn.commit().await?;
    records::load_version(&state.db, a, existing.version as u32).await
}

async fn version_by_digest(
    db: &impl ConnectionTrait,
    a: &adapter::Model,
    digest: &str,
) -> Result<Option<adapter_version::Model>, ApiError> {
    Ok(adapter_version::Entity::find()
        .filter(adapter_version::Column::AdapterId.eq(a.id))
        .filter(adapter_version::Column::Digest.eq(digest))
        .one(db)
        .await?)
}
