//! The request path against its ceiling, in one run: a bare async-graphql + axum server (the
//! same framework with nothing else on the path) and the gateway, both in this process, loaded
//! by the same external load generator (`wrk`, Debian package `wrk`) with the same connections
//! and duration. Prints requests/s, p50 and p99 for each query and the gateway ÷ bare ratio.
//!
//! ```sh
//! cargo run --release -p smd-gateway-suite --example request_bench -- [--seconds 5] [--connections 32] [--postgres URL]
//! ```
//!
//! Queries: `{ __typename }` (transport, token check and GraphQL only), `{ me { id } }`,
//! `{ credits { balance } }` (a database read) and `messages(first: 20)` (a page of 20 received
//! messages, decrypted envelopes; the bare server answers the same shape from memory). Every
//! answer is checked once before the load; wrk's non-2xx count is printed (it must be 0, else the
//! figure is not work finished). Server and load generator share the machine's cores, the same
//! for both servers.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use async_graphql::{EmptyMutation, EmptySubscription, Object, Schema, SimpleObject};
use serde_json::{Value, json};
use smd_gateway::auth::{TokenRequest, mint_hs256};
use smd_gateway::config::{
    GraphqlSettings, JwtSettings, LimitSettings, Mode, PaymentSettings, ProviderSettings,
};
use smd_gateway::crypto::SecretBox;
use smd_gateway::domain::types::Role;
use smd_gateway::{App, Settings};
use smd_sandbox::SandboxConfig;
use tokio::sync::oneshot;

const SECRET: &str = "request-bench-signing-secret-0123456789ab";
const ISSUER: &str = "https://pms.bench.example";
const AUDIENCE: &str = "smd-gateway-bench";
const HPII: &str = "8003610000000006";

const QUERIES: [(&str, &str); 4] = [
    ("{ __typename }", "{ __typename }"),
    ("{ me { id } }", "{ me { id } }"),
    ("{ credits { balance } }", "{ credits { balance } }"),
    (
        "messages(first: 20)",
        "{ messages(first: 20) { edges { node { id status counterpartName } } } }",
    ),
];

// ---- the bare server: the same shapes, answered from memory ----

#[derive(SimpleObject, Clone)]
struct BareMe {
    id: String,
}

#[derive(SimpleObject, Clone)]
struct BareCredits {
    balance: i64,
}

#[derive(SimpleObject, Clone)]
#[graphql(name = "SecureMessage")]
struct BareMessage {
    id: String,
    status: String,
    counterpart_name: String,
}

#[derive(SimpleObject, Clone)]
struct BareEdge {
    node: BareMessage,
}

#[derive(SimpleObject, Clone)]
struct BareConnection {
    edges: Vec<BareEdge>,
}

struct BareQuery;

#[Object]
impl BareQuery {
    async fn me(&self) -> BareMe {
        BareMe {
            id: "dr-chen".into(),
        }
    }
    async fn credits(&self) -> BareCredits {
        BareCredits { balance: 0 }
    }
    async fn messages(&self, first: i32) -> BareConnection {
        BareConnection {
            edges: (0..first)
                .map(|index| BareEdge {
                    node: BareMessage {
                        id: format!("message-{index}"),
                        status: "DELIVERED".into(),
                        counterpart_name: "Dr Ada Lovelace".into(),
                    },
                })
                .collect(),
        }
    }
}

async fn spawn_bare() -> anyhow::Result<(String, oneshot::Sender<()>)> {
    let schema = Schema::new(BareQuery, EmptyMutation, EmptySubscription);
    let router = axum::Router::new().route(
        "/graphql",
        axum::routing::post_service(async_graphql_axum::GraphQL::new(schema)),
    );
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
    Ok((url, stop))
}

// ---- the gateway, with real data behind the queries ----

