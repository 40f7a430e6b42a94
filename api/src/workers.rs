//! Background work. For now: the approval watcher, which asks providers about registrations
//! waiting for approval. Its schedule lives in the database (`next_check_at`), so it survives
//! restarts, backs off per account on provider errors, and several nodes share it safely.

use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::domain::credits::CreditService;
use crate::domain::integrations::IntegrationService;
use crate::domain::messaging::MessagingService;

/// Starts the watcher; it stops when `shutdown` turns true.
pub(crate) fn spawn_approval_watcher(
    service: IntegrationService,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    // Wake at twice the check rate so a due check waits at most half an interval.
    let tick = (interval / 2).clamp(Duration::from_millis(50), Duration::from_secs(5));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            match service.check_due_registrations(Utc::now()).await {
                Ok(0) => {}
                Ok(checked) => tracing::debug!(checked, "approval checks done"),
                Err(error) => {
                    tracing::error!(error = ?error, "approval watcher pass failed; retrying next tick")
                }
            }
        }
    })
}

/// Starts the purchase recovery worker: it finishes purchases left `PENDING` by a crash, a
/// lost answer or a payment gateway outage, charging again with the same idempotency key.
pub(crate) fn spawn_purchase_recovery(
    service: CreditService,
    lease: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let tick = (lease / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            if let Err(error) = service.recover_pending_purchases(Utc::now()).await {
                tracing::error!(error = ?error, "purchase recovery pass failed; retrying next tick");
            }
        }
    })
}

/// Starts the outbox: it hands queued messages to providers and follows sent ones to
/// `DELIVERED` and `ACKNOWLEDGED`. Its schedule is `next_attempt_at` in the database, so it
/// survives restarts, and claims make several nodes share it without sending twice.
pub(crate) fn spawn_outbox(
    service: MessagingService,
    poll_interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let tick = (poll_interval / 2).clamp(Duration::from_millis(50), Duration::from_secs(2));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            if let Err(error) = service.process_outbox(Utc::now()).await {
                tracing::error!(error = ?error, "outbox pass failed; retrying next tick");
            }
            if let Err(error) = service.poll_inboxes().await {
                tracing::error!(error = ?error, "inbox pass failed; retrying next tick");
            }
        }
    })
}
