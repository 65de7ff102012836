//! `…/versions/{v}/evidence`: evaluation results bound to the exact bytes they evaluated, and
//! `/base-models/{name}/evidence`: the base model's own, the baseline of `vs: base` gate rules.
//! Posting needs the `evaluator` role. Evidence whose digest is not the version's (or the base
//! model's) is refused, and so is evidence that does not cite a suite the registry holds
//! (by digest, with its name, version and number of cases), so it can never count.

use actix_web::{HttpResponse, web};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set, TransactionTrait,
};

use crate::api::{BaseEvidence, Evidence, Name, NewEvidence, Role, base_evidence_digest};
use crate::server::AppState;
use crate::server::caller::Caller;
use crate::server::entities::{base_evidence, base_model, evidence, suite};
use crate::server::error::ApiError;
use crate::server::records;
use crate::server::routes::adapters::path_version;

fn to_api(name: &crate::api::Name, version: u32, e: evidence::Model) -> Result<Evidence, ApiError> {
    Ok(Evidence {
        id: e.id as i64,
        adapter: name.clone(),
        version,
        body: serde_json::from_value(e.body).map_err(|err| {
            ApiError::internal(format!("stored evidence {} is unreadable: {err}", e.id))
        })?,
        created_by: e.created_by,
        created_at: e.created_at,
    })
}

#[utoipa::path(post, path = "/api/v1/adapters/{name}/versions/{version}/evidence", params(("name" = String, Path, description = "adapter, base model or suite name"), ("version" = String, Path, description = "version")), request_body = NewEvidence,
    responses((status = 201, body = Evidence), (status = 422, body = crate::api::ErrorBody)))]
pub async fn create(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<(String, String)>,
    body: web::Json<NewEvidence>,
) -> Result<HttpResponse, ApiError> {
    let (name, version) = path_version(&path)?;
    let who = caller.require(Role::Evaluator, Some(name.as_str()))?;
    let a = records::adapter_by_name(&state.db, name.as_str()).await?;
    let v = records::version_row(&state.db, &a, version).await?;
    let body = body.into_inner();
    if body.adapter_digest != v.digest {
        return Err(ApiError::unprocessable(
            "digest_mismatch",
            format!(
                "evidence is for adapter digest {} but {name}@{version} is {}",
                body.adapter_digest, v.digest
            ),
        ));
    }
    check_body(&state, &body).await?;
    let txn = state.db.begin().await?;
    let row = evidence::ActiveModel {
        version_id: Set(v.id),
        adapter_digest: Set(body.adapter_digest.clone()),
        suite_name: Set(body.suite.name.clone()),
        suite_digest: Set(body.suite.digest.clone()),
        body: Set(serde_json::to_value(&body).expect("evidence serialises")),
        created_by: Set(who.sub.clone()),
        created_at: Set(chrono::Utc::now()),
        ..Default::default()
    }
    .insert(&txn)
    .await?;
    state
        .webhooks
        .emit(
            &txn,
            "evidence.created",
            serde_json::json!({"adapter": name.as_str(), "version": version, "evidence_id": row.id,
                "adapter_digest": body.adapter_digest, "suite": body.suite, "metrics": body.metrics,
                "created_by": who.sub}),
        )
        .await?;
    txn.commit().await?;
    Ok(HttpResponse::Created().json(to_api(&name, version, row)?))
}

