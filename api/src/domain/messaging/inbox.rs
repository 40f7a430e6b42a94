//! Receiving: the inbox poller stores each waiting message for the practitioner who holds its
//! HPI-I (or the practice's unassigned inbox) before acknowledging it to the provider, and the
//! unassigned inbox's claims.

use chrono::Utc;

use super::{MessagingService, StoredPayload, actions, practitioner_only};
use crate::domain::audit::{AuditEntry, AuditOutcome, Principal};
use crate::domain::types::{Direction, Hpii, MessageId, MessageStatus, Role};
use crate::domain::{GatewayError, hl7};
use crate::store::messaging::{Assignment, AttentionMarks, MessageRow, MessageUpdate};

impl MessagingService {
    /// The practice's unassigned inbox (received messages whose HPI-I nobody holds), newest
    /// first. Envelopes only: the content stays sealed until a practitioner reads one with
    /// [`Self::message`]. Practitioners and administrators of the practice may list it.
    pub async fn unassigned_messages(
        &self,
        principal: &Principal,
        after: Option<&str>,
        first: u64,
    ) -> Result<Vec<MessageRow>, GatewayError> {
        Ok(self
            .store
            .list_unassigned_messages(&principal.group_id, after, first)
            .await?)
    }

    /// Takes a message from the practice's unassigned inbox and gives it to a practitioner:
    /// the caller, or the colleague named by `to_practitioner` (their `sub`). Administrators
    /// may hand messages on (triage from the envelope) but must name the practitioner, since
    /// they hold no inbox. Of concurrent claims exactly one wins; the others get `Conflict`.
    pub async fn assign_message(
        &self,
        principal: &Principal,
        id: &str,
        to_practitioner: Option<&str>,
    ) -> Result<MessageRow, GatewayError> {
        let assignee = match (principal.role, to_practitioner) {
            (Role::Administrator, None) => {
                return Err(GatewayError::BadUserInput(
                    "toPractitionerId: administrators must name the practitioner who takes the message".into(),
                ));
            }
            (Role::Practitioner, None) => principal.subject.as_str(),
            (_, Some(subject)) => subject.trim(),
        };
        let assignee = self
            .store
            .find_practitioner(&principal.group_id, assignee)
            .await?
            .ok_or_else(|| {
                GatewayError::NotFound(format!("no practitioner {assignee:?} in your practice"))
            })?;
        let audit = AuditEntry::by(
            principal,
            actions::ASSIGN_MESSAGE,
            format!("message:{id}"),
            AuditOutcome::Success,
        )
        .with_detail(format!("to practitioner:{}", assignee.subject));
        match self
            .store
            .assign_message(&principal.group_id, id, &assignee.user_id, &audit)
            .await?
        {
            Assignment::Assigned => self.events.message_changed(&principal.group_id, id),
            Assignment::AlreadyAssigned => {
                let mut refused = audit;
                refused.outcome = AuditOutcome::Denied;
                refused.detail = Some("already assigned".into());
                self.audit(refused).await;
                return Err(GatewayError::Conflict(
                    "this message is already assigned: someone took it from the unassigned inbox first".into(),
                ));
            }
            Assignment::NotFound => {
                return Err(GatewayError::NotFound(format!(
                    "your practice has no received message {id:?}"
                )));
            }
        }
        self.store
            .find_message(&assignee.user_id, id)
            .await?
            .ok_or_else(|| {
                GatewayError::internal(anyhow::anyhow!("assigned message {id} vanished"))
            })
    }

