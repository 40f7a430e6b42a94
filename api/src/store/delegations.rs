//! Sending delegations: one row per (practitioner, delegate) pair. Whether a row is live is
//! decided by the domain (`messaging::delegation::is_live`); this module stores, locks and lists.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::entities::sending_delegations;
use super::{Store, StoreError, Transaction, from_millis, new_id, to_millis};
use crate::domain::audit::AuditEntry;

/// A stored delegation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegationRow {
    /// Id.
    pub id: String,
    /// The practice.
    pub group_id: String,
    /// The practitioner who granted it (whose messages, wallet and HPI-I it lends).
    pub practitioner_user_id: String,
    /// The user who may send on the practitioner's behalf.
    pub delegate_user_id: String,
    /// When it was (last) granted.
    pub granted_at: DateTime<Utc>,
    /// When it stops counting (`None`: until revoked).
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
}

fn from_model(model: sending_delegations::Model) -> DelegationRow {
    DelegationRow {
        id: model.id,
        group_id: model.group_id,
        practitioner_user_id: model.practitioner_user_id,
        delegate_user_id: model.delegate_user_id,
        granted_at: from_millis(model.granted_at),
        expires_at: model.expires_at.map(from_millis),
        revoked_at: model.revoked_at.map(from_millis),
    }
}