async fn spawn_gateway(
    database_url: String,
    data_dir: &std::path::Path,
) -> anyhow::Result<(String, String, oneshot::Sender<()>)> {
    let sandbox = smd_sandbox::spawn(
        "127.0.0.1:0".parse()?,
        SandboxConfig {
            allow_private_webhooks: true,
            ..SandboxConfig::default()
        },
    )
    .await?;
    let sandbox_url = sandbox.base_url();
    let settings = Settings {
        mode: Mode::Production,
        listen: "127.0.0.1:0".parse()?,
        data_dir: data_dir.to_path_buf(),
        database_url: Some(database_url),
        jwt: JwtSettings {
            issuer: Some(ISSUER.into()),
            audience: Some(AUDIENCE.into()),
            hs256_secret: Some(SECRET.into()),
            leeway_seconds: 5,
            ..JwtSettings::default()
        },
        encryption_key: Some(SecretBox::generate_key()),
        providers: ProviderSettings {
            argus_base_url: Some(sandbox_url.clone()),
            referralnet_base_url: Some(sandbox_url.clone()),
            timeout_ms: 5_000,
            allow_insecure_http: true,
        },
        payments: PaymentSettings {
            base_url: Some(sandbox_url.clone()),
            api_key: Some("sk_sandbox_bench".into()),
        },
        approval_poll_interval_ms: Some(1_000),
        graphql: GraphqlSettings {
            playground: Some(false),
            introspection: Some(false),
            ..GraphqlSettings::default()
        },
        // The load is one user from one address on purpose: lift the request buckets so the
        // figure is the path's cost, not the limiter's refusals.
        limits: LimitSettings {
            user_requests_per_second: 10_000_000,
            user_request_burst: 10_000_000,
            address_requests_per_second: 10_000_000,
            address_request_burst: 10_000_000,
            ..LimitSettings::default()
        },
        seed_demo_data: false,
        print_banner: false,
        ..Settings::default()
    };
    let app = App::build(settings).await.context("the gateway builds")?;
    let url = format!("http://{}/graphql", app.address());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _sandbox = sandbox;
        let _ = app
            .run_until(async move {
                let _ = stopped.await;
            })
            .await;
    });
    Ok((url, sandbox_url, stop))
}

async fn gql(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    query: &str,
) -> anyhow::Result<Value> {
    let mut request = client.post(url).json(&json!({ "query": query }));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    Ok(request.send().await?.json().await?)
}