    /// Marks a received message as acknowledged by its practitioner.
    pub async fn acknowledge(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<MessageRow, GatewayError> {
        practitioner_only(principal, "acknowledge secure messages")?;
        let row = self
            .store
            .find_message(&principal.user_id, id)
            .await?
            .ok_or_else(|| GatewayError::NotFound(format!("you have no message {id:?}")))?;
        if row.direction != Direction::Inbound {
            return Err(GatewayError::BadUserInput(
                "only received messages can be acknowledged".into(),
            ));
        }
        let update = MessageUpdate {
            status: Some(MessageStatus::Acknowledged),
            acknowledged_at: Some(Utc::now()),
            ..MessageUpdate::default()
        };
        if self
            .store
            .update_message(&row.id, MessageStatus::Delivered, &update)
            .await?
        {
            self.events.message_changed(&row.group_id, row.id.as_str());
        }
        Ok(self
            .store
            .find_message(&principal.user_id, id)
            .await?
            .unwrap_or(row))
    }

    /// One pass of the inbox poller: for every ACTIVE account, fetch waiting messages, store
    /// each for its addressee, and only then acknowledge it to the provider. A duplicate (already
    /// stored) is acknowledged again and dropped. Receiving costs nothing.
    pub async fn poll_inboxes(&self) -> Result<usize, GatewayError> {
        let mut received = 0;
        for account in self.store.active_accounts().await? {
            let Some(credentials) = self
                .integrations
                .active_group_credentials(&account.group_id, account.provider)
                .await?
            else {
                continue;
            };
            self.ensure_webhook(&account, &credentials).await;
            let adapter = self.providers.get(account.provider);
            let items = match adapter.fetch_inbox(&credentials).await {
                Ok(items) => items,
                Err(error) => {
                    tracing::warn!(provider = %account.provider, error = %error, "inbox fetch failed; will retry");
                    continue;
                }
            };
            for item in items {
                let parsed = hl7::parse(&item.payload).ok();
                let addressed_hpii = parsed
                    .as_ref()
                    .and_then(|message| message.party(hl7::ROLE_REFERRED_TO_PROVIDER))
                    .map(|party| party.hpii);
                // Only a well-formed HPI-I can be anyone's; anything else is kept as "no HPI-I".
                let addressed_hpii = addressed_hpii.and_then(|hpii| Hpii::parse(&hpii).ok());
                // The practitioner of this practice who holds the HPI-I, or nobody: then it
                // waits in the practice's unassigned inbox for a practitioner to claim it.
                let owner = match &addressed_hpii {
                    Some(hpii) => self
                        .store
                        .practitioner_by_hpii(&account.group_id, hpii)
                        .await?
                        .map(|user| user.id),
                    None => None,
                };
                let id = MessageId::generate();
                let stored = StoredPayload {
                    hl7: item.payload.clone(),
                    section_keys: Vec::new(),
                };
                let sealed = self
                    .secrets
                    .seal(
                        &serde_json::to_string(&stored).map_err(GatewayError::internal)?,
                        &format!("message/{}/{id}", account.group_id),
                    )
                    .map_err(GatewayError::internal)?;
                let now = Utc::now();
                let row = MessageRow {
                    id: id.clone(),
                    group_id: account.group_id.clone(),
                    owner_user_id: owner,
                    direction: Direction::Inbound,
                    provider: account.provider,
                    status: MessageStatus::Delivered,
                    counterpart_hpii: item.sender_hpii.chars().take(16).collect(),
                    counterpart_name: item.sender_name.chars().take(256).collect(),
                    note_id: None,
                    payload_ciphertext: sealed,
                    idempotency_key: None,
                    provider_reference: Some(item.id.clone()),
                    failure_reason: None,
                    credits_charged: 0,
                    refunded: false,
                    ambiguous: false,
                    attempts: 0,
                    next_attempt_at: None,
                    created_at: now,
                    sent_at: None,
                    delivered_at: Some(now),
                    acknowledged_at: None,
                    addressed_hpii,
                    attention: AttentionMarks::default(),
                };
                let audit = AuditEntry::by_gateway(
                    &account.group_id,
                    actions::RECEIVE_MESSAGE,
                    format!("message:{id}"),
                    AuditOutcome::Success,
                )
                .with_detail(format!(
                    "{} from {}{}",
                    account.provider.code(),
                    row.counterpart_hpii,
                    if row.owner_user_id.is_none() {
                        "; unassigned"
                    } else {
                        ""
                    }
                ));
                // Stored (or stored before) first; only then may the provider forget it.
                let is_new = self.store.insert_inbound_message(&row, &audit).await?;
                if let Err(error) = adapter.acknowledge_inbox(&credentials, &item.id).await {
                    tracing::warn!(provider = %account.provider, error = %error, "inbox acknowledgement failed; the duplicate will be dropped next time");
                }
                if is_new {
                    self.events.message_changed(&row.group_id, row.id.as_str());
                    received += 1;
                }
            }
        }
        Ok(received)
    }

    /// Makes sure an ACTIVE account of a provider that pushes receipts pushes them to us.
    async fn ensure_webhook(
        &self,
        account: &crate::store::accounts::AccountRow,
        credentials: &crate::domain::types::ProviderCredentials,
    ) {
        let Some(public_url) = &self.settings.public_url else {
            return;
        };
        if account.webhook_secret_ciphertext.is_some() {
            return;
        }
        let url = format!(
            "{}/webhooks/{}/{}",
            public_url.trim_end_matches('/'),
            account.provider.code().to_lowercase(),
            account.id
        );
        match self
            .providers
            .get(account.provider)
            .register_webhook(credentials, &url)
            .await
        {
            Ok(Some(secret)) => match self
                .secrets
                .seal(&secret, &format!("webhook/{}", account.id))
            {
                Ok(sealed) => {
                    if let Err(error) = self.store.set_webhook_secret(&account.id, &sealed).await {
                        tracing::warn!(error = ?error, "could not store a webhook secret");
                    }
                }
                Err(error) => tracing::error!(error = ?error, "could not seal a webhook secret"),
            },
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(provider = %account.provider, error = %error, "webhook registration failed; polling continues")
            }
        }
    }
}