/// What every evidence body needs: ordered times, finite metrics, and a suite the registry
/// holds, cited by its digest with its own name, version and number of cases.
async fn check_body(state: &AppState, body: &NewEvidence) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::unprocessable("invalid_evidence", m));
    if body.finished_at < body.started_at {
        return bad("finished_at is before started_at".into());
    }
    if let Some((k, _)) = body.metrics.iter().find(|(_, m)| !m.is_finite()) {
        return bad(format!("metric {k:?} is not a finite number"));
    }
    let s = &body.suite;
    let Some(held) = suite::Entity::find()
        .filter(suite::Column::Digest.eq(s.digest.as_str()))
        .one(&state.db)
        .await?
    else {
        return Err(ApiError::unprocessable(
            "unknown_suite",
            format!(
                "the registry holds no suite with digest {}: upload the suite (loraops eval suite push) before posting its evidence",
                s.digest
            ),
        ));
    };
    if held.name != s.name || s.version.as_ref().is_some_and(|v| *v != held.version) {
        return bad(format!(
            "suite digest {} is {}@{}, not {}@{}",
            s.digest,
            held.name,
            held.version,
            s.name,
            s.version.as_deref().unwrap_or("?")
        ));
    }
    if body.cases != held.cases as u64 {
        return bad(format!(
            "{}@{} has {} cases; the evidence reports {}",
            held.name, held.version, held.cases, body.cases
        ));
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/v1/adapters/{name}/versions/{version}/evidence", params(("name" = String, Path, description = "adapter, base model or suite name"), ("version" = String, Path, description = "version")), responses((status = 200, body = Vec<Evidence>)))]
pub async fn list(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (name, version) = path_version(&path)?;
    caller.require_read(&state, Some(name.as_str()))?;
    let a = records::adapter_by_name(&state.db, name.as_str()).await?;
    let v = records::version_row(&state.db, &a, version).await?;
    let rows = evidence::Entity::find()
        .filter(evidence::Column::VersionId.eq(v.id))
        .order_by_asc(evidence::Column::Id)
        .all(&state.db)
        .await?;
    let items = rows
        .into_iter()
        .map(|e| to_api(&name, version, e))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HttpResponse::Ok().json(items))
}

fn to_api_base(e: base_evidence::Model) -> Result<BaseEvidence, ApiError> {
    Ok(BaseEvidence {
        id: e.id as i64,
        base_model: Name::parse(&e.base_model)
            .map_err(|err| ApiError::internal(err.to_string()))?,
        body: serde_json::from_value(e.body).map_err(|err| {
            ApiError::internal(format!(
                "stored base evidence {} is unreadable: {err}",
                e.id
            ))
        })?,
        created_by: e.created_by,
        created_at: e.created_at,
    })
}

async fn base_row(state: &AppState, raw: &str) -> Result<(Name, base_model::Model), ApiError> {
    let name = Name::parse(raw)?;
    let row = base_model::Entity::find()
        .filter(base_model::Column::Name.eq(name.as_str()))
        .one(&state.db)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("base model {name:?} not found")))?;
    Ok((name, row))
}

#[utoipa::path(post, path = "/api/v1/base-models/{name}/evidence", params(("name" = String, Path, description = "adapter, base model or suite name")), request_body = NewEvidence,
    responses((status = 201, body = BaseEvidence), (status = 422, body = crate::api::ErrorBody)))]
pub async fn create_base(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<NewEvidence>,
) -> Result<HttpResponse, ApiError> {
    let who = caller.require(Role::Evaluator, None)?;
    let (name, b) = base_row(&state, &path).await?;
    let body = body.into_inner();
    let want = base_evidence_digest(&name, b.digest.as_deref());
    if body.adapter_digest != want {
        return Err(ApiError::unprocessable(
            "digest_mismatch",
            format!(
                "base-model evidence is bound to {want} (the base model's digest, or base:NAME without one), not {}",
                body.adapter_digest
            ),
        ));
    }
    check_body(&state, &body).await?;
    let row = base_evidence::ActiveModel {
        base_model: Set(name.to_string()),
        model_digest: Set(want),
        suite_name: Set(body.suite.name.clone()),
        suite_digest: Set(body.suite.digest.clone()),
        body: Set(serde_json::to_value(&body).expect("evidence serialises")),
        created_by: Set(who.sub.clone()),
        created_at: Set(chrono::Utc::now()),
        ..Default::default()
    }
    .insert(&state.db)
    .await?;
    Ok(HttpResponse::Created().json(to_api_base(row)?))
}

#[utoipa::path(get, path = "/api/v1/base-models/{name}/evidence", params(("name" = String, Path, description = "adapter, base model or suite name")), responses((status = 200, body = Vec<BaseEvidence>)))]
pub async fn list_base(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require_read(&state, None)?;
    let (name, _) = base_row(&state, &path).await?;
    let items = base_evidence::Entity::find()
        .filter(base_evidence::Column::BaseModel.eq(name.as_str()))
        .order_by_asc(base_evidence::Column::Id)
        .all(&state.db)
        .await?
        .into_iter()
        .map(to_api_base)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HttpResponse::Ok().json(items))
}
