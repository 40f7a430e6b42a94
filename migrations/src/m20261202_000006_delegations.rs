//! Delegated sending: a practitioner's grant to another user of the practice to send secure
//! messages on their behalf, and the audit trail's second person.
//!
//! One row per (practitioner, delegate) pair, unique: granting again renews the row (new
//! expiry, revocation cleared) instead of piling up rows, so "is there a live grant" is a
//! single-row read that a send locks (`FOR UPDATE` on PostgreSQL; SQLite's write transaction
//! already serialises it) in the transaction that debits the practitioner's wallet. A revoke
//! updates that row, so it waits for sends holding it and every later send sees it revoked.
//! The history of grants and revokes is in the audit trail.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum SendingDelegations {
    Table,
    Id,
    GroupId,
    PractitionerUserId,
    DelegateUserId,
    GrantedAt,
    ExpiresAt,
    RevokedAt,
}

#[derive(DeriveIden)]
enum AuditEvents {
    Table,
    OnBehalfOfSubject,
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SendingDelegations::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(SendingDelegations::Id)
                            .string_len(36)
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(SendingDelegations::GroupId)
                            .string_len(128)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SendingDelegations::PractitionerUserId)
                            .string_len(36)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SendingDelegations::DelegateUserId)
                            .string_len(36)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SendingDelegations::GrantedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SendingDelegations::ExpiresAt)
                            .big_integer()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(SendingDelegations::RevokedAt)
                            .big_integer()
                            .null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_sending_delegations_pair")
                    .table(SendingDelegations::Table)
                    .col(SendingDelegations::PractitionerUserId)
                    .col(SendingDelegations::DelegateUserId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        // "What do I hold" lists by delegate.
        manager
            .create_index(
                Index::create()
                    .name("ix_sending_delegations_delegate")
                    .table(SendingDelegations::Table)
                    .col(SendingDelegations::DelegateUserId)
                    .to_owned(),
            )
            .await?;
        // The practitioner an action was done for, when someone acted on their behalf (the
        // actor stays in `actor_subject`). NULL for everything done in one's own name.
        manager
            .alter_table(
                Table::alter()
                    .table(AuditEvents::Table)
                    .add_column(
                        ColumnDef::new(AuditEvents::OnBehalfOfSubject)
                            .string_len(256)
                            .null(),
                    )
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(AuditEvents::Table)
                    .drop_column(AuditEvents::OnBehalfOfSubject)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(SendingDelegations::Table).to_owned())
            .await?;
        Ok(())
    }
}
