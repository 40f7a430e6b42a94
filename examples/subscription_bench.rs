//! What open subscriptions cost and how fast a change reaches them: N `messageStatusChanged`
//! subscriptions (graphql-transport-ws, 50 per socket) on one gateway node, then
//! 1. CPU and RSS of this process over an idle period, with the subscriptions open and without
//!    (the same process, measured before opening them), from `/proc/self/stat` and
//!    `/proc/self/status`;
//! 2. one change — a message sent by their practitioner — fanned out to all of them: the time
//!    from sending the mutation until the last subscriber has the message.
//!
//! ```sh
//! cargo run --release -p smd-gateway-suite --example subscription_bench -- [--subscriptions 1000] [--idle-seconds 10] [--postgres URL]
//! ```
//!
//! With `--postgres` two nodes share a fresh database: the subscriptions are on node A and the
//! send goes through node B, so the change crosses nodes through `NOTIFY`. On SQLite one node
//! does both. Everything (nodes, sandbox, the WebSocket clients) is in this process, so the
//! idle figure is an upper bound for the gateway; the clients do nothing while idle.
//! The subscription caps are lifted for the run (one practitioner holds all N).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use smd_gateway::auth::{TokenRequest, mint_hs256};
use smd_gateway::config::{
    GraphqlSettings, JwtSettings, LimitSettings, MessagingConfig, Mode, PaymentSettings,
    ProviderSettings,
};
use smd_gateway::crypto::SecretBox;
use smd_gateway::domain::types::Role;
use smd_gateway::{App, Settings};
use smd_sandbox::SandboxConfig;
use tokio::sync::{Notify, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "subscription-bench-secret-0123456789abcdef";
const ISSUER: &str = "https://pms.bench.example";
const AUDIENCE: &str = "smd-gateway-bench";
const HPII: &str = "8003610000000006";
const PER_SOCKET: usize = 50;
const SLOW_RECIPIENT: &str = "8003619999900050";

fn settings(database_url: &str, sandbox_url: &str, data_dir: &std::path::Path) -> Settings {
    Settings {
        mode: Mode::Production,
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_path_buf(),
        database_url: Some(database_url.to_owned()),
        jwt: JwtSettings {
            issuer: Some(ISSUER.into()),
            audience: Some(AUDIENCE.into()),
            hs256_secret: Some(SECRET.into()),
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
            status_poll_interval_ms: Some(1_000),
            ..MessagingConfig::default()
        },
        approval_poll_interval_ms: Some(1_000),
        graphql: GraphqlSettings {
            playground: Some(false),
            introspection: Some(false),
            ..GraphqlSettings::default()
        },
        limits: LimitSettings {
            ws_subscriptions_per_connection: PER_SOCKET,
            ws_subscriptions_per_user: 1_000_000,
            user_requests_per_second: 1_000_000,
            user_request_burst: 1_000_000,
            address_requests_per_second: 1_000_000,
            address_request_burst: 1_000_000,
            ..LimitSettings::default()
        },
        seed_demo_data: false,
        print_banner: false,
        ..Settings::default()
    }
}

async fn start(settings: Settings) -> anyhow::Result<(std::net::SocketAddr, oneshot::Sender<()>)> {
    let app = App::build(settings).await.context("the gateway builds")?;
    let address = app.address();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    Ok((address, stop))
}

async fn gql(
    client: &reqwest::Client,
    address: std::net::SocketAddr,
    token: &str,
    query: &str,
    variables: Value,
) -> anyhow::Result<Value> {
    Ok(client
        .post(format!("http://{address}/graphql"))
        .bearer_auth(token)
        .json(&json!({"query": query, "variables": variables}))
        .send()
        .await?
        .json()
        .await?)
}

/// Links Argus, sets an HPI-I and a card, buys credits, writes a note and picks a recipient.
/// Returns the send mutation's input (without its key).
async fn ready_to_send(
    client: &reqwest::Client,
    node: std::net::SocketAddr,
    token: &str,
) -> anyhow::Result<Value> {
    let steps = [
        r#"mutation { linkArgus(input: { username: "demo.argus", password: "argus-sandbox-pw" }) { status } }"#.to_owned(),
        format!(r#"mutation {{ setMyHpii(hpii: "{HPII}") }}"#),
        r#"mutation { setPaymentMethod(input: { token: "pm_sandbox_approve" }) { display } }"#.to_owned(),
        format!(r#"mutation {{ purchaseCredits(input: {{ packId: "pack-500", idempotencyKey: "{}" }}) {{ balance }} }}"#, uuid::Uuid::new_v4()),
    ];
    for step in steps {
        let answer = gql(client, node, token, &step, json!({})).await?;
        ensure!(answer["errors"].is_null(), "{step}: {answer}");
    }
    let patient = gql(client, node, token, r#"mutation { createPatient(input: { givenName: "Ada", familyName: "O'Brien", dateOfBirth: "1961-03-04" }) { id } }"#, json!({})).await?;
    let note = gql(client, node, token, r#"mutation($p: ID!) { createClinicalNote(input: { patientId: $p, title: "Review", sections: [{ key: "history", title: "History", body: "well" }] }) { id } }"#, json!({"p": patient["data"]["createPatient"]["id"]})).await?;
    // The sandbox's recipient that delivers only after an hour of sandbox time: after SENT
    // the messages stay put, so the idle period is idle.
    let recipient = json!(SLOW_RECIPIENT);
    Ok(
        json!({"noteId": note["data"]["createClinicalNote"]["id"], "sectionKeys": ["history"], "recipientId": recipient, "provider": "ARGUS"}),
    )
}

async fn send(
    client: &reqwest::Client,
    node: std::net::SocketAddr,
    token: &str,
    input: &Value,
) -> anyhow::Result<String> {
    let mut input = input.clone();
    input["idempotencyKey"] = json!(uuid::Uuid::new_v4().to_string());
    let answer = gql(
        client,
        node,
        token,
        "mutation($input: SendSecureMessageInput!) { sendSecureMessage(input: $input) { message { id } } }",
        json!({"input": input}),
    )
    .await?;
    answer["data"]["sendSecureMessage"]["message"]["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("send: {answer}"))
}

/// For each message id, how many subscriptions have had it and when the last one did.
#[derive(Default)]
struct Fanout {
    arrivals: std::sync::Mutex<HashMap<String, (usize, Option<Instant>)>>,
    total: usize,
    completed: Notify,
}

impl Fanout {
    fn arrived(&self, message_id: &str) {
        let mut arrivals = self.arrivals.lock().unwrap();
        let entry = arrivals.entry(message_id.to_owned()).or_default();
        entry.0 += 1;
        if entry.0 == self.total {
            entry.1 = Some(Instant::now());
            self.completed.notify_waiters();
        }
    }

    fn completed_at(&self, message_id: &str) -> Option<Instant> {
        self.arrivals
            .lock()
            .unwrap()
            .get(message_id)
            .and_then(|entry| entry.1)
    }
}

/// Opens one socket with `count` subscriptions; a task reports each subscription's first
/// result for each message.
async fn open_socket(
    node: std::net::SocketAddr,
    token: &str,
    count: usize,
    fanout: Arc<Fanout>,
) -> anyhow::Result<()> {
    let mut request = format!("ws://{node}/graphql/ws").into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    socket
        .send(Message::text(
            json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}})
                .to_string(),
        ))
        .await?;
    match socket.next().await {
        Some(Ok(Message::Text(text))) if text.contains("connection_ack") => {}
        other => bail!("no connection_ack: {other:?}"),
    }
    for index in 0..count {
        socket
            .send(Message::text(
                json!({"id": format!("s{index}"), "type": "subscribe", "payload": {"query": "subscription { messageStatusChanged { id status } }"}})
                    .to_string(),
            ))
            .await?;
    }
    tokio::spawn(async move {
        let mut seen: HashSet<(String, String)> = HashSet::new();
        while let Some(Ok(frame)) = socket.next().await {
            let Message::Text(text) = frame else { continue };
            let Ok(message) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if message["type"] != "next" {
                continue;
            }
            let (Some(operation), Some(id)) = (
                message["id"].as_str(),
                message["payload"]["data"]["messageStatusChanged"]["id"].as_str(),
            ) else {
                continue;
            };
            // Its first appearance (later statuses of the same message are not counted).
            if seen.insert((operation.to_owned(), id.to_owned())) {
                fanout.arrived(id);
            }
        }
    });
    Ok(())
}

/// Sends a message and waits until every subscriber has it; returns the time from sending
/// the mutation until the last subscriber had it.
async fn fan_out(
    client: &reqwest::Client,
    node: std::net::SocketAddr,
    token: &str,
    input: &Value,
    fanout: &Fanout,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let id = send(client, node, token, input).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let completed = fanout.completed.notified();
        tokio::pin!(completed);
        completed.as_mut().enable();
        if let Some(at) = fanout.completed_at(&id) {
            return Ok(at - started);
        }
        ensure!(
            Instant::now() < deadline,
            "not every subscriber had the message within 60 s: {} of {}",
            fanout
                .arrivals
                .lock()
                .unwrap()
                .get(&id)
                .map_or(0, |entry| entry.0),
            fanout.total
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), completed).await;
    }
}

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let after_name = &stat[stat.rfind(')').context("/proc/self/stat")? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of the whole line (utime, stime) are 12 and 13 after the name.
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let per_second: f64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0);
    Ok(ticks / per_second)
}

