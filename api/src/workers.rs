//! Background work, one periodic loop each: the approval watcher (registrations waiting for a
//! provider's decision), purchase recovery (purchases left pending by a crash or an outage),
//! and the outbox with the inbox poller (sending, tracking and receiving messages). Every
//! schedule lives in the database, so the work survives restarts, and each item is claimed
//! with a conditional update, so several gateway nodes share it without doing anything twice.

use std::future::Future;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::domain::GatewayError;
use crate::domain::credits::CreditService;
use crate::domain::integrations::IntegrationService;
use crate::domain::messaging::MessagingService;

/// Runs `pass` every `tick` until `shutdown` turns true. A failed pass is logged and retried
/// at the next tick.
fn spawn_periodic<F, Fut>(
    name: &'static str,
    tick: Duration,
    mut shutdown: watch::Receiver<bool>,
    mut pass: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), GatewayError>> + Send,
{
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            if let Err(error) = pass().await {
                tracing::error!(worker = name, error = ?error, "background pass failed; retrying next tick");
            }
        }
    })
}

/// Starts the approval watcher.
pub(crate) fn spawn_approval_watcher(
    service: IntegrationService,
    interval: Duration,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    // Wake at twice the check rate so a due check waits at most half an interval.
    let tick = (interval / 2).clamp(Duration::from_millis(50), Duration::from_secs(5));
    spawn_periodic("approval watcher", tick, shutdown, move || {
        let service = service.clone();
        async move {
            service
                .check_due_registrations(Utc::now())
                .await
                .map(|_| ())
        }
    })
}

/// Starts purchase recovery: it finishes purchases left `PENDING`, charging again with the
/// same idempotency key (the payment gateway replays rather than charging twice).
pub(crate) fn spawn_purchase_recovery(
    service: CreditService,
    lease: Duration,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let tick = (lease / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    spawn_periodic("purchase recovery", tick, shutdown, move || {
        let service = service.clone();
        async move {
            service
                .recover_pending_purchases(Utc::now())
                .await
                .map(|_| ())
        }
    })
}

/// Starts the outbox and inbox poller: queued messages go to providers, sent ones are followed
/// to `DELIVERED` and `ACKNOWLEDGED`, and waiting inbound messages are fetched and stored.
pub(crate) fn spawn_outbox(
    service: MessagingService,
    poll_interval: Duration,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let tick = (poll_interval / 2).clamp(Duration::from_millis(50), Duration::from_secs(2));
    spawn_periodic("outbox", tick, shutdown, move || {
        let service = service.clone();
        async move {
            // While passes come back full there is a backlog: keep going instead of sleeping a
            // tick between batches (bounded, so the inbox still gets its turn).
            let mut outbox = Ok(());
            for _ in 0..20 {
                match service.process_outbox(Utc::now()).await {
                    Ok(worked) if worked >= crate::domain::messaging::OUTBOX_BATCH => continue,
                    Ok(_) => break,
                    Err(error) => {
                        outbox = Err(error);
                        break;
                    }
                }
            }
            let inbox = service.poll_inboxes().await;
            outbox.and(inbox).map(|_| ())
        }
    })
}
