//! `--state FILE`: a sandbox's namespaces kept across restarts (a public shared sandbox).
//!
//! The file is JSON, `{"format":"smd-sandbox-state","version":1,…}`. It is written whole to a
//! temporary file beside it, flushed to disk, then renamed over it, so a crash leaves either the
//! old file or the new one, never half of one; on Unix it is readable by its owner only. A file
//! that is not JSON, has another format or version, or does not fit this sandbox (another seed,
//! directory size or extra directory entries) stops the start with an error that says which;
//! nothing is overwritten then.
//!
//! What is kept, and what is not (secrets):
//! - account passwords: only as salted PBKDF2-HMAC-SHA256 hashes (`passwordHash`);
//! - ReferralNet session tokens: only their SHA-256 (sessions survive a restart, the tokens are
//!   not in the file);
//! - ReferralNet webhook signing secrets: as they are, because the sandbox must keep signing
//!   pushes with the secret the account was given (hence the owner-only file);
//! - payment API keys: never (the sandbox does not store them in memory either);
//! - everything else as it is: clocks (the sandbox time when saved; time does not pass while
//!   the sandbox is down), accounts, faults, charges and idempotency answers, sent messages,
//!   inboxes, push progress, the request log, scheduled events, and a seeded namespace's
//!   random stream position (an unseeded one draws from a fresh key after a restart).

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};

use crate::SandboxConfig;
use crate::accounts::AccountBook;
use crate::clock::{SandboxClock, validate_clock_speed};
use crate::faults::FaultQueue;
use crate::messaging::MessageStore;
use crate::namespace::{NamespaceName, NamespaceState, SandboxState};
use crate::payments::{PaymentBook, PaymentsSnapshot};
use crate::random::NamespaceRandom;
use crate::referralnet::SessionBook;
use crate::requests::RequestLog;
use crate::schedule::Schedule;

/// The `format` of every state file.
const STATE_FORMAT: &str = "smd-sandbox-state";
/// The version this sandbox writes and reads.
pub const STATE_VERSION: u64 = 1;

/// A state file that cannot be used.
#[derive(Debug)]
pub struct StateError {
    pub path: PathBuf,
    pub message: String,
}

impl std::fmt::Display for StateError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "state file {}: {}",
            self.path.display(),
            self.message
        )
    }
}

impl std::error::Error for StateError {}

