//! `/adapters/{name}/gate`: the adapter's gate policy (`deployer` to change it; `admin` for
//! `*`, the default policy of adapters without their own). A policy names suites the registry
//! holds, by digest or `NAME@VERSION`, and must have at least one rule or required suite.
//! Every change is announced (webhook `gate.updated`).

use actix_web::{HttpResponse, web};
use sea_orm::{EntityTrait, Set, TransactionTrait, sea_query::OnConflict};

use crate::api::{Gate, GatePolicy, GateReport, Name, Role};
use crate::server::AppState;
use crate::server::caller::Caller;
use crate::server::entities::gate;
use crate::server::error::ApiError;
use crate::server::records;
use crate::server::routes::adapters::path_version;

/// `*` (the default policy) or a valid adapter name.
fn scope(raw: &str) -> Result<String, ApiError> {
    if raw == "*" {
        Ok(raw.into())
    } else {
        Ok(Name::parse(raw)?.to_string())
    }
}

fn check(policy: &GatePolicy) -> Result<(), ApiError> {
    if policy.rules.is_empty() && policy.required_suites.is_empty() {
        return Err(ApiError::unprocessable(
            "invalid_gate",
            "an empty policy would pass every version: give it rules or required_suites",
        ));
    }
    for (i, r) in policy.rules.iter().enumerate() {
        if r.vs.is_some() && r.max_regression.is_none() {
            return Err(ApiError::unprocessable(
                "invalid_gate",
                format!(
                    "rules[{i}] ({}/{}) names a baseline (vs) but no max_regression",
                    r.suite, r.metric
                ),
            ));
        }
        if r.threshold.is_none() && r.max_regression.is_none() {
            return Err(ApiError::unprocessable(
                "invalid_gate",
                format!(
                    "rules[{i}] ({}/{}) needs a threshold or max_regression",
                    r.suite, r.metric
                ),
            ));
        }
        if r.threshold.is_some_and(|t| !t.is_finite())
            || r.max_regression.is_some_and(|t| !t.is_finite() || t < 0.0)
        {
            return Err(ApiError::unprocessable(
                "invalid_gate",
                format!("rules[{i}] has a non-finite or negative bound"),
            ));
        }
    }
    if policy
        .max_evidence_age_hours
        .is_some_and(|h| !(h.is_finite() && h > 0.0))
    {
        return Err(ApiError::unprocessable(
            "invalid_gate",
            "max_evidence_age_hours must be positive",
        ));
    }
    Ok(())
}

#[utoipa::path(put, path = "/api/v1/adapters/{name}/gate", params(("name" = String, Path, description = "adapter, base model or suite name")), request_body = GatePolicy, responses((status = 200, body = Gate)))]
pub async fn put(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<GatePolicy>,
) -> Result<HttpResponse, ApiError> {
    let scope = scope(&path)?;
    // The default policy governs every adapter without its own: only an admin sets it.
    let who = if scope == "*" {
        caller.require(Role::Admin, None)?
    } else {
        caller.require(Role::Deployer, Some(scope.as_str()))?
    };
    let policy = body.into_inner();
    check(&policy)?;
    let resolved = crate::server::gate::resolve_policy(&state.db, &policy).await?;
    let mut names: Vec<&String> = resolved.keys().collect();
    names.sort();
    for name in names {
        if let Err(why) = &resolved[name] {
            return Err(ApiError::unprocessable("invalid_gate", why.clone())
                .with_details(serde_json::json!({"suite": name})));
        }
    }
    let now = chrono::Utc::now();
    let txn = state.db.begin().await?;
    gate::Entity::insert(gate::ActiveModel {
        scope: Set(scope.clone()),
        policy: Set(serde_json::to_value(&policy).expect("policy serialises")),
        updated_by: Set(who.sub.clone()),
        updated_at: Set(now),
    })
    .on_conflict(
        OnConflict::column(gate::Column::Scope)
            .update_columns([
                gate::Column::Policy,
                gate::Column::UpdatedBy,
                gate::Column::UpdatedAt,
            ])
            .to_owned(),
    )
    .exec_without_returning(&txn)
    .await?;
    state
        .webhooks
        .emit(
            &txn,
            "gate.updated",
            serde_json::json!({"scope": scope, "policy": policy, "suites": resolved
                .iter()
                .filter_map(|(k, v)| v.as_ref().ok().map(|d| (k.clone(), d.clone())))
                .collect::<std::collections::BTreeMap<_, _>>(), "updated_by": who.sub}),
        )
        .await?;
    txn.commit().await?;
    Ok(HttpResponse::Ok().json(Gate {
        adapter: adapter_name(&scope),
        policy,
        updated_by: who.sub.clone(),
        updated_at: now,
    }))
}

fn adapter_name(scope: &str) -> Name {
    // `*` is not a valid Name; the default policy is reported under the name "default".
    Name::parse(scope).unwrap_or_else(|_| Name::parse("default").expect("valid"))
}

#[utoipa::path(get, path = "/api/v1/adapters/{name}/gate", params(("name" = String, Path, description = "adapter, base model or suite name")), responses((status = 200, body = Gate), (status = 404, body = crate::api::ErrorBody)))]
pub async fn show(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let scope = scope(&path)?;
    caller.require_read(&state, (scope != "*").then_some(scope.as_str()))?;
    let row = gate::Entity::find_by_id(scope.clone())
        .one(&state.db)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no gate policy for {scope:?}")))?;
    let policy = serde_json::from_value(row.policy)
        .map_err(|e| ApiError::internal(format!("stored gate is unreadable: {e}")))?;
    Ok(HttpResponse::Ok().json(Gate {
        adapter: adapter_name(&scope),
        policy,
        updated_by: row.updated_by,
        updated_at: row.updated_at,
    }))
}

#[utoipa::path(get, path = "/api/v1/adapters/{name}/versions/{version}/gate-report",
    params(("name" = String, Path, description = "adapter name"), ("version" = String, Path, description = "version")),
    responses((status = 200, description = "the adapter's gate evaluated now for this version; nothing changes", body = GateReport),
        (status = 404, body = crate::api::ErrorBody)))]
pub async fn report(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (name, version) = path_version(&path)?;
    caller.require_read(&state, Some(name.as_str()))?;
    let a = records::adapter_by_name(&state.db, name.as_str()).await?;
    let v = records::version_row(&state.db, &a, version).await?;
    Ok(HttpResponse::Ok().json(crate::server::gate::report(&state.db, &a, &v).await?))
}
