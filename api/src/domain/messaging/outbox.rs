//! The outbox: hands queued messages to their provider, retries transient faults, fails and
//! refunds what the provider refuses, and follows sent messages to `ACKNOWLEDGED`.
//!
//! A message the provider accepted is followed for `expire_after` (5 days by default) from
//! `sentAt`: still not delivered by then, it becomes `FAILED` with the reason "expired" (like
//! MESH's non-delivery report) and is *not* refunded, since the provider took it; delivered, it
//! is simply no longer followed for its acknowledgement.
//!
//! Sans-I/O: [`next_call`] says which provider call a due message needs and [`next_step`] decides,
//! from the message and what that call brought back, what to write, whether to refund and when
//! to look again. Both are pure functions of typed values (no clock, no randomness, no I/O), so
//! the whole machine is one table test; the worker around them ([`MessagingService::process_outbox`])
//! claims messages, makes the call and applies the transition.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{MessagingService, MessagingSettings, OUTBOX_BATCH, OUTBOX_CONCURRENCY, actions};
use crate::domain::audit::{AuditEntry, AuditOutcome};
use crate::domain::types::MessageStatus;
use crate::domain::{GatewayError, later, safe_word};
use crate::providers::{DeliveryState, OutboundMessage, ProviderError, ProviderFailure};
use crate::store::messaging::{MessageRow, MessageUpdate};

/// The outbox's timing rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutboxPolicy {
    /// How often a sent message's delivery is checked.
    pub status_poll_interval: Duration,
    /// First retry delay after a transient fault (doubling per attempt).
    pub retry_base: Duration,
    /// Longest retry delay (also how long a message waits for a connection to come back).
    pub retry_max: Duration,
    /// Past this age a message the provider has not accepted fails.
    pub give_up_after: Duration,
    /// This long after the provider accepted it, a message still `SENT` expires and a
    /// `DELIVERED` one is no longer followed.
    pub expire_after: Duration,
}

impl OutboxPolicy {
    pub(crate) fn from_settings(settings: &MessagingSettings) -> Self {
        Self {
            status_poll_interval: settings.status_poll_interval,
            retry_base: settings.retry_base,
            retry_max: settings.retry_max,
            give_up_after: settings.give_up_after,
            expire_after: settings.expire_after,
        }
    }
}

/// Up to this fraction of a retry delay is added at random, so messages failing together do
/// not retry together. The worker draws it; tests pass zero.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Jitter(f64);

impl Jitter {
    /// No jitter.
    pub(crate) const NONE: Jitter = Jitter(0.0);

    /// A random jitter in `[0, 0.25)`.
    pub(crate) fn random() -> Self {
        use rand::Rng;
        Jitter(rand::thread_rng().gen_range(0.0..0.25))
    }
}

/// The provider call a due message needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    /// Hand it over (it is `QUEUED`).
    Send,
    /// Ask where it is (it is `SENT` or `DELIVERED`).
    CheckDelivery,
    /// Nothing to ask: it is final, or sent so long ago that it is no longer followed.
    Nothing,
}

/// What the worker learnt for a message, from the provider or from not being able to ask.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The practice has no `ACTIVE` connection to the message's provider: nothing was asked.
    NotConnected,
    /// [`next_call`] said [`Call::Nothing`]: nothing was asked.
    NotAsked,
    /// The provider accepted the message, with its reference for tracking it.
    Accepted {
        /// The provider's reference.
        reference: String,
    },
    /// Handing the message over failed; decided on [`ProviderError::failure`], never its text.
    SendFailed(ProviderError),
    /// Where the provider says a sent message is (polled, or pushed as a receipt).
    Delivery(DeliveryState),
    /// Asking where a sent message is failed.
    DeliveryCheckFailed,
}

/// What to do with a message after an [`Outcome`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Transition {
    /// Write this, if the message is still in the status it was read in.
    Write(MessageUpdate),
    /// The provider never accepted it: it fails and its credits come back, in one transaction.
    FailAndRefund {
        /// Why, for the message and the refund's audit event.
        reason: String,
    },
    /// Nothing to write (a combination the worker does not produce, such as a send answer for
    /// a message already sent); its lease runs out and it is looked at again.
    Nothing,
}

fn too_old(policy: &OutboxPolicy, message: &MessageRow, now: DateTime<Utc>) -> bool {
    (now - message.created_at).to_std().unwrap_or_default() > policy.give_up_after
}

/// Whether a sent message's time is up: `expire_after` since the provider accepted it (since
/// it was created, for a row without `sentAt`).
fn past_expiry(policy: &OutboxPolicy, message: &MessageRow, now: DateTime<Utc>) -> bool {
    let accepted = message.sent_at.unwrap_or(message.created_at);
    (now - accepted).to_std().unwrap_or_default() >= policy.expire_after
}

/// Doubling from `retry_base` per attempt up to `retry_max`, plus jitter; at least what the
/// provider asked for (capped at `retry_max`).
fn backoff(
    policy: &OutboxPolicy,
    attempts: i32,
    retry_after: Option<Duration>,
    jitter: Jitter,
) -> Duration {
    let exponent = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(0)
        .min(16);
    let base = policy
        .retry_base
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(policy.retry_max);
    (base + base.mul_f64(jitter.0)).max(retry_after.unwrap_or_default().min(policy.retry_max))
}

