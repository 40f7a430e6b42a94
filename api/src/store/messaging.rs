//! Patients, clinical notes and secure messages (inbound and outbound) with the outbox
//! schedule. Clinical content arrives here already sealed; this module never sees it in clear.
//!
//! A received message that no practitioner's HPI-I matches is stored *unassigned*: its owner
//! column holds [`UNASSIGNED_OWNER`] (see `m20261201_000005_hpii_inbox` for why a sentinel and
//! not NULL). Only this module knows the sentinel; [`MessageRow::owner_user_id`] is `None` for
//! such a message.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect,
};

use super::entities::{clinical_notes, messages, patients};
use super::{Store, StoreError, Transaction, from_millis, to_millis};
use crate::domain::audit::AuditEntry;
use crate::domain::types::{AttentionReason, Direction, Hpii, MessageId, MessageStatus, Provider};

/// The owner column's value for a message waiting in its practice's unassigned inbox. User ids
/// are UUIDs, so it can never name a real user.
const UNASSIGNED_OWNER: &str = "unassigned";

/// The owner column's value for an owner (`None`: unassigned).
fn owner_to_column(owner: Option<&str>) -> String {
    owner.unwrap_or(UNASSIGNED_OWNER).to_owned()
}

/// The owner an owner column names (`None`: unassigned).
fn owner_from_column(column: String) -> Option<String> {
    (column != UNASSIGNED_OWNER).then_some(column)
}

/// The outbox's backlog: messages not yet handed to a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxBacklog {
    /// Outbound messages in `QUEUED`.
    pub queued: u64,
    /// When the oldest of them was created.
    pub oldest_created_at: Option<DateTime<Utc>>,
}

/// What an attempt to assign an unassigned message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assignment {
    /// It was unassigned and now belongs to the assignee (with the audit event, atomically).
    Assigned,
    /// It exists in the group but someone already holds it (another claim won).
    AlreadyAssigned,
    /// No received message with that id in the group.
    NotFound,
}

/// When a sent message was flagged, once per reason (see `m20261202_000007_attention_caps`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttentionMarks {
    /// Flagged: accepted by the provider but not delivered in time.
    pub undelivered_at: Option<DateTime<Utc>>,
    /// Flagged: delivered but not acknowledged in time.
    pub unacknowledged_at: Option<DateTime<Utc>>,
    /// Accepted but never delivered: it became `FAILED` (expired) at this time.
    pub expired_at: Option<DateTime<Utc>>,
}

impl AttentionMarks {
    /// When the message was flagged for `reason`, if it was.
    pub fn at(&self, reason: AttentionReason) -> Option<DateTime<Utc>> {
        match reason {
            AttentionReason::NotDelivered => self.undelivered_at,
            AttentionReason::NotAcknowledged => self.unacknowledged_at,
            AttentionReason::Expired => self.expired_at,
        }
    }
}

/// A stored patient (details sealed).
#[derive(Debug, Clone)]
pub struct PatientRow {
    /// Id.
    pub id: String,
    /// Group.
    pub group_id: String,
    /// The practitioner whose patient record this is.
    pub owner_user_id: String,
    /// Sealed JSON of the patient's details.
    pub details_ciphertext: String,
    /// When created.
    pub created_at: DateTime<Utc>,
}

/// A stored clinical note (content sealed).
#[derive(Debug, Clone)]
pub struct NoteRow {
    /// Id.
    pub id: String,
    /// Group.
    pub group_id: String,
    /// The practitioner who wrote it.
    pub owner_user_id: String,
    /// The patient it is about.
    pub patient_id: String,
    /// Sealed JSON of title and sections.
    pub content_ciphertext: String,
    /// When created.
    pub created_at: DateTime<Utc>,
}

