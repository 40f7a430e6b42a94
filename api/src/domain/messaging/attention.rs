//! Delivery alerts: a sent message that is not `DELIVERED` in time, or not `ACKNOWLEDGED` in
//! time after delivery, is flagged once per reason and announced to its sender; one the
//! provider accepted but never delivered expires (the outbox makes it `FAILED`, see
//! `outbox.rs`).
//!
//! The clocks: "not delivered" runs from `sentAt` (the provider accepted the message; before
//! that the outbox's own give-up rule applies, and a message it gives up on is refunded), "not
//! acknowledged" from `deliveredAt` (before delivery the message is already flagged as not
//! delivered, and the recipient's system cannot acknowledge what it has not received). Both
//! are measured on the gateway's clock against configured durations.
//!
//! Sans-I/O like the outbox: [`attention_due`] decides from a message and the time which flag
//! it is owed, [`needs_attention`] what a message shows now; the worker pass around them
//! ([`MessagingService::flag_overdue_messages`]) finds candidates and flags each with one
//! conditional update (`… WHERE flagged_… IS NULL AND status = …`), which is its claim: of any
//! number of nodes flagging at once exactly one changes the row, writes the audit event and
//! announces it. No lease is needed because nothing happens outside that transaction except
//! the in-process announcement, and subscribers re-read the flags from the database anyway.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{MessagingService, MessagingSettings, actions, practitioner_only};
use crate::domain::audit::{AuditEntry, AuditOutcome, Principal};
use crate::domain::types::{AttentionReason, Direction, MessageStatus};
use crate::domain::{GatewayError, earlier};
use crate::store::messaging::MessageRow;

/// How many overdue messages one pass flags at most (the worker goes on while passes are full).
pub const ATTENTION_BATCH: usize = 200;

/// The alert deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttentionPolicy {
    /// From `sentAt` to the "not delivered" flag.
    pub undelivered_after: Duration,
    /// From `deliveredAt` to the "not acknowledged" flag.
    pub unacknowledged_after: Duration,
}

impl AttentionPolicy {
    pub(crate) fn from_settings(settings: &MessagingSettings) -> Self {
        Self {
            undelivered_after: settings.undelivered_alert_after,
            unacknowledged_after: settings.unacknowledged_alert_after,
        }
    }
}

/// Why a message needs attention, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attention {
    /// Why.
    pub reason: AttentionReason,
    /// When it was flagged.
    pub since: DateTime<Utc>,
}

fn past(start: Option<DateTime<Utc>>, deadline: Duration, now: DateTime<Utc>) -> bool {
    start.is_some_and(|start| start <= earlier(now, deadline))
}

/// The flag `message` is owed at `now` and does not have yet, if any.
pub(crate) fn attention_due(
    policy: &AttentionPolicy,
    message: &MessageRow,
    now: DateTime<Utc>,
) -> Option<AttentionReason> {
    if message.direction != Direction::Outbound {
        return None;
    }
    let marks = &message.attention;
    match message.status {
        MessageStatus::Sent
            if marks.undelivered_at.is_none()
                && past(message.sent_at, policy.undelivered_after, now) =>
        {
            Some(AttentionReason::NotDelivered)
        }
        MessageStatus::Delivered
            if marks.unacknowledged_at.is_none()
                && past(message.delivered_at, policy.unacknowledged_after, now) =>
        {
            Some(AttentionReason::NotAcknowledged)
        }
        MessageStatus::Queued
        | MessageStatus::Sent
        | MessageStatus::Delivered
        | MessageStatus::Acknowledged
        | MessageStatus::Failed => None,
    }
}

/// What a message shows as `needsAttention` now: a flag counts while the message is still
/// where it was flagged (a late delivery or acknowledgement clears it); an expired message
/// keeps needing attention (it was never delivered and must be sent again some other way).
pub fn needs_attention(message: &MessageRow) -> Option<Attention> {
    if message.direction != Direction::Outbound {
        return None;
    }
    let marks = &message.attention;
    let (reason, since) = match message.status {
        MessageStatus::Sent => (AttentionReason::NotDelivered, marks.undelivered_at?),
        MessageStatus::Delivered => (AttentionReason::NotAcknowledged, marks.unacknowledged_at?),
        MessageStatus::Failed => (AttentionReason::Expired, marks.expired_at?),
        MessageStatus::Queued | MessageStatus::Acknowledged => return None,
    };
    Some(Attention { reason, since })
}

/// Every flag a message ever got, oldest first (what a subscriber is told about).
pub fn flags_of(message: &MessageRow) -> Vec<Attention> {
    let mut flags: Vec<Attention> = AttentionReason::ALL
        .into_iter()
        .filter_map(|reason| {
            message
                .attention
                .at(reason)
                .map(|since| Attention { reason, since })
        })
        .collect();
    flags.sort_by_key(|flag| (flag.since, flag.reason));
    flags
}

