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
        pub last_analysis_at: Option<DateTimeUtc>,
        pub created_by: String,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
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
