//! Messaging load benchmark: C concurrent practitioners send secure messages through the
//! gateway to the sandbox for a fixed time, next to the same sends made straight to the sandbox
//! in the same run (the provider-side ceiling), on SQLite and, when asked, on PostgreSQL.
//!
//! ```text
//! cargo run --release -p smd-gateway-suite --example messaging_bench
//! cargo run --release -p smd-gateway-suite --example messaging_bench -- --postgres postgres://postgres@127.0.0.1:5432/postgres
//! cargo run --release -p smd-gateway-suite --example messaging_bench -- --seconds 10 --clients 1,8,32
//! ```
//!
//! Every cell (one backend, one client count C) starts from nothing: a fresh in-process sandbox
//! whose clock runs 1000 times faster than real time (its 5 s delivery delay passes in about
//! 5 ms), a fresh database (a SQLite file in a temporary directory, or a PostgreSQL database
//! `smd_bench_<uuid>` created through the admin URL and dropped afterwards), and a fresh gateway
//! in production mode on both, started with `smd_gateway::App` exactly as the end-to-end tests
//! start it. Then:
//!
//! 1. C practitioners of one practice each link the demo Argus account, set a sandbox card,
//!    buy `pack-3000` enough times, and write one patient and one note; one recipient reachable
//!    on Argus is picked with `searchPractitioners`.
//! 2. *Gateway phase*: C tasks, one per practitioner, call `sendSecureMessage` (provider ARGUS,
//!    a fresh idempotency key each time) in a loop for `--seconds`, over HTTP with one shared
//!    client, timing each call. Afterwards the program polls `messages` until every message is
//!    DELIVERED or ACKNOWLEDGED (with a deadline) and takes send-to-DELIVERED from each
//!    message's `createdAt` and `deliveredAt`, both stamped by the gateway's clock.
//! 3. *Checks*: the sandbox holds exactly as many messages as the gateway reported sent, and
//!    every practitioner's balance is what they bought less 3 credits per send. A mismatch
//!    prints a `MISMATCH` line and makes the program exit with an error.
//! 4. *Probes*, one call at a time, to explain the numbers: a cheap authenticated GraphQL read,
//!    one autocommit insert through the gateway's `Store` (a commit's cost on this backend),
//!    and the Argus directory search the gateway makes before every send.
//! 5. *Direct phase*: with the gateway stopped, C tasks POST straight to `/argus/v1/messages`
//!    of the cell's sandbox for `--seconds`, with HTTP Basic and the HL7 text the gateway built
//!    in phase 2. The direct phases run after every cell's gateway phase (each cell's sandbox
//!    is kept until then): they leave hundreds of megabytes of accepted messages in the
//!    sandbox, which would otherwise be counted in the next gateway phase's peak RSS.
//!
//! Everything runs in this one process on one tokio runtime — load generator, gateway, sandbox
//! (and, with `--postgres`, a PostgreSQL server on the same machine) — so both paths compete
//! with their own load generator for the same cores. The CPU columns say how busy this
//! process, PostgreSQL and everything else on the machine were (from `/proc`), and peak RSS is
//! the process's `VmHWM`, reset before each phase. The closing paragraph, "What limits it", is
//! written from this run's numbers.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use base64::Engine;
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use serde_json::{Value, json};
use smd_gateway::auth::{TokenRequest, mint_hs256};
use smd_gateway::config::{
    GraphqlSettings, JwtSettings, MessagingConfig, Mode, PaymentSettings, ProviderSettings,
};
use smd_gateway::crypto::SecretBox;
use smd_gateway::domain::audit::{AuditEntry, AuditOutcome};
use smd_gateway::domain::types::Role;
use smd_gateway::store::Store;
use smd_gateway::{App, Settings};
use smd_sandbox::SandboxConfig;
use tokio::sync::oneshot;

const USAGE: &str =
    "usage: messaging_bench [--postgres ADMIN_URL] [--seconds 5] [--clients 1,8,32]";

const SIGNING_SECRET: &str = "messaging-bench-signing-secret-0123456789";
const ISSUER: &str = "https://pms.bench.example";
const AUDIENCE: &str = "smd-gateway-bench";
/// The practice every benchmark practitioner belongs to.
const BENCH_GROUP: &str = "bench-practice";
/// The sandbox's demo Argus account, which every practitioner links to.
const ARGUS_USERNAME: &str = "demo.argus";
const ARGUS_PASSWORD: &str = "argus-sandbox-pw";

/// Sandbox seconds per real second: the 5 s delivery and 15 s acknowledgement delays pass in
/// 5 ms and 15 ms.
const SANDBOX_CLOCK_SPEED: f64 = 1000.0;
/// How often the gateway re-checks a sent message; its outbox ticks every
/// `max(poll / 2, 50 ms)`.
const STATUS_POLL_INTERVAL_MS: u64 = 20;
/// The outbox's tick with [`STATUS_POLL_INTERVAL_MS`] (the worker's floor is 50 ms).
const OUTBOX_TICK_MS: f64 = 50.0;

/// What one send costs (the gateway's `CREDITS_PER_MESSAGE`).
const CREDITS_PER_SEND: i64 = 3;
const PACK_ID: &str = "pack-3000";
const PACK_CREDITS: i64 = 3000;
/// The total send rate the credit budget is sized for; a practitioner who still runs dry stops
/// sending and the cell reports it.
const BUDGETED_SENDS_PER_SECOND: u64 = 1500;
/// The note sections every send shares (the note also has a third, private one).
const SECTION_KEYS: [&str; 2] = ["history", "medications"];

/// How long to wait for every message to reach DELIVERED after a gateway phase.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(60);
/// Calls per probe.
const PROBE_CALLS: usize = 200;

const SEND_MUTATION: &str = "mutation($input: SendSecureMessageInput!) { sendSecureMessage(input: $input) { message { id status } creditsRemaining } }";
const UNFINISHED_QUERY: &str = "{ queued: messages(direction: OUTBOUND, status: QUEUED, first: 1) { edges { node { id } } } sent: messages(direction: OUTBOUND, status: SENT, first: 1) { edges { node { id } } } }";
const MESSAGES_PAGE_QUERY: &str = "query($after: String) { messages(direction: OUTBOUND, first: 100, after: $after) { edges { node { id status createdAt deliveredAt } } pageInfo { hasNextPage endCursor } } }";
const BALANCE_QUERY: &str = "{ credits { balance } }";

/// What the command line asked for.
struct BenchOptions {
    /// Admin URL of a PostgreSQL server; the benchmark creates and drops its own databases.
    postgres_admin_url: Option<String>,
    /// How long each phase sends for.
    seconds_per_phase: u64,
    /// The concurrency levels, in order.
    client_counts: Vec<usize>,
}