/// What the audit trail says about a flag (no clinical content: the provider and the times).
fn describe(message: &MessageRow, reason: AttentionReason, policy: &AttentionPolicy) -> String {
    let minutes = |duration: Duration| duration.as_secs().div_ceil(60);
    match reason {
        AttentionReason::NotDelivered => format!(
            "NOT_DELIVERED: {} accepted it but has not delivered it within {} minutes",
            message.provider,
            minutes(policy.undelivered_after)
        ),
        AttentionReason::NotAcknowledged => format!(
            "NOT_ACKNOWLEDGED: delivered through {} but not acknowledged within {} minutes",
            message.provider,
            minutes(policy.unacknowledged_after)
        ),
        AttentionReason::Expired => format!(
            "EXPIRED: {} accepted it but never delivered it; FAILED without a refund",
            message.provider
        ),
    }
}

impl MessagingService {
    /// One pass of the alert worker: flags every sent message past a deadline, once per
    /// reason, and announces each flag this node made. Returns how many it flagged.
    pub async fn flag_overdue_messages(&self, now: DateTime<Utc>) -> Result<usize, GatewayError> {
        let policy = AttentionPolicy::from_settings(&self.settings);
        let candidates = self
            .store
            .attention_candidates(
                earlier(now, policy.undelivered_after),
                earlier(now, policy.unacknowledged_after),
                ATTENTION_BATCH as u64,
            )
            .await?;
        let mut flagged = 0;
        for message in candidates {
            let Some(reason) = attention_due(&policy, &message, now) else {
                continue;
            };
            if self
                .flag(&message, message.status, reason, now, &policy)
                .await?
            {
                flagged += 1;
            }
        }
        Ok(flagged)
    }

    /// Records and announces that `message` expired (the outbox made it `FAILED`).
    pub(super) async fn announce_expiry(&self, message: &MessageRow) {
        let policy = AttentionPolicy::from_settings(&self.settings);
        let mut audit = AuditEntry::by_gateway(
            &message.group_id,
            actions::MESSAGE_NEEDS_ATTENTION,
            format!("message:{}", message.id),
            AuditOutcome::Success,
        )
        .with_detail(describe(message, AttentionReason::Expired, &policy));
        audit.actor_user_id = None;
        if let Err(error) = self.store.insert_audit(&audit).await {
            tracing::error!(error = ?error, "could not record an audit event");
        }
        self.events
            .message_needs_attention(&message.group_id, message.id.as_str());
    }

    async fn flag(
        &self,
        message: &MessageRow,
        status: MessageStatus,
        reason: AttentionReason,
        now: DateTime<Utc>,
        policy: &AttentionPolicy,
    ) -> Result<bool, GatewayError> {
        if message.owner_user_id.is_none() {
            return Ok(false);
        }
        let mut audit = AuditEntry::by_gateway(
            &message.group_id,
            actions::MESSAGE_NEEDS_ATTENTION,
            format!("message:{}", message.id),
            AuditOutcome::Success,
        )
        .with_detail(describe(message, reason, policy));
        audit.actor_user_id = None;
        let flagged = self
            .store
            .flag_message(&message.id, status, reason, now, &audit)
            .await?;
        if flagged {
            tracing::info!(message = %message.id, reason = reason.code(), "message needs attention");
            self.events
                .message_needs_attention(&message.group_id, message.id.as_str());
        }
        Ok(flagged)
    }

