//! Ledger benchmark: concurrent send debits per second on SQLite (and on PostgreSQL when asked),
//! at several client counts, next to a bare single-row insert loop on the same database in the
//! same run, so the ledger's overhead reads as a ratio.
//!
//! ```text
//! cargo run --release --example ledger_bench
//! cargo run --release --example ledger_bench -- --postgres postgres://postgres@127.0.0.1:5432/postgres
//! cargo run --release --example ledger_bench -- --seconds 5 --clients 1,8,64
//! ```
//!
//! Each cell runs one operation for a fixed time with C tokio tasks, every task timing each of
//! its operations. The operations:
//! - *bare insert*: one autocommit `INSERT` into `audit_events` through `Store::insert_audit`;
//! - *ledger debit*: what a send debit does at the storage level — open a write transaction,
//!   `Store::debit_in` 3 credits, commit — each task on its own practitioner's wallet;
//! - *ledger debit (shared wallet)*: the same, with every task debiting one wallet (the
//!   contended case: all writers queue on one row).
//!
//! After each debit cell every wallet's balance must equal its seed less 3 credits per counted
//! debit; a mismatch prints a line and makes the program exit with an error.
//!
//! The store is opened with `Store::connect`, exactly as the gateway opens it, so the pool holds
//! at most 8 connections: with more clients than that, the extra tasks wait for a connection,
//! and that wait is part of their latency. On PostgreSQL the program creates a fresh database
//! `smd_bench_<uuid>` through the admin URL and drops it at the end.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use smd_gateway::domain::audit::{AuditEntry, AuditOutcome};
use smd_gateway::domain::types::Role;
use smd_gateway::store::Store;

/// Credits each benchmark wallet starts with: enough that no debit can ever run short.
const SEED_CREDITS: i64 = 1_000_000_000;
/// What one send debits (the gateway's `CREDITS_PER_MESSAGE`).
const CREDITS_PER_DEBIT: i64 = 3;
/// The practice every benchmark user belongs to.
const BENCH_GROUP: &str = "bench-group";

const USAGE: &str = "usage: ledger_bench [--postgres ADMIN_URL] [--seconds N] [--clients 1,8,64]";

/// What the command line asked for.
struct BenchOptions {
    /// Admin URL of a PostgreSQL server; the benchmark creates and drops its own database.
    postgres_admin_url: Option<String>,
    /// How long each cell runs.
    seconds_per_cell: u64,
    /// The concurrency levels, in order.
    client_counts: Vec<usize>,
}

impl BenchOptions {
    fn parse(mut arguments: impl Iterator<Item = String>) -> anyhow::Result<Self> {
        let mut options = Self {
            postgres_admin_url: None,
            seconds_per_cell: 3,
            client_counts: vec![1, 8, 64],
        };
        while let Some(flag) = arguments.next() {
            let mut value = || {
                arguments
                    .next()
                    .with_context(|| format!("{flag} needs a value\n{USAGE}"))
            };
            match flag.as_str() {
                "--postgres" => options.postgres_admin_url = Some(value()?),
                "--seconds" => {
                    options.seconds_per_cell = value()?
                        .parse()
                        .context("--seconds must be a whole number")?;
                    ensure!(options.seconds_per_cell > 0, "--seconds must be at least 1");
                }
                "--clients" => {
                    options.client_counts = value()?
                        .split(',')
                        .map(|count| count.trim().parse::<usize>())
                        .collect::<Result<_, _>>()
                        .context("--clients must be a comma-separated list of whole numbers")?;
                    ensure!(
                        !options.client_counts.is_empty() && !options.client_counts.contains(&0),
                        "--clients must list counts of at least 1"
                    );
                }
                "--help" | "-h" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        Ok(options)
    }
}

/// One benchmarked operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    BareInsert,
    LedgerDebit,
    LedgerDebitSharedWallet,
}

impl Operation {
    fn label(self) -> &'static str {
        match self {
            Operation::BareInsert => "bare insert",
            Operation::LedgerDebit => "ledger debit",
            Operation::LedgerDebitSharedWallet => "ledger debit (shared wallet)",
        }
    }
}

/// The measurements of one cell: one backend, one client count, one operation.
struct CellResult {
    backend: &'static str,
    clients: usize,
    operation: Operation,
    /// From the moment the tasks were started until the last one finished.
    wall_time: Duration,
    /// Every operation's latency, sorted ascending.
    sorted_latencies: Vec<Duration>,
}

impl CellResult {
    fn operations_per_second(&self) -> f64 {
        self.sorted_latencies.len() as f64 / self.wall_time.as_secs_f64()
    }