/// What makes a state file fit a sandbox: the same directory.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct SandboxFingerprint {
    pub(crate) seed: u64,
    pub(crate) directory_size: usize,
    /// The HPI-Is scenarios added to the directory, sorted.
    pub(crate) extra_directory_hpiis: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StateFile {
    format: String,
    version: u64,
    saved_at: DateTime<Utc>,
    sandbox: SandboxFingerprint,
    namespaces: Vec<NamespaceSnapshot>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ClockSnapshot {
    now: DateTime<Utc>,
    speed: f64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RandomSnapshot {
    /// The scenario seed; `null` for a namespace drawing from the operating system.
    seed: Option<u64>,
    /// Draws made so far (meaningful with a seed).
    draws: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NamespaceSnapshot {
    name: String,
    clock: ClockSnapshot,
    random: RandomSnapshot,
    sandbox_seed: u64,
    argus_accounts: AccountBook,
    referralnet_accounts: AccountBook,
    referralnet_sessions: SessionBook,
    faults: FaultQueue,
    payments: PaymentsSnapshot,
    messages: MessageStore,
    requests: RequestLog,
    schedule: Schedule,
}

/// A state file's namespaces, ready to install.
pub(crate) struct LoadedState {
    pub(crate) namespaces: Vec<NamespaceState>,
}

fn error(path: &Path, message: impl Into<String>) -> StateError {
    StateError {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Reads a state file; `Ok(None)` when there is none yet (the first start).
pub(crate) fn load(
    path: &Path,
    config: SandboxConfig,
    fingerprint: &SandboxFingerprint,
) -> Result<Option<LoadedState>, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(read_error) if read_error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(read_error) => return Err(error(path, format!("cannot read it: {read_error}"))),
    };
    // The format and version first, so a file of another kind or version says so instead of
    // failing on some field deep inside.
    let header: serde_json::Value = serde_json::from_str(&text).map_err(|parse_error| {
        error(
            path,
            format!("is not JSON ({parse_error}); it may be damaged: restore it, or move it away to start empty"),
        )
    })?;
    if header.get("format").and_then(serde_json::Value::as_str) != Some(STATE_FORMAT) {
        return Err(error(
            path,
            format!("is not an smd-sandbox state file (no \"format\": \"{STATE_FORMAT}\")"),
        ));
    }
    match header.get("version").and_then(serde_json::Value::as_u64) {
        Some(STATE_VERSION) => {}
        Some(version) => {
            return Err(error(
                path,
                format!(
                    "has version {version}; this sandbox reads version {STATE_VERSION} (use the sandbox that wrote it, or move it away)"
                ),
            ));
        }
        None => return Err(error(path, "has no numeric \"version\"")),
    }
    drop(header);
    let file: StateFile = serde_json::from_str(&text).map_err(|parse_error| {
        error(
            path,
            format!("does not fit version {STATE_VERSION}: {parse_error}"),
        )
    })?;
    if &file.sandbox != fingerprint {
        return Err(error(
            path,
            format!(
                "was written by a sandbox with seed {}, directory size {} and extra directory entries {:?}; this one has seed {}, directory size {} and {:?}. Start it the same way (--seed, --directory-size, --scenario), or move the file away",
                file.sandbox.seed,
                file.sandbox.directory_size,
                file.sandbox.extra_directory_hpiis,
                fingerprint.seed,
                fingerprint.directory_size,
                fingerprint.extra_directory_hpiis,
            ),
        ));
    }
    let mut namespaces = Vec::with_capacity(file.namespaces.len());
    let mut names = std::collections::HashSet::new();
    for snapshot in file.namespaces {
        let name = snapshot.name.clone();
        if !names.insert(name.clone()) {
            return Err(error(path, format!("namespace {name:?} is there twice")));
        }
        namespaces.push(
            restore_namespace(snapshot, config)
                .map_err(|message| error(path, format!("namespace {name:?}: {message}")))?,
        );
    }
    Ok(Some(LoadedState { namespaces }))
}

fn restore_namespace(
    snapshot: NamespaceSnapshot,
    config: SandboxConfig,
) -> Result<NamespaceState, String> {
    let name = NamespaceName::parse(&snapshot.name)?;
    let speed = snapshot.clock.speed;
    if speed != 0.0 {
        validate_clock_speed(speed).map_err(|invalid| invalid.to_string())?;
    }
    let mut messages = snapshot.messages;
    messages.rebuild_indexes()?;
    let payments = PaymentBook::restore(snapshot.payments)?;
    let random =
        NamespaceRandom::resumed(snapshot.random.seed, name.as_str(), snapshot.random.draws);
    Ok(NamespaceState {
        clock: SandboxClock::starting_at(snapshot.clock.now, speed),
        argus_accounts: snapshot.argus_accounts,
        referralnet_accounts: snapshot.referralnet_accounts,
        referralnet_sessions: snapshot.referralnet_sessions,
        faults: snapshot.faults,
        payments,
        messages,
        requests: snapshot.requests,
        random,
        sandbox_seed: snapshot.sandbox_seed,
        schedule: snapshot.schedule,
        ..NamespaceState::new(name, config)
    })
}

fn snapshot_namespace(state: &NamespaceState) -> NamespaceSnapshot {
    NamespaceSnapshot {
        name: state.name.as_str().to_owned(),
        clock: ClockSnapshot {
            now: state.clock.now().trunc_subsecs(3),
            speed: state.clock.speed(),
        },
        random: RandomSnapshot {
            seed: state.random.seed(),
            draws: state.random.counter(),
        },
        sandbox_seed: state.sandbox_seed,
        argus_accounts: state.argus_accounts.clone(),
        referralnet_accounts: state.referralnet_accounts.clone(),
        referralnet_sessions: state.referralnet_sessions.clone(),
        faults: state.faults.clone(),
        payments: state.payments.snapshot(),
        // Serialised straight from the state below: the store is not cloned.
        messages: MessageStore::default(),
        requests: RequestLog::default(),
        schedule: state.schedule.clone(),
    }
}

/// The whole sandbox as a state file's bytes. Each namespace is read under its own lock, so
/// each is consistent in itself.
pub(crate) fn render(sandbox: &SandboxState, fingerprint: &SandboxFingerprint) -> Vec<u8> {
    let mut namespaces = Vec::new();
    sandbox.for_each_namespace(|_, state| {
        let snapshot = snapshot_namespace(state);
        // Messages and requests can be large: serialise them in place rather than clone them.
        let mut value = serde_json::to_value(&snapshot).expect("a snapshot serialises");
        value["messages"] = serde_json::to_value(&state.messages).expect("messages serialise");
        value["requests"] = serde_json::to_value(&state.requests).expect("requests serialise");
        namespaces.push(value);
    });
    namespaces.sort_by(|left, right| left["name"].as_str().cmp(&right["name"].as_str()));
    let file = serde_json::json!({
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "savedAt": Utc::now().trunc_subsecs(3),
        "sandbox": fingerprint,
        "namespaces": namespaces,
    });
    serde_json::to_vec_pretty(&file).expect("a state file serialises")
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, flushed, renamed over it.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the state path names no file"))?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(file_name);
    temporary_name.push(format!(".{}.tmp", std::process::id()));
    let temporary = directory.join(temporary_name);
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let result = (|| {
        let mut file = options.open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temporary, path)?;
        // The rename itself reaches the disk once the directory is synced.
        #[cfg(unix)]
        File::open(&directory)?.sync_all()?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint() -> SandboxFingerprint {
        SandboxFingerprint {
            seed: 42,
            directory_size: 50,
            extra_directory_hpiis: Vec::new(),
        }
    }

    fn config() -> SandboxConfig {
        SandboxConfig {
            directory_size: 50,
            ..SandboxConfig::default()
        }
    }

    #[test]
    fn a_missing_file_is_a_first_start() {
        let directory = std::env::temp_dir().join(format!("smd-state-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("state.json");
        assert!(load(&path, config(), &fingerprint()).unwrap().is_none());
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn damaged_foreign_and_newer_files_are_refused_saying_why() {
        let directory = std::env::temp_dir().join(format!("smd-state-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("state.json");
        let cases = [
            (
                "{\"format\": \"smd-sandbox-state\", \"version\": 1, ",
                "is not JSON",
            ),
            ("{\"hello\": 1}", "is not an smd-sandbox state file"),
            (
                "{\"format\": \"smd-sandbox-state\", \"version\": 2}",
                "has version 2; this sandbox reads version 1",
            ),
            (
                "{\"format\": \"smd-sandbox-state\", \"version\": 1, \"namespaces\": []}",
                "does not fit version 1",
            ),
        ];
        for (text, words) in cases {
            std::fs::write(&path, text).unwrap();
            let refusal = load(&path, config(), &fingerprint()).err().unwrap();
            assert!(refusal.to_string().contains(words), "{text} → {refusal}");
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                text,
                "a refused file is left as it was"
            );
        }
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn an_atomic_write_replaces_the_file_whole_and_leaves_no_temporary_file() {
        let directory = std::env::temp_dir().join(format!("smd-state-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("state.json");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(&directory)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("state.json")]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
