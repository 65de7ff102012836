//! Lookups shared by handlers, and the conversion of rows into wire types.

use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};

use super::entities::{adapter, adapter_version, version_file};
use super::error::ApiError;
use crate::api::{AdapterVersion, Name, VersionFile};

pub async fn adapter_by_name(
    db: &impl ConnectionTrait,
    name: &str,
) -> Result<adapter::Model, ApiError> {
    adapter::Entity::find()
        .filter(adapter::Column::Name.eq(name))
        .one(db)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("adapter {name:?} not found")))
}

pub async fn version_row(
    db: &impl ConnectionTrait,
    a: &adapter::Model,
    version: u32,
) -> Result<adapter_version::Model, ApiError> {
    adapter_version::Entity::find()
        .filter(adapter_version::Column::AdapterId.eq(a.id))
        .filter(adapter_version::Column::Version.eq(version as i32))
        .one(db)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!("adapter {:?} has no version {version}", a.name))
        })
}

pub async fn files_of(
    db: &impl ConnectionTrait,
    version_id: i32,
) -> Result<Vec<version_file::Model>, ApiError> {
    Ok(version_file::Entity::find()
        .filter(version_file::Column::VersionId.eq(version_id))
        .order_by_asc(version_file::Column::Name)
        .all(db)
        .await?)
}

pub fn to_api_version(
    a: &adapter::Model,
    v: adapter_version::Model,
    files: Vec<version_file::Model>,
) -> Result<AdapterVersion, ApiError> {
    let bad = |what: &str, e: serde_json::Error| {
        ApiError::internal(format!(
            "stored {what} of {}@{} is unreadable: {e}",
            a.name, v.version
        ))
    };
    Ok(AdapterVersion {
        adapter: Name::parse(&a.name).map_err(|e| ApiError::internal(e.to_string()))?,
        version: v.version as u32,
        digest: v.digest,
        base_model: Name::parse(&v.base_model).map_err(|e| ApiError::internal(e.to_string()))?,
        files: files
            .into_iter()
            .map(|f| VersionFile {
                name: f.name,
                sha256: f.sha256,
                size: f.size as u64,
            })
            .collect(),
        summary: serde_json::from_value(v.summary).map_err(|e| bad("summary", e))?,
        config: v.config,
        lineage: v.lineage,
        run: v.run_id,
        size_bytes: v.size_bytes as u64,
        created_by: v.created_by,
        created_at: v.created_at,
    })
}

pub async fn load_version(
    db: &impl ConnectionTrait,
    a: &adapter::Model,
    version: u32,
) -> Result<AdapterVersion, ApiError> {
    let v = version_row(db, a, version).await?;
    let files = files_of(db, v.id).await?;
    to_api_version(a, v, files)
}

/// `?limit=&after=` of listings.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct PageQuery {
    /// Items per page (1–500, default 100).
    pub limit: Option<u64>,
    /// The `next` value of the previous page.
    pub after: Option<String>,
}

impl PageQuery {
    pub fn limit(&self) -> u64 {
        self.limit.unwrap_or(100).clamp(1, 500)
    }

    /// Listings fetch `limit + 1` rows: cut the extra one off and return the key of the page's
    /// last row as `next` when it existed.
    pub fn cut<R>(&self, rows: &mut Vec<R>, key: impl Fn(&R) -> String) -> Option<String> {
        self.cut_at(self.limit(), rows, key)
    }

    /// [`Self::cut`] for a listing with its own, lower, page limit.
    pub fn cut_at<R>(
        &self,
        limit: u64,
        rows: &mut Vec<R>,
        key: impl Fn(&R) -> String,
    ) -> Option<String> {
        let limit = limit as usize;
        if rows.len() <= limit {
            return None;
        }
        rows.truncate(limit);
        rows.last().map(key)
    }
}