impl BenchOptions {
    fn parse(mut arguments: impl Iterator<Item = String>) -> anyhow::Result<Self> {
        let mut options = Self {
            postgres_admin_url: None,
            // Five seconds keeps a default SQLite run within about two minutes: the outbox's
            // backlog after each gateway phase takes longer to drain than the phase took.
            seconds_per_phase: 5,
            client_counts: vec![1, 8, 32],
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
                    options.seconds_per_phase = value()?
                        .parse()
                        .context("--seconds must be a whole number")?;
                    ensure!(
                        options.seconds_per_phase > 0,
                        "--seconds must be at least 1"
                    );
                }
                "--clients" => {
                    options.client_counts = value()?
                        .split(',')
                        .map(|count| count.trim().parse::<usize>())
                        .collect::<Result<_, _>>()
                        .context("--clients must be a comma-separated list of whole numbers")?;
                    ensure!(
                        !options.client_counts.is_empty()
                            && options
                                .client_counts
                                .iter()
                                .all(|count| (1..=256).contains(count)),
                        "--clients must list counts from 1 to 256"
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

/// The nearest-rank percentile of ascending `sorted` latencies, in milliseconds.
fn percentile_ms(sorted: &[Duration], percent: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((percent / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

/// CPU time counters at one instant, in clock ticks of `USER_HZ` (100 a second on Linux).
#[derive(Clone, Copy)]
struct CpuSample {
    /// User and system time of this process (gateway, sandbox and load generator).
    process_ticks: u64,
    /// User and system time of every process named `postgres` (a local server's backends).
    postgres_ticks: u64,
    /// Busy time of the whole machine, whoever used it.
    machine_busy_ticks: u64,
    taken_at: Instant,
}

/// How busy the CPUs were between two samples, in cores (1.0 = one core all the time).
#[derive(Clone, Copy, Default)]
struct CpuUse {
    process_cores: f64,
    postgres_cores: f64,
    machine_cores: f64,
    /// CPU seconds of this process and the PostgreSQL server together.
    own_seconds: f64,
}

impl CpuUse {
    /// Cores busy with this run: this process and the PostgreSQL server.
    fn own_cores(&self) -> f64 {
        self.process_cores + self.postgres_cores
    }

    /// Cores busy with anything else on the machine.
    fn other_cores(&self) -> f64 {
        (self.machine_cores - self.own_cores()).max(0.0)
    }
}

const TICKS_PER_SECOND: f64 = 100.0;

/// The command name and utime + stime of a `/proc/<pid>/stat` line.
fn parse_proc_stat(stat: &str) -> Option<(&str, u64)> {
    // The command name is in parentheses and may hold spaces; after it, utime and stime are
    // the 12th and 13th fields.
    let (before, after_name) = stat.rsplit_once(')')?;
    let name = before.split_once('(')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((name, ticks))
}

impl CpuSample {
    fn now() -> Self {
        let process_ticks = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| parse_proc_stat(&stat).map(|(_, ticks)| ticks))
            .unwrap_or(0);
        let postgres_ticks = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
            .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok())
            .filter_map(|stat| {
                parse_proc_stat(&stat)
                    .filter(|(name, _)| *name == "postgres")
                    .map(|(_, ticks)| ticks)
            })
            .sum();
        let machine_busy_ticks = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                let totals: Vec<u64> = stat
                    .lines()
                    .next()?
                    .strip_prefix("cpu ")?
                    .split_whitespace()
                    .filter_map(|field| field.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal (guest time is inside user).
                let all: u64 = totals.iter().take(8).sum();
                Some(all - totals.get(3)? - totals.get(4)?)
            })
            .unwrap_or(0);
        Self {
            process_ticks,
            postgres_ticks,
            machine_busy_ticks,
            taken_at: Instant::now(),
        }
    }

    fn used_since(self, start: CpuSample) -> CpuUse {
        let elapsed = self.taken_at.duration_since(start.taken_at).as_secs_f64();
        let seconds = |now: u64, then: u64| now.saturating_sub(then) as f64 / TICKS_PER_SECOND;
        let process = seconds(self.process_ticks, start.process_ticks);
        // A backend that exited between the samples takes its ticks with it; never negative.
        let postgres = seconds(self.postgres_ticks, start.postgres_ticks);
        let machine = seconds(self.machine_busy_ticks, start.machine_busy_ticks);
        CpuUse {
            process_cores: process / elapsed,
            postgres_cores: postgres / elapsed,
            machine_cores: machine / elapsed,
            own_seconds: process + postgres,
        }
    }
}

/// Resets this process's peak resident set size to its current size (Linux's
/// `clear_refs` value 5), so each cell's peak is its own.
fn reset_peak_resident_set() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size of this process in KiB, from `/proc/self/status`.
fn peak_resident_set_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let value = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?;
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

/// How a send went, as far as the benchmark cares.
enum SendAnswer {
    Sent {
        message_id: String,
        credits_remaining: i64,
    },
    Refused {
        code: String,
    },
}

/// The gateway's GraphQL endpoint and the one HTTP client every benchmark task shares.
#[derive(Clone)]
struct GatewayClient {
    http: reqwest::Client,
    graphql_url: String,
}

impl GatewayClient {
    /// POSTs an operation and returns the whole JSON response.
    async fn call(&self, token: &str, query: &str, variables: Value) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(&self.graphql_url)
            .bearer_auth(token)
            .json(&json!({ "query": query, "variables": variables }))
            .send()
            .await
            .context("the gateway did not answer")?;
        response
            .json()
            .await
            .context("the gateway did not answer JSON")
    }

    /// The `data` of an operation that must succeed.
    async fn data(&self, token: &str, query: &str, variables: Value) -> anyhow::Result<Value> {
        let response = self.call(token, query, variables).await?;
        if let Some(errors) = response.get("errors") {
            bail!("gateway refused {query:.60}…: {errors}");
        }
        Ok(response["data"].clone())
    }

    async fn send(
        &self,
        practitioner: &Practitioner,
        recipient_id: &str,
    ) -> anyhow::Result<SendAnswer> {
        let response = self
            .call(
                &practitioner.token,
                SEND_MUTATION,
                json!({"input": {
                    "noteId": practitioner.note_id,
                    "sectionKeys": SECTION_KEYS,
                    "recipientId": recipient_id,
                    "provider": "ARGUS",
                    "idempotencyKey": uuid::Uuid::new_v4().to_string(),
                }}),
            )
            .await?;
        let payload = &response["data"]["sendSecureMessage"];
        match (
            payload["message"]["id"].as_str(),
            payload["creditsRemaining"].as_i64(),
        ) {
            (Some(message_id), Some(credits_remaining)) => Ok(SendAnswer::Sent {
                message_id: message_id.to_owned(),
                credits_remaining,
            }),
            _ => Ok(SendAnswer::Refused {
                code: response["errors"][0]["extensions"]["code"]
                    .as_str()
                    .unwrap_or("NO_CODE")
                    .to_owned(),
            }),
        }
    }
}

/// One benchmark practitioner, ready to send.
#[derive(Clone)]
struct Practitioner {
    token: String,
    note_id: String,
    credits_bought: i64,
}

fn practitioner_token(subject: &str) -> anyhow::Result<String> {
    mint_hs256(
        SIGNING_SECRET,
        ISSUER,
        AUDIENCE,
        &TokenRequest {
            subject: subject.to_owned(),
            group_id: BENCH_GROUP.to_owned(),
            role: Role::Practitioner,
            name: Some(format!("Dr {subject}")),
            ttl_seconds: 3600,
        },
    )
}

/// Creates `count` practitioners linked to the demo Argus account, each with an HPI-I, `packs`
/// × `pack-3000`, one patient and one three-section note.
async fn enroll_practitioners(
    gateway: &GatewayClient,
    count: usize,
    packs: usize,
) -> anyhow::Result<Vec<Practitioner>> {
    let tokens: Vec<String> = (0..count)
        .map(|index| practitioner_token(&format!("bench-{index}")))
        .collect::<anyhow::Result<_>>()?;
    // One at a time: the first link creates the practice's Argus account, the others join it.
    for token in &tokens {
        let linked = gateway
            .data(
                token,
                "mutation($input: LinkAccountInput!) { linkArgus(input: $input) { individualStatus } }",
                json!({"input": {"username": ARGUS_USERNAME, "password": ARGUS_PASSWORD}}),
            )
            .await?;
        ensure!(
            linked["linkArgus"]["individualStatus"] == "ACTIVE",
            "linkArgus did not make the practitioner ACTIVE: {linked}"
        );
    }
    // The practice's card, set once by the first practitioner (only an administrator may
    // replace it later).
    if let Some(first) = tokens.first() {
        gateway
            .data(
                first,
                "mutation { setPaymentMethod(input: {token: \"pm_sandbox_approve\"}) { last4 } }",
                json!({}),
            )
            .await?;
    }
    let enrolments = tokens
        .into_iter()
        .enumerate()
        .map(|(index, token)| enroll_practitioner(gateway, token, index, packs));
    futures::future::try_join_all(enrolments).await
}

async fn enroll_practitioner(
    gateway: &GatewayClient,
    token: String,
    index: usize,
    packs: usize,
) -> anyhow::Result<Practitioner> {
    // A sender needs their own HPI-I (one per practitioner of the practice).
    let hpii = (0..10)
        .map(|digit| format!("80036188{index:07}{digit}"))
        .find(|candidate| smd_gateway::domain::types::Hpii::parse(candidate).is_ok())
        .context("an HPI-I check digit")?;
    gateway
        .data(
            &token,
            "mutation($h: String!) { setMyHpii(hpii: $h) }",
            json!({"h": hpii}),
        )
        .await?;
    let mut credits_bought = 0;
    for _ in 0..packs {
        let bought = gateway
            .data(
                &token,
                "mutation($input: PurchaseCreditsInput!) { purchaseCredits(input: $input) { purchase { credits status } balance } }",
                json!({"input": {"packId": PACK_ID, "idempotencyKey": uuid::Uuid::new_v4().to_string()}}),
            )
            .await?;
        let purchase = &bought["purchaseCredits"]["purchase"];
        ensure!(
            purchase["status"] == "SUCCEEDED" && purchase["credits"] == PACK_CREDITS,
            "purchase of {PACK_ID} did not succeed: {bought}"
        );
        credits_bought += PACK_CREDITS;
    }
    let patient = gateway
        .data(
            &token,
            "mutation { createPatient(input: {givenName: \"Ada\", familyName: \"O'Brien\", dateOfBirth: \"1961-03-04\"}) { id } }",
            json!({}),
        )
        .await?;
    let patient_id = patient["createPatient"]["id"]
        .as_str()
        .with_context(|| format!("createPatient returned no id: {patient}"))?
        .to_owned();
    let note = gateway
        .data(
            &token,
            "mutation($input: CreateClinicalNoteInput!) { createClinicalNote(input: $input) { id } }",
            json!({"input": {"patientId": patient_id, "title": "Chest pain review", "sections": [
                {"key": "history", "title": "History", "body": "Chest pain on exertion for 3 weeks, worse at night.\nNo syncope, no palpitations. Non-smoker; father had a myocardial infarction at 58."},
                {"key": "medications", "title": "Medications", "body": "Aspirin 100 mg daily\nAtorvastatin 40 mg at night"},
                {"key": "private", "title": "Private notes", "body": "Not for sharing."}
            ]}}),
        )
        .await?;
    let note_id = note["createClinicalNote"]["id"]
        .as_str()
        .with_context(|| format!("createClinicalNote returned no id: {note}"))?
        .to_owned();
    Ok(Practitioner {
        token,
        note_id,
        credits_bought,
    })
}

/// The HPI-I of a directory practitioner the practice reaches on Argus (not a magic "Test "
/// recipient).
async fn pick_recipient(
    gateway: &GatewayClient,
    practitioner: &Practitioner,
) -> anyhow::Result<String> {
    let found = gateway
        .data(
            &practitioner.token,
            "query($q: String!) { searchPractitioners(query: $q, first: 50) { edges { node { id name providers } } } }",
            json!({"q": ""}),
        )
        .await?;
    let edges = found["searchPractitioners"]["edges"]
        .as_array()
        .with_context(|| format!("searchPractitioners returned no edges: {found}"))?;
    edges
        .iter()
        .map(|edge| &edge["node"])
        .find(|node| {
            let on_argus = node["providers"]
                .as_array()
                .is_some_and(|providers| providers.iter().any(|p| p == "ARGUS"));
            let ordinary = node["name"]
                .as_str()
                .is_some_and(|name| !name.contains("Test "));
            on_argus && ordinary
        })
        .and_then(|node| node["id"].as_str())
        .map(str::to_owned)
        .context("no ordinary Argus recipient among the first 50 directory results")
}

/// What one sending task did.
#[derive(Default)]
struct TaskOutcome {
    latencies: Vec<Duration>,
    message_ids: Vec<String>,
    /// Failed calls by error code (or HTTP status), not timed.
    failures: BTreeMap<String, usize>,
    /// The practitioner's credits ran out before the deadline.
    ran_out_of_credits: bool,
}

/// Sends through the gateway until `deadline`, one call at a time.
async fn gateway_send_loop(
    gateway: GatewayClient,
    practitioner: Practitioner,
    recipient_id: String,
    deadline: Instant,
) -> TaskOutcome {
    let mut outcome = TaskOutcome::default();
    while Instant::now() < deadline {
        let started = Instant::now();
        match gateway.send(&practitioner, &recipient_id).await {
            Ok(SendAnswer::Sent {
                message_id,
                credits_remaining,
            }) => {
                outcome.latencies.push(started.elapsed());
                outcome.message_ids.push(message_id);
                if credits_remaining < CREDITS_PER_SEND {
                    outcome.ran_out_of_credits = true;
                    break;
                }
            }
            Ok(SendAnswer::Refused { code }) => {
                *outcome.failures.entry(code).or_default() += 1;
            }
            Err(error) => {
                *outcome.failures.entry(format!("{error:#}")).or_default() += 1;
            }
        }
    }
    outcome
}

/// The sandbox's Argus send endpoint and what a direct send posts to it.
#[derive(Clone)]
struct DirectTarget {
    http: reqwest::Client,
    messages_url: String,
    recipient_hpii: String,
    payload_base64: String,
}

/// Sends straight to the sandbox until `deadline`, one call at a time.
async fn direct_send_loop(target: DirectTarget, deadline: Instant) -> TaskOutcome {
    let mut outcome = TaskOutcome::default();
    while Instant::now() < deadline {
        let started = Instant::now();
        let sent = target
            .http
            .post(&target.messages_url)
            .basic_auth(ARGUS_USERNAME, Some(ARGUS_PASSWORD))
            .json(&json!({
                "clientMessageId": uuid::Uuid::new_v4().to_string(),
                "recipientHpii": target.recipient_hpii,
                "payload": target.payload_base64,
            }))
            .send()
            .await;
        let answer = match sent {
            Ok(response) => {
                let status = response.status();
                match response.json::<Value>().await {
                    Ok(body) if status == reqwest::StatusCode::ACCEPTED => body["trackingId"]
                        .as_str()
                        .map(str::to_owned)
                        .ok_or(format!("HTTP {status} without a trackingId")),
                    Ok(body) => Err(format!("HTTP {status}: {}", body["error"]["code"])),
                    Err(error) => Err(format!("HTTP {status}, unreadable body: {error}")),
                }
            }
            Err(error) => Err(format!("{error:#}")),
        };
        match answer {
            Ok(tracking_id) => {
                outcome.latencies.push(started.elapsed());
                outcome.message_ids.push(tracking_id);
            }
            Err(failure) => *outcome.failures.entry(failure).or_default() += 1,
        }
    }
    outcome
}

/// One path's sending phase, every task's outcome merged.
struct PhaseResult {
    /// From the moment the tasks were started until the last one finished.
    wall_time: Duration,
    /// Every successful send's latency, sorted ascending.
    sorted_latencies: Vec<Duration>,
    /// Successful sends per task, in task order.
    sends_per_task: Vec<usize>,
    message_ids: Vec<String>,
    failures: BTreeMap<String, usize>,
    tasks_out_of_credits: usize,
    cpu: CpuUse,
}

impl PhaseResult {
    fn sends(&self) -> usize {
        self.sorted_latencies.len()
    }

    fn sends_per_second(&self) -> f64 {
        self.sends() as f64 / self.wall_time.as_secs_f64()
    }

    fn failed(&self) -> usize {
        self.failures.values().sum()
    }

    /// CPU milliseconds (this process and PostgreSQL) per successful send.
    fn cpu_ms_per_send(&self) -> f64 {
        self.cpu.own_seconds * 1000.0 / self.sends() as f64
    }
}

/// Runs `tasks` to completion and merges what they did.
async fn run_phase(
    tasks: Vec<tokio::task::JoinHandle<TaskOutcome>>,
    started: Instant,
    cpu_at_start: CpuSample,
) -> anyhow::Result<PhaseResult> {
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await.context("a sending task panicked")?);
    }
    let wall_time = started.elapsed();
    let cpu = CpuSample::now().used_since(cpu_at_start);
    let mut result = PhaseResult {
        wall_time,
        sorted_latencies: Vec::new(),
        sends_per_task: Vec::with_capacity(outcomes.len()),
        message_ids: Vec::new(),
        failures: BTreeMap::new(),
        tasks_out_of_credits: 0,
        cpu,
    };
    for outcome in outcomes {
        result.sends_per_task.push(outcome.latencies.len());
        result.sorted_latencies.extend(outcome.latencies);
        result.message_ids.extend(outcome.message_ids);
        for (failure, count) in outcome.failures {
            *result.failures.entry(failure).or_default() += count;
        }
        result.tasks_out_of_credits += usize::from(outcome.ran_out_of_credits);
    }
    result.sorted_latencies.sort_unstable();
    Ok(result)
}

/// Polls until none of the practitioners has a QUEUED or SENT message; returns whether that
/// happened before `deadline`.
///
/// One practitioner is asked at a time, and only until their messages are done (no new ones
/// come once the phase is over), so the polling itself barely loads the gateway.
async fn wait_until_delivered(
    gateway: &GatewayClient,
    practitioners: &[Practitioner],
    deadline: Instant,
) -> anyhow::Result<bool> {
    for practitioner in practitioners {
        loop {
            let unfinished = gateway
                .data(&practitioner.token, UNFINISHED_QUERY, json!({}))
                .await?;
            let none = |alias: &str| {
                unfinished[alias]["edges"]
                    .as_array()
                    .is_some_and(Vec::is_empty)
            };
            if none("queued") && none("sent") {
                break;
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(true)
}

/// A sent message as `messages` lists it.
struct ListedMessage {
    id: String,
    status: String,
    created_at: Option<DateTime<Utc>>,
    delivered_at: Option<DateTime<Utc>>,
}

/// Every outbound message of a practitioner, newest first.
async fn outbound_messages(
    gateway: &GatewayClient,
    practitioner: &Practitioner,
) -> anyhow::Result<Vec<ListedMessage>> {
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = gateway
            .data(
                &practitioner.token,
                MESSAGES_PAGE_QUERY,
                json!({ "after": after }),
            )
            .await?;
        let connection = &page["messages"];
        for edge in connection["edges"].as_array().into_iter().flatten() {
            let node = &edge["node"];
            let timestamp = |field: &str| {
                node[field]
                    .as_str()
                    .and_then(|text| DateTime::parse_from_rfc3339(text).ok())
                    .map(|time| time.with_timezone(&Utc))
            };
            listed.push(ListedMessage {
                id: node["id"].as_str().unwrap_or_default().to_owned(),
                status: node["status"].as_str().unwrap_or("?").to_owned(),
                created_at: timestamp("createdAt"),
                delivered_at: timestamp("deliveredAt"),
            });
        }
        if connection["pageInfo"]["hasNextPage"] != true {
            return Ok(listed);
        }
        after = connection["pageInfo"]["endCursor"]
            .as_str()
            .map(str::to_owned);
    }
}

/// Every message the sandbox accepted, oldest first.
async fn sandbox_messages(http: &reqwest::Client, sandbox_url: &str) -> anyhow::Result<Vec<Value>> {
    let listed: Value = http
        .get(format!("{sandbox_url}/_sandbox/messages"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    listed
        .as_array()
        .cloned()
        .context("/_sandbox/messages is not a list")
}

/// Times `calls` sequential runs of `operation`; returns the p50 in milliseconds.
async fn probe<F, Fut>(calls: usize, mut operation: F) -> anyhow::Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut latencies = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        operation().await?;
        latencies.push(started.elapsed());
    }
    latencies.sort_unstable();
    Ok(percentile_ms(&latencies, 50.0))
}

/// Sequential probes that take the gateway's send apart.
#[derive(Clone, Copy)]
struct Probes {
    /// `{ credits { balance } }`: HTTP, JWT check, principal lookup, one read, JSON.
    graphql_read_ms: f64,
    /// One autocommit insert through the gateway's `Store` (durable commit included).
    commit_ms: f64,
    /// The Argus directory search the gateway makes before each send.
    directory_lookup_ms: f64,
}

/// What one cell measured through the gateway.
struct GatewayCell {
    backend: &'static str,
    clients: usize,
    gateway: PhaseResult,
    /// The bare durable mutation on the same database, same clients and tokens.
    bare: PhaseResult,
    /// Messages the sandbox had received by the end of the gateway phase, per second of it.
    handed_over_per_second: f64,
    /// Send-to-DELIVERED of every message that got there, sorted ascending.
    sorted_delivery_latencies: Vec<Duration>,
    /// Messages the provider had not yet received when the gateway phase ended.
    queued_at_phase_end: usize,
    /// From the end of the gateway phase until no message was QUEUED or SENT.
    drain_time: Duration,
    /// Delivered messages per second, from the first `createdAt` to the last `deliveredAt`:
    /// what the outbox sustained end to end.
    delivered_per_second: f64,
    /// Messages by final status.
    statuses: BTreeMap<String, usize>,
    probes: Probes,
    /// Peak resident set size during the gateway phase and its drain, in KiB.
    gateway_peak_kib: Option<u64>,
}

/// A cell whose gateway phase is done; its sandbox waits for the direct phase.
struct PendingCell {
    measured: GatewayCell,
    sandbox: smd_sandbox::SandboxHandle,
    target: DirectTarget,
}

/// Everything measured in one cell.
struct CellReport {
    measured: GatewayCell,
    direct: PhaseResult,
    /// Peak resident set size during the direct phase, in KiB.
    direct_peak_kib: Option<u64>,
}

/// A gateway serving on a loopback port until stopped.
struct RunningGateway {
    url: String,
    store: Store,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningGateway {
    /// Builds a production-mode gateway the way `tests/e2e/helpers.rs` does, on `sandbox_url`
    /// for providers and payments.
    async fn start(sandbox_url: &str, database_url: &str, data_dir: &Path) -> anyhow::Result<Self> {
        let settings = Settings {
            mode: Mode::Production,
            listen: "127.0.0.1:0".parse()?,
            data_dir: data_dir.to_path_buf(),
            database_url: Some(database_url.to_owned()),
            jwt: JwtSettings {
                issuer: Some(ISSUER.into()),
                audience: Some(AUDIENCE.into()),
                hs256_secret: Some(SIGNING_SECRET.into()),
                leeway_seconds: 5,
                ..JwtSettings::default()
            },
            encryption_key: Some(SecretBox::generate_key()),
            providers: ProviderSettings {
                argus_base_url: Some(sandbox_url.to_owned()),
                referralnet_base_url: Some(sandbox_url.to_owned()),
                timeout_ms: 5_000,
                allow_insecure_http: true,
            },
            payments: PaymentSettings {
                base_url: Some(sandbox_url.to_owned()),
                api_key: Some("sk_sandbox_bench".into()),
            },
            messaging: MessagingConfig {
                status_poll_interval_ms: Some(STATUS_POLL_INTERVAL_MS),
                retry_base_ms: 50,
                retry_max_ms: 1_000,
                give_up_after_seconds: 600,
                ..MessagingConfig::default()
            },
            approval_poll_interval_ms: Some(1_000),
            graphql: GraphqlSettings {
                playground: Some(false),
                introspection: Some(false),
                ..GraphqlSettings::default()
            },
            // Every client is on loopback and sends as fast as it can on purpose: lift the
            // request buckets so the figures are the send path's, not the limiter's refusals.
            limits: smd_gateway::config::LimitSettings {
                user_requests_per_second: 10_000_000,
                user_request_burst: 10_000_000,
                address_requests_per_second: 10_000_000,
                address_request_burst: 10_000_000,
                ..smd_gateway::config::LimitSettings::default()
            },
            seed_demo_data: false,
            print_banner: false,
            ..Settings::default()
        };
        let app = App::build(settings).await.context("the gateway builds")?;
        let url = format!("http://{}", app.address());
        let store = app.store();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            url,
            store,
            stop,
            server,
        })
    }

    /// Stops serving and waits for the background workers to finish.
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.server.await.context("the gateway task panicked")??;
        self.store.close().await?;
        Ok(())
    }
}

/// One backend for the length of the run: where each cell's fresh database comes from.
enum Backend {
    Sqlite,
    Postgres {
        admin: DatabaseConnection,
        admin_url: String,
    },
}

impl Backend {
    fn label(&self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres { .. } => "postgresql",
        }
    }

