//! Dev mode: keys generated once and kept under the data dir, the demo practice, and the
//! start-up banner with ready-to-paste tokens. Nothing here runs in production mode.

use std::path::Path;

use crate::auth::{TokenRequest, mint_hs256};
use crate::crypto::SecretBox;
use crate::domain::types::Role;
use crate::store::Store;

/// The issuer dev tokens carry.
pub const DEV_ISSUER: &str = "smd-gateway-dev";
/// The audience dev tokens carry.
pub const DEV_AUDIENCE: &str = "smd-gateway";
/// The demo practice's group id.
pub const DEMO_GROUP: &str = "demo-practice";

/// The demo users: (sub, role, name).
pub const DEMO_USERS: [(&str, Role, &str); 3] = [
    (
        "demo-admin",
        Role::Administrator,
        "Alex Morgan (practice manager)",
    ),
    ("dr-chen", Role::Practitioner, "Dr Mei Chen"),
    ("dr-patel", Role::Practitioner, "Dr Raj Patel"),
];

/// Keys that dev mode generates once and then reuses.
#[derive(Clone)]
pub struct DevKeys {
    /// HS256 signing secret for dev tokens.
    pub signing_secret: String,
    /// Base64 data-encryption key.
    pub encryption_key: String,
}

/// Reads the dev keys from `data_dir`, creating them (mode 0600) on first use.
pub fn ensure_dev_keys(data_dir: &Path) -> anyhow::Result<DevKeys> {
    std::fs::create_dir_all(data_dir).map_err(|error| {
        anyhow::anyhow!(
            "cannot create the data directory {}: {error}",
            data_dir.display()
        )
    })?;
    let signing_secret = read_or_create(&data_dir.join("dev-signing-key"), || {
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    })?;
    let encryption_key = read_or_create(
        &data_dir.join("dev-encryption-key"),
        SecretBox::generate_key,
    )?;
    Ok(DevKeys {
        signing_secret,
        encryption_key,
    })
}

/// Reads a key file, or creates it atomically: the key is written to a private temporary file
/// and hard-linked into place, so two processes starting together (the gateway and
/// `smd-gateway token`) can never each keep a different key; the loser reads the winner's.
fn read_or_create(path: &Path, make: impl FnOnce() -> String) -> anyhow::Result<String> {
    if let Some(existing) = read_key(path) {
        return Ok(existing);
    }
    let temporary = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    {
        use std::io::Write;
        let mut file = options
            .open(&temporary)
            .map_err(|error| anyhow::anyhow!("cannot write {}: {error}", temporary.display()))?;
        writeln!(file, "{}", make())?;
        file.sync_all()?;
    }
    let linked = std::fs::hard_link(&temporary, path);
    let _ = std::fs::remove_file(&temporary);
    match linked {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => anyhow::bail!("cannot create {}: {error}", path.display()),
    }
    read_key(path).ok_or_else(|| {
        anyhow::anyhow!(
            "{} is empty; delete it to generate a new key",
            path.display()
        )
    })
}

fn read_key(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let key = text.trim();
    (!key.is_empty()).then(|| key.to_owned())
}

/// Provisions the demo practice's users (idempotent).
pub async fn seed_demo_practice(store: &Store) -> anyhow::Result<()> {
    for (subject, role, name) in DEMO_USERS {
        store
            .provision_user(DEMO_GROUP, subject, role, name)
            .await?;
    }
    Ok(())
}

/// The banner printed when dev mode starts.
/// What dev tokens are signed with: the HS256 secret, issuer and audience the gateway checks.
pub struct DevSigner<'a> {
    /// HS256 secret.
    pub secret: &'a str,
    /// `iss`.
    pub issuer: &'a str,
    /// `aud`.
    pub audience: &'a str,
}

/// The banner; demo tokens are included when the gateway verifies HS256 tokens.
pub fn banner(
    signer: Option<DevSigner<'_>>,
    playground_url: &str,
    sandbox_url: &str,
    database: &str,
) -> anyhow::Result<String> {
    let mut text = String::new();
    text.push_str("\nSMD Gateway — dev mode\n");
    text.push_str(&format!("  playground (GraphiQL): {playground_url}\n"));
    text.push_str(&format!(
        "  sandbox:               {sandbox_url}   (control API under /_sandbox)\n"
    ));
    text.push_str(&format!("  database:              {database}\n"));
    text.push_str("  demo provider accounts:\n");
    text.push_str("    Argus        username demo.argus        password argus-sandbox-pw\n");
    text.push_str("    ReferralNet  username demo.referralnet  password rn-sandbox-pw\n");
    let Some(signer) = signer else {
        text.push_str(
            "  (no demo tokens: the gateway is configured to verify RS256/ES256 tokens only)\n",
        );
        return Ok(text);
    };
    text.push_str("  demo tokens for the practice \"demo-practice\" (valid 24 hours; the playground starts as Dr Mei Chen,\n");
    text.push_str(
        "  put {\"Authorization\": \"Bearer <token>\"} in its Headers pane to be someone else; mint more with `smd-gateway token --help`):\n",
    );
    for (subject, role, name) in DEMO_USERS {
        let token = demo_token(&signer, subject, role, name)?;
        text.push_str(&format!("    {:<13} {name}\n      {token}\n", role.code()));
    }
    Ok(text)
}

/// The demo user GraphiQL's Headers pane starts as (dev mode): Dr Mei Chen, a practitioner.
pub const PLAYGROUND_USER: &str = "dr-chen";

/// A fresh day-long token for [`PLAYGROUND_USER`], minted each time the playground loads so a
/// gateway running for days still pre-fills one that works.
pub fn playground_token(signer: &DevSigner<'_>) -> anyhow::Result<String> {
    let (subject, role, name) = DEMO_USERS
        .into_iter()
        .find(|(subject, _, _)| *subject == PLAYGROUND_USER)
        .ok_or_else(|| anyhow::anyhow!("{PLAYGROUND_USER} is not a demo user"))?;
    demo_token(signer, subject, role, name)
}

/// A day-long token for one of the demo practice's users.
fn demo_token(
    signer: &DevSigner<'_>,
    subject: &str,
    role: Role,
    name: &str,
) -> anyhow::Result<String> {
    mint_hs256(
        signer.secret,
        signer.issuer,
        signer.audience,
        &TokenRequest {
            subject: subject.to_owned(),
            group_id: DEMO_GROUP.to_owned(),
            role,
            name: Some(name.to_owned()),
            ttl_seconds: 86_400,
        },
    )
}
