//! Delivery alerts and monthly spending caps.
//!
//! **Alerts.** Three nullable BIGINT timestamps on `messages`, one per reason a sent message
//! needs attention: `flagged_undelivered_at` (accepted by the provider, not delivered in time),
//! `flagged_unacknowledged_at` (delivered, not acknowledged in time) and `expired_at` (accepted
//! but never delivered: the message became `FAILED`). A flag is set by one conditional update
//! (`… WHERE flagged_undelivered_at IS NULL AND status = 'SENT'`), so of any number of gateway
//! nodes flagging at once exactly one sets it, and a message is flagged at most once per
//! reason. One column per reason (rather than one "reason" column) keeps that rule a plain
//! `IS NULL` test and keeps the history: a message flagged undelivered that then expires holds
//! both times. Two indexes let the alert worker find candidates by status and age without
//! scanning delivered history.
//!
//! **Spending caps.** `spending_caps` holds at most one cap per practitioner and one for the
//! practice (`scope` is the practitioner's user id, or the sentinel `practice`, which can never
//! be a user id since those are UUIDs), in whole cents per calendar month (UTC). No row: no
//! cap. What a month has spent is summed from `purchases` (pending and succeeded), so the two
//! new indexes on `purchases` serve that sum per practitioner and per practice.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Messages {
    Table,
    Status,
    SentAt,
    DeliveredAt,
    FlaggedUndeliveredAt,
    FlaggedUnacknowledgedAt,
    ExpiredAt,
}

#[derive(DeriveIden)]
enum Purchases {
    Table,
    GroupId,
    UserId,
    CreatedAt,
}

#[derive(DeriveIden)]
enum SpendingCaps {
    Table,
    GroupId,
    Scope,
    MonthlyLimitCents,
    UpdatedByUserId,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Groups {
    Table,
    Id,
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite takes one column per ALTER TABLE.
        for column in [
            Messages::FlaggedUndeliveredAt,
            Messages::FlaggedUnacknowledgedAt,
            Messages::ExpiredAt,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Messages::Table)
                        .add_column(ColumnDef::new(column).big_integer().null())
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("ix_messages_status_sent_at")
                    .table(Messages::Table)
                    .col(Messages::Status)
                    .col(Messages::SentAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_messages_status_delivered_at")
                    .table(Messages::Table)
                    .col(Messages::Status)
                    .col(Messages::DeliveredAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SpendingCaps::Table)
                    .col(
                        ColumnDef::new(SpendingCaps::GroupId)
                            .string_len(128)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SpendingCaps::Scope)
                            .string_len(36)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SpendingCaps::MonthlyLimitCents)
                            .big_integer()
                            .not_null()
                            .check(Expr::col(SpendingCaps::MonthlyLimitCents).gte(0)),
                    )
                    .col(
                        ColumnDef::new(SpendingCaps::UpdatedByUserId)
                            .string_len(36)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SpendingCaps::UpdatedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(SpendingCaps::GroupId)
                            .col(SpendingCaps::Scope),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(SpendingCaps::Table, SpendingCaps::GroupId)
                            .to(Groups::Table, Groups::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_purchases_user_created")
                    .table(Purchases::Table)
                    .col(Purchases::UserId)
                    .col(Purchases::CreatedAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_purchases_group_created")
                    .table(Purchases::Table)
                    .col(Purchases::GroupId)
                    .col(Purchases::CreatedAt)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (name, table) in [
            ("ix_purchases_group_created", Purchases::Table.into_iden()),
            ("ix_purchases_user_created", Purchases::Table.into_iden()),
            (
                "ix_messages_status_delivered_at",
                Messages::Table.into_iden(),
            ),
            ("ix_messages_status_sent_at", Messages::Table.into_iden()),
        ] {
            manager
                .drop_index(Index::drop().name(name).table(table).to_owned())
                .await?;
        }
        manager
            .drop_table(Table::drop().table(SpendingCaps::Table).to_owned())
            .await?;
        for column in [
            Messages::ExpiredAt,
            Messages::FlaggedUnacknowledgedAt,
            Messages::FlaggedUndeliveredAt,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Messages::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