    async fn describe(&self) -> anyhow::Result<String> {
        Ok(match self {
            Backend::Sqlite => {
                let memory = Database::connect("sqlite::memory:").await?;
                let version = server_version(&memory, "SELECT sqlite_version() AS v").await?;
                format!(
                    "SQLite {version} (file in a temporary directory, WAL; the gateway: synchronous=NORMAL plus its group-commit WAL flush before answering; the bare mutation: synchronous=FULL)"
                )
            }
            Backend::Postgres { admin, .. } => {
                server_version(admin, "SELECT version() AS v").await?
            }
        })
    }

    /// A fresh database URL for one cell: a file in `directory`, or a new PostgreSQL database
    /// (its name is returned so it can be dropped).
    async fn fresh_database(&self, directory: &Path) -> anyhow::Result<(String, Option<String>)> {
        match self {
            Backend::Sqlite => Ok((
                format!(
                    "sqlite://{}?mode=rwc",
                    directory.join("gateway.db").display()
                ),
                None,
            )),
            Backend::Postgres { admin, admin_url } => {
                let name = format!("smd_bench_{}", uuid::Uuid::new_v4().simple());
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .context("create the benchmark database")?;
                Ok((database_url(admin_url, &name), Some(name)))
            }
        }
    }

    async fn drop_database(&self, name: &str) -> anyhow::Result<()> {
        if let Backend::Postgres { admin, .. } = self {
            admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .with_context(|| format!("drop the benchmark database {name}"))?;
        }
        Ok(())
    }
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

// ---- the ceiling: a bare durable mutation ----

/// The claims the bare server checks (the gateway checks the same ones).
#[derive(serde::Deserialize)]
struct BareClaims {
    sub: String,
    group: String,
}

struct BareQuery;

#[async_graphql::Object]
impl BareQuery {
    /// async-graphql needs a query root.
    async fn ok(&self) -> bool {
        true
    }
}

struct BareMutation;

#[async_graphql::Object]
impl BareMutation {
    /// Inserts one row in one write transaction and answers once it is committed.
    async fn record_send(
        &self,
        ctx: &async_graphql::Context<'_>,
        idempotency_key: String,
    ) -> async_graphql::Result<String> {
        let claims = ctx.data::<BareClaims>()?;
        let db = ctx.data::<DatabaseConnection>()?;
        let id = uuid::Uuid::now_v7().to_string();
        let txn = match db.get_database_backend() {
            sea_orm::DatabaseBackend::Sqlite => {
                sea_orm::TransactionTrait::begin_with_options(
                    db,
                    sea_orm::TransactionOptions {
                        sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
                        ..sea_orm::TransactionOptions::default()
                    },
                )
                .await?
            }
            _ => sea_orm::TransactionTrait::begin(db).await?,
        };
        txn.execute_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            match txn.get_database_backend() {
                sea_orm::DatabaseBackend::Postgres => {
                    "INSERT INTO bare_sends (id, group_id, user_id, idempotency_key, created_at) VALUES ($1, $2, $3, $4, $5)"
                }
                _ => {
                    "INSERT INTO bare_sends (id, group_id, user_id, idempotency_key, created_at) VALUES (?, ?, ?, ?, ?)"
                }
            },
            [
                id.clone().into(),
                claims.group.clone().into(),
                claims.sub.clone().into(),
                idempotency_key.into(),
                Utc::now().timestamp_millis().into(),
            ],
        ))
        .await?;
        txn.commit().await?;
        Ok(id)
    }
}