/// A stored secure message.
#[derive(Debug, Clone)]
pub struct MessageRow {
    /// Id (also the provider-side client message id, so provider retries are idempotent).
    pub id: MessageId,
    /// Group.
    pub group_id: String,
    /// Sender (outbound) or addressee (inbound) practitioner; `None` for a received message
    /// waiting in the practice's unassigned inbox.
    pub owner_user_id: Option<String>,
    /// Sent or received.
    pub direction: Direction,
    /// Through which provider.
    pub provider: Provider,
    /// Where it is.
    pub status: MessageStatus,
    /// The other party's HPI-I (for a received message, as the provider reported it: not
    /// necessarily a valid one).
    pub counterpart_hpii: String,
    /// The other party's name.
    pub counterpart_name: String,
    /// The note it was made from (outbound).
    pub note_id: Option<String>,
    /// Sealed HL7 payload.
    pub payload_ciphertext: String,
    /// The client's idempotency key (outbound).
    pub idempotency_key: Option<String>,
    /// The provider's tracking / receipt / inbox id.
    pub provider_reference: Option<String>,
    /// Why it failed.
    pub failure_reason: Option<String>,
    /// Credits debited for it.
    pub credits_charged: i64,
    /// Whether those credits were refunded.
    pub refunded: bool,
    /// Whether an attempt may have reached the provider without our learning the answer
    /// (timeout, broken connection, unreadable reply): then a give-up is not refunded blindly.
    pub ambiguous: bool,
    /// Delivery attempts so far.
    pub attempts: i32,
    /// When the outbox should look at it next.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Accepted by the provider.
    pub sent_at: Option<DateTime<Utc>>,
    /// Delivered to the recipient's endpoint.
    pub delivered_at: Option<DateTime<Utc>>,
    /// Acknowledged by the recipient's system.
    pub acknowledged_at: Option<DateTime<Utc>>,
    /// The HPI-I a received message was addressed to, if it named one (envelope, not content).
    pub addressed_hpii: Option<Hpii>,
    /// When it was flagged as needing attention, per reason (outbound).
    pub attention: AttentionMarks,
}

