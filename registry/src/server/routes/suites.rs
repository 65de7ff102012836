//! `/api/v1/suites`: evaluation suites (a manifest and JSONL cases), content-addressed by
//! their digest. Uploading needs the `evaluator` role; a name and version, once stored, always
//! mean the same bytes. The canonical cases file lives in the object store under
//! `suites/{digest-hex}/cases.jsonl`; the row holds the manifest and the counts.

use actix_web::{HttpResponse, web};
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};
use serde::Deserialize;

use crate::api::{
    Name, NewSuite, Page, Role, Suite, SuitePushResponse, canonical_cases, suite_digest,
};
use crate::server::AppState;
use crate::server::caller::Caller;
use crate::server::entities::suite;
use crate::server::error::ApiError;

/// The object-store key of a suite's canonical cases.
pub fn cases_key(digest: &str) -> ObjectPath {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    ObjectPath::from(format!("suites/{hex}/cases.jsonl"))
}

fn to_api(m: suite::Model) -> Result<Suite, ApiError> {
    Ok(Suite {
        name: Name::parse(&m.name).map_err(|e| ApiError::internal(e.to_string()))?,
        version: m.version,
        digest: m.digest,
        manifest: serde_json::from_value(m.manifest).map_err(|e| {
            ApiError::internal(format!(
                "stored manifest of suite {} is unreadable: {e}",
                m.id
            ))
        })?,
        cases: m.cases as u64,
        size_bytes: m.size_bytes as u64,
        created_by: m.created_by,
        created_at: m.created_at,
    })
}

async fn by_digest(state: &AppState, digest: &str) -> Result<Option<suite::Model>, ApiError> {
    Ok(suite::Entity::find()
        .filter(suite::Column::Digest.eq(digest))
        .one(&state.db)
        .await?)
}

#[utoipa::path(post, path = "/api/v1/suites", request_body = NewSuite,
    responses((status = 201, body = SuitePushResponse, description = "Stored"),
        (status = 200, body = SuitePushResponse, description = "The same suite was already stored"),
        (status = 409, body = crate::api::ErrorBody, description = "Name and version hold other content"),
        (status = 422, body = crate::api::ErrorBody)))]
