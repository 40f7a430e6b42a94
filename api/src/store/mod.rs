//! Storage: the only module that knows sea-orm. It opens the database (SQLite by default,
//! PostgreSQL by URL), applies migrations, and offers queries that speak domain records.
//!
//! SQLite runs in WAL mode with a 5 s busy timeout, and every write transaction is opened
//! `BEGIN IMMEDIATE` (see [`Store::begin_write`]): a deferred transaction that reads and then
//! writes gets `SQLITE_BUSY` at once under concurrency, and no busy timeout rescues it.
//! `synchronous = FULL`: WAL with `NORMAL` may lose the last commits on power loss, and this
//! database will hold a credit ledger, so every commit is made durable before it is reported.

pub mod accounts;
pub mod audit;
pub mod credits;
pub(crate) mod entities;
pub mod limits;
pub mod messaging;
pub mod notify;
pub mod users;

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection,
    DatabaseTransaction, DbErr, SqlErr, SqliteTransactionMode, TransactionOptions,
    TransactionTrait,
};

/// A storage failure. Never shown to clients; the domain wraps it as an internal error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed the operation.
    #[error("database error")]
    Database(#[from] DbErr),
    /// A stored value no longer parses (a bug or a hand-edited row).
    #[error("corrupt row in {table}: {problem}")]
    Corrupt {
        /// Which table.
        table: &'static str,
        /// What did not parse.
        problem: String,
    },
}

/// The advisory lock key migrations run under on PostgreSQL (an arbitrary constant, ASCII
/// "smdmigr" as a number).
const MIGRATION_LOCK_KEY: i64 = 0x0073_6d64_6d69_6772;

/// A sqlx error (from the few places that use sea-orm's sqlx pool directly) as a store error.
fn sqlx_error(error: sea_orm::sqlx::Error) -> StoreError {
    StoreError::Database(DbErr::Conn(sea_orm::RuntimeErr::SqlxError(error.into())))
}

/// Whether an error is a unique-constraint violation, on either backend.
pub(crate) fn is_unique_violation(error: &DbErr) -> bool {
    matches!(error.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// How much of the connection pool is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections open (idle or in use).
    pub open: u32,
    /// Of those, idle.
    pub idle: u32,
}

/// The database handle shared by every service.
#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
}

impl Store {
    /// Opens a pool on `database_url` (`sqlite://…` or `postgres://…`).
    pub async fn connect(database_url: &str) -> Result<Self, StoreError> {
        let mut options = ConnectOptions::new(database_url.to_owned());
        options
            .max_connections(8)
            .min_connections(1)
            .connect_timeout(Duration::from_secs(10))
            .acquire_timeout(Duration::from_secs(10))
            .sqlx_logging(false)
            .map_sqlx_sqlite_opts(|sqlite| {
                sqlite
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(5))
                    .foreign_keys(true)
            });
        let db = Database::connect(options).await?;
        Ok(Self { db })
    }

    /// Applies every pending migration. On PostgreSQL, under a session advisory lock held on
    /// one connection of the pool for the whole run: nodes starting together on an empty
    /// database queue behind the first, which applies everything, and then find nothing left
    /// to do (sea-orm-migration alone would let them race to create the same tables). SQLite
    /// serialises writers itself and is one node's database.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        if self.db.get_database_backend() != DatabaseBackend::Postgres {
            Migrator::up(&self.db, None).await?;
            return Ok(());
        }
        let pool = self.db.get_postgres_connection_pool();
        let mut holder = pool.acquire().await.map_err(sqlx_error)?;
        sea_orm::sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATION_LOCK_KEY)
            .execute(&mut *holder)
            .await
            .map_err(sqlx_error)?;
        let applied = Migrator::up(&self.db, None).await;
        let unlocked = sea_orm::sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MIGRATION_LOCK_KEY)
            .execute(&mut *holder)
            .await;
        if unlocked.is_err() {
            // Closing the session releases the lock in any case.
            holder.close_on_drop();
        }
        applied?;
        Ok(())
    }

    /// Checks that the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.ping().await?;
        Ok(())
    }

    /// The connection pool's use right now: open connections and how many of them are idle.
    pub fn pool_stats(&self) -> PoolStats {
        let (open, idle) = match self.db.get_database_backend() {
            DatabaseBackend::Sqlite => {
                let pool = self.db.get_sqlite_connection_pool();
                (pool.size(), pool.num_idle())
            }
            DatabaseBackend::Postgres => {
                let pool = self.db.get_postgres_connection_pool();
                (pool.size(), pool.num_idle())
            }
            _ => (0, 0),
        };
        PoolStats {
            open,
            idle: u32::try_from(idle).unwrap_or(u32::MAX),
        }
    }

    /// The backend in use, for log lines and the start-up banner.
    pub fn backend_name(&self) -> &'static str {
        match self.db.get_database_backend() {
            DatabaseBackend::Sqlite => "sqlite",
            DatabaseBackend::Postgres => "postgresql",
            _ => "other",
        }
    }

    /// Opens a transaction that will write. On SQLite it takes the write lock up front.
    pub(crate) async fn begin_write(&self) -> Result<DatabaseTransaction, DbErr> {
        match self.db.get_database_backend() {
            DatabaseBackend::Sqlite => {
                self.db
                    .begin_with_options(TransactionOptions {
                        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                        ..TransactionOptions::default()
                    })
                    .await
            }
            _ => self.db.begin().await,
        }
    }

    pub(crate) fn connection(&self) -> &impl ConnectionTrait {
        &self.db
    }

    /// Closes the pool (tests and shutdown).
    pub async fn close(self) -> Result<(), StoreError> {
        self.db.close().await?;
        Ok(())
    }
}

/// A write transaction handed to services that compose several changes (a message and its
/// debit). It keeps sea-orm's type inside `store/`.
pub struct Transaction(pub(crate) DatabaseTransaction);

impl Transaction {
    /// Makes every change durable.
    pub async fn commit(self) -> Result<(), StoreError> {
        self.0.commit().await?;
        Ok(())
    }

    /// Undoes every change.
    pub async fn rollback(self) -> Result<(), StoreError> {
        self.0.rollback().await?;
        Ok(())
    }
}

/// Milliseconds since the epoch, the unit of every stored timestamp.
pub(crate) fn to_millis(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

/// The inverse of [`to_millis`].
pub(crate) fn from_millis(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(millis)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A fresh time-ordered id.
pub(crate) fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

impl Store {
    /// Counts the rows of one of the gateway's tables. For tests and diagnostics that must
    /// prove nothing was stored; the table name is checked against the known tables.
    #[doc(hidden)]
    pub async fn count_rows_for_tests(&self, table: &str) -> i64 {
        const TABLES: [&str; 13] = [
            "groups",
            "users",
            "provider_accounts",
            "provider_links",
            "audit_events",
            "payment_methods",
            "wallets",
            "ledger_entries",
            "purchases",
            "idempotency_keys",
            "patients",
            "clinical_notes",
            "messages",
        ];
        assert!(TABLES.contains(&table), "unknown table {table}");
        let statement = sea_orm::Statement::from_string(
            self.db.get_database_backend(),
            format!("SELECT COUNT(*) AS n FROM {table}"),
        );
        let row = self
            .db
            .query_one_raw(statement)
            .await
            .expect("count query")
            .expect("one row");
        row.try_get::<i64>("", "n").expect("count column")
    }
}
