//! `/runs`: training runs as the trainer reports them (`loraops train … --registry`). The
//! trainer picks the run's id, so every write is idempotent: a create or a batch of points
//! resent after a timeout, or sent late after the registry was unreachable, changes nothing
//! twice. Writing needs the `publisher` role (the same as pushing the run's adapter); a run
//! names the adapter it trains, and a token limited to some adapters sees only their runs.

use std::collections::BTreeMap;

use actix_web::{HttpResponse, web};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    Set, TryInsertResult,
};

use crate::api::{
    DatasetRef, EndRun, Name, NewRun, Page, Role, Run, RunMetrics, RunPoints, RunStatus, VersionRef,
};
use crate::server::AppState;
use crate::server::caller::Caller;
use crate::server::entities::{adapter, adapter_version, run, run_metric};
use crate::server::error::ApiError;
use crate::server::records::PageQuery;

/// Points in one `POST /runs/{id}/metrics`.
const MAX_POINTS: usize = 10_000;

const METHODS: [&str; 4] = ["sft", "dpo", "orpo", "kto"];

fn to_api(r: run::Model) -> Result<Run, ApiError> {
    let bad = |what: &str, e: String| {
        ApiError::internal(format!("stored {what} of run {} is unreadable: {e}", r.id))
    };
    let datasets: Vec<DatasetRef> =
        serde_json::from_value(r.datasets.clone()).map_err(|e| bad("datasets", e.to_string()))?;
    Ok(Run {
        adapter: r
            .adapter
            .as_deref()
            .map(Name::parse)
            .transpose()
            .map_err(|e| bad("adapter", e.to_string()))?,
        status: r.status.parse().map_err(|e| bad("status", e))?,
        method: r.method,
        base_model: r.base_model,
        config: r.config,
        datasets,
        total_steps: r.total_steps.max(0) as u64,
        last_step: r.last_step.max(0) as u64,
        summary: r.summary,
        created_by: r.created_by,
        created_at: r.created_at,
        updated_at: r.updated_at,
        ended_at: r.ended_at,
        versions: Vec::new(),
        id: r.id,
    })
}

fn parse_id(raw: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(raw)
        .map(|u| u.to_string())
        .map_err(|_| ApiError::bad_request(format!("run id {raw:?} is not a UUID")))
}

/// The run, if this caller may read it (a run of an adapter the token does not cover, or of
/// no adapter for a token limited to some, answers 404 as if absent).
async fn readable(state: &AppState, caller: &Caller, id: &str) -> Result<run::Model, ApiError> {
    caller.require_read(state, None)?;
    let r = run::Entity::find_by_id(id.to_string())
        .one(&state.db)
        .await?
        .filter(|r| match &r.adapter {
            Some(a) => caller.may_see(a),
            None => caller.sees_all(),
        })
        .ok_or_else(|| ApiError::not_found(format!("run {id} not found")))?;
    Ok(r)
}

/// The run, for a write by a publisher who may act on its adapter.
async fn writable(state: &AppState, caller: &Caller, id: &str) -> Result<run::Model, ApiError> {
    let r = run::Entity::find_by_id(id.to_string())
        .one(&state.db)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("run {id} not found")))?;
    caller.require(Role::Publisher, r.adapter.as_deref())?;
    Ok(r)
}

#[utoipa::path(post, path = "/api/v1/runs", request_body = NewRun,
    responses((status = 201, body = Run), (status = 200, description = "the run already exists (a resent create)", body = Run),
        (status = 409, body = crate::api::ErrorBody), (status = 422, body = crate::api::ErrorBody)))]
pub async fn create(
    state: web::Data<AppState>,
    caller: Caller,
    body: web::Json<NewRun>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let who = caller.require(Role::Publisher, body.adapter.as_ref().map(Name::as_str))?;
    if !METHODS.contains(&body.method.as_str()) {
        return Err(ApiError::unprocessable(
            "invalid_run",
            format!("method {:?} is not one of sft, dpo, orpo, kto", body.method),
        ));
    }
    if body.base_model.is_empty() || body.base_model.len() > 1024 {
        return Err(ApiError::unprocessable(
            "invalid_run",
            "base_model must be 1–1024 characters",
        ));
    }
    if !body.config.is_object() {
        return Err(ApiError::unprocessable(
            "invalid_run",
            "config must be a JSON object",
        ));
    }
    no_nul(&(&body.base_model, &body.config, &body.datasets))?;
    let id = body.id.to_string();
    let now = chrono::Utc::now();
    let inserted = run::Entity::insert(run::ActiveModel {
        id: Set(id.clone()),
        adapter: Set(body.adapter.as_ref().map(|a| a.to_string())),
        method: Set(body.method.clone()),
        base_model: Set(body.base_model.clone()),
        status: Set(RunStatus::Running.as_str().into()),
        config: Set(body.config.clone()),
        datasets: Set(serde_json::to_value(&body.datasets).expect("datasets serialise")),
        total_steps: Set(body.total_steps.min(i64::MAX as u64) as i64),
        last_step: Set(0),
        summary: Set(None),
        created_by: Set(who.sub.clone()),
        created_at: Set(now),
        updated_at: Set(now),
        ended_at: Set(None),
    })
    .on_conflict_do_nothing_on([run::Column::Id])
    .exec_without_returning(&state.db)
    .await?;
    let row = run::Entity::find_by_id(id.clone())
        .one(&state.db)
        .await?
        .ok_or_else(|| ApiError::internal(format!("run {id} vanished after its insert")))?;
    if !matches!(inserted, TryInsertResult::Inserted(n) if n > 0) {
        // A resend is the same run; another run with this id is a conflict, not an update.
        if row.created_by != who.sub
            || row.adapter.as_deref() != body.adapter.as_ref().map(Name::as_str)
            || row.method != body.method
        {
            return Err(ApiError::conflict(format!(
                "run {id} exists with another owner, adapter or method"
            )));
        }
        return Ok(HttpResponse::Ok().json(to_api(row)?));
    }
    Ok(HttpResponse::Created().json(to_api(row)?))
}

