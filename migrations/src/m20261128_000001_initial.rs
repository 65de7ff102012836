//! Initial schema: base models, adapters, immutable versions and their files, pending uploads
//! (for orphan clean-up), evidence, gates, rollouts with their audit events, the routing
//! revision, gateway observations, and leases for the rollout controller.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum BaseModels {
    Table,
    Id,
    Name,
    Architecture,
    Dims,
    Digest,
    Description,
    CreatedBy,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Adapters {
    Table,
    Id,
    Name,
    BaseModel,
    LatestVersion,
    StableVersion,
    ActiveRolloutId,
    CreatedBy,
    CreatedAt,
}

#[derive(DeriveIden)]
enum AdapterVersions {
    Table,
    Id,
    AdapterId,
    Version,
    Digest,
    BaseModel,
    Config,
    Summary,
    Lineage,
    SizeBytes,
    UploadId,
    CreatedBy,
    CreatedAt,
}

#[derive(DeriveIden)]
enum VersionFiles {
    Table,
    Id,
    VersionId,
    Name,
    Sha256,
    Size,
    BlobKey,
}

#[derive(DeriveIden)]
enum Uploads {
    Table,
    Id,
    Adapter,
    StartedAt,
}

#[derive(DeriveIden)]
enum Evidence {
    Table,
    Id,
    VersionId,
    AdapterDigest,
    SuiteName,
    SuiteDigest,
    Body,
    CreatedBy,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Gates {
    Table,
    Scope,
    Policy,
    UpdatedBy,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Rollouts {
    Table,
    Id,
    AdapterId,
    Version,
    FromVersion,
    State,
    StepIndex,
    Weight,
    Failures,
    Spec,
    RowVersion,
    LastAnalysisAt,
    CreatedBy,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum RolloutEvents {
    Table,
    Id,
    RolloutId,
    At,
    Actor,
    Action,
    FromState,
    ToState,
    Weight,
    Reason,
    Observations,
}

#[derive(DeriveIden)]
enum RoutingState {
    Table,
    Id,
    Revision,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Observations {
    Table,
    Id,
    Gateway,
    AdapterId,
    Version,
    Arm,
    WindowStart,
    WindowEnd,
    Requests,
    Errors,
    Tokens,
    Latency,
    ReceivedAt,
}

#[derive(DeriveIden)]
enum Leases {
    Table,
    Name,
    Holder,
    ExpiresAt,
}

fn fk(
    from: (impl IntoIden, impl IntoIden),
    to: (impl IntoIden, impl IntoIden),
) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .from(from.0, from.1)
        .to(to.0, to.1)
        .on_delete(ForeignKeyAction::Cascade)
        .take()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(BaseModels::Table)
                .col(pk_auto(BaseModels::Id))
                .col(string_uniq(BaseModels::Name))
                .col(string_null(BaseModels::Architecture))
                .col(json_binary(BaseModels::Dims))
                .col(string_null(BaseModels::Digest))
                .col(text_null(BaseModels::Description))
                .col(string(BaseModels::CreatedBy))
                .col(timestamp_with_time_zone(BaseModels::CreatedAt))
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Adapters::Table)
                .col(pk_auto(Adapters::Id))
                .col(string_uniq(Adapters::Name))
                .col(string(Adapters::BaseModel))
                // Highest version number handed out; bumped inside the publishing transaction.
                .col(integer(Adapters::LatestVersion).default(0))
                .col(integer_null(Adapters::StableVersion))
                // At most one running or paused rollout per adapter.
                .col(integer_null(Adapters::ActiveRolloutId))
                .col(string(Adapters::CreatedBy))
                .col(timestamp_with_time_zone(Adapters::CreatedAt))
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(AdapterVersions::Table)
                .col(pk_auto(AdapterVersions::Id))
                .col(integer(AdapterVersions::AdapterId))
                .col(integer(AdapterVersions::Version))
                .col(string(AdapterVersions::Digest))
                .col(string(AdapterVersions::BaseModel))
                .col(json_binary(AdapterVersions::Config))
                .col(json_binary(AdapterVersions::Summary))
                .col(json_binary_null(AdapterVersions::Lineage))
                .col(big_integer(AdapterVersions::SizeBytes))
                .col(string(AdapterVersions::UploadId))
                .col(string(AdapterVersions::CreatedBy))
                .col(timestamp_with_time_zone(AdapterVersions::CreatedAt))
                .foreign_key(&mut fk(
                    (AdapterVersions::Table, AdapterVersions::AdapterId),
                    (Adapters::Table, Adapters::Id),
                ))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ux_adapter_versions_number")
                .table(AdapterVersions::Table)
                .col(AdapterVersions::AdapterId)
                .col(AdapterVersions::Version)
                .unique()
                .take(),
        )
        .await?;
        // Identical bytes pushed twice resolve to one version, even when the pushes race.
        m.create_index(
            Index::create()
                .name("ux_adapter_versions_digest")
                .table(AdapterVersions::Table)
                .col(AdapterVersions::AdapterId)
                .col(AdapterVersions::Digest)
                .unique()
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(VersionFiles::Table)
                .col(pk_auto(VersionFiles::Id))
                .col(integer(VersionFiles::VersionId))
                .col(string(VersionFiles::Name))
                .col(string(VersionFiles::Sha256))
                .col(big_integer(VersionFiles::Size))
                .col(string(VersionFiles::BlobKey))
                .foreign_key(&mut fk(
                    (VersionFiles::Table, VersionFiles::VersionId),
                    (AdapterVersions::Table, AdapterVersions::Id),
                ))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ux_version_files_name")
                .table(VersionFiles::Table)
                .col(VersionFiles::VersionId)
                .col(VersionFiles::Name)
                .unique()
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Uploads::Table)
                .col(string(Uploads::Id).primary_key())
                .col(string(Uploads::Adapter))
                .col(timestamp_with_time_zone(Uploads::StartedAt))
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Evidence::Table)
                .col(pk_auto(Evidence::Id))
                .col(integer(Evidence::VersionId))
                .col(string(Evidence::AdapterDigest))
                .col(string(Evidence::SuiteName))
                .col(string(Evidence::SuiteDigest))
                .col(json_binary(Evidence::Body))
                .col(string(Evidence::CreatedBy))
                .col(timestamp_with_time_zone(Evidence::CreatedAt))
                .foreign_key(&mut fk(
                    (Evidence::Table, Evidence::VersionId),
                    (AdapterVersions::Table, AdapterVersions::Id),
                ))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_evidence_version_suite")
                .table(Evidence::Table)
                .col(Evidence::VersionId)
                .col(Evidence::SuiteName)
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Gates::Table)
                // An adapter name, or `*` for the default policy.
                .col(string(Gates::Scope).primary_key())
                .col(json_binary(Gates::Policy))
                .col(string(Gates::UpdatedBy))
                .col(timestamp_with_time_zone(Gates::UpdatedAt))
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Rollouts::Table)
                .col(pk_auto(Rollouts::Id))
                .col(integer(Rollouts::AdapterId))
                .col(integer(Rollouts::Version))
                .col(integer_null(Rollouts::FromVersion))
                .col(string(Rollouts::State))
                .col(integer(Rollouts::StepIndex))
                .col(double(Rollouts::Weight))
                .col(integer(Rollouts::Failures))
                .col(json_binary(Rollouts::Spec))
                // Optimistic concurrency: every transition bumps it, guarded by its old value.
                .col(integer(Rollouts::RowVersion))
                .col(timestamp_with_time_zone_null(Rollouts::LastAnalysisAt))
                .col(string(Rollouts::CreatedBy))
                .col(timestamp_with_time_zone(Rollouts::CreatedAt))
                .col(timestamp_with_time_zone(Rollouts::UpdatedAt))
                .foreign_key(&mut fk(
                    (Rollouts::Table, Rollouts::AdapterId),
                    (Adapters::Table, Adapters::Id),
                ))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_rollouts_adapter_state")
                .table(Rollouts::Table)
                .col(Rollouts::AdapterId)
                .col(Rollouts::State)
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(RolloutEvents::Table)
                .col(pk_auto(RolloutEvents::Id))
                .col(integer(RolloutEvents::RolloutId))
                .col(timestamp_with_time_zone(RolloutEvents::At))
                .col(string(RolloutEvents::Actor))
                .col(string(RolloutEvents::Action))
                .col(string_null(RolloutEvents::FromState))
                .col(string(RolloutEvents::ToState))
                .col(double(RolloutEvents::Weight))
                .col(text(RolloutEvents::Reason))
                .col(json_binary_null(RolloutEvents::Observations))
                .foreign_key(&mut fk(
                    (RolloutEvents::Table, RolloutEvents::RolloutId),
                    (Rollouts::Table, Rollouts::Id),
                ))
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(RoutingState::Table)
                .col(integer(RoutingState::Id).primary_key())
                .col(big_integer(RoutingState::Revision))
                .col(timestamp_with_time_zone(RoutingState::UpdatedAt))
                .take(),
        )
        .await?;
        m.exec_stmt(
            Query::insert()
                .into_table(RoutingState::Table)
                .columns([
                    RoutingState::Id,
                    RoutingState::Revision,
                    RoutingState::UpdatedAt,
                ])
                .values_panic([1.into(), 1i64.into(), Expr::current_timestamp()])
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Observations::Table)
                .col(pk_auto(Observations::Id))
                .col(string(Observations::Gateway))
                .col(integer(Observations::AdapterId))
                .col(integer(Observations::Version))
                .col(string(Observations::Arm))
                .col(timestamp_with_time_zone(Observations::WindowStart))
                .col(timestamp_with_time_zone(Observations::WindowEnd))
                .col(big_integer(Observations::Requests))
                .col(big_integer(Observations::Errors))
                .col(big_integer(Observations::Tokens))
                .col(json_binary(Observations::Latency))
                .col(timestamp_with_time_zone(Observations::ReceivedAt))
                .foreign_key(&mut fk(
                    (Observations::Table, Observations::AdapterId),
                    (Adapters::Table, Adapters::Id),
                ))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_observations_arm_window")
                .table(Observations::Table)
                .col(Observations::AdapterId)
                .col(Observations::Version)
                .col(Observations::WindowEnd)
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Leases::Table)
                .col(string(Leases::Name).primary_key())
                .col(string(Leases::Holder))
                .col(timestamp_with_time_zone(Leases::ExpiresAt))
                .take(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            Leases::Table.into_iden(),
            Observations::Table.into_iden(),
            RoutingState::Table.into_iden(),
            RolloutEvents::Table.into_iden(),
            Rollouts::Table.into_iden(),
            Gates::Table.into_iden(),
            Evidence::Table.into_iden(),
            Uploads::Table.into_iden(),
            VersionFiles::Table.into_iden(),
            AdapterVersions::Table.into_iden(),
            Adapters::Table.into_iden(),
            BaseModels::Table.into_iden(),
        ] {
            m.drop_table(Table::drop().table(t).take()).await?;
        }
        Ok(())
    }
}