/// A change of a message's delivery state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageUpdate {
    /// New status.
    pub status: Option<MessageStatus>,
    /// Provider reference learnt.
    pub provider_reference: Option<String>,
    /// Failure reason.
    pub failure_reason: Option<String>,
    /// Next outbox visit (`Some(None)` clears it).
    pub next_attempt_at: Option<Option<DateTime<Utc>>>,
    /// Timestamps reached.
    pub sent_at: Option<DateTime<Utc>>,
    /// Timestamps reached.
    pub delivered_at: Option<DateTime<Utc>>,
    /// Timestamps reached.
    pub acknowledged_at: Option<DateTime<Utc>>,
    /// Mark refunded.
    pub refunded: bool,
    /// Mark that an attempt's outcome is unknown.
    pub ambiguous: bool,
    /// It expired (accepted, never delivered) at this time.
    pub expired_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Stores a patient.
    pub async fn insert_patient(&self, row: &PatientRow) -> Result<(), StoreError> {
        let txn = self.begin_write().await?;
        patients::Entity::insert(patients::ActiveModel {
            id: Set(row.id.clone()),
            group_id: Set(row.group_id.clone()),
            owner_user_id: Set(row.owner_user_id.clone()),
            details_ciphertext: Set(row.details_ciphertext.clone()),
            created_at: Set(to_millis(row.created_at)),
        })
        .exec_without_returning(&txn)
        .await?;
        txn.commit().await?;
        Ok(())
    }

    /// A practitioner's own patient.
    pub async fn find_patient(
        &self,
        owner_user_id: &str,
        id: &str,
    ) -> Result<Option<PatientRow>, StoreError> {
        Ok(patients::Entity::find_by_id(id.to_owned())
            .filter(patients::Column::OwnerUserId.eq(owner_user_id))
            .one(self.connection())
            .await?
            .map(|model| PatientRow {
                id: model.id,
                group_id: model.group_id,
                owner_user_id: model.owner_user_id,
                details_ciphertext: model.details_ciphertext,
                created_at: from_millis(model.created_at),
            }))
    }

    /// Stores a clinical note.
    pub async fn insert_note(&self, row: &NoteRow) -> Result<(), StoreError> {
        let txn = self.begin_write().await?;
        clinical_notes::Entity::insert(clinical_notes::ActiveModel {
            id: Set(row.id.clone()),
            group_id: Set(row.group_id.clone()),
            owner_user_id: Set(row.owner_user_id.clone()),
            patient_id: Set(row.patient_id.clone()),
            content_ciphertext: Set(row.content_ciphertext.clone()),
            created_at: Set(to_millis(row.created_at)),
        })
        .exec_without_returning(&txn)
        .await?;
        txn.commit().await?;
        Ok(())
    }

    /// A practitioner's own note.
    pub async fn find_note(
        &self,
        owner_user_id: &str,
        id: &str,
    ) -> Result<Option<NoteRow>, StoreError> {
        Ok(clinical_notes::Entity::find_by_id(id.to_owned())
            .filter(clinical_notes::Column::OwnerUserId.eq(owner_user_id))
            .one(self.connection())
            .await?
            .map(note_from_model))
    }

    /// A practitioner's notes, newest first.
    pub async fn list_notes(
        &self,
        owner_user_id: &str,
        before_id: Option<&str>,
        limit: u64,
    ) -> Result<Vec<NoteRow>, StoreError> {
        let mut query = clinical_notes::Entity::find()
            .filter(clinical_notes::Column::OwnerUserId.eq(owner_user_id));
        if let Some(before_id) = before_id {
            query = query.filter(clinical_notes::Column::Id.lt(before_id));
        }
        Ok(query
            .order_by_desc(clinical_notes::Column::Id)
            .limit(limit)
            .all(self.connection())
            .await?
            .into_iter()
            .map(note_from_model)
            .collect())
    }

    /// Stores a message inside the caller's transaction (the send debit's).
    pub async fn insert_message_in(
        &self,
        txn: &Transaction,
        row: &MessageRow,
    ) -> Result<(), StoreError> {
        insert_message(&txn.0, row).await
    }

    /// Stores a received message; `false` if it was stored before (same provider reference).
    pub async fn insert_inbound_message(
        &self,
        row: &MessageRow,
        audit: &crate::domain::audit::AuditEntry,
    ) -> Result<bool, StoreError> {
        let txn = self.begin_write().await?;
        match insert_message(&txn, row).await {
            Err(StoreError::Database(error)) if super::is_unique_violation(&error) => {
                txn.rollback().await?;
                return Ok(false);
            }
            other => other?,
        }
        self.insert_audit_in(&txn, audit).await?;
        txn.commit().await?;
        Ok(true)
    }

    /// Of a group's last `limit` outbound messages through a provider: (how many `FAILED`, how
    /// many in all).
    pub async fn recent_outcomes(
        &self,
        group_id: &str,
        provider: Provider,
        limit: u64,
    ) -> Result<(u64, u64), StoreError> {
        let statuses: Vec<String> = messages::Entity::find()
            .select_only()
            .column(messages::Column::Status)
            .filter(messages::Column::GroupId.eq(group_id))
            .filter(messages::Column::Provider.eq(provider.code()))
            .filter(messages::Column::Direction.eq(Direction::Outbound.code()))
            .order_by_desc(messages::Column::Id)
            .limit(limit)
            .into_tuple()
            .all(self.connection())
            .await?;
        let failed = statuses
            .iter()
            .filter(|status| status.as_str() == MessageStatus::Failed.code())
            .count() as u64;
        Ok((failed, statuses.len() as u64))
    }

    /// A practitioner's outbound message by their idempotency key.
    pub async fn find_message_by_key(
        &self,
        owner_user_id: &str,
        key: &str,
    ) -> Result<Option<MessageRow>, StoreError> {
        messages::Entity::find()
            .filter(messages::Column::OwnerUserId.eq(owner_user_id))
            .filter(messages::Column::IdempotencyKey.eq(key))
            .one(self.connection())
            .await?
            .map(message_from_model)
            .transpose()
    }

    /// A practitioner's own message.
    pub async fn find_message(
        &self,
        owner_user_id: &str,
        id: &str,
    ) -> Result<Option<MessageRow>, StoreError> {
        messages::Entity::find_by_id(id.to_owned())
            .filter(messages::Column::OwnerUserId.eq(owner_user_id))
            .one(self.connection())
            .await?
            .map(message_from_model)
            .transpose()
    }

    /// A received message of the group waiting in its unassigned inbox.
    pub async fn find_unassigned_message(
        &self,
        group_id: &str,
        id: &str,
    ) -> Result<Option<MessageRow>, StoreError> {
        messages::Entity::find_by_id(id.to_owned())
            .filter(messages::Column::GroupId.eq(group_id))
            .filter(messages::Column::OwnerUserId.eq(UNASSIGNED_OWNER))
            .filter(messages::Column::Direction.eq(Direction::Inbound.code()))
            .one(self.connection())
            .await?
            .map(message_from_model)
            .transpose()
    }

    /// The group's unassigned inbox, newest first.
    pub async fn list_unassigned_messages(
        &self,
        group_id: &str,
        before_id: Option<&str>,
        limit: u64,
    ) -> Result<Vec<MessageRow>, StoreError> {
        let mut query = messages::Entity::find()
            .filter(messages::Column::GroupId.eq(group_id))
            .filter(messages::Column::OwnerUserId.eq(UNASSIGNED_OWNER))
            .filter(messages::Column::Direction.eq(Direction::Inbound.code()));
        if let Some(before_id) = before_id {
            query = query.filter(messages::Column::Id.lt(before_id));
        }
        query
            .order_by_desc(messages::Column::Id)
            .limit(limit)
            .all(self.connection())
            .await?
            .into_iter()
            .map(message_from_model)
            .collect()
    }

    /// Gives an unassigned received message of the group to `to_user_id`, with its audit
    /// event in the same transaction. The update is conditional on the message still being
    /// unassigned, so of many concurrent claims exactly one changes the row (PostgreSQL
    /// re-checks the condition after waiting for the winner's row lock; SQLite serialises the
    /// writers) and the others see `AlreadyAssigned`.
    pub async fn assign_message(
        &self,
        group_id: &str,
        id: &str,
        to_user_id: &str,
        audit: &AuditEntry,
    ) -> Result<Assignment, StoreError> {
        let txn = self.begin_write().await?;
        let changed = messages::Entity::update_many()
            .col_expr(messages::Column::OwnerUserId, Expr::value(to_user_id))
            .col_expr(
                messages::Column::UpdatedAt,
                Expr::value(to_millis(Utc::now())),
            )
            .filter(messages::Column::Id.eq(id))
            .filter(messages::Column::GroupId.eq(group_id))
            .filter(messages::Column::Direction.eq(Direction::Inbound.code()))
            .filter(messages::Column::OwnerUserId.eq(UNASSIGNED_OWNER))
            .exec(&txn)
            .await?
            .rows_affected;
        if changed == 1 {
            self.insert_audit_in(&txn, audit).await?;
            txn.commit().await?;
            return Ok(Assignment::Assigned);
        }
        let exists = messages::Entity::find_by_id(id.to_owned())
            .filter(messages::Column::GroupId.eq(group_id))
            .filter(messages::Column::Direction.eq(Direction::Inbound.code()))
            .one(&txn)
            .await?
            .is_some();
        txn.rollback().await?;
        Ok(if exists {
            Assignment::AlreadyAssigned
        } else {
            Assignment::NotFound
        })
    }

    /// A message by id (workers).
    pub async fn message_by_id(&self, id: &str) -> Result<Option<MessageRow>, StoreError> {
        messages::Entity::find_by_id(id.to_owned())
            .one(self.connection())
            .await?
            .map(message_from_model)
            .transpose()
    }

    /// A practitioner's messages, newest first; `needs_attention` keeps only those that do
    /// (`Some(true)`) or do not (`Some(false)`) need attention now.
    pub async fn list_messages(
        &self,
        owner_user_id: &str,
        direction: Option<Direction>,
        status: Option<MessageStatus>,
        needs_attention: Option<bool>,
        before_id: Option<&str>,
        limit: u64,
    ) -> Result<Vec<MessageRow>, StoreError> {
        let mut query =
            messages::Entity::find().filter(messages::Column::OwnerUserId.eq(owner_user_id));
        if let Some(direction) = direction {
            query = query.filter(messages::Column::Direction.eq(direction.code()));
        }
        if let Some(status) = status {
            query = query.filter(messages::Column::Status.eq(status.code()));
        }
        match needs_attention {
            Some(true) => query = query.filter(needs_attention_now()),
            Some(false) => query = query.filter(needs_attention_now().not()),
            None => {}
        }
        if let Some(before_id) = before_id {
            query = query.filter(messages::Column::Id.lt(before_id));
        }
        query
            .order_by_desc(messages::Column::Id)
            .limit(limit)
            .all(self.connection())
            .await?
            .into_iter()
            .map(message_from_model)
            .collect()
    }

    /// How many outbound messages wait in `QUEUED` (not yet handed to a provider), and when
    /// the oldest of them was created (for the outbox gauges at scrape time).
    pub async fn outbox_backlog(&self) -> Result<OutboxBacklog, StoreError> {
        let (queued, oldest): (i64, Option<i64>) = messages::Entity::find()
            .select_only()
            .column_as(Expr::col(messages::Column::Id).count(), "queued")
            .column_as(Expr::col(messages::Column::CreatedAt).min(), "oldest")
            .filter(messages::Column::Direction.eq("OUTBOUND"))
            .filter(messages::Column::Status.eq("QUEUED"))
            .into_tuple()
            .one(self.connection())
            .await?
            .unwrap_or((0, None));
        Ok(OutboxBacklog {
            queued: u64::try_from(queued).unwrap_or(0),
            oldest_created_at: oldest.map(from_millis),
        })
    }

    /// Claims up to `limit` due outbound messages for this node until `lease_until`, counting
    /// an attempt on each, in one write transaction: one commit for the whole batch. On
    /// PostgreSQL the rows are read `FOR UPDATE SKIP LOCKED`, so nodes claiming at the same
    /// moment take different messages instead of queueing on each other; on SQLite the
    /// transaction holds the write lock from its first statement. The rows come back as
    /// claimed (attempt counted, lease set).
    pub async fn claim_due_messages(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<MessageRow>, StoreError> {
        use sea_orm::sea_query::{LockBehavior, LockType};
        let due_statuses = [
            MessageStatus::Queued,
            MessageStatus::Sent,
            MessageStatus::Delivered,
        ]
        .map(MessageStatus::code);
        let txn = self.begin_write().await?;
        let due: Vec<messages::Model> = messages::Entity::find()
            .filter(messages::Column::Direction.eq(Direction::Outbound.code()))
            .filter(messages::Column::Status.is_in(due_statuses))
            .filter(messages::Column::NextAttemptAt.lte(to_millis(now)))
            .order_by_asc(messages::Column::NextAttemptAt)
            .limit(limit)
            .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
            .all(&txn)
            .await?;
        if due.is_empty() {
            txn.rollback().await?;
            return Ok(Vec::new());
        }
        let ids: Vec<String> = due.iter().map(|model| model.id.clone()).collect();
        let updated = messages::Entity::update_many()
            .col_expr(
                messages::Column::NextAttemptAt,
                Expr::value(to_millis(lease_until)),
            )
            .col_expr(
                messages::Column::Attempts,
                Expr::col(messages::Column::Attempts).add(1),
            )
            .filter(messages::Column::Id.is_in(ids))
            .exec(&txn)
            .await?
            .rows_affected;
        if updated != due.len() as u64 {
            // The rows were read and locked in this transaction; anything else is a bug.
            txn.rollback().await?;
            return Err(StoreError::Corrupt {
                table: "messages",
                problem: format!("claimed {} due messages but updated {updated}", due.len()),
            });
        }
        txn.commit().await?;
        due.into_iter()
            .map(|model| {
                message_from_model(model).map(|row| MessageRow {
                    attempts: row.attempts + 1,
                    next_attempt_at: Some(lease_until),
                    ..row
                })
            })
            .collect()
    }

    /// Applies many delivery updates in one write transaction (one commit), each conditional
    /// on the status its message was claimed in. Returns, in order, whether each applied.
    pub async fn update_messages(
        &self,
        updates: &[(MessageId, MessageStatus, MessageUpdate)],
    ) -> Result<Vec<bool>, StoreError> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        let txn = self.begin_write().await?;
        let mut applied = Vec::with_capacity(updates.len());
        for (id, from_status, update) in updates {
            applied.push(
                self.update_message_in(&txn, id, *from_status, update)
                    .await?,
            );
        }
        txn.commit().await?;
        Ok(applied)
    }

    /// Applies a delivery update if the message is still in `from_status`, inside the caller's
    /// transaction (so a refund can share it). Returns whether it applied.
    pub async fn update_message_in(
        &self,
        connection: &impl ConnectionTrait,
        id: &MessageId,
        from_status: MessageStatus,
        update: &MessageUpdate,
    ) -> Result<bool, StoreError> {
        let mut query = messages::Entity::update_many().col_expr(
            messages::Column::UpdatedAt,
            Expr::value(to_millis(Utc::now())),
        );
        if let Some(status) = &update.status {
            query = query.col_expr(messages::Column::Status, Expr::value(status.code()));
        }
        if let Some(reference) = &update.provider_reference {
            query = query.col_expr(
                messages::Column::ProviderReference,
                Expr::value(reference.clone()),
            );
        }
        if let Some(reason) = &update.failure_reason {
            query = query.col_expr(messages::Column::FailureReason, Expr::value(reason.clone()));
        }
        if let Some(next) = update.next_attempt_at {
            query = query.col_expr(
                messages::Column::NextAttemptAt,
                Expr::value(next.map(to_millis)),
            );
        }
        if let Some(at) = update.sent_at {
            query = query.col_expr(messages::Column::SentAt, Expr::value(to_millis(at)));
        }
        if let Some(at) = update.delivered_at {
            query = query.col_expr(messages::Column::DeliveredAt, Expr::value(to_millis(at)));
        }
        if let Some(at) = update.acknowledged_at {
            query = query.col_expr(messages::Column::AcknowledgedAt, Expr::value(to_millis(at)));
        }
        if update.refunded {
            query = query.col_expr(messages::Column::Refunded, Expr::value(true));
        }
        if update.ambiguous {
            query = query.col_expr(messages::Column::Ambiguous, Expr::value(true));
        }
        if let Some(at) = update.expired_at {
            query = query.col_expr(messages::Column::ExpiredAt, Expr::value(to_millis(at)));
        }
        Ok(query
            .filter(messages::Column::Id.eq(id.as_str()))
            .filter(messages::Column::Status.eq(from_status.code()))
            .exec(connection)
            .await?
            .rows_affected
            == 1)
    }

    /// Applies a delivery update inside a composed transaction (a failure and its refund).
    pub async fn update_message_in_transaction(
        &self,
        txn: &Transaction,
        id: &MessageId,
        from_status: MessageStatus,
        update: &MessageUpdate,
    ) -> Result<bool, StoreError> {
        self.update_message_in(&txn.0, id, from_status, update)
            .await
    }

    /// Applies a delivery update on its own.
    pub async fn update_message(
        &self,
        id: &MessageId,
        from_status: MessageStatus,
        update: &MessageUpdate,
    ) -> Result<bool, StoreError> {
        let txn = self.begin_write().await?;
        let applied = self
            .update_message_in(&txn, id, from_status, update)
            .await?;
        txn.commit().await?;
        Ok(applied)
    }

    /// Sent messages past an attention deadline and not yet flagged for it: `SENT` since before
    /// `sent_before`, or `DELIVERED` since before `delivered_before` (oldest first). The
    /// caller decides (see `messaging::attention`); [`Store::flag_message`] makes it so once.
    pub async fn attention_candidates(
        &self,
        sent_before: DateTime<Utc>,
        delivered_before: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<MessageRow>, StoreError> {
        messages::Entity::find()
            .filter(messages::Column::Direction.eq(Direction::Outbound.code()))
            .filter(
                Condition::any()
                    .add(
                        Condition::all()
                            .add(messages::Column::Status.eq(MessageStatus::Sent.code()))
                            .add(messages::Column::SentAt.lte(to_millis(sent_before)))
                            .add(messages::Column::FlaggedUndeliveredAt.is_null()),
                    )
                    .add(
                        Condition::all()
                            .add(messages::Column::Status.eq(MessageStatus::Delivered.code()))
                            .add(messages::Column::DeliveredAt.lte(to_millis(delivered_before)))
                            .add(messages::Column::FlaggedUnacknowledgedAt.is_null()),
                    ),
            )
            .order_by_asc(messages::Column::Id)
            .limit(limit)
            .all(self.connection())
            .await?
            .into_iter()
            .map(message_from_model)
            .collect()
    }

    /// Flags a message for `reason` at `at`, with its audit event, if it is still in
    /// `from_status` and was never flagged for that reason: one conditional update, so of any
    /// number of nodes trying at once exactly one flags it. Returns whether this call did.
    pub async fn flag_message(
        &self,
        id: &MessageId,
        from_status: MessageStatus,
        reason: AttentionReason,
        at: DateTime<Utc>,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError> {
        let column = match reason {
            AttentionReason::NotDelivered => messages::Column::FlaggedUndeliveredAt,
            AttentionReason::NotAcknowledged => messages::Column::FlaggedUnacknowledgedAt,
            AttentionReason::Expired => messages::Column::ExpiredAt,
        };
        let txn = self.begin_write().await?;
        let flagged = messages::Entity::update_many()
            .col_expr(column, Expr::value(to_millis(at)))
            .filter(messages::Column::Id.eq(id.as_str()))
            .filter(messages::Column::Status.eq(from_status.code()))
            .filter(column.is_null())
            .exec(&txn)
            .await?
            .rows_affected
            == 1;
        if !flagged {
            txn.rollback().await?;
            return Ok(false);
        }
        self.insert_audit_in(&txn, audit).await?;
        txn.commit().await?;
        Ok(true)
    }

    /// A practitioner's messages flagged (for any reason) at or after `since`, oldest flag
    /// first as far as one order allows (by id), at most `limit`.
    pub async fn messages_flagged_since(
        &self,
        owner_user_id: &str,
        since: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<MessageRow>, StoreError> {
        let since = to_millis(since);
        messages::Entity::find()
            .filter(messages::Column::OwnerUserId.eq(owner_user_id))
            .filter(messages::Column::Direction.eq(Direction::Outbound.code()))
            .filter(
                Condition::any()
                    .add(messages::Column::FlaggedUndeliveredAt.gte(since))
                    .add(messages::Column::FlaggedUnacknowledgedAt.gte(since))
                    .add(messages::Column::ExpiredAt.gte(since)),
            )
            .order_by_desc(messages::Column::Id)
            .limit(limit)
            .all(self.connection())
            .await?
            .into_iter()
            .map(message_from_model)
            .collect()
    }
}

/// What "needs attention now" means in SQL; the same rule as `messaging::attention::needs_attention`
/// (a flag counts only while the message is still in the status it was flagged in).
fn needs_attention_now() -> Condition {
    Condition::any()
        .add(
            Condition::all()
                .add(messages::Column::Status.eq(MessageStatus::Sent.code()))
                .add(messages::Column::FlaggedUndeliveredAt.is_not_null()),
        )
        .add(
            Condition::all()
                .add(messages::Column::Status.eq(MessageStatus::Delivered.code()))
                .add(messages::Column::FlaggedUnacknowledgedAt.is_not_null()),
        )
        .add(
            Condition::all()
                .add(messages::Column::Status.eq(MessageStatus::Failed.code()))
                .add(messages::Column::ExpiredAt.is_not_null()),
        )
}

async fn insert_message(
    connection: &impl ConnectionTrait,
    row: &MessageRow,
) -> Result<(), StoreError> {
    messages::Entity::insert(messages::ActiveModel {
        id: Set(row.id.as_str().to_owned()),
        group_id: Set(row.group_id.clone()),
        owner_user_id: Set(owner_to_column(row.owner_user_id.as_deref())),
        direction: Set(row.direction.code().to_owned()),
        provider: Set(row.provider.code().to_owned()),
        status: Set(row.status.code().to_owned()),
        counterpart_hpii: Set(row.counterpart_hpii.clone()),
        counterpart_name: Set(row.counterpart_name.clone()),
        note_id: Set(row.note_id.clone()),
        payload_ciphertext: Set(row.payload_ciphertext.clone()),
        idempotency_key: Set(row.idempotency_key.clone()),
        provider_reference: Set(row.provider_reference.clone()),
        failure_reason: Set(row.failure_reason.clone()),
        credits_charged: Set(row.credits_charged),
        refunded: Set(row.refunded),
        ambiguous: Set(row.ambiguous),
        attempts: Set(row.attempts),
        next_attempt_at: Set(row.next_attempt_at.map(to_millis)),
        created_at: Set(to_millis(row.created_at)),
        sent_at: Set(row.sent_at.map(to_millis)),
        delivered_at: Set(row.delivered_at.map(to_millis)),
        acknowledged_at: Set(row.acknowledged_at.map(to_millis)),
        updated_at: Set(to_millis(Utc::now())),
        addressed_hpii: Set(row
            .addressed_hpii
            .as_ref()
            .map(|hpii| hpii.as_str().to_owned())),
        flagged_undelivered_at: Set(row.attention.undelivered_at.map(to_millis)),
        flagged_unacknowledged_at: Set(row.attention.unacknowledged_at.map(to_millis)),
        expired_at: Set(row.attention.expired_at.map(to_millis)),
    })
    .exec_without_returning(connection)
    .await?;
    Ok(())
}

fn note_from_model(model: clinical_notes::Model) -> NoteRow {
    NoteRow {
        id: model.id,
        group_id: model.group_id,
        owner_user_id: model.owner_user_id,
        patient_id: model.patient_id,
        content_ciphertext: model.content_ciphertext,
        created_at: from_millis(model.created_at),
    }
}

/// A stored message as the domain knows it. A value that does not parse (a bug or a
/// hand-edited row) is `Corrupt`, never quietly read as something else.
fn message_from_model(model: messages::Model) -> Result<MessageRow, StoreError> {
    let corrupt = |problem: String| StoreError::Corrupt {
        table: "messages",
        problem,
    };
    let direction = Direction::from_code(&model.direction)
        .ok_or_else(|| corrupt(format!("unknown direction {:?}", model.direction)))?;
    let provider = Provider::from_code(&model.provider)
        .ok_or_else(|| corrupt(format!("unknown provider {:?}", model.provider)))?;
    let status = MessageStatus::from_code(&model.status)
        .ok_or_else(|| corrupt(format!("unknown status {:?}", model.status)))?;
    let addressed_hpii = model
        .addressed_hpii
        .map(|hpii| {
            Hpii::parse(&hpii).map_err(|problem| corrupt(format!("addressed_hpii: {problem}")))
        })
        .transpose()?;
    Ok(MessageRow {
        id: MessageId::from_stored(model.id),
        group_id: model.group_id,
        owner_user_id: owner_from_column(model.owner_user_id),
        direction,
        provider,
        status,
        counterpart_hpii: model.counterpart_hpii,
        counterpart_name: model.counterpart_name,
        note_id: model.note_id,
        payload_ciphertext: model.payload_ciphertext,
        idempotency_key: model.idempotency_key,
        provider_reference: model.provider_reference,
        failure_reason: model.failure_reason,
        credits_charged: model.credits_charged,
        refunded: model.refunded,
        ambiguous: model.ambiguous,
        attempts: model.attempts,
        next_attempt_at: model.next_attempt_at.map(from_millis),
        created_at: from_millis(model.created_at),
        sent_at: model.sent_at.map(from_millis),
        delivered_at: model.delivered_at.map(from_millis),
        acknowledged_at: model.acknowledged_at.map(from_millis),
        addressed_hpii,
        attention: AttentionMarks {
            undelivered_at: model.flagged_undelivered_at.map(from_millis),
            unacknowledged_at: model.flagged_unacknowledged_at.map(from_millis),
            expired_at: model.expired_at.map(from_millis),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unassigned_message_round_trips_through_the_owner_sentinel_and_owners_stay_owners() {
        let owner = uuid::Uuid::now_v7().to_string();
        for (stored_owner, column) in [
            (None, UNASSIGNED_OWNER.to_owned()),
            (Some(owner.clone()), owner.clone()),
        ] {
            assert_eq!(owner_to_column(stored_owner.as_deref()), column);
            assert_eq!(owner_from_column(column), stored_owner);
        }
        // The sentinel must fit the column and never look like a user id.
        assert!(UNASSIGNED_OWNER.len() <= 36);
        assert!(uuid::Uuid::parse_str(UNASSIGNED_OWNER).is_err());
    }

    fn stored_message(status: &str, direction: &str, provider: &str) -> messages::Model {
        messages::Model {
            id: uuid::Uuid::now_v7().to_string(),
            group_id: "clinic-1".into(),
            owner_user_id: uuid::Uuid::now_v7().to_string(),
            direction: direction.into(),
            provider: provider.into(),
            status: status.into(),
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
            attempts: 0,
            next_attempt_at: None,
            created_at: 0,
            sent_at: None,
            delivered_at: None,
            acknowledged_at: None,
            updated_at: 0,
            addressed_hpii: None,
            flagged_undelivered_at: None,
            flagged_unacknowledged_at: None,
            expired_at: None,
        }
    }

    #[test]
    fn a_stored_status_direction_or_provider_that_does_not_parse_is_corrupt_never_a_default() {
        let read = message_from_model(stored_message("QUEUED", "OUTBOUND", "ARGUS")).unwrap();
        assert_eq!(read.status, MessageStatus::Queued);
        assert_eq!(read.direction, Direction::Outbound);
        assert_eq!(read.provider, Provider::Argus);
        for model in [
            stored_message("RECEIVED", "OUTBOUND", "ARGUS"),
            stored_message("QUEUED", "SIDEWAYS", "ARGUS"),
            stored_message("QUEUED", "OUTBOUND", "HEALTHLINK"),
            messages::Model {
                addressed_hpii: Some("1234".into()),
                ..stored_message("DELIVERED", "INBOUND", "REFERRALNET")
            },
        ] {
            assert!(
                matches!(
                    message_from_model(model.clone()),
                    Err(StoreError::Corrupt {
                        table: "messages",
                        ..
                    })
                ),
                "{model:?}"
            );
        }
    }
}