impl Store {
    /// Grants (or renews) a delegation with its audit event, in one transaction: a revoked or
    /// expired grant of the same pair becomes live again with the new expiry.
    pub async fn grant_delegation(
        &self,
        group_id: &str,
        practitioner_user_id: &str,
        delegate_user_id: &str,
        expires_at: Option<DateTime<Utc>>,
        audit: &AuditEntry,
    ) -> Result<DelegationRow, StoreError> {
        let now = to_millis(Utc::now());
        let txn = self.begin_write().await?;
        sending_delegations::Entity::insert(sending_delegations::ActiveModel {
            id: Set(new_id()),
            group_id: Set(group_id.to_owned()),
            practitioner_user_id: Set(practitioner_user_id.to_owned()),
            delegate_user_id: Set(delegate_user_id.to_owned()),
            granted_at: Set(now),
            expires_at: Set(expires_at.map(to_millis)),
            revoked_at: Set(None),
        })
        .on_conflict(
            OnConflict::columns([
                sending_delegations::Column::PractitionerUserId,
                sending_delegations::Column::DelegateUserId,
            ])
            .update_columns([
                sending_delegations::Column::GrantedAt,
                sending_delegations::Column::ExpiresAt,
                sending_delegations::Column::RevokedAt,
            ])
            .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
        self.insert_audit_in(&txn, audit).await?;
        let row = sending_delegations::Entity::find()
            .filter(sending_delegations::Column::PractitionerUserId.eq(practitioner_user_id))
            .filter(sending_delegations::Column::DelegateUserId.eq(delegate_user_id))
            .one(&txn)
            .await?
            .map(from_model)
            .ok_or_else(|| StoreError::Corrupt {
                table: "sending_delegations",
                problem: "delegation missing right after upsert".into(),
            })?;
        txn.commit().await?;
        Ok(row)
    }

    /// Revokes a pair's delegation (if not already revoked) with its audit event, in one
    /// transaction. The update waits for every send holding the row (see
    /// [`Store::delegation_in`]), so once this returns no send can still use the grant.
    /// `None` when the pair never had one.
    pub async fn revoke_delegation(
        &self,
        practitioner_user_id: &str,
        delegate_user_id: &str,
        audit: &AuditEntry,
    ) -> Result<Option<DelegationRow>, StoreError> {
        let txn = self.begin_write().await?;
        let updated = sending_delegations::Entity::update_many()
            .col_expr(
                sending_delegations::Column::RevokedAt,
                Expr::value(to_millis(Utc::now())),
            )
            .filter(sending_delegations::Column::PractitionerUserId.eq(practitioner_user_id))
            .filter(sending_delegations::Column::DelegateUserId.eq(delegate_user_id))
            .filter(sending_delegations::Column::RevokedAt.is_null())
            .exec(&txn)
            .await?
            .rows_affected;
        let row = sending_delegations::Entity::find()
            .filter(sending_delegations::Column::PractitionerUserId.eq(practitioner_user_id))
            .filter(sending_delegations::Column::DelegateUserId.eq(delegate_user_id))
            .one(&txn)
            .await?
            .map(from_model);
        if updated == 1 {
            self.insert_audit_in(&txn, audit).await?;
        }
        txn.commit().await?;
        Ok(row)
    }

    /// A pair's delegation, read outside any transaction (an early refusal before any
    /// directory call; the decision that counts is [`Store::delegation_in`]'s).
    pub async fn find_delegation(
        &self,
        practitioner_user_id: &str,
        delegate_user_id: &str,
    ) -> Result<Option<DelegationRow>, StoreError> {
        Ok(sending_delegations::Entity::find()
            .filter(sending_delegations::Column::PractitionerUserId.eq(practitioner_user_id))
            .filter(sending_delegations::Column::DelegateUserId.eq(delegate_user_id))
            .one(self.connection())
            .await?
            .map(from_model))
    }

    /// A pair's delegation read inside a write transaction and held there: `FOR UPDATE` on
    /// PostgreSQL, so a concurrent revoke waits for this transaction to end, and a send that
    /// locks the row after the revoke committed reads it revoked. (Not `FOR SHARE`: a stream of
    /// sends holding share locks could keep a waiting revoke out indefinitely, while exclusive
    /// lockers queue in order; sends for one practitioner already queue on their wallet row,
    /// so this costs no concurrency.) SQLite's `BEGIN IMMEDIATE` write lock serialises the two
    /// anyway.
    pub async fn delegation_in(
        &self,
        txn: &Transaction,
        practitioner_user_id: &str,
        delegate_user_id: &str,
    ) -> Result<Option<DelegationRow>, StoreError> {
        Ok(sending_delegations::Entity::find()
            .filter(sending_delegations::Column::PractitionerUserId.eq(practitioner_user_id))
            .filter(sending_delegations::Column::DelegateUserId.eq(delegate_user_id))
            .lock_exclusive()
            .one(&txn.0)
            .await?
            .map(from_model))
    }

    /// The delegations a practitioner granted, newest first.
    pub async fn delegations_granted_by(
        &self,
        practitioner_user_id: &str,
    ) -> Result<Vec<DelegationRow>, StoreError> {
        Ok(sending_delegations::Entity::find()
            .filter(sending_delegations::Column::PractitionerUserId.eq(practitioner_user_id))
            .order_by_desc(sending_delegations::Column::GrantedAt)
            .all(self.connection())
            .await?
            .into_iter()
            .map(from_model)
            .collect())
    }

    /// The delegations a user holds, newest first.
    pub async fn delegations_held_by(
        &self,
        delegate_user_id: &str,
    ) -> Result<Vec<DelegationRow>, StoreError> {
        Ok(sending_delegations::Entity::find()
            .filter(sending_delegations::Column::DelegateUserId.eq(delegate_user_id))
            .order_by_desc(sending_delegations::Column::GrantedAt)
            .all(self.connection())
            .await?
            .into_iter()
            .map(from_model)
            .collect())
    }

    /// Moves the expiry of every delegation of a practice to `expires_at`, standing in for
    /// time passing (the gateway has no clock of its own to advance). Tests only.
    #[doc(hidden)]
    pub async fn set_delegation_expiry_for_tests(
        &self,
        group_id: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        Ok(sending_delegations::Entity::update_many()
            .col_expr(
                sending_delegations::Column::ExpiresAt,
                Expr::value(to_millis(expires_at)),
            )
            .filter(sending_delegations::Column::GroupId.eq(group_id))
            .exec(self.connection())
            .await?
            .rows_affected)
    }
}
