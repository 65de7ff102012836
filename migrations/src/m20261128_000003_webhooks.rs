//! The webhook outbox: one row per (event, endpoint), written in the transaction that makes
//! the event, so a committed event is never lost and a rolled-back one is never sent. The
//! delivery task claims due rows, posts them, and records the outcome and the next attempt.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum WebhookDeliveries {
    Table,
    Id,
    EventId,
    EventType,
    Endpoint,
    Payload,
    Attempts,
    NextAttemptAt,
    DeliveredAt,
    LastError,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(WebhookDeliveries::Table)
                .col(pk_auto(WebhookDeliveries::Id))
                .col(string(WebhookDeliveries::EventId))
                .col(string(WebhookDeliveries::EventType))
                .col(text(WebhookDeliveries::Endpoint))
                .col(json_binary(WebhookDeliveries::Payload))
                .col(integer(WebhookDeliveries::Attempts))
                .col(timestamp_with_time_zone_null(
                    WebhookDeliveries::NextAttemptAt,
                ))
                .col(timestamp_with_time_zone_null(
                    WebhookDeliveries::DeliveredAt,
                ))
                .col(text_null(WebhookDeliveries::LastError))
                .col(timestamp_with_time_zone(WebhookDeliveries::CreatedAt))
                .take(),
        )
        .await?;
        // The delivery task's query: pending rows (next attempt set) in due order.
        m.create_index(
            Index::create()
                .name("ix_webhook_deliveries_next_attempt_at")
                .table(WebhookDeliveries::Table)
                .col(WebhookDeliveries::NextAttemptAt)
                .take(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(WebhookDeliveries::Table).take())
            .await
    }
}