/// The first delivery check after a hand-over: most deliveries take seconds, so the first look
/// is soon (or at `status_poll_interval`, if that is sooner).
const FIRST_STATUS_CHECK: Duration = Duration::from_secs(1);

/// When to ask again where a sent message is. Backed-off polling: the wait grows with the time
/// since the message was handed over (so checks come at about 1, 2, 4, 8 … seconds after it),
/// from [`FIRST_STATUS_CHECK`] up to `status_poll_interval`. A provider that pushes receipts
/// moves the message at once; these checks are then only the safety net.
fn next_status_check(
    policy: &OutboxPolicy,
    message: &MessageRow,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    let first = FIRST_STATUS_CHECK.min(policy.status_poll_interval);
    let since_sent = (now - message.sent_at.unwrap_or(message.created_at))
        .to_std()
        .unwrap_or_default();
    later(now, since_sent.clamp(first, policy.status_poll_interval))
}

/// Which provider call a due message needs.
pub(crate) fn next_call(policy: &OutboxPolicy, message: &MessageRow, now: DateTime<Utc>) -> Call {
    match message.status {
        MessageStatus::Queued => Call::Send,
        MessageStatus::Sent | MessageStatus::Delivered if past_expiry(policy, message, now) => {
            Call::Nothing
        }
        MessageStatus::Sent | MessageStatus::Delivered => Call::CheckDelivery,
        MessageStatus::Acknowledged | MessageStatus::Failed => Call::Nothing,
    }
}

/// The outbox's decision for `message` (as claimed: `attempts` already counts this attempt)
/// after `outcome`, at `now`.
pub(crate) fn next_step(
    policy: &OutboxPolicy,
    message: &MessageRow,
    outcome: &Outcome,
    now: DateTime<Utc>,
    jitter: Jitter,
) -> Transition {
    let provider = message.provider;
    let old = too_old(policy, message, now);
    let expired = past_expiry(policy, message, now);
    // Accepted, never delivered, and its time is up: FAILED, not refunded (the provider took
    // it; a refund is only for what it never accepted).
    let expire = || {
        Transition::Write(MessageUpdate {
            status: Some(MessageStatus::Failed),
            failure_reason: Some(format!(
                "expired: {provider} accepted the message but did not deliver it within {} days; it was not refunded because {provider} took it — send it again, or contact the recipient another way",
                policy.expire_after.as_secs().div_ceil(86_400)
            )),
            next_attempt_at: Some(None),
            expired_at: Some(now),
            ..MessageUpdate::default()
        })
    };
    let retry = |retry_after: Option<Duration>, ambiguous: bool| {
        Transition::Write(MessageUpdate {
            next_attempt_at: Some(Some(later(
                now,
                backoff(policy, message.attempts, retry_after, jitter),
            ))),
            ambiguous,
            ..MessageUpdate::default()
        })
    };
    // Giving up on a message the provider has not (knowingly) accepted. If an attempt may have
    // reached the provider unseen, the credits are not refunded blindly: the message fails with
    // a reason that says so.
    let give_up = |ambiguous: bool, reason: String| {
        if ambiguous {
            Transition::Write(MessageUpdate {
                status: Some(MessageStatus::Failed),
                failure_reason: Some(format!(
                    "{reason}; an earlier attempt may have reached the provider, so the credits were not refunded automatically — contact support"
                )),
                next_attempt_at: Some(None),
                ..MessageUpdate::default()
            })
        } else {
            Transition::FailAndRefund { reason }
        }
    };
    match (message.status, outcome) {
        // The account was disconnected or is no longer active: keep the message and look again
        // later; a queued one the provider never saw fails and is refunded in time.
        (MessageStatus::Queued, Outcome::NotConnected) if old => give_up(
            message.ambiguous,
            format!("your practice's {provider} connection is no longer active"),
        ),
        (MessageStatus::Sent, Outcome::NotConnected | Outcome::NotAsked) if expired => expire(),
        (
            MessageStatus::Queued | MessageStatus::Sent | MessageStatus::Delivered,
            Outcome::NotConnected,
        ) => Transition::Write(MessageUpdate {
            next_attempt_at: Some(Some(later(now, policy.retry_max))),
            ..MessageUpdate::default()
        }),
        (MessageStatus::Queued, Outcome::Accepted { reference }) => {
            Transition::Write(MessageUpdate {
                status: Some(MessageStatus::Sent),
                provider_reference: Some(reference.clone()),
                sent_at: Some(now),
                next_attempt_at: Some(Some(later(
                    now,
                    FIRST_STATUS_CHECK.min(policy.status_poll_interval),
                ))),
                ..MessageUpdate::default()
            })
        }
        (MessageStatus::Queued, Outcome::SendFailed(error)) => match error.failure() {
            ProviderFailure::Refused => {
                let code = match error {
                    ProviderError::Refused { code, .. } => safe_word(code),
                    _ => String::new(),
                };
                Transition::FailAndRefund {
                    reason: format!("{provider} refused the message ({code})"),
                }
            }
            ProviderFailure::BadCredentials if old => give_up(
                message.ambiguous,
                format!("{provider} no longer accepts the practice's login"),
            ),
            ProviderFailure::BadCredentials => retry(None, false),
            failure @ (ProviderFailure::Timeout
            | ProviderFailure::ConnectFailed
            | ProviderFailure::Transport
            | ProviderFailure::MalformedReply
            | ProviderFailure::ServerError
            | ProviderFailure::RateLimited
            | ProviderFailure::Duplicate) => {
                // A timeout, a broken connection or an unreadable reply may hide an
                // acceptance; a clean 5xx or 429 does not.
                let ambiguous = failure.may_have_been_accepted();
                if old {
                    give_up(
                        message.ambiguous || ambiguous,
                        format!("{provider} did not accept the message in time"),
                    )
                } else {
                    retry(error.retry_after(), ambiguous)
                }
            }
        },
        // Delivered long ago and never acknowledged (some recipients never are): stop asking.
        (MessageStatus::Delivered, Outcome::NotAsked) if expired => {
            Transition::Write(MessageUpdate {
                next_attempt_at: Some(None),
                ..MessageUpdate::default()
            })
        }
        // Asked nothing although its time is not up (a clock step back between the call and
        // the decision): look again at the next poll.
        (MessageStatus::Sent | MessageStatus::Delivered, Outcome::NotAsked) => {
            Transition::Write(MessageUpdate {
                next_attempt_at: Some(Some(next_status_check(policy, message, now))),
                ..MessageUpdate::default()
            })
        }
        (MessageStatus::Sent | MessageStatus::Delivered, Outcome::Delivery(state)) => {
            Transition::Write(delivery_update(policy, message, state, now))
        }
        (MessageStatus::Sent | MessageStatus::Delivered, Outcome::DeliveryCheckFailed) => {
            Transition::Write(MessageUpdate {
                next_attempt_at: Some(Some(later(
                    now,
                    backoff(policy, message.attempts, None, jitter),
                ))),
                ..MessageUpdate::default()
            })
        }
        (
            MessageStatus::Queued,
            Outcome::NotAsked | Outcome::Delivery(_) | Outcome::DeliveryCheckFailed,
        )
        | (
            MessageStatus::Sent | MessageStatus::Delivered,
            Outcome::Accepted { .. } | Outcome::SendFailed(_),
        )
        | (MessageStatus::Acknowledged | MessageStatus::Failed, _) => Transition::Nothing,
    }
}