/// Links Argus, claims an HPI-I and has the sandbox deliver 20 referrals to it.
async fn seed_messages(
    client: &reqwest::Client,
    url: &str,
    sandbox_url: &str,
    token: &str,
) -> anyhow::Result<()> {
    let linked = gql(client, url, Some(token), r#"mutation { linkArgus(input: { username: "demo.argus", password: "argus-sandbox-pw" }) { status } }"#).await?;
    ensure!(
        linked["data"]["linkArgus"]["status"] == "ACTIVE",
        "link: {linked}"
    );
    let hpii = gql(
        client,
        url,
        Some(token),
        &format!(r#"mutation {{ setMyHpii(hpii: "{HPII}") }}"#),
    )
    .await?;
    ensure!(hpii["errors"].is_null(), "setMyHpii: {hpii}");
    for index in 0..20 {
        client
            .post(format!("{sandbox_url}/_sandbox/inbound"))
            .json(&json!({"provider": "argus", "account": "demo.argus", "recipientHpii": HPII, "text": format!("referral {index}")}))
            .send()
            .await?
            .error_for_status()?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let page = gql(client, url, Some(token), QUERIES[3].1).await?;
        let count = page["data"]["messages"]["edges"]
            .as_array()
            .map_or(0, Vec::len);
        if count == 20 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the inbox poller did not store 20 messages: {page}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---- the load generator ----

struct Figures {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    failures: u64,
}

fn wrk(
    url: &str,
    query: &str,
    token: Option<&str>,
    seconds: u64,
    connections: u64,
    dir: &std::path::Path,
) -> anyhow::Result<Figures> {
    let script = dir.join("post.lua");
    let mut lua = String::from(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n",
    );
    if let Some(token) = token {
        lua.push_str(&format!(
            "wrk.headers[\"Authorization\"] = \"Bearer {token}\"\n"
        ));
    }
    lua.push_str(&format!(
        "wrk.body = {:?}\n",
        json!({ "query": query }).to_string()
    ));
    std::fs::write(&script, lua)?;
    let output = Command::new("wrk")
        .args([
            "-t",
            "2",
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(url)
        .output()
        .context("run wrk (apt-get install wrk)")?;
    ensure!(
        output.status.success(),
        "wrk failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let number_after = |label: &str| -> Option<String> {
        text.lines()
            .find(|line| line.trim_start().starts_with(label))
            .and_then(|line| {
                line.trim_start()[label.len()..]
                    .split_whitespace()
                    .next()
                    .map(str::to_owned)
            })
    };
    let millis = |value: String| -> anyhow::Result<f64> {
        let (number, unit) = value.split_at(
            value
                .find(|c: char| c.is_ascii_alphabetic())
                .unwrap_or(value.len()),
        );
        let number: f64 = number.parse()?;
        Ok(match unit {
            "us" => number / 1000.0,
            "ms" => number,
            "s" => number * 1000.0,
            other => bail!("unknown unit {other}"),
        })
    };
    Ok(Figures {
        requests_per_second: number_after("Requests/sec:")
            .context("Requests/sec")?
            .parse()?,
        p50_ms: millis(number_after("50%").context("p50")?)?,
        p99_ms: millis(number_after("99%").context("p99")?)?,
        failures: number_after("Non-2xx or 3xx responses:").map_or(Ok(0), |n| n.parse())?,
    })
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| {
                    line.split_whitespace()
                        .nth(1)
                        .and_then(|kb| kb.parse::<f64>().ok())
                })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    smd_gateway::install_crypto_provider();
    let mut seconds = 5;
    let mut connections = 32;
    let mut postgres = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => seconds = args.next().context("--seconds N")?.parse()?,
            "--connections" => connections = args.next().context("--connections N")?.parse()?,
            "--postgres" => postgres = Some(args.next().context("--postgres URL")?),
            other => bail!("unknown argument {other}; see the header of examples/request_bench.rs"),
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
    let backend = if postgres.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    let (bare_url, stop_bare) = spawn_bare().await?;
    let (gateway_url, sandbox_url, stop_gateway) = spawn_gateway(database_url, dir.path()).await?;
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
    seed_messages(&client, &gateway_url, &sandbox_url, &token).await?;

    println!(
        "request path, {backend}, {connections} connections, {seconds} s per cell, wrk -t2; servers and wrk share the machine's cores"
    );
    println!(
        "| query | bare req/s | bare p50 / p99 ms | gateway req/s | gateway p50 / p99 ms | gateway ÷ bare | failed |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|");
    for (label, query) in QUERIES {
        // Both answer the query correctly before either is loaded.
        let bare_answer = gql(&client, &bare_url, None, query).await?;
        let gateway_answer = gql(&client, &gateway_url, Some(&token), query).await?;
        ensure!(
            bare_answer["errors"].is_null(),
            "bare {label}: {bare_answer}"
        );
        ensure!(
            gateway_answer["errors"].is_null(),
            "gateway {label}: {gateway_answer}"
        );
        let bare = wrk(&bare_url, query, None, seconds, connections, dir.path())?;
        let gateway = wrk(
            &gateway_url,
            query,
            Some(&token),
            seconds,
            connections,
            dir.path(),
        )?;
        println!(
            "| `{label}` | {:.0} | {:.2} / {:.2} | {:.0} | {:.2} / {:.2} | {:.2} | {} |",
            bare.requests_per_second,
            bare.p50_ms,
            bare.p99_ms,
            gateway.requests_per_second,
            gateway.p50_ms,
            gateway.p99_ms,
            gateway.requests_per_second / bare.requests_per_second,
            bare.failures + gateway.failures,
        );
    }
    println!(
        "peak RSS of this process (both servers, the sandbox): {:.0} MiB",
        peak_rss_mib()
    );
    let _ = stop_bare.send(());
    let _ = stop_gateway.send(());
    Ok(())
}
