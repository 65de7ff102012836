//! sea-orm entities, one module per table. The schema itself is defined only by the
//! `loraops-migrations` crate; these mirror it.

macro_rules! no_relations {
    () => {
        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}
        impl ActiveModelBehavior for ActiveModel {}
    };
}

pub mod base_model {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "base_models")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        #[sea_orm(unique)]
        pub name: String,
        pub architecture: Option<String>,
        #[sea_orm(column_type = "JsonBinary")]
        pub dims: Json,
        pub digest: Option<String>,
        pub description: Option<String>,
        pub created_by: String,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

pub mod adapter {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "adapters")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        #[sea_orm(unique)]
        pub name: String,
        pub base_model: String,
        pub latest_version: i32,
        pub stable_version: Option<i32>,
        pub active_rollout_id: Option<i32>,
        pub created_by: String,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

pub mod adapter_version {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "adapter_versions")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub adapter_id: i32,
        pub version: i32,
        pub digest: String,
        pub base_model: String,
        #[sea_orm(column_type = "JsonBinary")]
        pub config: Json,
        #[sea_orm(column_type = "JsonBinary")]
        pub summary: Json,
        #[sea_orm(column_type = "JsonBinary", nullable)]
        pub lineage: Option<Json>,
        pub size_bytes: i64,
        pub upload_id: String,
        pub created_by: String,
        pub created_at: DateTimeUtc,
        /// The training run that produced it (`run_id` of the pushed manifest).
        pub run_id: Option<String>,
    }
    no_relations!();
}

pub mod version_file {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "version_files")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub version_id: i32,
        pub name: String,
        pub sha256: String,
        pub size: i64,
        pub blob_key: String,
    }
    no_relations!();
}

pub mod upload {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "uploads")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub adapter: String,
        pub started_at: DateTimeUtc,
    }
    no_relations!();
}

pub mod evidence {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "evidence")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub version_id: i32,
        pub adapter_digest: String,
        pub suite_name: String,
        pub suite_digest: String,
        #[sea_orm(column_type = "JsonBinary")]
        pub body: Json,
        pub created_by: String,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

pub mod gate {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "gates")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub scope: String,
        #[sea_orm(column_type = "JsonBinary")]
        pub policy: Json,
        pub updated_by: String,
        pub updated_at: DateTimeUtc,
    }
    no_relations!();
}

pub mod rollout {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "rollouts")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub adapter_id: i32,
        pub version: i32,
        pub from_version: Option<i32>,
        pub state: String,
        pub step_index: i32,
        pub weight: f64,
        pub failures: i32,
        #[sea_orm(column_type = "JsonBinary")]
        pub spec: Json,
        pub row_version: i32,
        /// Start of the open analysis interval.
        pub last_analysis_at: Option<DateTimeUtc>,
        pub created_by: String,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        /// When the current step (or the shadow phase) began or was last resumed: `max_hold`.
        pub step_started_at: Option<DateTimeUtc>,
        /// When users first saw the canary; `None` while in the shadow phase.
        pub canary_since: Option<DateTimeUtc>,
        /// The phase's observations folded before `last_analysis_at` (`analysis::Arms`).
        #[sea_orm(column_type = "JsonBinary", nullable)]
        pub cumulative: Option<Json>,
    }
    no_relations!();
}

pub mod routing_state {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "routing_state")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        pub revision: i64,
        pub updated_at: DateTimeUtc,
    }
    no_relations!();
}

pub mod rollout_event {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "rollout_events")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub rollout_id: i32,
        pub at: DateTimeUtc,
        pub actor: String,
        pub action: String,
        pub from_state: Option<String>,
        pub to_state: String,
        pub weight: f64,
        #[sea_orm(column_type = "Text")]
        pub reason: String,
        #[sea_orm(column_type = "JsonBinary", nullable)]
        pub observations: Option<Json>,
    }
    no_relations!();
}

pub mod observation {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "observations")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub gateway: String,
        pub adapter_id: i32,
        pub version: i32,
        pub arm: String,
        pub window_start: DateTimeUtc,
        pub window_end: DateTimeUtc,
        pub requests: i64,
        pub errors: i64,
        pub tokens: i64,
        /// `[[upper_bound_ms, cumulative_count], …]`
        #[sea_orm(column_type = "JsonBinary")]
        pub latency: Json,
        pub received_at: DateTimeUtc,
        /// Sum of the online judge's scores (each in [0, 1]) over `judge_scored` answers.
        pub judge_score_sum: f64,
        pub judge_scored: i64,
        /// Retries of one report carry the same id and are stored once.
        pub report_id: String,
        pub answers: i64,
        pub tokens_sq: f64,
        pub judge_score_sq: f64,
        pub agreement_scored: i64,
        pub agreement_sum: f64,
        /// `[[group, requests, errors], …]`
        #[sea_orm(column_type = "JsonBinary", nullable)]
        pub users: Option<Json>,
    }
    no_relations!();
}

pub mod gateway_seen {
    use sea_orm::entity::prelude::*;

    /// The gateways that reported, and whether each has an online judge.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "gateways")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub judge: Option<String>,
        pub last_seen: DateTimeUtc,
    }
    no_relations!();
}

pub mod base_evidence {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "base_evidence")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub base_model: String,
        pub model_digest: String,
        pub suite_name: String,
        pub suite_digest: String,
        #[sea_orm(column_type = "JsonBinary")]
        pub body: Json,
        pub created_by: String,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

pub mod lease {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "leases")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        pub holder: String,
        pub expires_at: DateTimeUtc,
    }
    no_relations!();
}

pub mod suite {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "suites")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub name: String,
        pub version: String,
        pub digest: String,
        #[sea_orm(column_type = "JsonBinary")]
        pub manifest: Json,
        pub cases: i64,
        pub size_bytes: i64,
        pub blob_key: String,
        pub created_by: String,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

pub mod webhook_delivery {
    use sea_orm::entity::prelude::*;

    /// Pending while `next_attempt_at` is set; delivered, or given up after the last attempt,
    /// when it is cleared.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "webhook_deliveries")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        /// The same for every endpoint and every retry: receivers deduplicate on it.
        pub event_id: String,
        pub event_type: String,
        #[sea_orm(column_type = "Text")]
        pub endpoint: String,
        #[sea_orm(column_type = "JsonBinary")]
        pub payload: Json,
        pub attempts: i32,
        pub next_attempt_at: Option<DateTimeUtc>,
        pub delivered_at: Option<DateTimeUtc>,
        #[sea_orm(column_type = "Text", nullable)]
        pub last_error: Option<String>,
        pub created_at: DateTimeUtc,
    }
    no_relations!();
}

pub mod run {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "runs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub adapter: Option<String>,
        pub method: String,
        pub base_model: String,
        pub status: String,
        #[sea_orm(column_type = "JsonBinary")]
        pub config: Json,
        #[sea_orm(column_type = "JsonBinary")]
        pub datasets: Json,
        pub total_steps: i64,
        pub last_step: i64,
        #[sea_orm(column_type = "JsonBinary", nullable)]
        pub summary: Option<Json>,
        pub created_by: String,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        pub ended_at: Option<DateTimeUtc>,
    }
    no_relations!();
}

pub mod run_metric {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "run_metrics")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub run_id: String,
        pub name: String,
        pub step: i64,
        pub value: f64,
    }
    no_relations!();
}