type BareSchema = async_graphql::Schema<BareQuery, BareMutation, async_graphql::EmptySubscription>;

/// The bare server's one route: verify the bearer token (HS256, `exp`, `iss`, `aud`, as the
/// gateway does), then run the operation.
async fn bare_graphql(
    axum::extract::State((schema, key, validation)): axum::extract::State<(
        BareSchema,
        jsonwebtoken::DecodingKey,
        jsonwebtoken::Validation,
    )>,
    headers: axum::http::HeaderMap,
    request: async_graphql_axum::GraphQLRequest,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let Some(claims) = token
        .and_then(|token| jsonwebtoken::decode::<BareClaims>(token, &key, &validation).ok())
        .map(|decoded| decoded.claims)
    else {
        return axum::http::StatusCode::UNAUTHORIZED.into_response();
    };
    async_graphql_axum::GraphQLResponse::from(
        schema.execute(request.into_inner().data(claims)).await,
    )
    .into_response()
}

/// A bare authenticated async-graphql server whose one mutation inserts one row in one
/// transaction into `database_url` (its own pool of 8; on SQLite WAL with `synchronous=FULL`,
/// the plain way to make each commit durable before answering).
async fn spawn_bare_durable(
    database_url: &str,
) -> anyhow::Result<(String, oneshot::Sender<()>, DatabaseConnection)> {
    let mut options = sea_orm::ConnectOptions::new(database_url.to_owned());
    options
        .max_connections(8)
        .min_connections(1)
        .sqlx_logging(false)
        .map_sqlx_sqlite_opts(|sqlite| {
            sqlite
                .journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(5))
        });
    let db = Database::connect(options).await?;
    db.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS bare_sends (id TEXT PRIMARY KEY, group_id TEXT NOT NULL, user_id TEXT NOT NULL, idempotency_key TEXT NOT NULL, created_at BIGINT NOT NULL)",
    )
    .await?;
    let schema =
        async_graphql::Schema::build(BareQuery, BareMutation, async_graphql::EmptySubscription)
            .data(db.clone())
            .finish();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_issuer(&[ISSUER]);
    validation.set_audience(&[AUDIENCE]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let key = jsonwebtoken::DecodingKey::from_secret(SIGNING_SECRET.as_bytes());
    let router = axum::Router::new()
        .route("/graphql", axum::routing::post(bare_graphql))
        .with_state((schema, key, validation));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/graphql", listener.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await;
    });
    Ok((url, stop, db))
}