    /// The latency at percentile `percent` (nearest rank), in milliseconds.
    fn percentile_ms(&self, percent: f64) -> f64 {
        if self.sorted_latencies.is_empty() {
            return f64::NAN;
        }
        let count = self.sorted_latencies.len();
        let rank = ((percent / 100.0) * count as f64).ceil() as usize;
        let index = rank.clamp(1, count) - 1;
        self.sorted_latencies[index].as_secs_f64() * 1000.0
    }
}

/// One backend's database for the length of the run.
struct Bench {
    store: Store,
    backend: &'static str,
    duration: Duration,
    /// Distinguishes the users of one cell from every other cell's.
    next_cell: usize,
    /// Balance mismatches found so far (there must never be any).
    mismatches: usize,
}

impl Bench {
    /// Runs every cell for this backend, in the order bare insert, ledger debit, shared wallet,
    /// for each client count.
    async fn run_all(&mut self, client_counts: &[usize]) -> anyhow::Result<Vec<CellResult>> {
        self.warm_pool().await?;
        let mut results = Vec::new();
        for &clients in client_counts {
            for operation in [
                Operation::BareInsert,
                Operation::LedgerDebit,
                Operation::LedgerDebitSharedWallet,
            ] {
                eprintln!(
                    "{}: {} with {clients} client(s) for {:?}",
                    self.backend,
                    operation.label(),
                    self.duration
                );
                results.push(self.run_cell(clients, operation).await?);
            }
        }
        Ok(results)
    }

    /// Opens every pooled connection before the first measurement, so no cell pays for it.
    async fn warm_pool(&self) -> anyhow::Result<()> {
        let pings: Vec<_> = (0..64)
            .map(|_| {
                let store = self.store.clone();
                tokio::spawn(async move { store.ping().await })
            })
            .collect();
        for ping in pings {
            ping.await?.context("warm-up ping")?;
        }
        Ok(())
    }

    async fn run_cell(
        &mut self,
        clients: usize,
        operation: Operation,
    ) -> anyhow::Result<CellResult> {
        let cell = self.next_cell;
        self.next_cell += 1;
        // Fresh practitioners per cell, so every wallet starts at the seed.
        let wallet_count = match operation {
            Operation::LedgerDebitSharedWallet => 1,
            Operation::BareInsert | Operation::LedgerDebit => clients,
        };
        let mut user_ids = Vec::with_capacity(wallet_count);
        for wallet in 0..wallet_count {
            user_ids.push(self.seeded_practitioner(cell, wallet).await?);
        }
        let audit_rows_before = self.store.count_rows_for_tests("audit_events").await;

        let started = Instant::now();
        let deadline = started + self.duration;
        let tasks: Vec<_> = (0..clients)
            .map(|task| {
                let store = self.store.clone();
                let user_id = user_ids[task % user_ids.len()].clone();
                tokio::spawn(async move {
                    match operation {
                        Operation::BareInsert => insert_loop(store, user_id, task, deadline).await,
                        Operation::LedgerDebit | Operation::LedgerDebitSharedWallet => {
                            debit_loop(store, user_id, task, deadline).await
                        }
                    }
                })
            })
            .collect();
        let mut latencies_per_task = Vec::with_capacity(clients);
        for task in tasks {
            latencies_per_task.push(task.await??);
        }
        let wall_time = started.elapsed();

        match operation {
            Operation::BareInsert => {
                let inserted: usize = latencies_per_task.iter().map(Vec::len).sum();
                let audit_rows_after = self.store.count_rows_for_tests("audit_events").await;
                let added = audit_rows_after - audit_rows_before;
                if usize::try_from(added).ok() != Some(inserted) {
                    self.mismatches += 1;
                    println!(
                        "MISMATCH {} {clients} clients bare insert: {inserted} inserts counted, {added} audit rows added",
                        self.backend
                    );
                }
            }
            Operation::LedgerDebit | Operation::LedgerDebitSharedWallet => {
                for (wallet, user_id) in user_ids.iter().enumerate() {
                    // Task `t` debited wallet `t % wallet_count`.
                    let debits: usize = latencies_per_task
                        .iter()
                        .enumerate()
                        .filter(|(task, _)| task % wallet_count == wallet)
                        .map(|(_, latencies)| latencies.len())
                        .sum();
                    let expected = SEED_CREDITS - CREDITS_PER_DEBIT * i64::try_from(debits)?;
                    let balance = self.store.wallet(user_id).await?.balance;
                    if balance != expected {
                        self.mismatches += 1;
                        println!(
                            "MISMATCH {} {clients} clients {}: wallet {user_id} holds {balance}, expected {expected} after {debits} debits",
                            self.backend,
                            operation.label()
                        );
                    }
                }
            }
        }

        let mut sorted_latencies: Vec<Duration> =
            latencies_per_task.into_iter().flatten().collect();
        sorted_latencies.sort_unstable();
        Ok(CellResult {
            backend: self.backend,
            clients,
            operation,
            wall_time,
            sorted_latencies,
        })
    }

