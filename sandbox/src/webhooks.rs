//! ReferralNet's delivery receipts pushed to accounts' webhooks: a ticker per sandbox that looks
//! every 200 ms (real time) for dispatches that reached a new state on their namespace's clock,
//! and one worker per namespace and account that POSTs the signed events in order, retrying
//! those that fail.
//!
//! Pushes go only to public addresses unless the sandbox allows private ones (see
//! `webhook_targets`): the client resolves names through a resolver that refuses the others,
//! follows no redirects and uses no proxy.
//!
//! The ticker holds the sandbox only weakly, so it ends once the sandbox is dropped; workers end
//! when the ticker does. Namespace locks are held only while due pushes are collected, never
//! across an await.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::messaging::PushJob;
use crate::namespace::WeakSandboxState;
use crate::webhook_targets::{self, PublicAddressResolver};

/// How often the ticker looks for dispatches that reached a new state.
const TICK_INTERVAL: Duration = Duration::from_millis(200);
/// How many times a failed push is tried again.
const RETRIES: u32 = 5;
/// The real time between tries of a push.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// How long one try waits for the webhook to answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The header carrying the real time of a push, in unix seconds.
pub(crate) const TIMESTAMP_HEADER: &str = "x-rn-timestamp";
/// The header carrying a push's signature.
pub(crate) const SIGNATURE_HEADER: &str = "x-rn-signature";

/// `sha256=` and the lowercase hex HMAC-SHA256, keyed with the whole secret (`whsec_…`), of
/// `"<timestamp>.<body>"`.
pub(crate) fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut signature = String::with_capacity(7 + digest.len() * 2);
    signature.push_str("sha256=");
    for byte in digest {
        write!(signature, "{byte:02x}").expect("writing to a string cannot fail");
    }
    signature
}

/// Starts the ticker of a sandbox on `runtime`; it ends by itself once the sandbox is dropped.
pub(crate) fn spawn_ticker(runtime: &Handle, sandbox: WeakSandboxState) -> JoinHandle<()> {
    runtime.spawn(run_ticker(sandbox))
}

async fn run_ticker(sandbox: WeakSandboxState) {
    // reqwest is built without a TLS crypto provider of its own; https webhooks need one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let allow_private = sandbox
        .upgrade()
        .is_some_and(|state| state.config().allow_private_webhooks);
    let mut builder = reqwest::Client::builder()
        .timeout(ATTEMPT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    if !allow_private {
        builder = builder.dns_resolver(Arc::new(PublicAddressResolver));
    }
    let client = match builder.build() {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot build the webhook client; webhooks will not be pushed");
            return;
        }
    };
    let mut workers: HashMap<(String, String), mpsc::UnboundedSender<PushJob>> = HashMap::new();
    let mut ticks = tokio::time::interval(TICK_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(state) = sandbox.upgrade() else {
            break;
        };
        let mut due = Vec::new();
        state.for_each_namespace(|namespace_name, namespace| {
            let now = namespace.clock.now();
            for job in namespace.messages.take_due_pushes(now) {
                due.push((namespace_name.to_owned(), job));
            }
        });
        drop(state);
        for (namespace_name, job) in due {
            let key = (namespace_name, job.account.clone());
            let worker = workers.entry(key.clone()).or_insert_with(|| {
                spawn_worker(
                    client.clone(),
                    sandbox.clone(),
                    key.0.clone(),
                    allow_private,
                )
            });
            if let Err(mpsc::error::SendError(job)) = worker.send(job) {
                // The worker ended (it panicked); start another for this account.
                let worker = spawn_worker(
                    client.clone(),
                    sandbox.clone(),
                    key.0.clone(),
                    allow_private,
                );
                let _ = worker.send(job);
                workers.insert(key, worker);
            }
        }
    }
    tracing::debug!("webhook ticker stopped with its sandbox");
}