fn rss_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| line.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Share of one core this process used over `seconds` of doing nothing.
async fn idle_cpu(seconds: u64) -> anyhow::Result<f64> {
    let before = cpu_seconds()?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    Ok((cpu_seconds()? - before) / started.elapsed().as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    smd_gateway::install_crypto_provider();
    let mut subscriptions = 1000;
    let mut idle_seconds = 10;
    let mut postgres = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--subscriptions" => {
                subscriptions = args.next().context("--subscriptions N")?.parse()?;
            }
            "--idle-seconds" => idle_seconds = args.next().context("--idle-seconds N")?.parse()?,
            "--postgres" => postgres = Some(args.next().context("--postgres URL")?),
            other => {
                bail!("unknown argument {other}; see the header of examples/subscription_bench.rs")
            }
        }
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run with --release for numbers worth comparing");
    }
    let dir = tempfile::tempdir()?;
    let database_url = match &postgres {
        Some(admin_url) => {
            use sea_orm::ConnectionTrait;
            let name = format!("smd_bench_{}", uuid::Uuid::new_v4().simple());
            let admin = sea_orm::Database::connect(admin_url.as_str()).await?;
            admin
                .execute_unprepared(&format!("CREATE DATABASE {name}"))
                .await?;
            let base = &admin_url[..admin_url.rfind('/').context("a database URL")?];
            format!("{base}/{name}")
        }
        None => format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.db").display()
        ),
    };
    let sandbox = smd_sandbox::spawn(
        "127.0.0.1:0".parse()?,
        SandboxConfig {
            allow_private_webhooks: true,
            ..SandboxConfig::default()
        },
    )
    .await?;
    let node_settings = settings(&database_url, &sandbox.base_url(), dir.path());
    let (node_a, _stop_a) = start(node_settings.clone()).await?;
    let (node_b, _stop_b, backend) = if postgres.is_some() {
        let (address, stop) = start(node_settings).await?;
        (
            address,
            Some(stop),
            "PostgreSQL, two nodes: subscribers on A, the send through B",
        )
    } else {
        (node_a, None, "SQLite, one node")
    };
    let token = mint_hs256(
        SECRET,
        ISSUER,
        AUDIENCE,
        &TokenRequest {
            subject: "dr-chen".into(),
            group_id: "bench-practice".into(),
            role: Role::Practitioner,
            name: Some("Dr Mei Chen".into()),
            ttl_seconds: 3600,
        },
    )?;
    let client = reqwest::Client::new();
    let input = ready_to_send(&client, node_b, &token).await?;
    // Let the outbox hand over the set-up's nothing and settle.
    tokio::time::sleep(Duration::from_secs(2)).await;

    println!(
        "subscriptions, {backend}; {subscriptions} × messageStatusChanged, {PER_SOCKET} per socket"
    );
    let baseline = idle_cpu(idle_seconds).await?;
    let rss_before = rss_mib("VmRSS:");
    println!(
        "idle, no subscriptions: {:.2}% of a core over {idle_seconds} s, RSS {rss_before:.0} MiB",
        baseline * 100.0
    );

    let fanout = Arc::new(Fanout {
        total: subscriptions,
        ..Fanout::default()
    });
    let mut left = subscriptions;
    while left > 0 {
        let count = left.min(PER_SOCKET);
        open_socket(node_a, &token, count, fanout.clone()).await?;
        left -= count;
    }
    // graphql-transport-ws does not acknowledge a subscribe: give the node time to start every
    // subscription (its first read), or a message created and sent before a subscription
    // started is, rightly, not news to it — and with the slow recipient it would never change
    // status again within the deadline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Every subscription is listening once a first change reaches all of them.
    let warm_up = fan_out(&client, node_b, &token, &input, &fanout).await?;
    // Its SENT (a second fan-out) passes by before the idle period starts.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = idle_cpu(idle_seconds).await?;
    let rss_open = rss_mib("VmRSS:");
    println!(
        "idle, {subscriptions} subscriptions open: {:.2}% of a core over {idle_seconds} s ({:+.2} points over none), RSS {rss_open:.0} MiB ({:+.0} MiB)",
        idle * 100.0,
        (idle - baseline) * 100.0,
        rss_open - rss_before
    );
    let mut times = Vec::new();
    for _ in 0..3 {
        times.push(
            fan_out(&client, node_b, &token, &input, &fanout)
                .await?
                .as_secs_f64()
                * 1000.0,
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!(
        "one change to all {subscriptions}: send request → last subscriber has it: {} ms (first, while warming up: {:.0} ms)",
        times
            .iter()
            .map(|ms| format!("{ms:.0}"))
            .collect::<Vec<_>>()
            .join(" / "),
        warm_up.as_secs_f64() * 1000.0
    );
    println!(
        "peak RSS of this process (nodes, sandbox, {subscriptions} client subscriptions): {:.0} MiB",
        rss_mib("VmHWM:")
    );
    drop(sandbox);
    Ok(())
}