    /// Provisions a practitioner and credits their wallet with [`SEED_CREDITS`].
    async fn seeded_practitioner(&self, cell: usize, wallet: usize) -> anyhow::Result<String> {
        let subject = format!("bench-cell{cell}-wallet{wallet}");
        let user = self
            .store
            .provision_user(BENCH_GROUP, &subject, Role::Practitioner, &subject)
            .await?;
        let txn = self.store.begin_credit_transaction().await?;
        self.store
            .credit_in(
                &txn,
                BENCH_GROUP,
                &user.id,
                SEED_CREDITS,
                "ADJUSTMENT",
                "bench-seed",
            )
            .await?;
        txn.commit().await?;
        Ok(user.id)
    }
}

/// Debits `user_id`'s wallet until `deadline`, one transaction per debit, as a send does.
async fn debit_loop(
    store: Store,
    user_id: String,
    task: usize,
    deadline: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = Vec::new();
    while Instant::now() < deadline {
        // A send debits with the message id as the reference; this is as long and as unique.
        let reference = format!("bench-t{task}-{}", latencies.len());
        let started = Instant::now();
        let txn = store.begin_credit_transaction().await?;
        let outcome = store
            .debit_in(
                &txn,
                BENCH_GROUP,
                &user_id,
                CREDITS_PER_DEBIT,
                "SEND_DEBIT",
                &reference,
                // The spending-cap period start: no top-up is ever decided here.
                chrono::Utc::now(),
                |_| None,
            )
            .await?;
        txn.commit().await?;
        latencies.push(started.elapsed());
        // `DebitOutcome` lives in `smd_gateway::store::credits`, a `pub(crate)` module, so its
        // variants cannot be named from here; its `Debug` form tells the two apart.
        let outcome = format!("{outcome:?}");
        ensure!(
            outcome.starts_with("Debited"),
            "debit {reference} was not made: {outcome}"
        );
    }
    Ok(latencies)
}

/// Inserts one audit row per operation, autocommit, until `deadline`.
async fn insert_loop(
    store: Store,
    user_id: String,
    task: usize,
    deadline: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = Vec::new();
    while Instant::now() < deadline {
        let entry = AuditEntry {
            group_id: BENCH_GROUP.to_owned(),
            actor_user_id: Some(user_id.clone()),
            actor_subject: format!("bench-t{task}"),
            action: "BENCH_INSERT".to_owned(),
            target: format!("bench:{}", latencies.len()),
            outcome: AuditOutcome::Success,
            detail: None,
            request_id: format!("bench-t{task}-{}", latencies.len()),
            on_behalf_of: None,
        };
        let started = Instant::now();
        store.insert_audit(&entry).await?;
        latencies.push(started.elapsed());
    }
    Ok(latencies)
}