/// A task that pushes one account's events in the order they arrive.
fn spawn_worker(
    client: reqwest::Client,
    sandbox: WeakSandboxState,
    namespace_name: String,
    allow_private: bool,
) -> mpsc::UnboundedSender<PushJob> {
    let (sender, mut receiver) = mpsc::unbounded_channel::<PushJob>();
    tokio::spawn(async move {
        while let Some(job) = receiver.recv().await {
            if !sandbox.is_alive() {
                break;
            }
            push(&client, &sandbox, &namespace_name, job, allow_private).await;
        }
    });
    sender
}

/// POSTs one event, trying again up to [`RETRIES`] times while the answer is not 2xx. A
/// target the address rules refuse is given up at once: retrying cannot make it public.
async fn push(
    client: &reqwest::Client,
    sandbox: &WeakSandboxState,
    namespace_name: &str,
    job: PushJob,
    allow_private: bool,
) {
    let body = match serde_json::to_vec(&job.event) {
        Ok(body) => body,
        Err(error) => {
            tracing::error!(%error, "cannot encode a webhook event");
            return;
        }
    };
    let url = match reqwest::Url::parse(&job.webhook.url) {
        Ok(url) => url,
        Err(error) => {
            tracing::error!(%error, "a stored webhook URL does not parse");
            return;
        }
    };
    if !allow_private && let Err(refused) = webhook_targets::check_literal_before_push(&url) {
        tracing::warn!(namespace = namespace_name, account = job.account, %refused, "webhook push refused");
        return;
    }
    for attempt in 0..=RETRIES {
        if attempt > 0 {
            tokio::time::sleep(RETRY_DELAY).await;
        }
        if !sandbox.is_alive() {
            return;
        }
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|since_epoch| since_epoch.as_secs())
            .unwrap_or_default();
        let outcome = client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(
                SIGNATURE_HEADER,
                signature(&job.webhook.secret, timestamp, &body),
            )
            .body(body.clone())
            .send()
            .await;
        match outcome {
            Ok(response) if response.status().is_success() => {
                tracing::info!(
                    namespace = namespace_name,
                    account = job.account,
                    receipt_id = job.event.receipt_id,
                    state = job.event.state,
                    "webhook pushed"
                );
                return;
            }
            Ok(response) => tracing::warn!(
                namespace = namespace_name,
                account = job.account,
                status = %response.status(),
                attempt,
                "webhook answered with an error"
            ),
            Err(error) if webhook_targets::is_refusal(&error) => {
                tracing::warn!(
                    namespace = namespace_name,
                    account = job.account,
                    error = %error.without_url(),
                    "webhook push refused: the host resolves to a non-public address"
                );
                return;
            }
            Err(error) => tracing::warn!(
                namespace = namespace_name,
                account = job.account,
                %error,
                attempt,
                "webhook did not answer"
            ),
        }
    }
    tracing::warn!(
        namespace = namespace_name,
        account = job.account,
        receipt_id = job.event.receipt_id,
        state = job.event.state,
        "webhook push given up"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SandboxConfig;
    use crate::namespace::SandboxState;

    #[tokio::test]
    async fn the_ticker_stops_once_its_sandbox_is_dropped() {
        let state = SandboxState::new(SandboxConfig {
            directory_size: 10,
            ..SandboxConfig::default()
        });
        let ticker = spawn_ticker(&Handle::current(), state.downgrade());
        tokio::task::yield_now().await;
        assert!(!ticker.is_finished(), "it runs while the sandbox lives");

        drop(state);

        tokio::time::timeout(Duration::from_secs(5), ticker)
            .await
            .expect("the ticker stops within a tick or two")
            .expect("the ticker did not panic");
    }

    #[test]
    fn a_signature_is_the_lowercase_hex_hmac_of_timestamp_dot_body() {
        // Computed independently: HMAC-SHA256(key "whsec_test", "1700000000.{}").
        assert_eq!(
            signature("whsec_test", 1_700_000_000, b"{}"),
            "sha256=35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91"
        );
    }
}