const BARE_MUTATION: &str = "mutation($key: String!) { recordSend(idempotencyKey: $key) }";

/// Calls the bare mutation until `deadline`, one call at a time.
async fn bare_send_loop(
    http: reqwest::Client,
    url: String,
    token: String,
    deadline: Instant,
) -> TaskOutcome {
    let mut outcome = TaskOutcome::default();
    while Instant::now() < deadline {
        let started = Instant::now();
        let answer = http
            .post(&url)
            .bearer_auth(&token)
            .json(&json!({"query": BARE_MUTATION, "variables": {"key": uuid::Uuid::new_v4().to_string()}}))
            .send()
            .await;
        let body: Option<Value> = match answer {
            Ok(response) => response.json().await.ok(),
            Err(_) => None,
        };
        match body
            .as_ref()
            .and_then(|body| body["data"]["recordSend"].as_str())
        {
            Some(id) => {
                outcome.latencies.push(started.elapsed());
                outcome.message_ids.push(id.to_owned());
            }
            None => {
                let code = body
                    .map(|body| body["errors"][0]["message"].to_string())
                    .unwrap_or_else(|| "no answer".to_owned());
                *outcome.failures.entry(code).or_default() += 1;
            }
        }
    }
    outcome
}

/// Runs the cells, and holds what they share.
struct Bench {
    http: reqwest::Client,
    phase: Duration,
    /// Check failures found so far (there must never be any).
    mismatches: usize,
    /// The HL7 text of the latest message the gateway handed to a sandbox.
    last_hl7_text: Option<String>,
}

impl Bench {
    fn mismatch(&mut self, cell: &str, what: String) {
        self.mismatches += 1;
        println!("MISMATCH {cell}: {what}");
    }

    /// A cell's gateway side: fresh sandbox, database and gateway; the gateway phase, its
    /// checks and probes. The sandbox is kept for the cell's direct phase.
    async fn run_gateway_cell(
        &mut self,
        backend: &Backend,
        clients: usize,
    ) -> anyhow::Result<PendingCell> {
        let sandbox = smd_sandbox::spawn(
            "127.0.0.1:0".parse()?,
            SandboxConfig {
                clock_speed: SANDBOX_CLOCK_SPEED,
                // The gateway's ReferralNet webhook is on loopback.
                allow_private_webhooks: true,
                ..SandboxConfig::default()
            },
        )
        .await?;
        let directory = tempfile::tempdir()?;
        let (database_url, postgres_name) = backend.fresh_database(directory.path()).await?;
        let outcome = self
            .run_gateway_cell_on(
                backend,
                clients,
                &sandbox.base_url(),
                &database_url,
                directory.path(),
            )
            .await;
        if let Some(name) = postgres_name {
            backend.drop_database(&name).await?;
        }
        let (measured, target) = outcome?;
        Ok(PendingCell {
            measured,
            sandbox,
            target,
        })
    }

    /// A cell's direct phase: C tasks POST straight to the cell's sandbox.
    async fn run_direct_cell(&mut self, pending: PendingCell) -> anyhow::Result<CellReport> {
        let PendingCell {
            measured,
            sandbox,
            target,
        } = pending;
        let cell = format!("{} {} client(s)", measured.backend, measured.clients);
        eprintln!("{cell}: sandbox-direct phase, {:?}", self.phase);
        reset_peak_resident_set();
        let cpu_at_start = CpuSample::now();
        let started = Instant::now();
        let deadline = started + self.phase;
        let tasks = (0..measured.clients)
            .map(|_| tokio::spawn(direct_send_loop(target.clone(), deadline)))
            .collect();
        let direct = run_phase(tasks, started, cpu_at_start).await?;
        let direct_peak_kib = peak_resident_set_kib();
        sandbox.shutdown().await;
        // Listing tens of thousands of payloads back would cost more memory than the phase
        // did; distinct tracking ids show that every accepted send is its own message.
        let distinct_tracking_ids: std::collections::HashSet<&String> =
            direct.message_ids.iter().collect();
        if distinct_tracking_ids.len() != direct.sends() {
            self.mismatch(
                &cell,
                format!(
                    "{} direct sends were answered with {} distinct tracking ids",
                    direct.sends(),
                    distinct_tracking_ids.len()
                ),
            );
        }
        if direct.failed() > 0 {
            eprintln!("{cell}: direct failures: {:?}", direct.failures);
        }
        Ok(CellReport {
            measured,
            direct,
            direct_peak_kib,
        })
    }

