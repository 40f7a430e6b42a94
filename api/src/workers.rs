//! Background work, one periodic loop each: the approval watcher (registrations waiting for a
//! provider's decision), purchase recovery (purchases left pending by a crash or an outage),
//! the outbox (sending and tracking messages), the inbox poller (receiving them) and the alert
//! worker (flagging sent messages that are overdue), each on its own task so one slow provider call never holds up another loop. Every
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

/// Starts the outbox: queued messages go to providers, sent ones are followed to `DELIVERED` and
/// `ACKNOWLEDGED`. It has its own task so that a slow inbox never holds up sending. It wakes on
/// its tick (to find work made by other nodes and delivery checks falling due) and at once when
/// a send on this node commits; while passes come back full it keeps going.
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
                () = service.outbox_woken() => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            // Bounded, so a shutdown is noticed between rounds even under a steady backlog;
            // a stopping node claims no further batch.
            for _ in 0..20 {
                if *shutdown.borrow() {
                    break;
                }
                match service.process_outbox(Utc::now()).await {
                    Ok(worked) if worked < crate::domain::messaging::OUTBOX_BATCH => break,
                    Ok(_) => {}
                    Err(error) => {
                        tracing::error!(worker = "outbox", error = ?error, "background pass failed; retrying next tick");
                        break;
                    }
                }
            }
        }
    })
}

/// Starts the inbox poller: waiting inbound messages are fetched, stored and only then
/// acknowledged to the provider. On its own schedule and task: a provider whose inbox answers
/// slowly (up to the request timeout per account) delays receiving, never sending.
pub(crate) fn spawn_inbox_poller(
    service: MessagingService,
    poll_interval: Duration,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let tick = (poll_interval / 2).clamp(Duration::from_millis(50), Duration::from_secs(2));
    spawn_periodic("inbox poller", tick, shutdown, move || {
        let service = service.clone();
        async move { service.poll_inboxes().await.map(|_| ()) }
    })
}

/// Starts the alert worker: sent messages not delivered, or not acknowledged, in time are
/// flagged once per reason and announced to their senders. Each flag is a conditional update,
/// so any number of nodes may run it at once.
pub(crate) fn spawn_attention_worker(
    service: MessagingService,
    interval: Duration,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    spawn_periodic("alert worker", interval, shutdown, move || {
        let service = service.clone();
        async move {
            for _ in 0..20 {
                let flagged = service.flag_overdue_messages(Utc::now()).await?;
                if flagged < crate::domain::messaging::ATTENTION_BATCH {
                    break;
                }
            }
            Ok(())
        }
    })
}