    /// The caller's sent messages flagged at or after `since` (for `messageNeedsAttention`).
    pub async fn flagged_since(
        &self,
        principal: &Principal,
        since: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<MessageRow>, GatewayError> {
        practitioner_only(principal, "follow secure messages")?;
        Ok(self
            .store
            .messages_flagged_since(&principal.user_id, since, limit)
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::domain::types::{MessageId, Provider};
    use crate::store::messaging::AttentionMarks;

    const POLICY: AttentionPolicy = AttentionPolicy {
        undelivered_after: Duration::from_secs(3600),
        unacknowledged_after: Duration::from_secs(48 * 3600),
    };

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap()
    }

    fn ago(seconds: i64) -> Option<DateTime<Utc>> {
        Some(now() - chrono::Duration::seconds(seconds))
    }

    /// An outbound message in `status`, sent and delivered the given seconds ago.
    fn message(
        status: MessageStatus,
        sent: Option<i64>,
        delivered: Option<i64>,
        attention: AttentionMarks,
    ) -> MessageRow {
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
            provider_reference: None,
            failure_reason: None,
            credits_charged: 3,
            refunded: false,
            ambiguous: false,
            attempts: 1,
            next_attempt_at: None,
            created_at: now() - chrono::Duration::days(10),
            sent_at: sent.and_then(ago),
            delivered_at: delivered.and_then(ago),
            acknowledged_at: None,
            addressed_hpii: None,
            attention,
        }
    }

    fn none() -> AttentionMarks {
        AttentionMarks::default()
    }

    fn undelivered_flagged() -> AttentionMarks {
        AttentionMarks {
            undelivered_at: ago(60),
            ..AttentionMarks::default()
        }
    }

    fn unacknowledged_flagged() -> AttentionMarks {
        AttentionMarks {
            unacknowledged_at: ago(60),
            ..AttentionMarks::default()
        }
    }

    #[test]
    fn each_overdue_message_is_owed_its_flag_once_as_the_table_says() {
        use AttentionReason::{NotAcknowledged, NotDelivered};
        use MessageStatus::{Acknowledged, Delivered, Failed, Queued, Sent};
        const HOUR: i64 = 3600;
        #[rustfmt::skip]
        let rows: Vec<(MessageRow, Option<AttentionReason>)> = vec![
            // Not yet accepted: the outbox's give-up rule (with its refund) applies, not alerts.
            (message(Queued, None, None, none()), None),
            // SENT: flagged once an hour has passed since the provider accepted it.
            (message(Sent, Some(HOUR - 1), None, none()), None),
            (message(Sent, Some(HOUR), None, none()), Some(NotDelivered)),
            (message(Sent, Some(5 * HOUR), None, none()), Some(NotDelivered)),
            // … and never twice.
            (message(Sent, Some(5 * HOUR), None, undelivered_flagged()), None),
            // A SENT row without sentAt (never written so) is not guessed at.
            (message(Sent, None, None, none()), None),
            // DELIVERED: the acknowledgement clock starts at delivery, not at sending.
            (message(Delivered, Some(60 * HOUR), Some(47 * HOUR), none()), None),
            (message(Delivered, Some(49 * HOUR), Some(48 * HOUR), none()), Some(NotAcknowledged)),
            // A late delivery after a NOT_DELIVERED flag may still earn NOT_ACKNOWLEDGED.
            (message(Delivered, Some(60 * HOUR), Some(50 * HOUR), undelivered_flagged()), Some(NotAcknowledged)),
            (message(Delivered, Some(60 * HOUR), Some(50 * HOUR), unacknowledged_flagged()), None),
            // Final states owe nothing.
            (message(Acknowledged, Some(60 * HOUR), Some(50 * HOUR), none()), None),
            (message(Failed, Some(200 * HOUR), None, none()), None),
        ];
        for (message, expected) in &rows {
            assert_eq!(
                attention_due(&POLICY, message, now()),
                *expected,
                "{:?} sent {:?} delivered {:?} marks {:?}",
                message.status,
                message.sent_at,
                message.delivered_at,
                message.attention
            );
        }
        // A received message is never flagged, whatever its age.
        let mut inbound = message(Delivered, Some(60 * HOUR), Some(50 * HOUR), none());
        inbound.direction = Direction::Inbound;
        assert_eq!(attention_due(&POLICY, &inbound, now()), None);
        assert_eq!(needs_attention(&inbound), None);
    }

    #[test]
    fn a_flag_shows_while_the_message_stays_where_it_was_flagged() {
        use MessageStatus::{Acknowledged, Delivered, Failed, Sent};
        let expired = AttentionMarks {
            undelivered_at: ago(300),
            expired_at: ago(10),
            ..AttentionMarks::default()
        };
        let rows = [
            (
                message(Sent, Some(7200), None, undelivered_flagged()),
                Some((AttentionReason::NotDelivered, ago(60))),
            ),
            // Delivered after the flag: the reason is gone until acknowledgement is late.
            (
                message(Delivered, Some(7200), Some(100), undelivered_flagged()),
                None,
            ),
            (
                message(Delivered, Some(7200), Some(100), unacknowledged_flagged()),
                Some((AttentionReason::NotAcknowledged, ago(60))),
            ),
            (
                message(
                    Acknowledged,
                    Some(7200),
                    Some(100),
                    unacknowledged_flagged(),
                ),
                None,
            ),
            (
                message(Failed, Some(7200), None, expired),
                Some((AttentionReason::Expired, ago(10))),
            ),
            // FAILED for another reason (refused, undeliverable) is not an expiry alert.
            (
                message(Failed, Some(7200), None, undelivered_flagged()),
                None,
            ),
        ];
        for (message, expected) in rows {
            assert_eq!(
                needs_attention(&message)
                    .map(|attention| (attention.reason, Some(attention.since))),
                expected,
                "{:?} {:?}",
                message.status,
                message.attention
            );
        }
        let both = message(Failed, Some(7200), None, expired);
        assert_eq!(
            flags_of(&both)
                .into_iter()
                .map(|flag| flag.reason)
                .collect::<Vec<_>>(),
            vec![AttentionReason::NotDelivered, AttentionReason::Expired]
        );
    }
}