/// Runs the SQLite cells on a fresh file database in a temporary directory.
async fn run_sqlite(options: &BenchOptions) -> anyhow::Result<(Vec<CellResult>, usize, String)> {
    let directory = tempfile::tempdir()?;
    let path = directory.path().join("bench.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let store = Store::connect(&url).await?;
    store.migrate().await?;
    let version = server_version(
        &Database::connect("sqlite::memory:").await?,
        "SELECT sqlite_version() AS v",
    )
    .await?;
    let mut bench = Bench {
        store,
        backend: "sqlite",
        duration: Duration::from_secs(options.seconds_per_cell),
        next_cell: 0,
        mismatches: 0,
    };
    let results = bench.run_all(&options.client_counts).await?;
    let mismatches = bench.mismatches;
    bench.store.close().await?;
    Ok((
        results,
        mismatches,
        format!(
            "SQLite {version} (file in {}, WAL, synchronous=FULL)",
            directory.path().display()
        ),
    ))
}

/// Runs the PostgreSQL cells on a database created for the run, and drops it afterwards
/// whether or not the cells succeeded.
async fn run_postgres(
    options: &BenchOptions,
    admin_url: &str,
) -> anyhow::Result<(Vec<CellResult>, usize, String)> {
    let admin = Database::connect(admin_url)
        .await
        .context("connect to the PostgreSQL admin URL")?;
    let version = server_version(&admin, "SELECT version() AS v").await?;
    let name = format!("smd_bench_{}", uuid::Uuid::new_v4().simple());
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .context("create the benchmark database")?;
    let outcome = run_postgres_cells(options, &database_url(admin_url, &name)).await;
    let dropped = admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .with_context(|| format!("drop the benchmark database {name}"));
    admin.close().await.ok();
    let (results, mismatches) = outcome?;
    dropped?;
    eprintln!("postgresql: dropped {name}");
    Ok((results, mismatches, version))
}

async fn run_postgres_cells(
    options: &BenchOptions,
    url: &str,
) -> anyhow::Result<(Vec<CellResult>, usize)> {
    let store = Store::connect(url).await?;
    store.migrate().await?;
    let mut bench = Bench {
        store,
        backend: "postgresql",
        duration: Duration::from_secs(options.seconds_per_cell),
        next_cell: 0,
        mismatches: 0,
    };
    let results = bench.run_all(&options.client_counts).await;
    let mismatches = bench.mismatches;
    bench.store.close().await?;
    Ok((results?, mismatches))
}

/// The admin URL with its database name replaced by `name` (query string kept).
fn database_url(admin_url: &str, name: &str) -> String {
    let (without_query, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (admin_url, String::new()),
    };
    let base = match without_query.rfind('/') {
        Some(slash) if slash > "postgres://".len() => &without_query[..slash],
        _ => without_query,
    };
    format!("{base}/{name}{query}")
}

async fn server_version(connection: &DatabaseConnection, query: &str) -> anyhow::Result<String> {
    let row = connection
        .query_one_raw(Statement::from_string(
            connection.get_database_backend(),
            query.to_owned(),
        ))
        .await?
        .context("version query returned no row")?;
    Ok(row.try_get::<String>("", "v")?)
}

/// Peak resident set size of this process, from `/proc/self/status`.
fn peak_resident_set() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .map(|value| value.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn print_table(results: &[CellResult]) {
    println!(
        "| backend    | clients | operation                    |    ops/s |  p50 ms |  p99 ms | debit/insert ratio |"
    );
    println!(
        "|------------|--------:|------------------------------|---------:|--------:|--------:|-------------------:|"
    );
    for result in results {
        let ratio = match result.operation {
            Operation::BareInsert => String::new(),
            Operation::LedgerDebit | Operation::LedgerDebitSharedWallet => results
                .iter()
                .find(|other| {
                    other.operation == Operation::BareInsert
                        && other.backend == result.backend
                        && other.clients == result.clients
                })
                .map(|insert| {
                    format!(
                        "{:.2}",
                        insert.operations_per_second() / result.operations_per_second()
                    )
                })
                .unwrap_or_default(),
        };
        println!(
            "| {:<10} | {:>7} | {:<28} | {:>8.0} | {:>7.2} | {:>7.2} | {:>18} |",
            result.backend,
            result.clients,
            result.operation.label(),
            result.operations_per_second(),
            result.percentile_ms(50.0),
            result.percentile_ms(99.0),
            ratio
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    smd_gateway::install_crypto_provider();
    let options = BenchOptions::parse(std::env::args().skip(1))?;
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run with --release for numbers worth comparing");
    }

    let mut results = Vec::new();
    let mut mismatches = 0;
    let mut backends = Vec::new();
    let (sqlite_results, sqlite_mismatches, sqlite_version) = run_sqlite(&options).await?;
    results.extend(sqlite_results);
    mismatches += sqlite_mismatches;
    backends.push(sqlite_version);
    if let Some(admin_url) = &options.postgres_admin_url {
        let (postgres_results, postgres_mismatches, postgres_version) =
            run_postgres(&options, admin_url).await?;
        results.extend(postgres_results);
        mismatches += postgres_mismatches;
        backends.push(postgres_version);
    }

    println!();
    for backend in &backends {
        println!("{backend}");
    }
    println!(
        "{} s per cell; pool of 8 connections (Store::connect); ratio = bare insert ops/s ÷ debit ops/s, same backend and clients",
        options.seconds_per_cell
    );
    println!();
    print_table(&results);
    println!();
    println!(
        "nproc: {}",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!("peak RSS (VmHWM): {}", peak_resident_set());
    ensure!(
        mismatches == 0,
        "{mismatches} balance or row-count mismatch(es); see the MISMATCH lines"
    );
    Ok(())
}
