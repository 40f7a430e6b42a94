//! Change notifications between gateway nodes on PostgreSQL: one `LISTEN` connection per node
//! that hands every notification to the node's [`EventBus`], and `pg_notify` for the events no
//! trigger publishes. See `crate::events` for the design.
//!
//! The listening connection is outside the pool (its own one-connection pool) and names itself
//! `smd-gateway-events` in `pg_stat_activity`. When it is lost (network, restart, a terminated
//! backend) the listener reconnects with a growing pause (0.1 s doubling to 5 s), `LISTEN`s
//! again, and only then publishes [`Event::Resync`] locally, so every subscriber re-reads once
//! *after* it can hear again: a change that committed while the node was deaf is picked up by
//! that re-read, and one that commits after it is heard.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Store, StoreError, sqlx_error};
use crate::events::{CHANNEL, Event, EventBus, SharedChannel};

/// The `application_name` of each node's listening connection.
pub const LISTENER_APPLICATION_NAME: &str = "smd-gateway-events";

/// Publishes events through `pg_notify` on the store's pool (after the change committed).
#[derive(Debug)]
struct PgChannel {
    db: DatabaseConnection,
}

impl SharedChannel for PgChannel {
    fn send(&self, event: Event) {
        let db = self.db.clone();
        tokio::spawn(async move {
            let statement = Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                "SELECT pg_notify($1, $2)",
                [CHANNEL.into(), event.to_payload().into()],
            );
            if let Err(error) = db.execute_raw(statement).await {
                tracing::warn!(error = ?error, "could not publish a change notification");
            }
        });
    }
}

impl Store {
    /// The bus this node's services publish on: shared between nodes through the database on
    /// PostgreSQL, in-process on SQLite.
    pub fn event_bus(&self) -> EventBus {
        match self.db.get_database_backend() {
            DatabaseBackend::Postgres => EventBus::shared(Arc::new(PgChannel {
                db: self.db.clone(),
            })),
            _ => EventBus::new(),
        }
    }

    /// On PostgreSQL, starts `LISTEN`ing (returning once the first `LISTEN` is in place, so
    /// nothing committed after start-up is missed) and hands notifications to `bus` until
    /// `shutdown`. `None` on SQLite, where the bus is fed in-process.
    pub async fn listen_for_changes(
        &self,
        bus: EventBus,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Option<JoinHandle<()>>, StoreError> {
        if self.db.get_database_backend() != DatabaseBackend::Postgres {
            return Ok(None);
        }
        let options = (*self.db.get_postgres_connection_pool().connect_options())
            .clone()
            .application_name(LISTENER_APPLICATION_NAME);
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with(options);
        let listener = start_listening(&pool).await.map_err(sqlx_error)?;
        Ok(Some(tokio::spawn(relay(pool, listener, bus, shutdown))))
    }
}

async fn start_listening(pool: &PgPool) -> Result<PgListener, sea_orm::sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Hands notifications to the bus; after a lost connection, reconnects and resyncs.
async fn relay(
    pool: PgPool,
    listener: PgListener,
    bus: EventBus,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut listener = Some(listener);
    let mut pause = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            break;
        }
        let Some(current) = listener.as_mut() else {
            tokio::select! {
                _ = shutdown.changed() => break,
                () = tokio::time::sleep(pause) => {}
            }
            match start_listening(&pool).await {
                Ok(fresh) => {
                    tracing::info!("change notifications: listening again; subscribers re-read");
                    listener = Some(fresh);
                    pause = Duration::from_millis(100);
                    bus.deliver(Event::Resync);
                }
                Err(error) => {
                    tracing::warn!(error = ?error, retry_in_ms = pause.as_millis() as u64 * 2, "change notifications: cannot listen yet");
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
            continue;
        };
        tokio::select! {
            _ = shutdown.changed() => break,
            received = current.try_recv() => match received {
                Ok(Some(notification)) => bus.deliver(Event::from_payload(notification.payload())),
                Ok(None) => {
                    // sqlx reconnected and listens again already.
                    tracing::warn!("change notifications: connection lost and re-established; subscribers re-read");
                    bus.deliver(Event::Resync);
                }
                Err(error) => {
                    tracing::warn!(error = ?error, "change notifications: connection lost; reconnecting");
                    listener = None;
                }
            },
        }
    }
    if let Some(mut listener) = listener {
        let _ = listener.unlisten_all().await;
    }
    pool.close().await;
}
