//! `…/versions/{v}/evidence`: evaluation results bound to the exact bytes they evaluated.
//! Posting needs the `evaluator` role; evidence whose adapter digest is not the version's is
//! refused, so it can never count.

use actix_web::{HttpResponse, web};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set, TransactionTrait,
};

use crate::api::{Evidence, NewEvidence, Role};
use crate::server::AppState;
use crate::server::caller::Caller;
use crate::server::entities::evidence;
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

#[utoipa::path(post, path = "/api/v1/adapters/{name}/versions/{version}/evidence", request_body = NewEvidence,
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
    if body.finished_at < body.started_at {
        return Err(ApiError::unprocessable(
            "invalid_evidence",
            "finished_at is before started_at",
        ));
    }
    if let Some((k, _)) = body.metrics.iter().find(|(_, m)| !m.is_finite()) {
        return Err(ApiError::unprocessable(
            "invalid_evidence",
            format!("metric {k:?} is not a finite number"),
        ));
    }
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

#[utoipa::path(get, path = "/api/v1/adapters/{name}/versions/{version}/evidence", responses((status = 200, body = Vec<Evidence>)))]
pub async fn list(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    caller.require_read(&state)?;
    let (name, version) = path_version(&path)?;
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
