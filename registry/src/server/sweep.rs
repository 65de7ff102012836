//! The orphan sweep: deletes blobs that belong to no version. Two sources: `uploads` rows
//! left by a push that never finished (the process died mid-upload), and upload directories in
//! the store that no row names at all. Only what is older than the grace period goes, so an
//! upload in progress is never touched.

use std::collections::HashSet;
use std::time::Duration;

use actix_web::web;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};

use super::AppState;
use super::blobs;
use super::entities::{adapter_version, upload};
use super::error::ApiError;

#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct SweepReport {
    pub uploads_removed: usize,
    pub blobs_deleted: usize,
    /// Delivered or abandoned webhook rows past their retention.
    pub webhook_rows_deleted: usize,
}

pub async fn sweep_orphans(state: &AppState, grace: Duration) -> Result<SweepReport, ApiError> {
    // A grace too large for a date means "keep everything", never "keep nothing".
    let cutoff = chrono::Duration::from_std(grace)
        .ok()
        .and_then(|g| chrono::Utc::now().checked_sub_signed(g))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
    let mut report = SweepReport::default();

    let stale = upload::Entity::find()
        .filter(upload::Column::StartedAt.lt(cutoff))
        .all(&state.db)
        .await?;
    for u in stale {
        report.blobs_deleted +=
            blobs::delete_prefix(&state.store, &blobs::version_prefix(&u.adapter, &u.id)).await?;
        upload::Entity::delete_by_id(u.id).exec(&state.db).await?;
        report.uploads_removed += 1;
    }

    let owned: HashSet<String> = adapter_version::Entity::find()
        .select_only()
        .column(adapter_version::Column::UploadId)
        .into_tuple::<String>()
        .all(&state.db)
        .await?
        .into_iter()
        .collect();
    let pending: HashSet<String> = upload::Entity::find()
        .all(&state.db)
        .await?
        .into_iter()
        .map(|u| u.id)
        .collect();
    for (adapter, id, modified) in blobs::list_uploads(&state.store).await? {
        if modified < cutoff && !owned.contains(&id) && !pending.contains(&id) {
            report.blobs_deleted +=
                blobs::delete_prefix(&state.store, &blobs::version_prefix(&adapter, &id)).await?;
        }
    }
    let hours = state.settings.registry.webhook_retention_hours;
    if let Some(before) = chrono::Duration::try_hours(hours.min(i64::MAX as u64) as i64)
        .and_then(|h| chrono::Utc::now().checked_sub_signed(h))
    {
        report.webhook_rows_deleted = super::webhooks::prune(&state.db, before).await? as usize;
    }
    if report != SweepReport::default() {
        tracing::info!(?report, "orphan sweep");
    }
    Ok(report)
}

/// Run the sweep now and then every `sweep_interval_secs`, supervised.
pub fn spawn_periodic(state: web::Data<AppState>) -> tokio::task::JoinHandle<()> {
    let every = Duration::from_secs(state.settings.registry.sweep_interval_secs.max(1));
    let grace = Duration::from_secs(state.settings.registry.orphan_grace_secs);
    // A sweep of a large store may take a while: stalled only well past its interval.
    let stale_after = every * 2 + Duration::from_secs(600);
    let supervisor = state.supervisor.clone();
    supervisor.spawn(SWEEP_TASK, stale_after, move || {
        let state = state.clone();
        async move {
            sweep_orphans(&state, grace)
                .await
                .map(|_| super::supervisor::Pass::Sleep(every))
                .map_err(|e| format!("orphan sweep failed: {e}"))
        }
    })
}

/// The supervisor's name of the sweep loop.
pub const SWEEP_TASK: &str = "orphan_sweep";
