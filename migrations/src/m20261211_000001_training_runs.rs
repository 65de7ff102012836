//! Training runs, as MLflow tracks them: a run with its configuration and datasets, its metric
//! points (one row per metric and step, so a resent batch is ignored by the unique key), and
//! the versions trained by it (`adapter_versions.run_id`, from the pushed manifest).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Runs {
    Table,
    Id,
    Adapter,
    Method,
    BaseModel,
    Status,
    Config,
    Datasets,
    TotalSteps,
    LastStep,
    Summary,
    CreatedBy,
    CreatedAt,
    UpdatedAt,
    EndedAt,
}

#[derive(DeriveIden)]
enum RunMetrics {
    Table,
    Id,
    RunId,
    Name,
    Step,
    Value,
}

#[derive(DeriveIden)]
enum AdapterVersions {
    Table,
    RunId,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Runs::Table)
                .col(string(Runs::Id).primary_key())
                .col(string_null(Runs::Adapter))
                .col(string(Runs::Method))
                .col(string(Runs::BaseModel))
                .col(string(Runs::Status))
                .col(json_binary(Runs::Config))
                .col(json_binary(Runs::Datasets))
                .col(big_integer(Runs::TotalSteps))
                .col(big_integer(Runs::LastStep))
                .col(json_binary_null(Runs::Summary))
                .col(string(Runs::CreatedBy))
                .col(timestamp_with_time_zone(Runs::CreatedAt))
                .col(timestamp_with_time_zone(Runs::UpdatedAt))
                .col(timestamp_with_time_zone_null(Runs::EndedAt))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_runs_adapter_created")
                .table(Runs::Table)
                .col(Runs::Adapter)
                .col(Runs::CreatedAt)
                .take(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(RunMetrics::Table)
                .col(pk_auto(RunMetrics::Id))
                .col(string(RunMetrics::RunId))
                .col(string(RunMetrics::Name))
                .col(big_integer(RunMetrics::Step))
                .col(double(RunMetrics::Value))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ux_run_metrics_point")
                .table(RunMetrics::Table)
                .col(RunMetrics::RunId)
                .col(RunMetrics::Step)
                .col(RunMetrics::Name)
                .unique()
                .take(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(AdapterVersions::Table)
                .add_column(string_null(AdapterVersions::RunId))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_adapter_versions_run")
                .table(AdapterVersions::Table)
                .col(AdapterVersions::RunId)
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(
            Index::drop()
                .name("ix_adapter_versions_run")
                .table(AdapterVersions::Table)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(AdapterVersions::Table)
                .drop_column(AdapterVersions::RunId)
                .take(),
        )
        .await?;
        m.drop_table(Table::drop().table(RunMetrics::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(Runs::Table).to_owned())
            .await
    }
}
