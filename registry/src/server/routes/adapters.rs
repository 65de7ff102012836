//! Reading adapters and their versions.

use actix_web::{HttpResponse, web};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use crate::api::{Adapter, AdapterVersion, Name, Page};
use crate::server::AppState;
use crate::server::caller::Caller;
use crate::server::entities::{adapter, adapter_version, version_file};
use crate::server::error::ApiError;
use crate::server::records::{self, PageQuery};

fn to_api(a: adapter::Model) -> Result<Adapter, ApiError> {
    let name = |s: &str| Name::parse(s).map_err(|e| ApiError::internal(e.to_string()));
    Ok(Adapter {
        name: name(&a.name)?,
        base_model: name(&a.base_model)?,
        latest_version: (a.latest_version > 0).then_some(a.latest_version as u32),
        stable_version: a.stable_version.map(|v| v as u32),
        created_by: a.created_by,
        created_at: a.created_at,
    })
}

/// Longest page of versions.
const MAX_VERSIONS_PAGE: u64 = 100;

fn parse_version(s: &str) -> Result<u32, ApiError> {
    match s.parse::<u32>() {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(ApiError::bad_request(format!(
            "version {s:?} must be a positive integer"
        ))),
    }
}

pub(crate) fn path_version(path: &(String, String)) -> Result<(Name, u32), ApiError> {
    Ok((Name::parse(&path.0)?, parse_version(&path.1)?))
}

#[utoipa::path(get, path = "/api/v1/adapters", params(PageQuery), responses((status = 200, body = Page<Adapter>)))]
pub async fn list(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require_serving_read(&state, None)?;
    let limit = q.limit();
    let mut query = adapter::Entity::find()
        // An adapter becomes visible with its first version.
        .filter(adapter::Column::LatestVersion.gt(0))
        .order_by_asc(adapter::Column::Name);
    // A token limited to some adapters lists only those (filtered here: patterns are globs).
    if caller.sees_all() {
        query = query.limit(limit + 1);
    }
    if let Some(after) = &q.after {
        query = query.filter(adapter::Column::Name.gt(after.as_str()));
    }
    let mut rows = query.all(&state.db).await?;
    rows.retain(|a| caller.may_see(&a.name));
    let next = q.cut(&mut rows, |r| r.name.clone());
    let items = rows
        .into_iter()
        .map(to_api)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HttpResponse::Ok().json(Page { items, next }))
}

#[utoipa::path(get, path = "/api/v1/adapters/{name}", params(("name" = String, Path, description = "adapter, base model or suite name")), responses((status = 200, body = Adapter), (status = 404, body = crate::api::ErrorBody)))]
pub async fn show(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let name = Name::parse(&path)?;
    caller.require_serving_read(&state, Some(name.as_str()))?;
    let a = records::adapter_by_name(&state.db, name.as_str()).await?;
    if a.latest_version == 0 {
        return Err(ApiError::not_found(format!("adapter {name:?} not found")));
    }
    Ok(HttpResponse::Ok().json(to_api(a)?))
}

#[utoipa::path(get, path = "/api/v1/adapters/{name}/versions", params(("name" = String, Path, description = "adapter, base model or suite name"), PageQuery), responses((status = 200, body = Page<AdapterVersion>)))]
pub async fn versions(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    q: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let name = Name::parse(&path)?;
    caller.require_serving_read(&state, Some(name.as_str()))?;
    let a = records::adapter_by_name(&state.db, name.as_str()).await?;
    // Versions carry their config and manifest: pages stay at most 100 long.
    let limit = q.limit().min(MAX_VERSIONS_PAGE);
    let mut query = adapter_version::Entity::find()
        .filter(adapter_version::Column::AdapterId.eq(a.id))
        .order_by_asc(adapter_version::Column::Version)
        .limit(limit + 1);
    if let Some(after) = &q.after {
        query = query.filter(adapter_version::Column::Version.gt(parse_version(after)? as i32));
    }
    let mut rows = query.all(&state.db).await?;
    let next = q.cut_at(limit, &mut rows, |r| r.version.to_string());
    let ids: Vec<i32> = rows.iter().map(|r| r.id).collect();
    let mut files = version_file::Entity::find()
        .filter(version_file::Column::VersionId.is_in(ids))
        .order_by_asc(version_file::Column::Name)
        .all(&state.db)
        .await?;
    let mut items = Vec::with_capacity(rows.len());
    for v in rows {
        let (mine, rest): (Vec<_>, Vec<_>) = files.into_iter().partition(|f| f.version_id == v.id);
        files = rest;
        items.push(records::to_api_version(&a, v, mine)?);
    }
    Ok(HttpResponse::Ok().json(Page { items, next }))
}

#[utoipa::path(get, path = "/api/v1/adapters/{name}/versions/{version}", params(("name" = String, Path, description = "adapter, base model or suite name"), ("version" = String, Path, description = "version")), responses((status = 200, body = AdapterVersion), (status = 404, body = crate::api::ErrorBody)))]
pub async fn version(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (name, v) = path_version(&path)?;
    caller.require_serving_read(&state, Some(name.as_str()))?;
    let a = records::adapter_by_name(&state.db, name.as_str()).await?;
    Ok(HttpResponse::Ok().json(records::load_version(&state.db, &a, v).await?))
}