/// PostgreSQL's text and jsonb cannot hold U+0000: refused here rather than failing there.
fn no_nul(v: &impl serde::Serialize) -> Result<(), ApiError> {
    let text = serde_json::to_string(v).expect("serialisable");
    if text.contains("\\u0000") {
        return Err(ApiError::unprocessable(
            "invalid_run",
            "the run contains a NUL character (U+0000)",
        ));
    }
    Ok(())
}

/// A metric name: 1–64 characters of `[A-Za-z0-9._/-]` (TRL's `rewards/margins` included).
fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::unprocessable(
            "invalid_metric",
            format!("metric name {name:?} must be 1–64 characters of [A-Za-z0-9._/-]"),
        ))
    }
}

#[utoipa::path(post, path = "/api/v1/runs/{id}/metrics", params(("id" = String, Path, description = "run id (UUID)")), request_body = RunPoints,
    responses((status = 200, description = "stored (points already stored are ignored)"), (status = 404, body = crate::api::ErrorBody), (status = 422, body = crate::api::ErrorBody)))]
pub async fn post_metrics(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<RunPoints>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path)?;
    let r = writable(&state, &caller, &id).await?;
    let points = body.into_inner().points;
    if points.len() > MAX_POINTS {
        return Err(ApiError::unprocessable(
            "invalid_metric",
            format!("{} points in one batch; at most {MAX_POINTS}", points.len()),
        ));
    }
    for p in &points {
        check_name(&p.name)?;
        if !p.value.is_finite() || p.step > i64::MAX as u64 {
            return Err(ApiError::unprocessable(
                "invalid_metric",
                format!("{} at step {}: not a finite value", p.name, p.step),
            ));
        }
    }
    let Some(top) = points.iter().map(|p| p.step).max() else {
        return Ok(HttpResponse::Ok().json(serde_json::json!({"stored": 0})));
    };
    // One statement per chunk keeps PostgreSQL's 65,535 bind parameters out of reach.
    for chunk in points.chunks(1000) {
        run_metric::Entity::insert_many(chunk.iter().map(|p| run_metric::ActiveModel {
            run_id: Set(id.clone()),
            name: Set(p.name.clone()),
            step: Set(p.step as i64),
            value: Set(p.value),
            ..Default::default()
        }))
        .on_conflict(
            OnConflict::columns([
                run_metric::Column::RunId,
                run_metric::Column::Step,
                run_metric::Column::Name,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(&state.db)
        .await?;
    }
    if top as i64 > r.last_step {
        run::Entity::update_many()
            .col_expr(run::Column::LastStep, Expr::value(top as i64))
            .col_expr(run::Column::UpdatedAt, Expr::value(chrono::Utc::now()))
            .filter(run::Column::Id.eq(id.clone()))
            .filter(run::Column::LastStep.lt(top as i64))
            .exec(&state.db)
            .await?;
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({"stored": points.len()})))
}

#[utoipa::path(post, path = "/api/v1/runs/{id}/end", params(("id" = String, Path, description = "run id (UUID)")), request_body = EndRun,
    responses((status = 200, body = Run), (status = 404, body = crate::api::ErrorBody), (status = 409, body = crate::api::ErrorBody)))]
