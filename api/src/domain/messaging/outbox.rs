//! The outbox: hands queued messages to their provider, retries transient faults, fails and
//! refunds what the provider refuses, and follows sent messages to `ACKNOWLEDGED`.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{MessagingService, OUTBOX_BATCH, actions};
use crate::domain::audit::{AuditEntry, AuditOutcome};
use crate::domain::types::{MessageStatus, Provider};
use crate::domain::{GatewayError, later, safe_word};
use crate::providers::{DeliveryState, OutboundMessage, ProviderError};
use crate::store::messaging::{MessageRow, MessageUpdate};

impl MessagingService {
    /// One pass of the outbox: sends queued messages and tracks sent ones. Returns how many
    /// messages it worked on.
    pub async fn process_outbox(&self, now: DateTime<Utc>) -> Result<usize, GatewayError> {
        use futures::StreamExt;
        let due = self.store.due_messages(now, OUTBOX_BATCH as u64).await?;
        let results: Vec<Result<bool, GatewayError>> = futures::stream::iter(due)
            .map(|message| async move {
                // Timed from the claim itself: a late claim in a long pass must not start
                // with a lease that has already run out.
                let lease_until = later(Utc::now(), self.settings.outbox_lease);
                if !self.store.claim_message(&message, lease_until).await? {
                    return Ok(false);
                }
                let message = MessageRow {
                    next_attempt_at: Some(lease_until),
                    attempts: message.attempts + 1,
                    ..message
                };
                self.work_on(&message, now).await?;
                Ok(true)
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut worked = 0;
        for result in results {
            match result {
                Ok(true) => worked += 1,
                Ok(false) => {}
                Err(error) => {
                    tracing::error!(error = ?error, "outbox step failed; it will be retried")
                }
            }
        }
        Ok(worked)
    }

    async fn work_on(&self, message: &MessageRow, now: DateTime<Utc>) -> Result<(), GatewayError> {
        let provider = message.provider;
        let Some(credentials) = self
            .integrations
            .active_group_credentials(&message.group_id, provider)
            .await?
        else {
            // The account was disconnected or is no longer active: keep the message and look
            // again later; a queued one the provider never saw fails and is refunded in time.
            if message.status == MessageStatus::Queued && self.too_old(message, now) {
                return self
                    .give_up(
                        message,
                        &format!("your practice's {provider} connection is no longer active"),
                    )
                    .await;
            }
            let update = MessageUpdate {
                next_attempt_at: Some(Some(later(now, self.settings.retry_max))),
                ..MessageUpdate::default()
            };
            self.store
                .update_message(&message.id, message.status, &update)
                .await?;
            return Ok(());
        };
        let adapter = self.providers.get(provider);
        if message.status == MessageStatus::Queued {
            let payload = self.open_payload(message)?;
            let result = adapter
                .send(
                    &credentials,
                    &OutboundMessage {
                        client_message_id: message.id.as_str(),
                        recipient_hpii: &message.counterpart_hpii,
                        payload: &payload.hl7,
                    },
                )
                .await;
            match result {
                Ok(_) if self.settings.fail_after_send => {
                    return Err(GatewayError::internal(anyhow::anyhow!(
                        "test fault point: stopped after the provider accepted"
                    )));
                }
                Ok(reference) => {
                    let update = MessageUpdate {
                        status: Some(MessageStatus::Sent),
                        provider_reference: Some(reference),
                        sent_at: Some(now),
                        next_attempt_at: Some(Some(later(now, self.settings.status_poll_interval))),
                        ..MessageUpdate::default()
                    };
                    self.store
                        .update_message(&message.id, MessageStatus::Queued, &update)
                        .await?;
                }
                Err(ProviderError::Refused { code, .. }) => {
                    self.fail_and_refund(
                        message,
                        &format!("{provider} refused the message ({})", safe_word(&code)),
                    )
                    .await?;
                }
                Err(ProviderError::InvalidCredentials) if self.too_old(message, now) => {
                    self.give_up(
                        message,
                        &format!("{provider} no longer accepts the practice's login"),
                    )
                    .await?;
                }
                Err(ProviderError::InvalidCredentials) => {
                    self.retry_later(message, now, None, false).await?;
                }
                Err(error @ (ProviderError::Unavailable { .. } | ProviderError::Duplicate)) => {
                    let retry_after = match &error {
                        ProviderError::Unavailable { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    // A timeout, a broken connection or an unreadable reply may hide an
                    // acceptance; a clean 5xx or 429 does not.
                    let ambiguous = error.failure().may_have_been_accepted();
                    if self.too_old(message, now) {
                        let message = MessageRow {
                            ambiguous: message.ambiguous || ambiguous,
                            ..message.clone()
                        };
                        self.give_up(
                            &message,
                            &format!("{provider} did not accept the message in time"),
                        )
                        .await?;
                    } else {
                        tracing::warn!(message = %message.id, %provider, error = %error, "send failed; will retry");
                        self.retry_later(message, now, retry_after, ambiguous)
                            .await?;
                    }
                }
            }
            return Ok(());
        }
        let Some(reference) = message.provider_reference.as_deref() else {
            return Err(GatewayError::internal(anyhow::anyhow!(
                "sent message without a provider reference"
            )));
        };
        if self.too_old(message, now) {
            // Sent long ago and never acknowledged (some recipients never are): stop asking.
            let update = MessageUpdate {
                next_attempt_at: Some(None),
                ..MessageUpdate::default()
            };
            self.store
                .update_message(&message.id, message.status, &update)
                .await?;
            return Ok(());
        }
        let update = match adapter.delivery_state(&credentials, reference).await {
            Ok(state) => delivery_update(
                message,
                &state,
                now,
                later(now, self.settings.status_poll_interval),
                provider,
            ),
            Err(error) => {
                tracing::warn!(message = %message.id, error = %error, "delivery status check failed; will retry");
                MessageUpdate {
                    next_attempt_at: Some(Some(later(now, self.backoff(message.attempts, None)))),
                    ..MessageUpdate::default()
                }
            }
        };
        self.store
            .update_message(&message.id, message.status, &update)
            .await?;
        Ok(())
    }

    fn backoff(&self, attempts: i32, retry_after: Option<Duration>) -> Duration {
        use rand::Rng;
        let exponent = u32::try_from(attempts.saturating_sub(1))
            .unwrap_or(0)
            .min(16);
        let base = self
            .settings
            .retry_base
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.settings.retry_max);
        // Up to 25% jitter so many messages failing together do not retry together.
        let jitter = base.mul_f64(rand::thread_rng().gen_range(0.0..0.25));
        (base + jitter).max(retry_after.unwrap_or_default().min(self.settings.retry_max))
    }

    fn too_old(&self, message: &MessageRow, now: DateTime<Utc>) -> bool {
        (now - message.created_at).to_std().unwrap_or_default() > self.settings.give_up_after
    }

    /// Gives up on a message the provider has not (knowingly) accepted. If an attempt may have
    /// reached the provider unseen, the credits are not refunded blindly: the message fails
    /// with a reason that says so.
    async fn give_up(&self, message: &MessageRow, reason: &str) -> Result<(), GatewayError> {
        if message.ambiguous {
            let update = MessageUpdate {
                status: Some(MessageStatus::Failed),
                failure_reason: Some(format!(
                    "{reason}; an earlier attempt may have reached the provider, so the credits were not refunded automatically — contact support"
                )),
                next_attempt_at: Some(None),
                ..MessageUpdate::default()
            };
            self.store
                .update_message(&message.id, MessageStatus::Queued, &update)
                .await?;
            return Ok(());
        }
        self.fail_and_refund(message, reason).await
    }

    async fn retry_later(
        &self,
        message: &MessageRow,
        now: DateTime<Utc>,
        retry_after: Option<Duration>,
        ambiguous: bool,
    ) -> Result<(), GatewayError> {
        let update = MessageUpdate {
            next_attempt_at: Some(Some(later(
                now,
                self.backoff(message.attempts, retry_after),
            ))),
            ambiguous,
            ..MessageUpdate::default()
        };
        self.store
            .update_message(&message.id, MessageStatus::Queued, &update)
            .await?;
        Ok(())
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
        Ok(())
    }
}

/// What a provider's delivery state means for a message in its current status. Transitions
/// only move forward, so duplicate and out-of-order receipts change nothing.
pub(super) fn delivery_update(
    message: &MessageRow,
    state: &DeliveryState,
    now: DateTime<Utc>,
    next_poll: DateTime<Utc>,
    provider: Provider,
) -> MessageUpdate {
    let poll_again = Some(Some(next_poll));
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
        DeliveryState::Failed(reason) if message.status == MessageStatus::Sent => {
            tracing::info!(message = %message.id, %provider, reason = %reason, "provider reports the message undeliverable");
            MessageUpdate {
                status: Some(MessageStatus::Failed),
                failure_reason: Some(format!(
                    "{provider} could not deliver the message to the recipient's endpoint"
                )),
                next_attempt_at: Some(None),
                ..MessageUpdate::default()
            }
        }
        DeliveryState::Failed(_) => MessageUpdate {
            next_attempt_at: poll_again,
            ..MessageUpdate::default()
        },
    }
}
