//! Secure messaging: patients and clinical notes (sealed at rest), the practitioner directory
//! across providers, sending chosen note sections as an HL7 referral, and the outbox that
//! delivers and tracks messages.
//!
//! A send is one transaction: the 3-credit debit from the sender's own wallet and the `QUEUED`
//! message (its idempotency key unique per sender). The outbox worker hands queued messages to
//! the provider with the message id as the provider's client message id, so a retry after an
//! ambiguous timeout is recognised as a duplicate, never delivered twice. A message the provider
//! refuses outright is `FAILED` and its credits refunded in the same transaction.
//!
//! One file per workflow, all methods of [`MessagingService`]: `notes` (patients and notes),
//! `directory` (search, reach, routing; `directory_cache` below it), `send`, `preview` (what a
//! send would transmit), `delegation` (sending on a practitioner's behalf), `outbox` (the pure
//! state machine and its worker), `inbox` (receiving, the unassigned inbox) and `receipts`
//! (pushed delivery receipts). This file holds what they share: settings, the service, reading
//! messages and the caller's HPI-I.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::crypto::SecretBox;
use crate::domain::GatewayError;
use crate::domain::audit::{AuditEntry, AuditOutcome, Principal, actions as audit_actions};
use crate::domain::credits::CreditService;
use crate::domain::hl7;
use crate::domain::integrations::IntegrationService;
use crate::domain::types::{Direction, Hpii, MessageStatus, Provider, Role};
use crate::providers::Providers;
use crate::store::Store;
use crate::store::messaging::MessageRow;
use crate::store::users::HpiiChange;

mod attention;
pub mod delegation;
mod directory;
mod directory_cache;
mod inbox;
mod notes;
mod outbox;
mod preview;
mod receipts;
mod send;

pub use attention::{ATTENTION_BATCH, Attention, flags_of, needs_attention};
pub use delegation::{Delegation, DelegationParty, DelegationStatus, Delegations};
pub use directory::{PractitionerHit, SearchResult};
pub use notes::{ClinicalNote, NoteSection, Patient};
pub use preview::{PREVIEW_CONTROL_ID, Preview, PreviewRequest};
pub use send::{SendRequest, SendResult};

use directory_cache::DirectoryCache;

/// Audit actions for messaging.
pub mod actions {
    /// A secure message was queued.
    pub const SEND_MESSAGE: &str = "SEND_MESSAGE";
    /// A message's content was read.
    pub const READ_MESSAGE: &str = "READ_MESSAGE";
    /// A clinical note was read.
    pub const READ_NOTE: &str = "READ_NOTE";
    /// A message was received and stored.
    pub const RECEIVE_MESSAGE: &str = "RECEIVE_MESSAGE";
    /// A failed message's credits were refunded.
    pub const REFUND_MESSAGE: &str = "REFUND_MESSAGE";
    /// A received message was taken from the practice's unassigned inbox (or a claim of one
    /// was refused because another claim won).
    pub const ASSIGN_MESSAGE: &str = "ASSIGN_MESSAGE";
    /// What a send would transmit was previewed (nothing sent or charged).
    pub const PREVIEW_MESSAGE: &str = "PREVIEW_MESSAGE";
    /// A practitioner granted (or renewed) a delegation to send on their behalf, or a
    /// non-practitioner's attempt to grant one was refused.
    pub const GRANT_SENDING_DELEGATION: &str = "GRANT_SENDING_DELEGATION";
    /// A practitioner revoked a sending delegation.
    pub const REVOKE_SENDING_DELEGATION: &str = "REVOKE_SENDING_DELEGATION";
    /// A sent message was flagged as needing attention (detail: the reason), or expired.
    pub const MESSAGE_NEEDS_ATTENTION: &str = "MESSAGE_NEEDS_ATTENTION";
}

/// How many due messages one outbox pass claims (in one transaction) and records (in another).
pub const OUTBOX_BATCH: usize = 256;

/// How many provider calls one outbox pass has in flight at once.
pub const OUTBOX_CONCURRENCY: usize = 32;

