//! Evaluation suites: one row per suite version (name, version, content digest, manifest,
//! case count). The cases themselves live in the object store under
//! `suites/{digest-hex}/cases.jsonl`, named by the row's `blob_key`.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Suites {
    Table,
    Id,
    Name,
    Version,
    Digest,
    Manifest,
    Cases,
    SizeBytes,
    BlobKey,
    CreatedBy,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Suites::Table)
                .col(pk_auto(Suites::Id))
                .col(string(Suites::Name))
                .col(string(Suites::Version))
                .col(string_uniq(Suites::Digest))
                .col(json_binary(Suites::Manifest))
                .col(big_integer(Suites::Cases))
                .col(big_integer(Suites::SizeBytes))
                .col(string(Suites::BlobKey))
                .col(string(Suites::CreatedBy))
                .col(timestamp_with_time_zone(Suites::CreatedAt))
                .take(),
        )
        .await?;
        // A name and version identify one suite: re-uploading them with other content is refused.
        m.create_index(
            Index::create()
                .name("ux_suites_name_version")
                .table(Suites::Table)
                .col(Suites::Name)
                .col(Suites::Version)
                .unique()
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(Suites::Table).take())
            .await
    }
}