/// What a provider's delivery state means for a message in its current status. Transitions
/// only move forward, so duplicate and out-of-order receipts change nothing.
fn delivery_update(
    policy: &OutboxPolicy,
    message: &MessageRow,
    state: &DeliveryState,
    now: DateTime<Utc>,
) -> MessageUpdate {
    let poll_again = Some(Some(next_status_check(policy, message, now)));
    match state {
        DeliveryState::Accepted => MessageUpdate {
            next_attempt_at: poll_again,
            ..MessageUpdate::default()
        },
        DeliveryState::Delivered if message.status == MessageStatus::Sent => MessageUpdate {
            status: Some(MessageStatus::Delivered),
            delivered_at: Some(now),
            next_attempt_at: poll_again,
            ..MessageUpdate::default()
        },
        DeliveryState::Delivered => MessageUpdate {
            next_attempt_at: poll_again,
            ..MessageUpdate::default()
        },
        DeliveryState::Acknowledged => MessageUpdate {
            status: Some(MessageStatus::Acknowledged),
            delivered_at: message.delivered_at.or(Some(now)),
            acknowledged_at: Some(now),
            next_attempt_at: Some(None),
            ..MessageUpdate::default()
        },
        // A delivered message cannot fail afterwards; the provider's words stay in the log.
        DeliveryState::Failed(_) if message.status == MessageStatus::Sent => MessageUpdate {
            status: Some(MessageStatus::Failed),
            failure_reason: Some(format!(
                "{} could not deliver the message to the recipient's endpoint",
                message.provider
            )),
            next_attempt_at: Some(None),
            ..MessageUpdate::default()
        },
        DeliveryState::Failed(_) => MessageUpdate {
            next_attempt_at: poll_again,
            ..MessageUpdate::default()
        },
    }
}

