//! Group commit for a SQLite file database: one task flushes the WAL (`fdatasync`) on behalf of
//! every commit that finished before the flush began. See the notes in `store/mod.rs`.

use std::path::PathBuf;

use sea_orm::DbErr;
use tokio::sync::{mpsc, oneshot};

/// The WAL file of a `sqlite:` URL that names a file, or `None` (in-memory, or not SQLite).
pub(crate) fn wal_path(database_url: &str) -> Option<PathBuf> {
    let rest = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory = path.is_empty()
        || path == ":memory:"
        || query
            .split('&')
            .any(|pair| pair == "mode=memory" || pair.starts_with("vfs=memdb"));
    if in_memory {
        return None;
    }
    Some(PathBuf::from(format!("{path}-wal")))
}

/// The handle writers wait on.
#[derive(Debug)]
pub(crate) struct WalSync {
    requests: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
}

impl WalSync {
    /// Starts the flushing task for the WAL at `path` (on the current tokio runtime).
    pub(crate) fn start(path: PathBuf) -> Self {
        let (requests, mut waiting) =
            mpsc::unbounded_channel::<oneshot::Sender<Result<(), String>>>();
        tokio::spawn(async move {
            // Sleep until someone has committed; then take everyone who has, flush once,
            // answer them all. Whoever commits during a flush is taken by the next round.
            while let Some(first) = waiting.recv().await {
                let mut round = vec![first];
                while let Ok(more) = waiting.try_recv() {
                    round.push(more);
                }
                let path = path.clone();
                let flushed = tokio::task::spawn_blocking(move || flush(&path))
                    .await
                    .unwrap_or_else(|error| Err(format!("the flush task failed: {error}")));
                if let Err(problem) = &flushed {
                    tracing::error!(problem = %problem, waiting = round.len(), "flushing the SQLite WAL failed; the commits waiting on it are reported as failed");
                }
                for waiter in round {
                    let _ = waiter.send(flushed.clone());
                }
            }
        });
        Self { requests }
    }

    /// Returns once every commit that finished before this call is on disk.
    pub(crate) async fn flush(&self) -> Result<(), DbErr> {
        let (answer, answered) = oneshot::channel();
        self.requests
            .send(answer)
            .map_err(|_| DbErr::Custom("the WAL flushing task has stopped".into()))?;
        answered
            .await
            .map_err(|_| DbErr::Custom("the WAL flushing task has stopped".into()))?
            .map_err(DbErr::Custom)
    }
}

/// `fdatasync` of the WAL file. A missing file means the last connection checkpointed it into
/// the database (which SQLite flushed) and removed it: nothing is left to flush.
fn flush(path: &std::path::Path) -> Result<(), String> {
    match std::fs::OpenOptions::new().read(true).open(path) {
        Ok(file) => file
            .sync_data()
            .map_err(|error| format!("fdatasync {}: {error}", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(format!("open {}: {error}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_file_databases_have_a_wal_to_flush() {
        assert_eq!(
            wal_path("sqlite:///var/lib/smd/gateway.db?mode=rwc"),
            Some(PathBuf::from("/var/lib/smd/gateway.db-wal"))
        );
        assert_eq!(
            wal_path("sqlite://data/smd-gateway.db"),
            Some(PathBuf::from("data/smd-gateway.db-wal"))
        );
        assert_eq!(wal_path("sqlite::memory:"), None);
        assert_eq!(wal_path("sqlite://file.db?mode=memory&cache=shared"), None);
        assert_eq!(wal_path("postgres://postgres@127.0.0.1/db"), None);
    }

    #[tokio::test]
    async fn a_flush_answers_every_waiter_and_a_missing_wal_is_nothing_to_flush() {
        let directory = std::env::temp_dir().join(format!("smd-wal-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&directory).unwrap();
        let wal = directory.join("db-wal");
        let sync = std::sync::Arc::new(WalSync::start(wal.clone()));
        // No file yet: nothing to flush, and no error.
        sync.flush().await.unwrap();
        std::fs::write(&wal, b"frames").unwrap();
        let waiters: Vec<_> = (0..32)
            .map(|_| {
                let sync = sync.clone();
                tokio::spawn(async move { sync.flush().await })
            })
            .collect();
        for waiter in waiters {
            waiter.await.unwrap().unwrap();
        }
        // A WAL that cannot be opened is a failed commit, not a silent success.
        let not_a_directory = directory.join("file");
        std::fs::write(&not_a_directory, b"").unwrap();
        let broken = WalSync::start(not_a_directory.join("db-wal"));
        assert!(broken.flush().await.is_err());
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
