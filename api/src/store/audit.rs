//! The append-only audit trail.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect,
};

use super::entities::audit_events;
use super::{Store, StoreError, from_millis, new_id, to_millis};
use crate::domain::audit::{AuditEntry, AuditOutcome};

/// A stored audit event.
#[derive(Debug, Clone)]
pub struct AuditRow {
    /// Time-ordered id (also the pagination cursor).
    pub id: String,
    /// The entry as recorded.
    pub entry: AuditEntry,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// Appends an audit event on its own (for outcomes that changed nothing else).
    pub async fn insert_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        self.insert_audit_in(self.connection(), entry).await?;
        self.flushed().await?;
        Ok(())
    }

    /// Appends an audit event inside the caller's transaction.
    pub(crate) async fn insert_audit_in(
        &self,
        connection: &impl ConnectionTrait,
        entry: &AuditEntry,
    ) -> Result<(), StoreError> {
        audit_events::Entity::insert(audit_events::ActiveModel {
            id: Set(new_id()),
            group_id: Set(entry.group_id.clone()),
            actor_user_id: Set(entry.actor_user_id.clone()),
            actor_subject: Set(entry.actor_subject.clone()),
            action: Set(entry.action.to_owned()),
            target: Set(entry.target.clone()),
            outcome: Set(entry.outcome.code().to_owned()),
            detail: Set(entry.detail.clone()),
            request_id: Set(entry.request_id.clone()),
            on_behalf_of_subject: Set(entry.on_behalf_of.clone()),
            created_at: Set(to_millis(Utc::now())),
        })
        .exec_without_returning(connection)
        .await?;
        Ok(())
    }

    /// How many events of one action a user caused since a moment (rate limits).
    pub async fn count_recent_audit(
        &self,
        user_id: &str,
        action: &str,
        since: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        Ok(audit_events::Entity::find()
            .filter(audit_events::Column::ActorUserId.eq(user_id))
            .filter(audit_events::Column::Action.eq(action))
            .filter(audit_events::Column::CreatedAt.gte(to_millis(since)))
            .count(self.connection())
            .await?)
    }

    /// How many of the given actions a user attempted and failed since a moment.
    pub async fn count_recent_failures(
        &self,
        user_id: &str,
        actions: &[&str],
        since: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        Ok(audit_events::Entity::find()
            .filter(audit_events::Column::ActorUserId.eq(user_id))
            .filter(audit_events::Column::Action.is_in(actions.iter().copied()))
            .filter(audit_events::Column::Outcome.eq(AuditOutcome::Failure.code()))
            .filter(audit_events::Column::CreatedAt.gte(to_millis(since)))
            .count(self.connection())
            .await?)
    }

    /// A group's events, newest first, strictly older than `before_id` when given.
    pub async fn list_audit(
        &self,
        group_id: &str,
        before_id: Option<&str>,
        limit: u64,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let mut query =
            audit_events::Entity::find().filter(audit_events::Column::GroupId.eq(group_id));
        if let Some(before_id) = before_id {
            query = query.filter(audit_events::Column::Id.lt(before_id));
        }
        query
            .order_by_desc(audit_events::Column::Id)
            .limit(limit)
            .all(self.connection())
            .await?
            .into_iter()
            .map(|model| {
                let outcome =
                    AuditOutcome::from_code(&model.outcome).ok_or_else(|| StoreError::Corrupt {
                        table: "audit_events",
                        problem: format!("outcome {:?}", model.outcome),
                    })?;
                Ok(AuditRow {
                    id: model.id,
                    created_at: from_millis(model.created_at),
                    entry: AuditEntry {
                        group_id: model.group_id,
                        actor_user_id: model.actor_user_id,
                        actor_subject: model.actor_subject,
                        action: model.action,
                        target: model.target,
                        outcome,
                        detail: model.detail,
                        request_id: model.request_id,
                        on_behalf_of: model.on_behalf_of_subject,
                    },
                })
            })
            .collect()
    }
}
