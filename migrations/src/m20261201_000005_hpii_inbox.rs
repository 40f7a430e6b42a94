//! HPI-I ownership and the practice's unassigned inbox.
//!
//! An inbound message that no practitioner's HPI-I matches waits, unassigned, in its practice's
//! inbox. It is stored with the sentinel owner `unassigned` in `messages.owner_user_id` rather
//! than a NULL owner: making that column nullable would need a table rebuild on SQLite (no
//! `ALTER COLUMN`), and every existing query that filters `owner_user_id = <caller>` then keeps
//! excluding unassigned messages without change. User ids are UUIDs, so the sentinel can never
//! be a real owner, and claiming a message is one conditional update
//! (`… WHERE owner_user_id = 'unassigned'`) that exactly one of many concurrent claims wins.
//! Only `store::messaging` knows the sentinel; everything above it sees `Option<String>`.
//!
//! "An HPI-I belongs to at most one practitioner of a practice" is the unique index
//! `ux_users_group_hpii` on `users (group_id, hpii)`, created with the column in
//! `m20261125_000003_messaging`; this migration does not repeat it (a second index on the same
//! columns would only slow writes down).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Messages {
    Table,
    GroupId,
    OwnerUserId,
    Id,
    AddressedHpii,
}

#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // The HPI-I an inbound message was addressed to (the referral's referred-to provider),
        // kept beside the sealed payload so the unassigned inbox can say whom a message was for
        // without opening clinical content. NULL for outbound messages and for inbound ones
        // addressed to no HPI-I.
        manager
            .alter_table(
                Table::alter()
                    .table(Messages::Table)
                    .add_column(
                        ColumnDef::new(Messages::AddressedHpii)
                            .string_len(16)
                            .null(),
                    )
                    .to_owned(),
            )
            .await?;
        // Lists a practice's unassigned inbox newest first without scanning other practices'
        // messages (`ix_messages_owner` starts with the owner, shared by every practice's
        // unassigned messages).
        manager
            .create_index(
                Index::create()
                    .name("ix_messages_group_owner")
                    .table(Messages::Table)
                    .col(Messages::GroupId)
                    .col(Messages::OwnerUserId)
                    .col(Messages::Id)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("ix_messages_group_owner")
                    .table(Messages::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Messages::Table)
                    .drop_column(Messages::AddressedHpii)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}
