//! Storage: the only module that knows sea-orm. It opens the database (SQLite by default,
//! PostgreSQL by URL), applies migrations, and offers queries that speak domain records.
//!
//! SQLite runs in WAL mode with a 5 s busy timeout, and every write transaction is opened
//! `BEGIN IMMEDIATE` (see [`Store::begin_write`]): a deferred transaction that reads and then
//! writes gets `SQLITE_BUSY` at once under concurrency, and no busy timeout rescues it.
//!
//! Durability, with group commit. This database holds a credit ledger, so every commit is
//! durable before it is reported. SQLite's `synchronous = FULL` does that with one `fsync` of
//! the WAL per commit, made while the transaction still holds the database's only write lock,
//! so concurrent writers queue behind each other's disk flushes. Instead, a file database runs
//! `synchronous = NORMAL` (a commit appends its frames to the WAL without flushing; checkpoints
//! and WAL resets still flush as SQLite requires) and every write transaction's
//! [`WriteTxn::commit`] then waits on [`wal_sync::WalSync`]: one task flushes the WAL file with
//! `fdatasync` for every commit that finished before the flush began. Commits that arrive
//! during a flush share the next one, so N concurrent commits cost about one or two flushes
//! instead of N, and the write lock is held only for the commit itself. A writer is answered
//! only after its flush returns; if a flush fails, the commit is reported as failed. The
//! autocommit writes outside [`Store::begin_write`] (an audit row, released attempt slots) wait
//! on the same flush. On PostgreSQL nothing changes: its WAL writer already flushes concurrent
//! commits together. An in-memory SQLite database (tests) has nothing to flush.

pub mod accounts;
pub mod audit;
pub mod credits;
pub mod delegations;
pub(crate) mod entities;
pub mod limits;
pub mod messaging;
pub mod notify;
pub mod users;
pub(crate) mod wal_sync;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection,
    DatabaseTransaction, DbBackend, DbErr, ExecResult, QueryResult, SqlErr, SqliteTransactionMode,
    Statement, TransactionOptions, TransactionTrait,
};

use wal_sync::WalSync;

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
    /// Flushes the WAL for committed writes (a SQLite file database only).
    wal: Option<Arc<WalSync>>,
    /// SQLite's one write lock, taken in this process first (see [`Store::begin_write`]).
    write_gate: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl Store {
    /// Opens a pool on `database_url` (`sqlite://…` or `postgres://…`).
    pub async fn connect(database_url: &str) -> Result<Self, StoreError> {
        let wal = wal_sync::wal_path(database_url).map(|path| Arc::new(WalSync::start(path)));
        let synchronous = if wal.is_some() {
            SqliteSynchronous::Normal
        } else {
            SqliteSynchronous::Full
        };
        let mut options = ConnectOptions::new(database_url.to_owned());
        options
            .max_connections(8)
            .min_connections(1)
            .connect_timeout(Duration::from_secs(10))
            .acquire_timeout(Duration::from_secs(10))
            .sqlx_logging(false)
            .map_sqlx_sqlite_opts(move |sqlite| {
                sqlite
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(synchronous)
                    .busy_timeout(Duration::from_secs(5))
                    .foreign_keys(true)
            });
        let db = Database::connect(options).await?;
        let write_gate = (db.get_database_backend() == DatabaseBackend::Sqlite)
            .then(|| Arc::new(tokio::sync::Mutex::new(())));
        Ok(Self {
            db,
            wal,
            write_gate,
        })
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

    /// Opens a transaction that will write. On SQLite it takes the write lock up front; its
    /// [`WriteTxn::commit`] returns once the commit is on disk.
    ///
    /// SQLite has one write lock per database. A writer that finds it taken sleeps in SQLite's
    /// busy handler (1 ms, then 2, 5, 10 … up to 100 ms between tries), so under load writers
    /// wait long after the lock came free. Writers of this process therefore queue first, in
    /// order, on an in-process gate, and start `BEGIN IMMEDIATE` only when it is their turn;
    /// the gate is held until the commit or rollback (not during the WAL flush, so the next
    /// writer proceeds while this one's commit reaches the disk). Another process on the same
    /// file still meets the busy handler. No code may open a second write transaction while
    /// holding one (it would wait on itself); reads never take the gate.
    pub(crate) async fn begin_write(&self) -> Result<WriteTxn, DbErr> {
        let turn = match &self.write_gate {
            Some(gate) => Some(gate.clone().lock_owned().await),
            None => None,
        };
        let txn = match self.db.get_database_backend() {
            DatabaseBackend::Sqlite => {
                self.db
                    .begin_with_options(TransactionOptions {
                        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                        ..TransactionOptions::default()
                    })
                    .await?
            }
            _ => self.db.begin().await?,
        };
        Ok(WriteTxn {
            txn,
            wal: self.wal.clone(),
            turn,
        })
    }

    /// Waits until every write committed so far is on disk (after an autocommit write).
    pub(crate) async fn flushed(&self) -> Result<(), DbErr> {
        match &self.wal {
            Some(wal) => wal.flush().await,
            None => Ok(()),
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

/// A write transaction whose commit is reported only once it is durable (see the module
/// notes). It runs statements like sea-orm's transaction it wraps.
pub(crate) struct WriteTxn {
    txn: DatabaseTransaction,
    wal: Option<Arc<WalSync>>,
    /// This writer's turn at the SQLite write gate, until commit or rollback.
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl WriteTxn {
    /// Commits, lets the next writer in, then waits until the commit is on disk.
    pub(crate) async fn commit(self) -> Result<(), DbErr> {
        let WriteTxn { txn, wal, turn } = self;
        let committed = txn.commit().await;
        drop(turn);
        committed?;
        match wal {
            Some(wal) => wal.flush().await,
            None => Ok(()),
        }
    }

    /// Undoes every change.
    pub(crate) async fn rollback(self) -> Result<(), DbErr> {
        let WriteTxn { txn, turn, .. } = self;
        let rolled_back = txn.rollback().await;
        drop(turn);
        rolled_back
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for WriteTxn {
    fn get_database_backend(&self) -> DbBackend {
        self.txn.get_database_backend()
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        self.txn.execute_raw(stmt).await
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        self.txn.execute_unprepared(sql).await
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        self.txn.query_one_raw(stmt).await
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        self.txn.query_all_raw(stmt).await
    }
}

/// A write transaction handed to services that compose several changes (a message and its
/// debit). It keeps sea-orm's type inside `store/`.
pub struct Transaction(pub(crate) WriteTxn);

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
        const TABLES: [&str; 15] = [
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
            "spending_caps",
            "sending_delegations",
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