    async fn run_gateway_cell_on(
        &mut self,
        backend: &Backend,
        clients: usize,
        sandbox_url: &str,
        database_url: &str,
        data_dir: &Path,
    ) -> anyhow::Result<(GatewayCell, DirectTarget)> {
        let cell = format!("{} {clients} client(s)", backend.label());
        let running = RunningGateway::start(sandbox_url, database_url, data_dir).await?;
        let gateway = GatewayClient {
            http: self.http.clone(),
            graphql_url: format!("{}/graphql", running.url),
        };
        // Enough credits for every practitioner even if one client sent at the budgeted rate.
        let credits_each =
            BUDGETED_SENDS_PER_SECOND * self.phase.as_secs().max(1) * CREDITS_PER_SEND as u64
                / clients as u64;
        let packs = usize::try_from(credits_each.div_ceil(PACK_CREDITS as u64))?.max(1);
        eprintln!("{cell}: enrolling {clients} practitioner(s), {packs} × {PACK_ID} each");
        let practitioners = enroll_practitioners(&gateway, clients, packs).await?;
        let recipient_id = pick_recipient(&gateway, &practitioners[0]).await?;

        eprintln!("{cell}: gateway phase, {:?}", self.phase);
        reset_peak_resident_set();
        let cpu_at_start = CpuSample::now();
        let started = Instant::now();
        let deadline = started + self.phase;
        let tasks = practitioners
            .iter()
            .map(|practitioner| {
                tokio::spawn(gateway_send_loop(
                    gateway.clone(),
                    practitioner.clone(),
                    recipient_id.clone(),
                    deadline,
                ))
            })
            .collect();
        let gateway_phase = run_phase(tasks, started, cpu_at_start).await?;
        let drain_started = Instant::now();
        let handed_over = sandbox_messages(&self.http, sandbox_url).await?.len();
        let queued_at_phase_end = gateway_phase.sends().saturating_sub(handed_over);
        let drained =
            wait_until_delivered(&gateway, &practitioners, drain_started + DELIVERY_DEADLINE)
                .await?;
        let drain_time = drain_started.elapsed();
        let gateway_peak_kib = peak_resident_set_kib();
        if !drained {
            self.mismatch(
                &cell,
                format!("messages still QUEUED or SENT {DELIVERY_DEADLINE:?} after the phase"),
            );
        }

        // What reached DELIVERED, and when.
        let mut statuses = BTreeMap::new();
        let mut sorted_delivery_latencies = Vec::new();
        let mut listed_ids = std::collections::HashSet::new();
        let mut first_created: Option<DateTime<Utc>> = None;
        let mut last_delivered: Option<DateTime<Utc>> = None;
        for (index, practitioner) in practitioners.iter().enumerate() {
            let listed = outbound_messages(&gateway, practitioner).await?;
            if listed.len() != gateway_phase.sends_per_task[index] {
                self.mismatch(
                    &cell,
                    format!(
                        "practitioner {index} lists {} messages after {} successful sends",
                        listed.len(),
                        gateway_phase.sends_per_task[index]
                    ),
                );
            }
            for message in listed {
                *statuses.entry(message.status.clone()).or_insert(0usize) += 1;
                if let Some(created) = message.created_at {
                    first_created = Some(first_created.map_or(created, |first| first.min(created)));
                }
                let reached = matches!(message.status.as_str(), "DELIVERED" | "ACKNOWLEDGED");
                if reached
                    && let (Some(created), Some(delivered)) =
                        (message.created_at, message.delivered_at)
                {
                    last_delivered = last_delivered.max(Some(delivered));
                    sorted_delivery_latencies
                        .push((delivered - created).to_std().unwrap_or_default());
                }
                listed_ids.insert(message.id);
            }
        }
        sorted_delivery_latencies.sort_unstable();
        let delivered_per_second = match (first_created, last_delivered) {
            (Some(first), Some(last)) if last > first => {
                sorted_delivery_latencies.len() as f64
                    / (last - first).to_std().unwrap_or_default().as_secs_f64()
            }
            _ => f64::NAN,
        };
        let unlisted = gateway_phase
            .message_ids
            .iter()
            .filter(|id| !listed_ids.contains(*id))
            .count();
        if unlisted > 0 {
            self.mismatch(&cell, format!("{unlisted} sent message ids are not listed"));
        }

        // The provider received each send exactly once, and each one was paid for exactly once.
        let received = sandbox_messages(&self.http, sandbox_url).await?;
        if received.len() != gateway_phase.sends() {
            self.mismatch(
                &cell,
                format!(
                    "the sandbox received {} messages; the gateway reported {} sent",
                    received.len(),
                    gateway_phase.sends()
                ),
            );
        }
        for (index, practitioner) in practitioners.iter().enumerate() {
            let credits = gateway
                .data(&practitioner.token, BALANCE_QUERY, json!({}))
                .await?;
            let balance = credits["credits"]["balance"].as_i64();
            let sends = i64::try_from(gateway_phase.sends_per_task[index])?;
            let expected = practitioner.credits_bought - CREDITS_PER_SEND * sends;
            if balance != Some(expected) {
                self.mismatch(
                    &cell,
                    format!(
                        "practitioner {index} holds {balance:?} credits; bought {} and sent {sends}, so expected {expected}",
                        practitioner.credits_bought
                    ),
                );
            }
        }
        // The direct phase sends what the gateway built; a cell whose sends all failed borrows
        // an earlier cell's (the same note, so the same size).
        let hl7_text = match received
            .first()
            .and_then(|message| message["payload"].as_str())
        {
            Some(text) => {
                self.last_hl7_text = Some(text.to_owned());
                text.to_owned()
            }
            None => {
                eprintln!(
                    "{cell}: no message reached the sandbox; the direct phase reuses an earlier cell's payload"
                );
                self.last_hl7_text.clone().context(
                    "no message reached the sandbox in this or an earlier cell, so the direct phase has no payload to send",
                )?
            }
        };
        drop(received);

        eprintln!("{cell}: probes");
        let probes = self
            .probes(
                &gateway,
                &running.store,
                &practitioners[0],
                sandbox_url,
                &recipient_id,
            )
            .await?;
        running.stop().await?;

        // The ceiling: the same clients, the same tokens, one bare durable mutation each call,
        // on the same database, with the gateway stopped.
        eprintln!("{cell}: bare durable mutation phase, {:?}", self.phase);
        let (bare_url, stop_bare, bare_db) = spawn_bare_durable(database_url).await?;
        let cpu_at_start = CpuSample::now();
        let started = Instant::now();
        let deadline = started + self.phase;
        let tasks = practitioners
            .iter()
            .map(|practitioner| {
                tokio::spawn(bare_send_loop(
                    self.http.clone(),
                    bare_url.clone(),
                    practitioner.token.clone(),
                    deadline,
                ))
            })
            .collect();
        let bare_phase = run_phase(tasks, started, cpu_at_start).await?;
        let _ = stop_bare.send(());
        let stored = bare_db
            .query_one_raw(Statement::from_string(
                bare_db.get_database_backend(),
                "SELECT COUNT(*) AS n FROM bare_sends".to_owned(),
            ))
            .await?
            .context("count bare rows")?
            .try_get::<i64>("", "n")?;
        bare_db.close().await?;
        if stored != i64::try_from(bare_phase.sends())? {
            self.mismatch(
                &cell,
                format!(
                    "the bare mutation answered {} calls but stored {stored} rows",
                    bare_phase.sends()
                ),
            );
        }
        if bare_phase.failed() > 0 {
            eprintln!("{cell}: bare failures: {:?}", bare_phase.failures);
        }

        if gateway_phase.failed() > 0 {
            eprintln!("{cell}: gateway failures: {:?}", gateway_phase.failures);
        }
        if gateway_phase.tasks_out_of_credits > 0 {
            eprintln!(
                "{cell}: {} practitioner(s) ran out of credits before the deadline",
                gateway_phase.tasks_out_of_credits
            );
        }
        let target = DirectTarget {
            http: self.http.clone(),
            messages_url: format!("{sandbox_url}/argus/v1/messages"),
            recipient_hpii: recipient_id,
            payload_base64: base64::engine::general_purpose::STANDARD.encode(&hl7_text),
        };
        Ok((
            GatewayCell {
                backend: backend.label(),
                clients,
                handed_over_per_second: handed_over as f64 / gateway_phase.wall_time.as_secs_f64(),
                gateway: gateway_phase,
                bare: bare_phase,
                sorted_delivery_latencies,
                queued_at_phase_end,
                drain_time,
                delivered_per_second,
                statuses,
                probes,
                gateway_peak_kib,
            },
            target,
        ))
    }

    async fn probes(
        &self,
        gateway: &GatewayClient,
        store: &Store,
        practitioner: &Practitioner,
        sandbox_url: &str,
        recipient_id: &str,
    ) -> anyhow::Result<Probes> {
        let graphql_read_ms = probe(PROBE_CALLS, || async {
            gateway
                .data(&practitioner.token, BALANCE_QUERY, json!({}))
                .await
                .map(drop)
        })
        .await?;
        let mut inserted = 0usize;
        let commit_ms = probe(PROBE_CALLS, || {
            inserted += 1;
            let entry = AuditEntry {
                group_id: BENCH_GROUP.to_owned(),
                actor_user_id: None,
                actor_subject: "bench-probe".to_owned(),
                action: "BENCH_PROBE".to_owned(),
                target: format!("probe:{inserted}"),
                outcome: AuditOutcome::Success,
                detail: None,
                request_id: format!("bench-probe-{inserted}"),
                on_behalf_of: None,
            };
            async move { Ok(store.insert_audit(&entry).await?) }
        })
        .await?;
        let directory_url = format!("{sandbox_url}/argus/v1/directory");
        let directory_lookup_ms = probe(PROBE_CALLS, || async {
            // The query the gateway's Argus adapter makes to find a recipient before a send.
            let found: Value = self
                .http
                .get(&directory_url)
                .basic_auth(ARGUS_USERNAME, Some(ARGUS_PASSWORD))
                .query(&[("q", recipient_id), ("page", "1"), ("pageSize", "50")])
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            ensure!(found["total"] == 1, "the directory search found {found}");
            Ok(())
        })
        .await?;
        Ok(Probes {
            graphql_read_ms,
            commit_ms,
            directory_lookup_ms,
        })
    }
}

fn print_results_table(reports: &[CellReport]) {
    println!(
        "| backend    | clients | path    | sends/s accepted | handed over/s | queued at phase end | send p50 ms | send p99 ms | to-DELIVERED p50 ms | to-DELIVERED p99 ms | CPU-ms per send | ÷ bare | ÷ direct |"
    );
    println!(
        "|------------|--------:|---------|-----------------:|--------------:|--------------------:|------------:|------------:|--------------------:|--------------------:|----------------:|-------:|---------:|"
    );
    for report in reports {
        let measured = &report.measured;
        let accepted = measured.gateway.sends_per_second();
        println!(
            "| {:<10} | {:>7} | gateway | {:>16.0} | {:>13.0} | {:>19} | {:>11.2} | {:>11.2} | {:>19.1} | {:>19.1} | {:>15.2} | {:>6.2} | {:>8.3} |",
            measured.backend,
            measured.clients,
            accepted,
            measured.handed_over_per_second,
            measured.queued_at_phase_end,
            percentile_ms(&measured.gateway.sorted_latencies, 50.0),
            percentile_ms(&measured.gateway.sorted_latencies, 99.0),
            percentile_ms(&measured.sorted_delivery_latencies, 50.0),
            percentile_ms(&measured.sorted_delivery_latencies, 99.0),
            measured.gateway.cpu_ms_per_send(),
            accepted / measured.bare.sends_per_second(),
            accepted / report.direct.sends_per_second(),
        );
        for (path, phase) in [("bare", &measured.bare), ("direct", &report.direct)] {
            println!(
                "| {:<10} | {:>7} | {:<7} | {:>16.0} | {:>13} | {:>19} | {:>11.2} | {:>11.2} | {:>19} | {:>19} | {:>15.3} | {:>6} | {:>8} |",
                measured.backend,
                measured.clients,
                path,
                phase.sends_per_second(),
                "—",
                "—",
                percentile_ms(&phase.sorted_latencies, 50.0),
                percentile_ms(&phase.sorted_latencies, 99.0),
                "—",
                "—",
                phase.cpu_ms_per_send(),
                "",
                "",
            );
        }
    }
}

