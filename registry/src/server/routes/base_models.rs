//! `/api/v1/base-models`: the models adapters are trained on, with the dimensions used to
//! check adapter shapes.

use actix_web::{HttpResponse, web};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};

use crate::api::{BaseModel, Name, NewBaseModel, Page, Role};
use crate::server::AppState;
use crate::server::caller::Caller;
use crate::server::entities::base_model;
use crate::server::error::ApiError;
use crate::server::records::PageQuery;

pub fn to_api(m: base_model::Model) -> Result<BaseModel, ApiError> {
    Ok(BaseModel {
        name: Name::parse(&m.name).map_err(|e| ApiError::internal(e.to_string()))?,
        architecture: m.architecture,
        dims: serde_json::from_value(m.dims).unwrap_or_default(),
        digest: m.digest,
        description: m.description,
        created_by: m.created_by,
        created_at: m.created_at,
    })
}

#[utoipa::path(post, path = "/api/v1/base-models", request_body = NewBaseModel,
    responses((status = 201, body = BaseModel), (status = 409, body = crate::api::ErrorBody)))]
pub async fn create(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<NewBaseModel>,
) -> Result<HttpResponse, ApiError> {
    let p = caller.require(Role::Admin, None)?;
    let b = body.into_inner();
    let exists = base_model::Entity::find()
        .filter(base_model::Column::Name.eq(b.name.as_str()))
        .one(&state.db)
        .await?;
    if exists.is_some() {
        return Err(ApiError::conflict(format!(
            "base model {:?} already exists",
            b.name.as_str()
        )));
    }
    let row = base_model::ActiveModel {
        name: Set(b.name.to_string()),
        architecture: Set(b.architecture),
        dims: Set(serde_json::to_value(&b.dims).expect("dims serialise")),
        digest: Set(b.digest),
        description: Set(b.description),
        created_by: Set(p.sub.clone()),
        created_at: Set(chrono::Utc::now()),
        ..Default::default()
    }
    .insert(&state.db)
    .await
    .map_err(|e| match e.sql_err() {
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) => {
            ApiError::conflict("base model already exists")
        }
        _ => e.into(),
    })?;
    Ok(HttpResponse::Created().json(to_api(row)?))
}

#[utoipa::path(get, path = "/api/v1/base-models", params(PageQuery), responses((status = 200, body = Page<BaseModel>)))]
pub async fn list(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require_serving_read(&state, None)?;
    let limit = q.limit();
    let mut query = base_model::Entity::find()
        .order_by_asc(base_model::Column::Name)
        .limit(limit + 1);
    if let Some(after) = &q.after {
        query = query.filter(base_model::Column::Name.gt(after.as_str()));
    }
    let mut rows = query.all(&state.db).await?;
    let next = q.cut(&mut rows, |r| r.name.clone());
    let items = rows
        .into_iter()
        .map(to_api)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HttpResponse::Ok().json(Page { items, next }))
}
