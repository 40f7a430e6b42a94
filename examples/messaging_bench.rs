//! Messaging load benchmark: C concurrent practitioners send secure messages through the
//! gateway to the sandbox for a fixed time, next to the same sends made straight to the sandbox
//! in the same run (the provider-side ceiling), on SQLite and, when asked, on PostgreSQL.
//!
//! ```text
//! cargo run --release -p smd-gateway-suite --example messaging_bench
//! cargo run --release -p smd-gateway-suite --example messaging_bench -- --postgres postgres://postgres@127.0.0.1:5432/postgres
//! cargo run --release -p smd-gateway-suite --example messaging_bench -- --seconds 5 --clients 1,8,32
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
//! 5. The gateway is stopped, and C tasks POST straight to `/argus/v1/messages` of the same
//!    sandbox for `--seconds`, with HTTP Basic and the HL7 text the gateway built in phase 2.
//!
//! Everything runs in this one process on one tokio runtime — load generator, gateway, sandbox
//! (and, with `--postgres`, a PostgreSQL server on the same machine) — so both paths compete
//! with their own load generator for the same cores; the CPU columns say how busy they were.

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
    "usage: messaging_bench [--postgres ADMIN_URL] [--seconds N] [--clients 1,8,32]";

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
            seconds_per_phase: 10,
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
    /// Busy time of the whole machine (a PostgreSQL server included, and anything else).
    machine_busy_ticks: u64,
    taken_at: Instant,
}

/// How busy the CPUs were between two samples, in cores (1.0 = one core all the time).
#[derive(Clone, Copy, Default)]
struct CpuUse {
    process_cores: f64,
    machine_cores: f64,
    process_seconds: f64,
}

const TICKS_PER_SECOND: f64 = 100.0;