pub async fn end(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<EndRun>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path)?;
    let r = writable(&state, &caller, &id).await?;
    let body = body.into_inner();
    if body.status == RunStatus::Running {
        return Err(ApiError::unprocessable(
            "invalid_run",
            "a run ends as succeeded, failed or interrupted",
        ));
    }
    no_nul(&body.summary)?;
    if r.status != RunStatus::Running.as_str() {
        // Resent: the same end is answered again; a different one is refused.
        if r.status == body.status.as_str() {
            return Ok(HttpResponse::Ok().json(to_api(r)?));
        }
        return Err(ApiError::conflict(format!(
            "run {id} already ended as {}",
            r.status
        )));
    }
    let now = chrono::Utc::now();
    let mut m: run::ActiveModel = r.into();
    m.status = Set(body.status.as_str().into());
    m.summary = Set(body.summary);
    m.ended_at = Set(Some(now));
    m.updated_at = Set(now);
    let r = m.update(&state.db).await?;
    Ok(HttpResponse::Ok().json(to_api(r)?))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct RunsQuery {
    /// Only runs that train this adapter.
    pub adapter: Option<String>,
    /// Items per page (1–500, default 100).
    pub limit: Option<u64>,
    /// The `next` value of the previous page.
    pub after: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/runs", params(RunsQuery), responses((status = 200, body = Page<Run>)))]
pub async fn list(
    state: web::Data<AppState>,
    caller: Caller,
    q: web::Query<RunsQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = q.into_inner();
    let adapter = q.adapter.as_deref().map(Name::parse).transpose()?;
    caller.require_read(&state, adapter.as_ref().map(Name::as_str))?;
    let page = PageQuery {
        limit: q.limit,
        after: q.after,
    };
    let limit = page.limit();
    let mut query = run::Entity::find()
        .order_by_desc(run::Column::CreatedAt)
        .order_by_desc(run::Column::Id);
    if let Some(a) = &adapter {
        query = query.filter(run::Column::Adapter.eq(a.as_str()));
    }
    if let Some(after) = &page.after {
        let after = parse_id(after)?;
        let last = run::Entity::find_by_id(after.clone())
            .one(&state.db)
            .await?
            .ok_or_else(|| ApiError::bad_request(format!("after: no run {after}")))?;
        query = query.filter(
            Condition::any()
                .add(run::Column::CreatedAt.lt(last.created_at))
                .add(
                    Condition::all()
                        .add(run::Column::CreatedAt.eq(last.created_at))
                        .add(run::Column::Id.lt(after)),
                ),
        );
    }
    // A token limited to some adapters filters after the query (its patterns are globs).
    if caller.sees_all() {
        query = query.limit(limit + 1);
    }
    let mut rows = query.all(&state.db).await?;
    rows.retain(|r| match &r.adapter {
        Some(a) => caller.may_see(a),
        None => caller.sees_all(),
    });
    let next = page.cut(&mut rows, |r| r.id.clone());
    let items = rows
        .into_iter()
        .map(to_api)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HttpResponse::Ok().json(Page { items, next }))
}

#[utoipa::path(get, path = "/api/v1/runs/{id}", params(("id" = String, Path, description = "run id (UUID)")),
    responses((status = 200, body = Run), (status = 404, body = crate::api::ErrorBody)))]
pub async fn show(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path)?;
    let r = readable(&state, &caller, &id).await?;
    let versions = adapter_version::Entity::find()
        .filter(adapter_version::Column::RunId.eq(id.clone()))
        .order_by_asc(adapter_version::Column::Id)
        .all(&state.db)
        .await?;
    let mut run = to_api(r)?;
    if !versions.is_empty() {
        let ids: Vec<i32> = versions.iter().map(|v| v.adapter_id).collect();
        let names: BTreeMap<i32, String> = adapter::Entity::find()
            .filter(adapter::Column::Id.is_in(ids))
            .all(&state.db)
            .await?
            .into_iter()
            .map(|a| (a.id, a.name))
            .collect();
        for v in versions {
            let Some(name) = names.get(&v.adapter_id) else {
                continue;
            };
            if !caller.may_see(name) {
                continue;
            }
            run.versions.push(VersionRef {
                adapter: Name::parse(name).map_err(|e| ApiError::internal(e.to_string()))?,
                version: v.version as u32,
            });
        }
    }
    Ok(HttpResponse::Ok().json(run))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct MetricsQuery {
    /// Only points after this step (what a live chart already has).
    pub after_step: Option<u64>,
}

#[utoipa::path(get, path = "/api/v1/runs/{id}/metrics", params(("id" = String, Path, description = "run id (UUID)"), MetricsQuery),
    responses((status = 200, body = RunMetrics), (status = 404, body = crate::api::ErrorBody)))]
pub async fn metrics(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    q: web::Query<MetricsQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path)?;
    readable(&state, &caller, &id).await?;
    let mut query = run_metric::Entity::find()
        .filter(run_metric::Column::RunId.eq(id.clone()))
        .order_by_asc(run_metric::Column::Step);
    if let Some(after) = q.after_step {
        query = query.filter(run_metric::Column::Step.gt(after.min(i64::MAX as u64) as i64));
    }
    let mut series: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for p in query.all(&state.db).await? {
        series
            .entry(p.name)
            .or_default()
            .push((p.step.max(0) as u64, p.value));
    }
    Ok(HttpResponse::Ok().json(RunMetrics { run: id, series }))
}