/// Tunables.
#[derive(Debug, Clone)]
pub struct MessagingSettings {
    /// How long a node owns a message it is working on.
    pub outbox_lease: Duration,
    /// How often a sent message's delivery is checked.
    pub status_poll_interval: Duration,
    /// First retry delay after a transient provider fault (doubles, with jitter).
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// A message not accepted by the provider within this age fails (and is refunded).
    pub give_up_after: Duration,
    /// A sent message not `DELIVERED` this long after the provider accepted it is flagged.
    pub undelivered_alert_after: Duration,
    /// A delivered message not `ACKNOWLEDGED` this long after delivery is flagged.
    pub unacknowledged_alert_after: Duration,
    /// A sent message not delivered this long after the provider accepted it becomes `FAILED`
    /// ("expired", not refunded); a delivered one is followed for acknowledgement this long.
    pub expire_after: Duration,
    /// Provider order when a send names none and both reach the recipient.
    pub provider_preference: Vec<Provider>,
    /// The gateway's externally reachable base URL, for providers that push receipts.
    pub public_url: Option<String>,
    /// How far a pushed receipt's timestamp may be from now (replay window).
    pub webhook_tolerance: Duration,
    /// Test-only fault point: stop after the provider accepted, before recording it.
    pub fail_after_send: bool,
    /// How long a practice's directory pages are reused (aliases, paging, repeated sends to
    /// one recipient; zero: not at all). Directories change over days; the default minute keeps
    /// them fresh enough.
    pub directory_cache_ttl: Duration,
}

#[derive(Serialize, Deserialize)]
struct StoredPayload {
    hl7: String,
    section_keys: Vec<String>,
}

/// The messaging rules.
#[derive(Clone)]
pub struct MessagingService {
    store: Store,
    providers: Providers,
    secrets: SecretBox,
    credits: CreditService,
    integrations: IntegrationService,
    settings: MessagingSettings,
    directory: DirectoryCache,
    /// Wakes this node's outbox when a send commits, so a message does not wait for its tick.
    outbox_wake: Arc<tokio::sync::Notify>,
    /// Where committed changes are announced (the integrations' bus).
    events: crate::events::EventBus,
}

fn practitioner_only(principal: &Principal, what: &str) -> Result<(), GatewayError> {
    if principal.role != Role::Practitioner {
        return Err(GatewayError::Forbidden(format!(
            "only practitioners can {what}; administrators cannot act on a practitioner's behalf"
        )));
    }
    Ok(())
}

