//! `DELETE /api/v1/adapters/{name}/versions/{version}`: retention. An admin removes a version
//! the adapter no longer needs (its files, evidence and blobs); the stable version and the
//! candidate of an active rollout cannot be removed. Version numbers are never reused.

use actix_web::{HttpResponse, web};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, TransactionTrait};
use serde_json::json;

use crate::api::{Role, RolloutState};
use crate::server::AppState;
use crate::server::blobs;
use crate::server::caller::Caller;
use crate::server::entities::{adapter, adapter_version, rollout};
use crate::server::error::ApiError;
use crate::server::records;
use crate::server::routes::adapters::path_version;

#[utoipa::path(delete, path = "/api/v1/adapters/{name}/versions/{version}",
    params(("name" = String, Path, description = "adapter name"), ("version" = String, Path, description = "version")),
    responses(
        (status = 204, description = "Deleted: the version, its files and evidence; its blobs follow"),
        (status = 401, body = crate::api::ErrorBody), (status = 403, body = crate::api::ErrorBody),
        (status = 404, body = crate::api::ErrorBody),
        (status = 409, description = "The stable version, or the candidate of an active rollout", body = crate::api::ErrorBody)))]
pub async fn delete_version(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (name, v) = path_version(&path)?;
    let who = caller.require(Role::Admin, Some(name.as_str()))?.clone();
    let a = records::adapter_by_name(&state.db, name.as_str()).await?;

    let txn = state.db.begin().await?;
    // A write on the adapter's row first: it orders this with pushes, promotions and rollout
    // starts of the same adapter (and takes SQLite's write lock now).
    adapter::Entity::update_many()
        .col_expr(
            adapter::Column::LatestVersion,
            Expr::col(adapter::Column::LatestVersion),
        )
        .filter(adapter::Column::Id.eq(a.id))
        .exec(&txn)
        .await?;
    let a = records::adapter_by_name(&txn, name.as_str()).await?;
    let row = records::version_row(&txn, &a, v).await?;
    if a.stable_version == Some(v as i32) {
        return Err(ApiError::conflict(format!(
            "{name}@{v} is the stable version; promote another version before deleting it"
        )));
    }
    if let Some(id) = a.active_rollout_id
        && let Some(r) = rollout::Entity::find_by_id(id).one(&txn).await?
        && r.version == v as i32
        && r.state.parse::<RolloutState>().is_ok_and(|s| s.is_active())
    {
        return Err(ApiError::conflict(format!(
            "{name}@{v} is the candidate of the active rollout {id}; abort it before deleting the version"
        )));
    }
    // Files and evidence go with the row (ON DELETE CASCADE).
    adapter_version::Entity::delete_by_id(row.id)
        .exec(&txn)
        .await?;
    state
        .webhooks
        .emit(
            &txn,
            "version.deleted",
            json!({"adapter": name.as_str(), "version": v, "digest": row.digest,
                "size_bytes": row.size_bytes, "deleted_by": who.sub}),
        )
        .await?;
    txn.commit().await?;
    tracing::info!(adapter = %name, version = v, "deleted adapter version");
    // After the commit: a blob left by a failed delete belongs to no version, and the sweep
    // removes it once the grace period has passed.
    if let Err(e) = blobs::delete_prefix(
        &state.store,
        &blobs::version_prefix(name.as_str(), &row.upload_id),
    )
    .await
    {
        tracing::warn!(adapter = %name, version = v, error = %e, "could not delete the version's blobs; the sweep will");
    }
    Ok(HttpResponse::NoContent().finish())
}