impl CpuSample {
    fn now() -> Self {
        let process_ticks = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| {
                // Fields after the command name, which is in parentheses and may hold spaces;
                // utime and stime are the 12th and 13th of them.
                let after_name = stat.rsplit_once(')')?.1;
                let fields: Vec<&str> = after_name.split_whitespace().collect();
                Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0);
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
            machine_busy_ticks,
            taken_at: Instant::now(),
        }
    }

    fn used_since(self, start: CpuSample) -> CpuUse {
        let seconds = self.taken_at.duration_since(start.taken_at).as_secs_f64();
        let process_seconds =
            self.process_ticks.saturating_sub(start.process_ticks) as f64 / TICKS_PER_SECOND;
        let machine_seconds = self
            .machine_busy_ticks
            .saturating_sub(start.machine_busy_ticks) as f64
            / TICKS_PER_SECOND;
        CpuUse {
            process_cores: process_seconds / seconds,
            machine_cores: machine_seconds / seconds,
            process_seconds,
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

/// Creates `count` practitioners linked to the demo Argus account, each with `packs` ×
/// `pack-3000`, one patient and one three-section note.
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
    let enrolments = tokens
        .into_iter()
        .map(|token| enroll_practitioner(gateway, token, packs));
    futures::future::try_join_all(enrolments).await
}

async fn enroll_practitioner(
    gateway: &GatewayClient,
    token: String,
    packs: usize,
) -> anyhow::Result<Practitioner> {
    gateway
        .data(
            &token,
            "mutation { setPaymentMethod(input: {token: \"pm_sandbox_approve\"}) { last4 } }",
            json!({}),
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

    /// Process CPU milliseconds per successful send.
    fn cpu_ms_per_send(&self) -> f64 {
        self.cpu.process_seconds * 1000.0 / self.sends() as f64
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
async fn wait_until_delivered(
    gateway: &GatewayClient,
    practitioners: &[Practitioner],
    deadline: Instant,
) -> anyhow::Result<bool> {
    let mut waiting: Vec<&Practitioner> = practitioners.iter().collect();
    while !waiting.is_empty() {
        let mut still_waiting = Vec::new();
        for practitioner in waiting {
            let unfinished = gateway
                .data(&practitioner.token, UNFINISHED_QUERY, json!({}))
                .await?;
            let none = |alias: &str| {
                unfinished[alias]["edges"]
                    .as_array()
                    .is_some_and(Vec::is_empty)
            };
            if !(none("queued") && none("sent")) {
                still_waiting.push(practitioner);
            }
        }
        waiting = still_waiting;
        if waiting.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(true)
}

/// A sent message as `messages` lists it.
struct ListedMessage {
    id: String,
    status: String,
    to_delivered: Option<Duration>,
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
            let to_delivered = match (timestamp("createdAt"), timestamp("deliveredAt")) {
                (Some(created), Some(delivered)) => (delivered - created).to_std().ok(),
                _ => None,
            };
            listed.push(ListedMessage {
                id: node["id"].as_str().unwrap_or_default().to_owned(),
                status: node["status"].as_str().unwrap_or("?").to_owned(),
                to_delivered,
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

/// Everything measured in one cell.
struct CellReport {
    backend: &'static str,
    clients: usize,
    gateway: PhaseResult,
    /// Send-to-DELIVERED of every message that got there, sorted ascending.
    sorted_delivery_latencies: Vec<Duration>,
    /// From the end of the gateway phase until no message was QUEUED or SENT.
    drain_time: Duration,
    /// Messages by final status.
    statuses: BTreeMap<String, usize>,
    direct: PhaseResult,
    probes: Probes,
    peak_resident_set_kib: Option<u64>,
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
                format!("SQLite {version} (file in a temporary directory, WAL, synchronous=FULL)")
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

/// Runs the cells of one backend.
struct Bench {
    http: reqwest::Client,
    phase: Duration,
    /// Check failures found so far (there must never be any).
    mismatches: usize,
}

impl Bench {
    fn mismatch(&mut self, cell: &str, what: String) {
        self.mismatches += 1;
        println!("MISMATCH {cell}: {what}");
    }

    /// One cell: fresh sandbox, database and gateway; both phases; checks and probes.
    async fn run_cell(&mut self, backend: &Backend, clients: usize) -> anyhow::Result<CellReport> {
        reset_peak_resident_set();
        let sandbox = smd_sandbox::spawn(
            "127.0.0.1:0".parse()?,
            SandboxConfig {
                clock_speed: SANDBOX_CLOCK_SPEED,
                ..SandboxConfig::default()
            },
        )
        .await?;
        let directory = tempfile::tempdir()?;
        let (database_url, postgres_name) = backend.fresh_database(directory.path()).await?;
        let outcome = self
            .run_cell_on(
                backend,
                clients,
                &sandbox.base_url(),
                &database_url,
                directory.path(),
            )
            .await;
        sandbox.shutdown().await;
        if let Some(name) = postgres_name {
            backend.drop_database(&name).await?;
        }
        outcome
    }

    async fn run_cell_on(
        &mut self,
        backend: &Backend,
        clients: usize,
        sandbox_url: &str,
        database_url: &str,
        data_dir: &Path,
    ) -> anyhow::Result<CellReport> {
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
        let drained =
            wait_until_delivered(&gateway, &practitioners, drain_started + DELIVERY_DEADLINE)
                .await?;
        let drain_time = drain_started.elapsed();
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
                if matches!(message.status.as_str(), "DELIVERED" | "ACKNOWLEDGED")
                    && let Some(latency) = message.to_delivered
                {
                    sorted_delivery_latencies.push(latency);
                }
                listed_ids.insert(message.id);
            }
        }
        sorted_delivery_latencies.sort_unstable();
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
        let hl7_text = received
            .first()
            .and_then(|message| message["payload"].as_str())
            .context("the sandbox holds no message to copy the payload of")?
            .to_owned();

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

        eprintln!("{cell}: sandbox-direct phase, {:?}", self.phase);
        let target = DirectTarget {
            http: self.http.clone(),
            messages_url: format!("{sandbox_url}/argus/v1/messages"),
            recipient_hpii: recipient_id.clone(),
            payload_base64: base64::engine::general_purpose::STANDARD.encode(&hl7_text),
        };
        let cpu_at_start = CpuSample::now();
        let started = Instant::now();
        let deadline = started + self.phase;
        let tasks = (0..clients)
            .map(|_| tokio::spawn(direct_send_loop(target.clone(), deadline)))
            .collect();
        let direct = run_phase(tasks, started, cpu_at_start).await?;
        let received_in_total = sandbox_messages(&self.http, sandbox_url).await?.len();
        if received_in_total != gateway_phase.sends() + direct.sends() {
            self.mismatch(
                &cell,
                format!(
                    "the sandbox holds {received_in_total} messages after {} gateway and {} direct sends",
                    gateway_phase.sends(),
                    direct.sends()
                ),
            );
        }
        for (path, phase) in [("gateway", &gateway_phase), ("direct", &direct)] {
            if phase.failed() > 0 {
                eprintln!("{cell}: {path} failures: {:?}", phase.failures);
            }
            if phase.tasks_out_of_credits > 0 {
                eprintln!(
                    "{cell}: {} practitioner(s) ran out of credits before the deadline",
                    phase.tasks_out_of_credits
                );
            }
        }

        Ok(CellReport {
            backend: backend.label(),
            clients,
            gateway: gateway_phase,
            sorted_delivery_latencies,
            drain_time,
            statuses,
            direct,
            probes,
            peak_resident_set_kib: peak_resident_set_kib(),
        })
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
        "| backend    | clients | path    | sends/s | send p50 ms | send p99 ms | to-DELIVERED p50 ms | to-DELIVERED p99 ms | gateway/direct |"
    );
    println!(
        "|------------|--------:|---------|--------:|------------:|------------:|--------------------:|--------------------:|---------------:|"
    );
    for report in reports {
        println!(
            "| {:<10} | {:>7} | gateway | {:>7.0} | {:>11.2} | {:>11.2} | {:>19.1} | {:>19.1} | {:>14.2} |",
            report.backend,
            report.clients,
            report.gateway.sends_per_second(),
            percentile_ms(&report.gateway.sorted_latencies, 50.0),
            percentile_ms(&report.gateway.sorted_latencies, 99.0),
            percentile_ms(&report.sorted_delivery_latencies, 50.0),
            percentile_ms(&report.sorted_delivery_latencies, 99.0),
            report.gateway.sends_per_second() / report.direct.sends_per_second(),
        );
        println!(
            "| {:<10} | {:>7} | direct  | {:>7.0} | {:>11.2} | {:>11.2} | {:>19} | {:>19} | {:>14} |",
            report.backend,
            report.clients,
            report.direct.sends_per_second(),
            percentile_ms(&report.direct.sorted_latencies, 50.0),
            percentile_ms(&report.direct.sorted_latencies, 99.0),
            "—",
            "—",
            "",
        );
    }
}

fn print_diagnostics_table(reports: &[CellReport]) {
    println!(
        "| backend    | clients | sends gw / direct | failed gw / direct | drain s | final statuses | process cores gw / direct | machine cores gw / direct | CPU ms per send gw / direct | gql read p50 ms | commit p50 ms | directory lookup p50 ms | peak RSS MiB |"
    );
    println!(
        "|------------|--------:|------------------:|-------------------:|--------:|----------------|--------------------------:|--------------------------:|----------------------------:|----------------:|--------------:|------------------------:|-------------:|"
    );
    for report in reports {
        let statuses: Vec<String> = report
            .statuses
            .iter()
            .map(|(status, count)| format!("{count} {status}"))
            .collect();
        println!(
            "| {:<10} | {:>7} | {:>17} | {:>18} | {:>7.2} | {:<14} | {:>25} | {:>25} | {:>27} | {:>15.2} | {:>13.2} | {:>23.2} | {:>12} |",
            report.backend,
            report.clients,
            format!("{} / {}", report.gateway.sends(), report.direct.sends()),
            format!("{} / {}", report.gateway.failed(), report.direct.failed()),
            report.drain_time.as_secs_f64(),
            statuses.join(", "),
            format!(
                "{:.2} / {:.2}",
                report.gateway.cpu.process_cores, report.direct.cpu.process_cores
            ),
            format!(
                "{:.2} / {:.2}",
                report.gateway.cpu.machine_cores, report.direct.cpu.machine_cores
            ),
            format!(
                "{:.2} / {:.2}",
                report.gateway.cpu_ms_per_send(),
                report.direct.cpu_ms_per_send()
            ),
            report.probes.graphql_read_ms,
            report.probes.commit_ms,
            report.probes.directory_lookup_ms,
            report.peak_resident_set_kib.map_or_else(
                || "?".to_owned(),
                |kib| format!("{:.0}", kib as f64 / 1024.0)
            ),
        );
    }
}

/// One paragraph on what limits the gateway's send rate, from the numbers of this run.
fn what_limits_it(reports: &[CellReport], cores: usize) -> String {
    let mut sentences = Vec::new();
    let ratios: Vec<f64> = reports
        .iter()
        .map(|report| report.gateway.sends_per_second() / report.direct.sends_per_second())
        .collect();
    let lowest = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let highest = ratios.iter().copied().fold(0.0, f64::max);
    let aim_met = reports
        .iter()
        .zip(&ratios)
        .filter(|(_, ratio)| **ratio >= 0.5)
        .count();
    sentences.push(format!(
        "The gateway sustained {:.0}–{:.0}% of the sandbox-direct rate ({aim_met} of {} cells at or above the 50% aim).",
        lowest * 100.0,
        highest * 100.0,
        reports.len()
    ));

    // Per-send work, from the one-client cells (no queueing, so latency is cost).
    for report in reports.iter().filter(|report| report.clients == 1) {
        let gateway_p50 = percentile_ms(&report.gateway.sorted_latencies, 50.0);
        let direct_p50 = percentile_ms(&report.direct.sorted_latencies, 50.0);
        sentences.push(format!(
            "On {} with one client a send takes {gateway_p50:.2} ms through the gateway against {direct_p50:.2} ms direct, {:.2} ms of overhead, of which a bare authenticated GraphQL read accounts for {:.2} ms, the Argus directory search made before every send (a scan of the sandbox's directory, absent from the direct path) {:.2} ms, and one durable commit {:.2} ms; the rest is the send's own reads, sealing and the debit transaction.",
            report.backend,
            gateway_p50 - direct_p50,
            report.probes.graphql_read_ms,
            report.probes.directory_lookup_ms,
            report.probes.commit_ms,
        ));
    }

    // Saturation: the busiest gateway cell per backend.
    let mut backends: Vec<&str> = reports.iter().map(|report| report.backend).collect();
    backends.dedup();
    for backend in backends {
        let cells: Vec<&CellReport> = reports
            .iter()
            .filter(|report| report.backend == backend)
            .collect();
        let Some(best) = cells.iter().max_by(|a, b| {
            a.gateway
                .sends_per_second()
                .total_cmp(&b.gateway.sends_per_second())
        }) else {
            continue;
        };
        let largest = cells
            .iter()
            .max_by_key(|report| report.clients)
            .expect("a backend has cells");
        let cpu_bound = best.gateway.cpu.machine_cores >= 0.85 * cores as f64;
        let mut sentence = format!(
            "On {backend} the gateway peaked at {:.0} sends/s with {} clients, using {:.2} of {cores} cores in this process ({:.2} machine-wide) at {:.2} CPU-ms per send against {:.2} direct",
            best.gateway.sends_per_second(),
            best.clients,
            best.gateway.cpu.process_cores,
            best.gateway.cpu.machine_cores,
            best.gateway.cpu_ms_per_send(),
            best.direct.cpu_ms_per_send(),
        );
        if cpu_bound {
            sentence.push_str(&format!(
                ", so it is CPU-bound: the machine is full, and the rate is the cores divided by the CPU each send costs, which the gateway's path spends {:.1}× as much of as the direct one",
                best.gateway.cpu_ms_per_send() / best.direct.cpu_ms_per_send()
            ));
        } else {
            sentence.push_str(", with CPU to spare, so it waits rather than computes");
            if backend == "sqlite" {
                sentence.push_str(&format!(
                    ": every send and every outbox step is a write transaction and SQLite takes one writer at a time, each paying a durable commit ({:.2} ms here)",
                    best.probes.commit_ms
                ));
            } else {
                sentence.push_str(&format!(
                    ": on the database's round trips and commits ({:.2} ms each here) through a pool of 8 connections shared with the outbox",
                    best.probes.commit_ms
                ));
            }
        }
        if largest.clients > best.clients {
            sentence.push_str(&format!(
                "; more clients ({}) only add queueing ({:.0} sends/s, send p50 {:.1} ms)",
                largest.clients,
                largest.gateway.sends_per_second(),
                percentile_ms(&largest.gateway.sorted_latencies, 50.0)
            ));
        }
        sentence.push('.');
        sentences.push(sentence);
    }

    // Delivery: the outbox, not the provider, sets send-to-DELIVERED.
    let slowest_drain = reports
        .iter()
        .max_by(|a, b| a.drain_time.cmp(&b.drain_time))
        .expect("at least one cell");
    let best_delivery = reports
        .iter()
        .map(|report| percentile_ms(&report.sorted_delivery_latencies, 50.0))
        .fold(f64::INFINITY, f64::min);
    let mut delivery = format!(
        "Send-to-DELIVERED is set by the outbox, not the sandbox (which delivers 5 ms after accepting): a message waits for an outbox pass (every {OUTBOX_TICK_MS:.0} ms, at most 50 messages, 8 at a time) to be sent, then for a later pass to see it delivered, so its p50 is at least about two ticks ({best_delivery:.0} ms at best here)"
    );
    if slowest_drain.drain_time > Duration::from_secs(1) {
        delivery.push_str(&format!(
            "; the outbox also fell behind the senders — {} {} clients needed {:.1} s after the phase to deliver its backlog, and a pass's `deliveredAt` is stamped at the pass's start, so the true wait is a little longer",
            slowest_drain.backend,
            slowest_drain.clients,
            slowest_drain.drain_time.as_secs_f64()
        ));
    } else {
        delivery.push_str("; it kept up with the senders in every cell (each drained within a second of the phase)");
    }
    delivery.push('.');
    sentences.push(delivery);
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
    };
    let run_started = Instant::now();
    let mut reports = Vec::new();
    let mut descriptions = Vec::new();
    for backend in &backends {
        descriptions.push(backend.describe().await?);
        for &clients in &options.client_counts {
            reports.push(bench.run_cell(backend, clients).await?);
        }
    }
    for backend in backends {
        if let Backend::Postgres { admin, .. } = backend {
            admin.close().await.ok();
        }
    }
    let overall_peak = reports
        .iter()
        .filter_map(|report| report.peak_resident_set_kib)
        .max();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);

    println!();
    for description in &descriptions {
        println!("{description}");
    }
    println!(
        "{} s per phase; sandbox clock ×{SANDBOX_CLOCK_SPEED:.0}; status poll {STATUS_POLL_INTERVAL_MS} ms (outbox tick {OUTBOX_TICK_MS:.0} ms); pool of 8 connections; one practitioner per client, sending 2 of 3 note sections to one Argus recipient",
        options.seconds_per_phase
    );
    println!();
    print_results_table(&reports);
    println!();
    print_diagnostics_table(&reports);
    println!();
    println!("nproc: {cores}");
    println!(
        "peak RSS (VmHWM): {}",
        overall_peak.map_or_else(|| "unknown".to_owned(), |kib| format!("{kib} kB"))
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