impl MessagingService {
    /// One pass of the outbox: claims up to [`OUTBOX_BATCH`] due messages in one transaction,
    /// asks their providers concurrently (up to [`OUTBOX_CONCURRENCY`] calls at once), then
    /// records every plain outcome in one transaction; failures that refund take their own
    /// transaction each (message and ledger together). Returns how many messages it claimed.
    pub async fn process_outbox(&self, now: DateTime<Utc>) -> Result<usize, GatewayError> {
        use std::collections::HashMap;

        use futures::StreamExt;

        use crate::domain::types::{MessageId, Provider, ProviderCredentials};

        let lease_until = later(Utc::now(), self.settings.outbox_lease);
        let claimed = self
            .store
            .claim_due_messages(now, lease_until, OUTBOX_BATCH as u64)
            .await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        // Each practice's credentials once per pass, not once per message.
        let mut credentials: HashMap<(String, Provider), Option<ProviderCredentials>> =
            HashMap::new();
        for message in &claimed {
            if let std::collections::hash_map::Entry::Vacant(entry) =
                credentials.entry((message.group_id.clone(), message.provider))
            {
                entry.insert(
                    self.integrations
                        .active_group_credentials(&message.group_id, message.provider)
                        .await?,
                );
            }
        }
        let policy = OutboxPolicy::from_settings(&self.settings);
        let credentials = &credentials;
        let asked: Vec<(MessageRow, Result<Outcome, GatewayError>)> =
            futures::stream::iter(claimed)
                .map(|message| async move {
                    let found = credentials
                        .get(&(message.group_id.clone(), message.provider))
                        .and_then(Option::as_ref);
                    let outcome = self.ask(&policy, &message, found, now).await;
                    (message, outcome)
                })
                .buffer_unordered(OUTBOX_CONCURRENCY)
                .collect()
                .await;
        let worked = asked.len();
        let groups: HashMap<MessageId, String> = asked
            .iter()
            .map(|(message, _)| (message.id.clone(), message.group_id.clone()))
            .collect();
        let mut writes = Vec::with_capacity(worked);
        // The message behind each write that expires it, to announce once it applied.
        let mut expiring = Vec::with_capacity(worked);
        let mut refunds = Vec::new();
        for (message, outcome) in asked {
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(error) => {
                    // Nothing is written: the lease runs out and the message is looked at again.
                    tracing::error!(message = %message.id, error = ?error, "outbox step failed; it will be retried");
                    continue;
                }
            };
            if let (MessageStatus::Sent, Outcome::Delivery(DeliveryState::Failed(reason))) =
                (message.status, &outcome)
            {
                tracing::info!(message = %message.id, provider = %message.provider, reason = %reason, "provider reports the message undeliverable");
            }
            match next_step(&policy, &message, &outcome, now, Jitter::random()) {
                Transition::Write(update) => {
                    expiring.push(update.expired_at.is_some().then(|| message.clone()));
                    writes.push((message.id, message.status, update));
                }
                Transition::FailAndRefund { reason } => refunds.push((message, reason)),
                Transition::Nothing => {}
            }
        }
        let applied = self.store.update_messages(&writes).await?;
        for (((id, from_status, update), applied), expiring) in
            writes.iter().zip(applied).zip(expiring)
        {
            self.announce_if_moved(&groups[id], id, *from_status, update, applied);
            if let (Some(message), true) = (expiring, applied) {
                self.announce_expiry(&message).await;
            }
        }
        for (message, reason) in refunds {
            if let Err(error) = self.fail_and_refund(&message, &reason).await {
                tracing::error!(message = %message.id, error = ?error, "failing and refunding a message failed; it will be retried");
            }
        }
        Ok(worked)
    }

    /// Asks the provider what [`next_call`] says a claimed message needs.
    async fn ask(
        &self,
        policy: &OutboxPolicy,
        message: &MessageRow,
        credentials: Option<&crate::domain::types::ProviderCredentials>,
        now: DateTime<Utc>,
    ) -> Result<Outcome, GatewayError> {
        let provider = message.provider;
        let Some(credentials) = credentials else {
            return Ok(Outcome::NotConnected);
        };
        let adapter = self.providers.get(provider);
        Ok(match next_call(policy, message, now) {
            Call::Send => {
                let payload = self.open_payload(message)?;
                let sent = adapter
                    .send(
                        credentials,
                        &OutboundMessage {
                            client_message_id: message.id.as_str(),
                            recipient_hpii: &message.counterpart_hpii,
                            payload: &payload.hl7,
                        },
                    )
                    .await;
                match sent {
                    Ok(_) if self.settings.fail_after_send => {
                        return Err(GatewayError::internal(anyhow::anyhow!(
                            "test fault point: stopped after the provider accepted"
                        )));
                    }
                    Ok(reference) => Outcome::Accepted { reference },
                    Err(error) => {
                        tracing::warn!(message = %message.id, %provider, error = %error, "send failed");
                        Outcome::SendFailed(error)
                    }
                }
            }
            Call::CheckDelivery => {
                let Some(reference) = message.provider_reference.as_deref() else {
                    return Err(GatewayError::internal(anyhow::anyhow!(
                        "sent message without a provider reference"
                    )));
                };
                match adapter.delivery_state(credentials, reference).await {
                    Ok(state) => Outcome::Delivery(state),
                    Err(error) => {
                        tracing::warn!(message = %message.id, error = %error, "delivery status check failed; will retry");
                        Outcome::DeliveryCheckFailed
                    }
                }
            }
            Call::Nothing => Outcome::NotAsked,
        })
    }

    /// Announces a recorded update that moved a message to another status (after its commit).
    fn announce_if_moved(
        &self,
        group_id: &str,
        id: &crate::domain::types::MessageId,
        from_status: MessageStatus,
        update: &MessageUpdate,
        applied: bool,
    ) {
        if applied && update.status.is_some_and(|status| status != from_status) {
            self.events.message_changed(group_id, id.as_str());
        }
    }

    /// Writes a transition (conditional on the status the message was read in).
    pub(super) async fn apply(
        &self,
        message: &MessageRow,
        outcome: &Outcome,
        transition: Transition,
    ) -> Result<(), GatewayError> {
        if let (MessageStatus::Sent, Outcome::Delivery(DeliveryState::Failed(reason))) =
            (message.status, outcome)
        {
            tracing::info!(message = %message.id, provider = %message.provider, reason = %reason, "provider reports the message undeliverable");
        }
        match transition {
            Transition::Write(update) => {
                let applied = self
                    .store
                    .update_message(&message.id, message.status, &update)
                    .await?;
                self.announce_if_moved(
                    &message.group_id,
                    &message.id,
                    message.status,
                    &update,
                    applied,
                );
                if applied && update.expired_at.is_some() {
                    self.announce_expiry(message).await;
                }
                Ok(())
            }
            Transition::FailAndRefund { reason } => self.fail_and_refund(message, &reason).await,
            Transition::Nothing => Ok(()),
        }
    }

    /// The provider never accepted the message: it fails and its credits come back, together.
    async fn fail_and_refund(
        &self,
        message: &MessageRow,
        reason: &str,
    ) -> Result<(), GatewayError> {
        // Only received messages can be unassigned; an outbound one always has its sender.
        let sender = message.owner_user_id.as_deref().ok_or_else(|| {
            GatewayError::internal(anyhow::anyhow!(
                "outbound message {} has no sender",
                message.id
            ))
        })?;
        let txn = self.store.begin_credit_transaction().await?;
        let update = MessageUpdate {
            status: Some(MessageStatus::Failed),
            failure_reason: Some(reason.to_owned()),
            next_attempt_at: Some(None),
            refunded: true,
            ..MessageUpdate::default()
        };
        if !self
            .store
            .update_message_in_transaction(&txn, &message.id, MessageStatus::Queued, &update)
            .await?
        {
            txn.rollback().await?;
            return Ok(());
        }
        self.credits
            .refund_in(
                &txn,
                &message.group_id,
                sender,
                message.credits_charged,
                message.id.as_str(),
            )
            .await?;
        let mut audit = AuditEntry::by_gateway(
            &message.group_id,
            actions::REFUND_MESSAGE,
            format!("message:{}", message.id),
            AuditOutcome::Success,
        )
        .with_detail(format!("{} credits: {reason}", message.credits_charged));
        audit.actor_user_id = None;
        self.store.audit_in(&txn, &audit).await?;
        txn.commit().await?;
        self.events
            .message_changed(&message.group_id, message.id.as_str());
        self.credits.refund_committed(message.credits_charged);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use chrono::TimeZone;

    use super::*;
    use crate::domain::types::{Direction, MessageId, Provider};
    use crate::providers::Unavailability;

    const POLICY: OutboxPolicy = OutboxPolicy {
        status_poll_interval: Duration::from_secs(5),
        retry_base: Duration::from_secs(1),
        retry_max: Duration::from_secs(60),
        give_up_after: Duration::from_secs(3600),
        expire_after: Duration::from_secs(5 * 86_400),
    };

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap()
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        now() + chrono::Duration::seconds(seconds)
    }

    #[derive(Clone, Copy)]
    enum Age {
        /// Created ten seconds ago.
        Fresh,
        /// Created two hours ago, past `give_up_after`.
        Old,
        /// Created (and, when sent, accepted) six days ago, past `expire_after`.
        Expired,
    }
    use Age::{Expired, Fresh, Old};

    /// A claimed outbound message (`attempts` counts this attempt). `stored_ambiguous`: an
    /// earlier attempt may have reached the provider.
    fn message(
        status: MessageStatus,
        age: Age,
        attempts: i32,
        stored_ambiguous: bool,
    ) -> MessageRow {
        let created_at = match age {
            Fresh => at(-10),
            Old => at(-7200),
            Expired => at(-6 * 86_400),
        };
        MessageRow {
            id: MessageId::generate(),
            group_id: "clinic-1".into(),
            owner_user_id: Some("dr-chen".into()),
            direction: Direction::Outbound,
            provider: Provider::Argus,
            status,
            counterpart_hpii: "8003610000000006".into(),
            counterpart_name: "Dr Ada Lovelace".into(),
            note_id: None,
            payload_ciphertext: String::new(),
            idempotency_key: None,
            provider_reference: (status != MessageStatus::Queued).then(|| "AR-1".into()),
            failure_reason: None,
            credits_charged: 3,
            refunded: false,
            ambiguous: stored_ambiguous,
            attempts,
            next_attempt_at: Some(at(30)),
            created_at,
            sent_at: (status != MessageStatus::Queued)
                .then_some(created_at + chrono::Duration::seconds(1)),
            delivered_at: (status == MessageStatus::Delivered).then(|| at(-5)),
            acknowledged_at: None,
            addressed_hpii: None,
            attention: crate::store::messaging::AttentionMarks::default(),
        }
    }

    fn unavailable(kind: Unavailability, retry_after: Option<u64>) -> Outcome {
        Outcome::SendFailed(ProviderError::Unavailable {
            kind,
            // Deliberately misleading words: only the kind may decide.
            reason: "timed out / transport error / malformed".into(),
            retry_after: retry_after.map(Duration::from_secs),
        })
    }

    fn refused() -> Outcome {
        Outcome::SendFailed(ProviderError::Refused {
            code: "badParam".into(),
            message: "unknown endpoint".into(),
        })
    }

    fn retry_in(seconds: i64, ambiguous: bool) -> Transition {
        Transition::Write(MessageUpdate {
            next_attempt_at: Some(Some(at(seconds))),
            ambiguous,
            ..MessageUpdate::default()
        })
    }

    fn poll_again() -> Transition {
        retry_in(5, false)
    }

    fn expired() -> Transition {
        Transition::Write(MessageUpdate {
            status: Some(MessageStatus::Failed),
            failure_reason: Some("expired: Argus accepted the message but did not deliver it within 5 days; it was not refunded because Argus took it — send it again, or contact the recipient another way".into()),
            next_attempt_at: Some(None),
            expired_at: Some(now()),
            ..MessageUpdate::default()
        })
    }

    fn refund(reason: &str) -> Transition {
        Transition::FailAndRefund {
            reason: reason.into(),
        }
    }

    fn failed_without_refund(reason: &str) -> Transition {
        Transition::Write(MessageUpdate {
            status: Some(MessageStatus::Failed),
            failure_reason: Some(format!(
                "{reason}; an earlier attempt may have reached the provider, so the credits were not refunded automatically — contact support"
            )),
            next_attempt_at: Some(None),
            ..MessageUpdate::default()
        })
    }

    /// A short name for an outcome, to check that the table misses no (status, outcome) pair.
    fn label(outcome: &Outcome) -> String {
        match outcome {
            Outcome::SendFailed(error) => format!("SendFailed({:?})", error.failure()),
            Outcome::Delivery(DeliveryState::Failed(_)) => "Delivery(Failed)".into(),
            Outcome::Delivery(state) => format!("Delivery({state:?})"),
            Outcome::Accepted { .. } => "Accepted".into(),
            other => format!("{other:?}"),
        }
    }

    fn every_outcome() -> Vec<Outcome> {
        vec![
            Outcome::NotConnected,
            Outcome::NotAsked,
            Outcome::Accepted {
                reference: "AR-1".into(),
            },
            unavailable(Unavailability::Timeout, None),
            unavailable(Unavailability::ConnectFailed, None),
            unavailable(Unavailability::Transport, None),
            unavailable(Unavailability::MalformedReply, None),
            unavailable(Unavailability::ServerError, None),
            unavailable(Unavailability::RateLimited, None),
            refused(),
            Outcome::SendFailed(ProviderError::InvalidCredentials),
            Outcome::SendFailed(ProviderError::Duplicate),
            Outcome::Delivery(DeliveryState::Accepted),
            Outcome::Delivery(DeliveryState::Delivered),
            Outcome::Delivery(DeliveryState::Acknowledged),
            Outcome::Delivery(DeliveryState::Failed("no such endpoint".into())),
            Outcome::DeliveryCheckFailed,
        ]
    }

    #[test]
    fn the_outbox_machine_decides_every_state_and_outcome_as_the_table_says() {
        use MessageStatus::{Acknowledged, Delivered, Failed, Queued, Sent};
        use Unavailability as U;
        let sent_now = Transition::Write(MessageUpdate {
            status: Some(Sent),
            provider_reference: Some("AR-7".into()),
            sent_at: Some(now()),
            // The first delivery check comes a second after the hand-over.
            next_attempt_at: Some(Some(at(1))),
            ..MessageUpdate::default()
        });
        let acknowledged = |delivered_at| {
            Transition::Write(MessageUpdate {
                status: Some(Acknowledged),
                delivered_at: Some(delivered_at),
                acknowledged_at: Some(now()),
                next_attempt_at: Some(None),
                ..MessageUpdate::default()
            })
        };
        #[rustfmt::skip]
        let mut rows: Vec<(MessageRow, Outcome, Transition)> = vec![
            // QUEUED: not connected — wait for the connection, and give up (refunded) in time.
            (message(Queued, Fresh, 1, false), Outcome::NotConnected, retry_in(60, false)),
            (message(Queued, Old, 1, false), Outcome::NotConnected, refund("your practice's Argus connection is no longer active")),
            (message(Queued, Old, 1, true), Outcome::NotConnected, failed_without_refund("your practice's Argus connection is no longer active")),
            // QUEUED: accepted.
            (message(Queued, Fresh, 1, false), Outcome::Accepted { reference: "AR-7".into() }, sent_now.clone()),
            (message(Queued, Old, 9, true), Outcome::Accepted { reference: "AR-7".into() }, sent_now),
            // QUEUED: refused outright is permanent and refunded at once, whatever its age.
            (message(Queued, Fresh, 1, false), refused(), refund("Argus refused the message (badParam)")),
            (message(Queued, Old, 1, true), refused(), refund("Argus refused the message (badParam)")),
            // QUEUED: the login no longer works — retry (not ambiguous), give up in time.
            (message(Queued, Fresh, 1, false), Outcome::SendFailed(ProviderError::InvalidCredentials), retry_in(1, false)),
            (message(Queued, Old, 1, false), Outcome::SendFailed(ProviderError::InvalidCredentials), refund("Argus no longer accepts the practice's login")),
            (message(Queued, Old, 1, true), Outcome::SendFailed(ProviderError::InvalidCredentials), failed_without_refund("Argus no longer accepts the practice's login")),
            // QUEUED: transient faults back off (1 s doubling per attempt, at most 60 s, at
            // least the provider's Retry-After); only those that may hide an acceptance mark
            // the message ambiguous.
            (message(Queued, Fresh, 3, false), unavailable(U::Timeout, None), retry_in(4, true)),
            (message(Queued, Fresh, 1, false), unavailable(U::Transport, None), retry_in(1, true)),
            (message(Queued, Fresh, 1, false), unavailable(U::MalformedReply, None), retry_in(1, true)),
            (message(Queued, Fresh, 2, false), unavailable(U::ConnectFailed, None), retry_in(2, false)),
            (message(Queued, Fresh, 1, false), unavailable(U::ServerError, None), retry_in(1, false)),
            (message(Queued, Fresh, 20, false), unavailable(U::ServerError, None), retry_in(60, false)),
            (message(Queued, Fresh, 1, false), unavailable(U::RateLimited, Some(30)), retry_in(30, false)),
            (message(Queued, Fresh, 1, false), unavailable(U::RateLimited, Some(86_400)), retry_in(60, false)),
            (message(Queued, Fresh, 1, false), Outcome::SendFailed(ProviderError::Duplicate), retry_in(1, false)),
            // QUEUED, too old: refunded only when no attempt may have reached the provider.
            (message(Queued, Old, 1, false), unavailable(U::ServerError, None), refund("Argus did not accept the message in time")),
            (message(Queued, Old, 1, false), unavailable(U::RateLimited, Some(5)), refund("Argus did not accept the message in time")),
            (message(Queued, Old, 1, false), unavailable(U::ConnectFailed, None), refund("Argus did not accept the message in time")),
            (message(Queued, Old, 1, true), unavailable(U::ServerError, None), failed_without_refund("Argus did not accept the message in time")),
            (message(Queued, Old, 1, false), unavailable(U::Timeout, None), failed_without_refund("Argus did not accept the message in time")),
            (message(Queued, Old, 1, false), unavailable(U::Transport, None), failed_without_refund("Argus did not accept the message in time")),
            (message(Queued, Old, 1, false), unavailable(U::MalformedReply, None), failed_without_refund("Argus did not accept the message in time")),
            (message(Queued, Old, 1, false), Outcome::SendFailed(ProviderError::Duplicate), refund("Argus did not accept the message in time")),
            // QUEUED: delivery answers belong to sent messages.
            (message(Queued, Fresh, 1, false), Outcome::NotAsked, Transition::Nothing),
            (message(Queued, Fresh, 1, false), Outcome::Delivery(DeliveryState::Acknowledged), Transition::Nothing),
            (message(Queued, Fresh, 1, false), Outcome::DeliveryCheckFailed, Transition::Nothing),
            // SENT: followed to the end; never refunded (the provider accepted it).
            (message(Sent, Fresh, 1, false), Outcome::NotConnected, retry_in(60, false)),
            (message(Sent, Old, 1, false), Outcome::NotConnected, retry_in(60, false)),
            // SENT past `expire_after` since the provider accepted it: FAILED ("expired"), never
            // refunded, whether or not the practice is still connected.
            (message(Sent, Expired, 1, false), Outcome::NotAsked, expired()),
            (message(Sent, Expired, 1, false), Outcome::NotConnected, expired()),
            (message(Sent, Old, 1, false), Outcome::NotAsked, poll_again()),
            // A late receipt still moves it forward before the outbox gets to expire it.
            (message(Sent, Expired, 1, false), Outcome::Delivery(DeliveryState::Delivered), Transition::Write(MessageUpdate { status: Some(Delivered), delivered_at: Some(now()), next_attempt_at: Some(Some(at(5))), ..MessageUpdate::default() })),
            (message(Sent, Fresh, 1, false), Outcome::Delivery(DeliveryState::Accepted), poll_again()),
            (message(Sent, Fresh, 1, false), Outcome::Delivery(DeliveryState::Delivered), Transition::Write(MessageUpdate { status: Some(Delivered), delivered_at: Some(now()), next_attempt_at: Some(Some(at(5))), ..MessageUpdate::default() })),
            (message(Sent, Fresh, 1, false), Outcome::Delivery(DeliveryState::Acknowledged), acknowledged(now())),
            (message(Sent, Fresh, 1, false), Outcome::Delivery(DeliveryState::Failed("no such endpoint".into())), Transition::Write(MessageUpdate { status: Some(Failed), failure_reason: Some("Argus could not deliver the message to the recipient's endpoint".into()), next_attempt_at: Some(None), ..MessageUpdate::default() })),
            (message(Sent, Fresh, 2, false), Outcome::DeliveryCheckFailed, retry_in(2, false)),
            // DELIVERED: only forward; a delivered message cannot fail afterwards.
            (message(Delivered, Fresh, 1, false), Outcome::NotConnected, retry_in(60, false)),
            // DELIVERED past `expire_after`: no longer followed (never failed, never refunded).
            (message(Delivered, Expired, 1, false), Outcome::NotAsked, Transition::Write(MessageUpdate { next_attempt_at: Some(None), ..MessageUpdate::default() })),
            (message(Delivered, Expired, 1, false), Outcome::NotConnected, retry_in(60, false)),
            (message(Delivered, Old, 1, false), Outcome::NotAsked, poll_again()),
            (message(Delivered, Fresh, 1, false), Outcome::Delivery(DeliveryState::Accepted), poll_again()),
            (message(Delivered, Fresh, 1, false), Outcome::Delivery(DeliveryState::Delivered), poll_again()),
            (message(Delivered, Fresh, 1, false), Outcome::Delivery(DeliveryState::Acknowledged), acknowledged(at(-5))),
            (message(Delivered, Fresh, 1, false), Outcome::Delivery(DeliveryState::Failed("late".into())), poll_again()),
            (message(Delivered, Fresh, 1, false), Outcome::DeliveryCheckFailed, retry_in(1, false)),
        ];
        // Delivery answers for a queued message, send answers for a message already sent, and
        // anything for a final one: nothing.
        for status in [Queued, Sent, Delivered, Acknowledged, Failed] {
            for outcome in every_outcome() {
                let applies = match status {
                    Queued => matches!(outcome, Outcome::Delivery(_)),
                    Sent | Delivered => {
                        matches!(outcome, Outcome::Accepted { .. } | Outcome::SendFailed(_))
                    }
                    _ => true,
                };
                if applies {
                    rows.push((
                        message(status, Fresh, 1, false),
                        outcome,
                        Transition::Nothing,
                    ));
                }
            }
        }

        for (message, outcome, expected) in &rows {
            let actual = next_step(&POLICY, message, outcome, now(), Jitter::NONE);
            assert_eq!(
                &actual, expected,
                "{:?} created {} attempts {} ambiguous {} after {outcome:?}",
                message.status, message.created_at, message.attempts, message.ambiguous
            );
        }

        let covered: BTreeSet<(&str, String)> = rows
            .iter()
            .map(|(message, outcome, _)| (message.status.code(), label(outcome)))
            .collect();
        for status in MessageStatus::ALL {
            for outcome in every_outcome() {
                assert!(
                    covered.contains(&(status.code(), label(&outcome))),
                    "no row for {status:?} after {}",
                    label(&outcome)
                );
            }
        }
    }

    #[test]
    fn delivery_checks_back_off_with_the_time_since_the_hand_over() {
        let sent_ago = |seconds: i64| MessageRow {
            sent_at: Some(at(-seconds)),
            ..message(MessageStatus::Sent, Fresh, 1, false)
        };
        let next_check = |message: &MessageRow| match next_step(
            &POLICY,
            message,
            &Outcome::Delivery(DeliveryState::Accepted),
            now(),
            Jitter::NONE,
        ) {
            Transition::Write(update) => update.next_attempt_at,
            other => panic!("expected a write, got {other:?}"),
        };
        // Just handed over: a second; then the wait doubles the elapsed time; never past the
        // configured interval (5 s here), however long ago it was sent.
        assert_eq!(next_check(&sent_ago(0)), Some(Some(at(1))));
        assert_eq!(next_check(&sent_ago(1)), Some(Some(at(1))));
        assert_eq!(next_check(&sent_ago(2)), Some(Some(at(2))));
        assert_eq!(next_check(&sent_ago(4)), Some(Some(at(4))));
        assert_eq!(next_check(&sent_ago(3600)), Some(Some(at(5))));
        // A message stamped sent in the future (clock skew between nodes) is checked soon.
        assert_eq!(next_check(&sent_ago(-30)), Some(Some(at(1))));
        // With an interval shorter than a second, every check waits that interval.
        let fast = OutboxPolicy {
            status_poll_interval: Duration::from_millis(20),
            ..POLICY
        };
        match next_step(
            &fast,
            &sent_ago(600),
            &Outcome::Delivery(DeliveryState::Accepted),
            now(),
            Jitter::NONE,
        ) {
            Transition::Write(update) => assert_eq!(
                update.next_attempt_at,
                Some(Some(now() + chrono::Duration::milliseconds(20)))
            ),
            other => panic!("expected a write, got {other:?}"),
        }
    }

    #[test]
    fn the_outbox_asks_the_provider_only_what_a_message_needs() {
        use MessageStatus::{Acknowledged, Delivered, Failed, Queued, Sent};
        #[rustfmt::skip]
        let rows = [
            (message(Queued, Fresh, 1, false), Call::Send),
            (message(Queued, Old, 1, false), Call::Send),
            (message(Sent, Fresh, 1, false), Call::CheckDelivery),
            (message(Sent, Old, 1, false), Call::CheckDelivery),
            (message(Sent, Expired, 1, false), Call::Nothing),
            (message(Delivered, Fresh, 1, false), Call::CheckDelivery),
            (message(Delivered, Old, 1, false), Call::CheckDelivery),
            (message(Delivered, Expired, 1, false), Call::Nothing),
            (message(Acknowledged, Fresh, 1, false), Call::Nothing),
            (message(Failed, Fresh, 1, false), Call::Nothing),
        ];
        for (message, expected) in rows {
            assert_eq!(
                next_call(&POLICY, &message, now()),
                expected,
                "{:?}",
                message.status
            );
        }
    }

    #[test]
    fn jitter_adds_at_most_a_quarter_and_never_shortens_a_retry_after() {
        let jittered = next_step(
            &POLICY,
            &message(MessageStatus::Queued, Fresh, 3, false),
            &unavailable(Unavailability::ServerError, None),
            now(),
            Jitter(0.25),
        );
        assert_eq!(jittered, retry_in(5, false));
        let asked = next_step(
            &POLICY,
            &message(MessageStatus::Queued, Fresh, 1, false),
            &unavailable(Unavailability::RateLimited, Some(40)),
            now(),
            Jitter(0.2),
        );
        assert_eq!(asked, retry_in(40, false));
    }
}