fn print_diagnostics_table(reports: &[CellReport]) {
    println!(
        "| backend    | clients | sends gw / direct | failed gw / direct | queued at phase end | drain s | delivered/s | final statuses | gw cores: process / postgres / other | direct cores: process / other | CPU ms per send gw / direct | gql read p50 ms | commit p50 ms | directory lookup p50 ms | peak RSS MiB gw / direct |"
    );
    println!(
        "|------------|--------:|------------------:|-------------------:|--------------------:|--------:|------------:|----------------|-------------------------------------:|------------------------------:|----------------------------:|----------------:|--------------:|------------------------:|-------------------------:|"
    );
    let mebibytes = |kib: Option<u64>| {
        kib.map_or_else(
            || "?".to_owned(),
            |kib| format!("{:.0}", kib as f64 / 1024.0),
        )
    };
    for report in reports {
        let statuses: Vec<String> = report
            .measured
            .statuses
            .iter()
            .map(|(status, count)| format!("{count} {status}"))
            .collect();
        let gateway_cpu = report.measured.gateway.cpu;
        let direct_cpu = report.direct.cpu;
        println!(
            "| {:<10} | {:>7} | {:>17} | {:>18} | {:>19} | {:>7.2} | {:>11.0} | {:<14} | {:>36} | {:>29} | {:>27} | {:>15.2} | {:>13.2} | {:>23.2} | {:>24} |",
            report.measured.backend,
            report.measured.clients,
            format!(
                "{} / {}",
                report.measured.gateway.sends(),
                report.direct.sends()
            ),
            format!(
                "{} / {}",
                report.measured.gateway.failed(),
                report.direct.failed()
            ),
            report.measured.queued_at_phase_end,
            report.measured.drain_time.as_secs_f64(),
            report.measured.delivered_per_second,
            statuses.join(", "),
            format!(
                "{:.2} / {:.2} / {:.2}",
                gateway_cpu.process_cores,
                gateway_cpu.postgres_cores,
                gateway_cpu.other_cores()
            ),
            format!(
                "{:.2} / {:.2}",
                direct_cpu.process_cores,
                direct_cpu.other_cores()
            ),
            format!(
                "{:.2} / {:.3}",
                report.measured.gateway.cpu_ms_per_send(),
                report.direct.cpu_ms_per_send()
            ),
            report.measured.probes.graphql_read_ms,
            report.measured.probes.commit_ms,
            report.measured.probes.directory_lookup_ms,
            format!(
                "{} / {}",
                mebibytes(report.measured.gateway_peak_kib),
                mebibytes(report.direct_peak_kib)
            ),
        );
    }
}

/// "1 client", "8 clients".
fn clients_label(clients: usize) -> String {
    if clients == 1 {
        "1 client".to_owned()
    } else {
        format!("{clients} clients")
    }
}