pub async fn create(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<NewSuite>,
) -> Result<HttpResponse, ApiError> {
    let who = caller.require(Role::Evaluator, None)?;
    let body = body.into_inner();
    let m = body.manifest;
    Name::parse(&m.version).map_err(|e| {
        ApiError::unprocessable("invalid_suite", format!("suite version: {e}"))
            .with_details(serde_json::json!({"field": "version"}))
    })?;
    if !m.scorer.get("type").is_some_and(|t| t.is_string()) {
        return Err(ApiError::unprocessable(
            "invalid_suite",
            "scorer must be an object with a \"type\"",
        )
        .with_details(serde_json::json!({"field": "scorer"})));
    }
    if let Some(t) = m.thresholds.iter().find(|t| !t.value.is_finite()) {
        return Err(ApiError::unprocessable(
            "invalid_suite",
            format!("threshold on {:?} is not a finite number", t.metric),
        ));
    }
    let (cases, n) = canonical_cases(&body.cases).map_err(|e| {
        ApiError::unprocessable("invalid_suite", e)
            .with_details(serde_json::json!({"field": "cases"}))
    })?;
    let digest = suite_digest(&m, &cases);
    if let Some(claimed) = &body.digest
        && *claimed != digest
    {
        return Err(ApiError::unprocessable(
            "digest_mismatch",
            format!("the upload says {claimed}, its content hashes to {digest}"),
        ));
    }
    if let Some(existing) = by_digest(&state, &digest).await? {
        return Ok(HttpResponse::Ok().json(SuitePushResponse {
            created: false,
            suite: to_api(existing)?,
        }));
    }
    let taken = suite::Entity::find()
        .filter(suite::Column::Name.eq(m.name.as_str()))
        .filter(suite::Column::Version.eq(m.version.as_str()))
        .one(&state.db)
        .await?;
    if let Some(t) = taken {
        return Err(ApiError::conflict(format!(
            "suite {}@{} already exists with digest {}; give changed content a new version",
            m.name, m.version, t.digest
        ))
        .with_details(serde_json::json!({"digest": t.digest})));
    }
    // Content-addressed: writing the same bytes twice is harmless.
    let key = cases_key(&digest);
    let size = cases.len() as i64;
    state.store.put(&key, cases.into_bytes().into()).await?;
    let inserted = suite::ActiveModel {
        name: Set(m.name.to_string()),
        version: Set(m.version.clone()),
        digest: Set(digest.clone()),
        manifest: Set(serde_json::to_value(&m).expect("manifest serialises")),
        cases: Set(n as i64),
        size_bytes: Set(size),
        blob_key: Set(key.to_string()),
        created_by: Set(who.sub.clone()),
        created_at: Set(chrono::Utc::now()),
        ..Default::default()
    }
    .insert(&state.db)
    .await;
    match inserted {
        Ok(row) => Ok(HttpResponse::Created().json(SuitePushResponse {
            created: true,
            suite: to_api(row)?,
        })),
        // A concurrent upload won the race: the same content is fine, other content conflicts.
        Err(e)
            if matches!(
                e.sql_err(),
                Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
            ) =>
        {
            match by_digest(&state, &digest).await? {
                Some(existing) => Ok(HttpResponse::Ok().json(SuitePushResponse {
                    created: false,
                    suite: to_api(existing)?,
                })),
                None => Err(ApiError::conflict(format!(
                    "suite {}@{} was stored concurrently with other content",
                    m.name, m.version
                ))),
            }
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct SuiteQuery {
    /// Only this suite's versions.
    pub name: Option<String>,
    /// Items per page (1–500, default 100).
    pub limit: Option<u64>,
    /// The `next` value of the previous page.
    pub after: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/suites", params(SuiteQuery), responses((status = 200, body = Page<Suite>)))]
pub async fn list(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<SuiteQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require_read(&state, None)?;
    let page = crate::server::records::PageQuery {
        limit: q.limit,
        after: q.after.clone(),
    };
    let mut query = suite::Entity::find()
        .order_by_asc(suite::Column::Id)
        .limit(page.limit() + 1);
    if let Some(n) = &q.name {
        query = query.filter(suite::Column::Name.eq(n.as_str()));
    }
    if let Some(after) = &q.after {
        let id: i32 = after
            .parse()
            .map_err(|_| ApiError::bad_request(format!("after={after:?} is not a page key")))?;
        query = query.filter(suite::Column::Id.gt(id));
    }
    let mut rows = query.all(&state.db).await?;
    let next = page.cut(&mut rows, |r| r.id.to_string());
    let items = rows
        .into_iter()
        .map(to_api)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HttpResponse::Ok().json(Page { items, next }))
}

async fn find(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<suite::Model, ApiError> {
    let mut q = suite::Entity::find().filter(suite::Column::Name.eq(name));
    if let Some(v) = version {
        q = q.filter(suite::Column::Version.eq(v));
    }
    q.order_by_desc(suite::Column::Id)
        .one(&state.db)
        .await?
        .ok_or_else(|| match version {
            Some(v) => ApiError::not_found(format!("suite {name:?} has no version {v:?}")),
            None => ApiError::not_found(format!("suite {name:?} not found")),
        })
}

#[utoipa::path(get, path = "/api/v1/suites/{name}", params(("name" = String, Path, description = "adapter, base model or suite name")), responses((status = 200, body = Suite, description = "The latest uploaded version"), (status = 404, body = crate::api::ErrorBody)))]
pub async fn latest(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require_read(&state, None)?;
    let row = find(&state, &path, None).await?;
    Ok(HttpResponse::Ok().json(to_api(row)?))
}

#[utoipa::path(get, path = "/api/v1/suites/{name}/versions/{version}", params(("name" = String, Path, description = "adapter, base model or suite name"), ("version" = String, Path, description = "version")), responses((status = 200, body = Suite), (status = 404, body = crate::api::ErrorBody)))]
pub async fn show(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    caller.require_read(&state, None)?;
    let (name, version) = path.into_inner();
    let row = find(&state, &name, Some(&version)).await?;
    Ok(HttpResponse::Ok().json(to_api(row)?))
}

#[utoipa::path(get, path = "/api/v1/suites/{name}/versions/{version}/cases", params(("name" = String, Path, description = "adapter, base model or suite name"), ("version" = String, Path, description = "version")),
    responses((status = 200, description = "The canonical cases (JSONL); ETag is the suite digest"), (status = 404, body = crate::api::ErrorBody)))]
pub async fn cases(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    caller.require_read(&state, None)?;
    let (name, version) = path.into_inner();
    let row = find(&state, &name, Some(&version)).await?;
    let bytes = state
        .store
        .get(&ObjectPath::from(row.blob_key.as_str()))
        .await?
        .bytes()
        .await?;
    Ok(HttpResponse::Ok()
        .insert_header((actix_web::http::header::ETAG, format!("\"{}\"", row.digest)))
        .insert_header(("x-loraops-suite-digest", row.digest))
        .content_type("application/x-ndjson")
        .body(bytes))
}
