//! The gateway's schema history: one list of migrations that runs unchanged on SQLite and
//! PostgreSQL. Timestamps are BIGINT milliseconds since the Unix epoch and money or credits are
//! BIGINT, so both backends compare and sum them the same way.

pub use sea_orm_migration::prelude::*;

mod m20261124_000001_accounts;
mod m20261125_000002_credits;
mod m20261125_000003_messaging;
mod m20261201_000004_limits;
mod m20261201_000005_hpii_inbox;
mod m20261202_000006_delegations;
mod m20261202_000007_attention_caps;
mod m20261202_000008_change_notifications;

/// Applies the gateway's migrations, in order.
pub struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261124_000001_accounts::Migration),
            Box::new(m20261125_000002_credits::Migration),
            Box::new(m20261125_000003_messaging::Migration),
            Box::new(m20261201_000004_limits::Migration),
            Box::new(m20261201_000005_hpii_inbox::Migration),
            Box::new(m20261202_000006_delegations::Migration),
            Box::new(m20261202_000007_attention_caps::Migration),
            Box::new(m20261202_000008_change_notifications::Migration),
        ]
    }
}
