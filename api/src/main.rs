//! The `smd-gateway` command: `serve` (default), `migrate`, `token`, `keygen`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use smd_gateway::auth::{TokenRequest, mint_hs256, parse_ttl};
use smd_gateway::config::{LogFormat, LogSettings, Mode};
use smd_gateway::domain::types::Role;
use smd_gateway::{App, Settings, dev};

/// SMD Gateway: a GraphQL API for Secure Message Delivery (Argus, ReferralNet).
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// A TOML settings file (also SMD_CONFIG); environment variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway (the default). In dev mode also the sandbox, demo data and GraphiQL.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Print a dev token signed with the dev key under SMD_DATA_DIR (dev mode only).
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        sub: String,
        /// The practice id (`group`).
        #[arg(long)]
        group: String,
        /// The role.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The display name (`name`).
        #[arg(long)]
        name: Option<String>,
        /// Lifetime: seconds, or with a unit (30m, 12h, 7d).
        #[arg(long, default_value = "12h")]
        ttl: String,
    },
    /// Print a fresh data-encryption key (base64 of 32 random bytes) for SMD_ENCRYPTION_KEY.
    Keygen,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Practitioner,
    Administrator,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(error) = run(cli).await {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            init_tracing(&settings.log)?;
            let app = App::build(settings).await?;
            if let Some(banner) = app.banner() {
                println!("{banner}");
            }
            let playground = format!("http://{}/graphql", app.address());
            match app.sandbox_url() {
                Some(sandbox) => println!("ready playground={playground} sandbox={sandbox}"),
                None => println!("ready graphql={playground}"),
            }
            app.run_until_stopped().await
        }
        Command::Migrate => {
            init_tracing(&settings.log)?;
            settings.validate()?;
            if settings.mode == Mode::Dev {
                std::fs::create_dir_all(&settings.data_dir)?;
            }
            smd_gateway::install_crypto_provider();
            let store =
                smd_gateway::store::Store::connect(&settings.effective_database_url()).await?;
            store.migrate().await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Token {
            sub,
            group,
            role,
            name,
            ttl,
        } => {
            anyhow::ensure!(
                settings.mode == Mode::Dev,
                "`smd-gateway token` signs with the dev key and only works in dev mode; production tokens come from your identity provider"
            );
            let ttl_seconds = parse_ttl(&ttl).map_err(anyhow::Error::msg)?;
            let max_lifetime = settings.jwt.max_lifetime_seconds;
            anyhow::ensure!(
                max_lifetime == 0 || ttl_seconds <= max_lifetime,
                "--ttl {ttl} is longer than the {max_lifetime} seconds the gateway accepts (SMD_JWT_MAX_LIFETIME_SECONDS); the gateway would refuse this token"
            );
            let keys = dev::ensure_dev_keys(&settings.data_dir)?;
            let secret = settings
                .jwt
                .hs256_secret
                .clone()
                .unwrap_or(keys.signing_secret);
            let issuer = settings
                .jwt
                .issuer
                .clone()
                .unwrap_or_else(|| dev::DEV_ISSUER.to_owned());
            let audience = settings
                .jwt
                .audience
                .clone()
                .unwrap_or_else(|| dev::DEV_AUDIENCE.to_owned());
            let role = match role {
                RoleArg::Practitioner => Role::Practitioner,
                RoleArg::Administrator => Role::Administrator,
            };
            smd_gateway::install_crypto_provider();
            let token = mint_hs256(
                &secret,
                &issuer,
                &audience,
                &TokenRequest {
                    subject: sub,
                    group_id: group,
                    role,
                    name,
                    ttl_seconds,
                },
            )?;
            println!("{token}");
            Ok(())
        }
        Command::Keygen => {
            println!("{}", smd_gateway::crypto::SecretBox::generate_key());
            Ok(())
        }
    }
}

/// Logs go to stderr: text (coloured only on a terminal) or JSON lines, filtered by
/// `SMD_LOG`/`RUST_LOG` as loaded into the settings.
fn init_tracing(log: &LogSettings) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(
        log.filter
            .as_deref()
            .unwrap_or("info,sqlx=warn,sea_orm=warn"),
    )
    .map_err(|error| anyhow::anyhow!("SMD_LOG / RUST_LOG: {error}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    Ok(())
}