/// One paragraph on what limits the gateway's send rate, from the numbers of this run.
fn what_limits_it(reports: &[CellReport], cores: usize) -> String {
    let mut sentences = Vec::new();
    let bare_ratio = |report: &CellReport| {
        report.measured.gateway.sends_per_second() / report.measured.bare.sends_per_second()
    };
    let ratio = |report: &CellReport| {
        report.measured.gateway.sends_per_second() / report.direct.sends_per_second()
    };
    let fold_range = |values: Vec<f64>| {
        (
            values.iter().copied().fold(f64::INFINITY, f64::min),
            values.iter().copied().fold(0.0, f64::max),
        )
    };
    let (lowest_bare, highest_bare) = fold_range(reports.iter().map(bare_ratio).collect());
    let bare_aim_met = reports
        .iter()
        .filter(|report| bare_ratio(report) >= 0.5)
        .count();
    sentences.push(format!(
        "A send ran at {:.0}–{:.0}% of the bare durable mutation's rate on the same database ({bare_aim_met} of {} cells at or above the 0.5× aim).",
        lowest_bare * 100.0,
        highest_bare * 100.0,
        reports.len()
    ));
    let (lowest, highest) = fold_range(reports.iter().map(ratio).collect());
    let aim_met = reports.iter().filter(|report| ratio(report) >= 0.5).count();
    sentences.push(format!(
        "Against sandbox-direct (the provider's own ceiling, no database at all) it sustained {:.2}–{:.2}%.",
        lowest * 100.0,
        highest * 100.0,
    ));
    let direct_cpu = reports
        .iter()
        .map(|report| report.direct.cpu_ms_per_send())
        .fold(f64::INFINITY, f64::min);
    let gateway_cpu = reports
        .iter()
        .map(|report| report.measured.gateway.cpu_ms_per_send())
        .fold(f64::INFINITY, f64::min);
    let cheapest_read = reports
        .iter()
        .map(|report| report.measured.probes.graphql_read_ms)
        .fold(f64::INFINITY, f64::min);
    if aim_met < reports.len() {
        let direct_single_p50 = reports
            .iter()
            .map(|report| percentile_ms(&report.direct.sorted_latencies, 50.0))
            .fold(f64::INFINITY, f64::min);
        sentences.push(format!(
            "The direct ceiling is the sandbox appending to memory: {direct_cpu:.3} CPU-ms and {direct_single_p50:.2} ms per send at best, whereas the cheapest gateway send here cost {gateway_cpu:.2} CPU-ms and one bare authenticated GraphQL read alone takes {cheapest_read:.2} ms; when both paths are CPU-bound the ratio can be no better than their costs' ratio, {:.1}%, so half the direct rate is out of reach of any gateway that authenticates, reads and durably commits per send against this sandbox — the gap measures the sandbox's cheapness as much as the gateway's cost.",
            direct_cpu / gateway_cpu * 100.0
        ));
    }

    let mut backends: Vec<&str> = reports
        .iter()
        .map(|report| report.measured.backend)
        .collect();
    backends.dedup();
    for backend in &backends {
        let cells: Vec<&CellReport> = reports
            .iter()
            .filter(|report| report.measured.backend == *backend)
            .collect();
        // Per-send work, from the one-client cell (no queueing, so latency is cost).
        if let Some(single) = cells.iter().find(|report| report.measured.clients == 1) {
            let gateway_p50 = percentile_ms(&single.measured.gateway.sorted_latencies, 50.0);
            let direct_p50 = percentile_ms(&single.direct.sorted_latencies, 50.0);
            sentences.push(format!(
                "On {backend} with one client a send takes {gateway_p50:.2} ms through the gateway against {direct_p50:.2} ms direct; of the {:.2} ms difference a bare authenticated GraphQL read accounts for {:.2} ms, an uncached Argus directory search (the gateway caches a practice's pages for a minute, so repeated sends to one recipient skip it) {:.2} ms, and one durable commit {:.2} ms, the rest being the send's other reads, sealing, HL7 building and its debit transaction.",
                gateway_p50 - direct_p50,
                single.measured.probes.graphql_read_ms,
                single.measured.probes.directory_lookup_ms,
                single.measured.probes.commit_ms,
            ));
        }

        // Stalls: calls that waited out a timeout instead of queueing.
        let stalled: Vec<&CellReport> = cells
            .iter()
            .copied()
            .filter(|report| {
                report.measured.gateway.failed() > 0
                    || percentile_ms(&report.measured.gateway.sorted_latencies, 99.0) >= 1000.0
            })
            .collect();
        if let Some(worst) = stalled.iter().copied().max_by(|a, b| {
            percentile_ms(&a.measured.gateway.sorted_latencies, 99.0)
                .total_cmp(&percentile_ms(&b.measured.gateway.sorted_latencies, 99.0))
        }) {
            let failed: usize = stalled
                .iter()
                .map(|report| report.measured.gateway.failed())
                .sum();
            let mut codes: Vec<&str> = stalled
                .iter()
                .flat_map(|report| report.measured.gateway.failures.keys())
                .map(String::as_str)
                .collect();
            codes.sort_unstable();
            codes.dedup();
            let timeout = if *backend == "sqlite" {
                "the SQLite busy timeout (5 s) or the pool's acquire timeout (10 s)"
            } else {
                "the pool's acquire timeout (10 s)"
            };
            sentences.push(format!(
                "On {backend} sends stalled in {} of {} cells: send p99 reached {:.1} s (with {}) and {failed} sends failed{}; a wait near {timeout} is the signature of requests waiting out a database timeout rather than queueing — for instance a request that holds a write transaction while it waits for a second pooled connection, which the writers queued behind it hold — and while it lasts these stalls, not the per-send cost, set the rate.",
                stalled.len(),
                cells.len(),
                percentile_ms(&worst.measured.gateway.sorted_latencies, 99.0) / 1000.0,
                clients_label(worst.measured.clients),
                if codes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", codes.join(", "))
                },
            ));
        }

        // Saturation, at the busiest cell.
        let Some(best) = cells.iter().copied().max_by(|a, b| {
            a.measured
                .gateway
                .sends_per_second()
                .total_cmp(&b.measured.gateway.sends_per_second())
        }) else {
            continue;
        };
        let cpu = best.measured.gateway.cpu;
        let mut sentence = format!(
            "On {backend} the gateway peaked at {:.0} sends/s with {} at {:.2} CPU-ms per send (this process{}), which {cores} cores to itself would cap near {:.0}/s; it kept {:.2} cores busy, other work on the machine {:.2}",
            best.measured.gateway.sends_per_second(),
            clients_label(best.measured.clients),
            best.measured.gateway.cpu_ms_per_send(),
            if *backend == "postgresql" {
                " and PostgreSQL"
            } else {
                ""
            },
            cores as f64 * 1000.0 / best.measured.gateway.cpu_ms_per_send(),
            cpu.own_cores(),
            cpu.other_cores(),
        );
        if cpu.own_cores() >= 0.8 * cores as f64 {
            sentence.push_str(", so it is CPU-bound.");
        } else if cpu.machine_cores >= 0.85 * cores as f64 {
            sentence.push_str(", so the machine was full and part of the limit is CPU that other work on this shared machine took.");
        } else {
            let idle = (cores as f64 - cpu.machine_cores).max(0.0);
            sentence.push_str(&format!(
                ", so {idle:.2} cores sat idle: it spent {} of its time waiting, not computing.",
                if idle >= 0.5 * cores as f64 {
                    "most"
                } else {
                    "part"
                }
            ));
        }
        sentences.push(sentence);
        // Queueing, in the largest cell that did not stall.
        let most = cells
            .iter()
            .copied()
            .filter(|report| !stalled.iter().any(|other| std::ptr::eq(*other, *report)))
            .max_by_key(|report| report.measured.clients);
        let percentiles = most.map(|most| {
            (
                percentile_ms(&most.measured.gateway.sorted_latencies, 50.0),
                percentile_ms(&most.measured.gateway.sorted_latencies, 99.0),
            )
        });
        // Busy-handler queueing shows as a long tail short of the stalls above.
        if *backend == "sqlite"
            && let (Some(most), Some((most_p50, most_p99))) = (most, percentiles)
            && most.measured.clients > 1
            && most_p99 > 10.0 * most.measured.probes.commit_ms
        {
            sentences.push(format!(
                "SQLite takes one writer at a time: with {} send p99 is {most_p99:.0} ms against a p50 of {most_p50:.1} ms and a lone commit of {:.2} ms; the gateway's writers queue in order on its write gate (and share WAL flushes), with the outbox's batch claims and records in the same line, so the tail is queueing behind CPU-bound work rather than lock polling.",
                clients_label(most.measured.clients),
                most.measured.probes.commit_ms
            ));
        }
        if *backend == "postgresql" {
            let queueing = match (most, percentiles) {
                (Some(most), Some((most_p50, _))) if most.measured.clients > 1 => format!(
                    " (with {} send p50 was {most_p50:.1} ms)",
                    clients_label(most.measured.clients)
                ),
                _ => String::new(),
            };
            sentences.push(format!(
                "PostgreSQL pays {:.2} ms for a lone commit here (the WAL flush) and a loopback round trip for every statement of a send, which one client waits on in turn; more clients overlap those waits until the CPU, or the pool of 8 connections that the outbox shares, is full{queueing}.",
                best.measured.probes.commit_ms,
            ));
        }

        // Delivery: the outbox.
        // A stalled cell's backlog is the stalls', already told above.
        let best_stalled = stalled.iter().any(|report| std::ptr::eq(*report, best));
        if !best_stalled
            && best.measured.delivered_per_second < 0.9 * best.measured.gateway.sends_per_second()
        {
            sentences.push(format!(
                "On {backend} the outbox delivered only {:.0} messages/s end to end against {:.0} sends/s accepted, left {} messages not yet handed to the provider when the senders stopped, and took {:.1} s to catch up (about {:.0} messages/s with the senders idle): the sustained rate is the outbox's, not the mutation's.",
                best.measured.delivered_per_second,
                best.measured.gateway.sends_per_second(),
                best.measured.queued_at_phase_end,
                best.measured.drain_time.as_secs_f64(),
                best.measured.queued_at_phase_end as f64 / best.measured.drain_time.as_secs_f64(),
            ));
        }
    }
    let best_delivery = reports
        .iter()
        .map(|report| percentile_ms(&report.measured.sorted_delivery_latencies, 50.0))
        .fold(f64::INFINITY, f64::min);
    sentences.push(format!(
        "Send-to-DELIVERED: the outbox wakes when a send commits, claims up to 256 due messages in one transaction, hands them over 32 at a time and records the outcomes in one transaction; the sandbox delivers 5 ms after accepting, and the first delivery check comes {STATUS_POLL_INTERVAL_MS} ms after the hand-over (the status poll interval here), so a message needs two outbox passes; the best p50 here was {best_delivery:.0} ms{}.",
        if best_delivery > 10.0 * STATUS_POLL_INTERVAL_MS as f64 {
            ", which is time spent queued behind other messages in the outbox"
        } else {
            ""
        }
    ));
    sentences.join(" ")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    smd_gateway::install_crypto_provider();
    let options = BenchOptions::parse(std::env::args().skip(1))?;
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run with --release for numbers worth comparing");
    }
    let mut backends = vec![Backend::Sqlite];
    if let Some(admin_url) = &options.postgres_admin_url {
        let admin = Database::connect(admin_url)
            .await
            .context("connect to the PostgreSQL admin URL")?;
        backends.push(Backend::Postgres {
            admin,
            admin_url: admin_url.clone(),
        });
    }
    let mut bench = Bench {
        http: reqwest::Client::new(),
        phase: Duration::from_secs(options.seconds_per_phase),
        mismatches: 0,
        last_hl7_text: None,
    };
    let run_started = Instant::now();
    let mut reports = Vec::new();
    let mut descriptions = Vec::new();
    // Every gateway phase first, then every direct phase on its cell's sandbox: the direct
    // phases leave hundreds of megabytes of accepted messages behind, which would otherwise
    // sit in the next gateway phase's resident set.
    let mut pending = Vec::new();
    for backend in &backends {
        descriptions.push(backend.describe().await?);
        for &clients in &options.client_counts {
            pending.push(bench.run_gateway_cell(backend, clients).await?);
        }
    }
    for cell in pending {
        reports.push(bench.run_direct_cell(cell).await?);
    }
    for backend in backends {
        if let Backend::Postgres { admin, .. } = backend {
            admin.close().await.ok();
        }
    }
    let gateway_peak = reports
        .iter()
        .filter_map(|report| report.measured.gateway_peak_kib)
        .max();
    let direct_peak = reports
        .iter()
        .filter_map(|report| report.direct_peak_kib)
        .max();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);

    println!();
    for description in &descriptions {
        println!("{description}");
    }
    println!(
        "{} s per phase; sandbox clock ×{SANDBOX_CLOCK_SPEED:.0}; status poll {STATUS_POLL_INTERVAL_MS} ms (outbox tick {OUTBOX_TICK_MS:.0} ms, and woken by each send); pool of 8 connections; one practitioner per client, sending 2 of 3 note sections to one Argus recipient; bare = an authenticated async-graphql mutation inserting one row in one transaction on the same database",
        options.seconds_per_phase
    );
    println!();
    print_results_table(&reports);
    println!();
    print_diagnostics_table(&reports);
    println!();
    for report in &reports {
        for (path, phase) in [
            ("gateway", &report.measured.gateway),
            ("direct", &report.direct),
        ] {
            for (failure, count) in &phase.failures {
                println!(
                    "failed: {} {} {path}: {count} × {failure}",
                    report.measured.backend,
                    clients_label(report.measured.clients)
                );
            }
        }
    }
    println!("nproc: {cores}");
    let kilobytes =
        |kib: Option<u64>| kib.map_or_else(|| "unknown".to_owned(), |kib| format!("{kib} kB"));
    println!(
        "peak RSS (VmHWM of the whole process, reset before each phase): {} in the gateway phases (gateway, sandbox, load generator); {} in the direct phases (the sandbox keeps every accepted message in memory)",
        kilobytes(gateway_peak),
        kilobytes(direct_peak)
    );
    println!(
        "total run time: {:.0} s",
        run_started.elapsed().as_secs_f64()
    );
    println!();
    println!("What limits it: {}", what_limits_it(&reports, cores));
    ensure!(
        bench.mismatches == 0,
        "{} check(s) failed; see the MISMATCH lines",
        bench.mismatches
    );
    Ok(())
}