impl MessagingService {
    /// Assembles the service.
    pub fn new(
        store: Store,
        providers: Providers,
        secrets: SecretBox,
        credits: CreditService,
        integrations: IntegrationService,
        settings: MessagingSettings,
    ) -> Self {
        let directory_cache_ttl = settings.directory_cache_ttl;
        Self {
            store,
            providers,
            secrets,
            credits,
            events: integrations.events().clone(),
            integrations,
            settings,
            directory: DirectoryCache::new(directory_cache_ttl),
            outbox_wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Resolves when a send on this node has queued a message since the outbox last looked
    /// (a send made through another node is found by the outbox's tick).
    pub async fn outbox_woken(&self) {
        self.outbox_wake.notified().await;
    }

    fn open_payload(&self, row: &MessageRow) -> Result<StoredPayload, GatewayError> {
        let json = self
            .secrets
            .open(
                &row.payload_ciphertext,
                &format!("message/{}/{}", row.group_id, row.id),
            )
            .map_err(GatewayError::internal)?;
        serde_json::from_str(&json).map_err(GatewayError::internal)
    }

    /// A practitioner's messages, newest first (`needs_attention`: only those that do, or
    /// only those that do not, need attention now).
    pub async fn messages(
        &self,
        principal: &Principal,
        direction: Option<Direction>,
        status: Option<MessageStatus>,
        needs_attention: Option<bool>,
        after: Option<&str>,
        first: u64,
    ) -> Result<Vec<MessageRow>, GatewayError> {
        practitioner_only(principal, "read secure messages")?;
        Ok(self
            .store
            .list_messages(
                &principal.user_id,
                direction,
                status,
                needs_attention,
                after,
                first,
            )
            .await?)
    }

    /// One of the caller's messages by id, envelope only (what a subscription re-reads when
    /// it hears the message changed): `None` unless it is the caller's. Not audited, like
    /// [`MessagingService::messages`]: no content is opened.
    pub async fn own_message(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<Option<MessageRow>, GatewayError> {
        practitioner_only(principal, "read secure messages")?;
        Ok(self
            .store
            .find_message(&principal.user_id, id)
            .await?
            .filter(|row| row.group_id == principal.group_id))
    }

    /// One message with its content (reading content is audited).
    pub async fn message(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<(MessageRow, Vec<hl7::Section>), GatewayError> {
        practitioner_only(principal, "read secure messages")?;
        // Practitioners may also read what waits in their practice's unassigned inbox, to
        // decide who should take it.
        let row = match self.store.find_message(&principal.user_id, id).await? {
            Some(row) => row,
            None => self
                .store
                .find_unassigned_message(&principal.group_id, id)
                .await?
                .ok_or_else(|| GatewayError::NotFound(format!("you have no message {id:?}")))?,
        };
        let payload = self.open_payload(&row)?;
        let sections = hl7::parse(&payload.hl7)
            .map(|message| message.referral_sections())
            .unwrap_or_default();
        let mut audit = AuditEntry::by(
            principal,
            actions::READ_MESSAGE,
            format!("message:{id}"),
            AuditOutcome::Success,
        );
        if row.owner_user_id.is_none() {
            audit = audit.with_detail("unassigned");
        }
        self.audit(audit).await;
        Ok((row, sections))
    }

    /// Records the calling practitioner's HPI-I (their identity in referrals they send, and
    /// how inbound messages addressed to them find them). An HPI-I belongs to at most one
    /// practitioner of a practice: the store's unique index decides between concurrent claims,
    /// so exactly one wins and the others get `Conflict`. Setting the HPI-I one already has
    /// changes nothing and succeeds. Every set, change and refused claim is audited.
    pub async fn set_my_hpii(&self, principal: &Principal, hpii: &str) -> Result<(), GatewayError> {
        practitioner_only(principal, "have an HPI-I")?;
        let hpii = Hpii::parse(hpii)
            .map_err(|problem| GatewayError::BadUserInput(format!("hpii: {problem}")))?;
        let audit = |change: &HpiiChange| {
            let (outcome, detail) = match change {
                HpiiChange::Set { previous: None } => {
                    (AuditOutcome::Success, format!("set {hpii}"))
                }
                HpiiChange::Set {
                    previous: Some(previous),
                } => (
                    AuditOutcome::Success,
                    format!("changed from {previous} to {hpii}"),
                ),
                HpiiChange::HeldByAnother | HpiiChange::Unchanged => (
                    AuditOutcome::Denied,
                    format!("{hpii} is held by another user of the practice"),
                ),
            };
            AuditEntry::by(
                principal,
                audit_actions::SET_HPII,
                format!("practitioner:{}", principal.subject),
                outcome,
            )
            .with_detail(detail)
        };
        match self
            .store
            .set_user_hpii(&principal.user_id, &hpii, audit)
            .await?
        {
            // The other holder is not named: an administrator can find them in the audit trail.
            HpiiChange::HeldByAnother => Err(GatewayError::Conflict(
                "this HPI-I is already held by another practitioner of your practice; check the number, or ask an administrator (the audit trail shows who set it)".into(),
            )),
            HpiiChange::Unchanged | HpiiChange::Set { .. } => Ok(()),
        }
    }

    /// The caller's HPI-I, if they set one.
    pub async fn my_hpii(&self, principal: &Principal) -> Result<Option<Hpii>, GatewayError> {
        Ok(self
            .store
            .user_by_id(&principal.user_id)
            .await?
            .and_then(|user| user.hpii))
    }

    async fn audit(&self, entry: AuditEntry) {
        if let Err(error) = self.store.insert_audit(&entry).await {
            tracing::error!(action = %entry.action, error = ?error, "could not record an audit event");
        }
    }
}
