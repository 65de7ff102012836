//! Statistical rollouts: observations gain what the relative tests need (answers, sums of
//! squares, judge agreement, per-user-group counts) and a report id that makes a gateway's
//! retry idempotent; they are read by the registry's receive time through an index that
//! covers the analysis query. Rollouts gain their phase bookkeeping (shadow, step start,
//! the folded cumulative sample). New tables: the gateways that reported (and whether they
//! have an online judge) and evidence for base models.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Observations {
    Table,
    Id,
    AdapterId,
    Version,
    Arm,
    WindowEnd,
    ReceivedAt,
    ReportId,
    Answers,
    TokensSq,
    JudgeScoreSq,
    AgreementScored,
    AgreementSum,
    Users,
}

#[derive(DeriveIden)]
enum Rollouts {
    Table,
    CreatedAt,
    LastAnalysisAt,
    StepStartedAt,
    CanarySince,
    Cumulative,
}

#[derive(DeriveIden)]
enum Gateways {
    Table,
    Id,
    Judge,
    LastSeen,
}

#[derive(DeriveIden)]
enum BaseEvidence {
    Table,
    Id,
    BaseModel,
    ModelDigest,
    SuiteName,
    SuiteDigest,
    Body,
    CreatedBy,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite's ALTER TABLE adds one at a time.
        for col in [
            string(Observations::ReportId).default("").to_owned(),
            big_integer(Observations::Answers).default(0).to_owned(),
            double(Observations::TokensSq).default(0.0).to_owned(),
            double(Observations::JudgeScoreSq).default(0.0).to_owned(),
            big_integer(Observations::AgreementScored)
                .default(0)
                .to_owned(),
            double(Observations::AgreementSum).default(0.0).to_owned(),
            json_binary_null(Observations::Users),
        ] {
            let mut col = col;
            m.alter_table(
                Table::alter()
                    .table(Observations::Table)
                    .add_column(&mut col)
                    .take(),
            )
            .await?;
        }
        // Rows stored before report ids are each their own report.
        m.exec_stmt(
            Query::update()
                .table(Observations::Table)
                .value(
                    Observations::ReportId,
                    Expr::col(Observations::Id).cast_as("TEXT"),
                )
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ux_observations_report")
                .table(Observations::Table)
                .col(Observations::ReportId)
                .col(Observations::AdapterId)
                .col(Observations::Version)
                .col(Observations::Arm)
                .unique()
                .take(),
        )
        .await?;
        // The analysis reads one adapter's reports received after a time; retention deletes
        // by receive time alone.
        m.create_index(
            Index::create()
                .name("ix_observations_adapter_received")
                .table(Observations::Table)
                .col(Observations::AdapterId)
                .col(Observations::ReceivedAt)
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_observations_received")
                .table(Observations::Table)
                .col(Observations::ReceivedAt)
                .take(),
        )
        .await?;
        m.drop_index(
            Index::drop()
                .name("ix_observations_arm_window")
                .table(Observations::Table)
                .to_owned(),
        )
        .await?;

        for col in [
            timestamp_with_time_zone_null(Rollouts::StepStartedAt),
            timestamp_with_time_zone_null(Rollouts::CanarySince),
            json_binary_null(Rollouts::Cumulative),
        ] {
            let mut col = col;
            m.alter_table(
                Table::alter()
                    .table(Rollouts::Table)
                    .add_column(&mut col)
                    .take(),
            )
            .await?;
        }
        // Rollouts started before shadow phases were canaries from their start.
        m.exec_stmt(
            Query::update()
                .table(Rollouts::Table)
                .value(Rollouts::CanarySince, Expr::col(Rollouts::CreatedAt))
                .value(
                    Rollouts::StepStartedAt,
                    Func::coalesce([
                        Expr::col(Rollouts::LastAnalysisAt),
                        Expr::col(Rollouts::CreatedAt),
                    ]),
                )
                .take(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table(Gateways::Table)
                .col(string(Gateways::Id).primary_key())
                .col(string_null(Gateways::Judge))
                .col(timestamp_with_time_zone(Gateways::LastSeen))
                .take(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(BaseEvidence::Table)
                .col(pk_auto(BaseEvidence::Id))
                .col(string(BaseEvidence::BaseModel))
                .col(string(BaseEvidence::ModelDigest))
                .col(string(BaseEvidence::SuiteName))
                .col(string(BaseEvidence::SuiteDigest))
                .col(json_binary(BaseEvidence::Body))
                .col(string(BaseEvidence::CreatedBy))
                .col(timestamp_with_time_zone(BaseEvidence::CreatedAt))
                .take(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ix_base_evidence_suite")
                .table(BaseEvidence::Table)
                .col(BaseEvidence::BaseModel)
                .col(BaseEvidence::SuiteDigest)
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(BaseEvidence::Table).take())
            .await?;
        m.drop_table(Table::drop().table(Gateways::Table).take())
            .await?;
        for col in [
            Rollouts::StepStartedAt,
            Rollouts::CanarySince,
            Rollouts::Cumulative,
        ] {
            m.alter_table(
                Table::alter()
                    .table(Rollouts::Table)
                    .drop_column(col)
                    .take(),
            )
            .await?;
        }
        for name in [
            "ux_observations_report",
            "ix_observations_adapter_received",
            "ix_observations_received",
        ] {
            m.drop_index(
                Index::drop()
                    .name(name)
                    .table(Observations::Table)
                    .to_owned(),
            )
            .await?;
        }
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
        for col in [
            Observations::ReportId,
            Observations::Answers,
            Observations::TokensSq,
            Observations::JudgeScoreSq,
            Observations::AgreementScored,
            Observations::AgreementSum,
            Observations::Users,
        ] {
            m.alter_table(
                Table::alter()
                    .table(Observations::Table)
                    .drop_column(col)
                    .take(),
            )
            .await?;
        }
        Ok(())
    }
}
