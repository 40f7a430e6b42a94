//! Limits reserved before the work they limit, shared by every gateway node: attempt slots in
//! sliding windows (failed provider logins, login validations), and one provider account per
//! practice.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AttemptBuckets {
    Table,
    Bucket,
    TouchedAt,
}

#[derive(DeriveIden)]
enum AttemptSlots {
    Table,
    Id,
    Bucket,
    CreatedAt,
}

#[derive(DeriveIden)]
enum ProviderAccounts {
    Table,
    Provider,
    Username,
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One row per limited key (a user, a provider username). A reservation upserts it first,
        // which takes its row lock on PostgreSQL, so concurrent reservations for one key queue
        // behind each other on every node; SQLite's single writer serialises them anyway.
        manager
            .create_table(
                Table::create()
                    .table(AttemptBuckets::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(AttemptBuckets::Bucket)
                            .string_len(400)
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(AttemptBuckets::TouchedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        // One row per attempt that counts against a key's window.
        manager
            .create_table(
                Table::create()
                    .table(AttemptSlots::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(AttemptSlots::Id)
                            .string_len(36)
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(AttemptSlots::Bucket)
                            .string_len(400)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(AttemptSlots::CreatedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_attempt_slots_bucket_created")
                    .table(AttemptSlots::Table)
                    .col(AttemptSlots::Bucket)
                    .col(AttemptSlots::CreatedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        // A provider account belongs to one practice. Before this index two practices could
        // link one username; such a database must be cleaned up (one practice disconnects) before
        // upgrading, and the index creation says which constraint failed.
        manager
            .create_index(
                Index::create()
                    .name("ux_provider_accounts_provider_username")
                    .table(ProviderAccounts::Table)
                    .col(ProviderAccounts::Provider)
                    .col(ProviderAccounts::Username)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("ux_provider_accounts_provider_username")
                    .table(ProviderAccounts::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(AttemptSlots::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(AttemptBuckets::Table).to_owned())
            .await
    }
}
