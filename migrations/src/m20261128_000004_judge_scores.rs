//! Online judge scores in the gateways' per-arm observations: the sum of the sampled answers'
//! scores (each in [0, 1]) and how many were scored, so windows add up exactly.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Observations {
    Table,
    JudgeScoreSum,
    JudgeScored,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite's ALTER TABLE adds one at a time.
        m.alter_table(
            Table::alter()
                .table(Observations::Table)
                .add_column(double(Observations::JudgeScoreSum).default(0.0))
                .take(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Observations::Table)
                .add_column(big_integer(Observations::JudgeScored).default(0))
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for col in [Observations::JudgeScoreSum, Observations::JudgeScored] {
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
