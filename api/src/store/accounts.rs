//! Group provider accounts and practitioners' individual links.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
    sea_query::{Expr, ExprTrait},
};

use super::entities::{provider_accounts, provider_links};
use super::{Store, StoreError, from_millis, is_unique_violation, to_millis};
use crate::domain::audit::AuditEntry;
use crate::domain::types::{ConnectionStatus, Provider};

/// How a group account came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountOrigin {
    /// An existing provider account was linked.
    Linked,
    /// The account was registered through the gateway with a promo code.
    Registered,
}

impl AccountOrigin {
    fn code(self) -> &'static str {
        match self {
            AccountOrigin::Linked => "LINKED",
            AccountOrigin::Registered => "REGISTERED",
        }
    }

    fn from_code(code: &str) -> Option<Self> {
        match code {
            "LINKED" => Some(AccountOrigin::Linked),
            "REGISTERED" => Some(AccountOrigin::Registered),
            _ => None,
        }
    }
}

/// A group's account with one provider.
#[derive(Debug, Clone)]
pub struct AccountRow {
    /// Internal id.
    pub id: String,
    /// Owning group.
    pub group_id: String,
    /// Which provider.
    pub provider: Provider,
    /// Provider login name.
    pub username: String,
    /// The password, sealed by [`crate::crypto::SecretBox`].
    pub password_ciphertext: String,
    /// Group connection status.
    pub status: ConnectionStatus,
    /// Linked or registered.
    pub origin: AccountOrigin,
    /// Practice name given at registration.
    pub practice_name: Option<String>,
    /// Contact email given at registration.
    pub contact_email: Option<String>,
    /// Who set it up.
    pub created_by_user_id: String,
    /// When it was set up.
    pub created_at: DateTime<Utc>,
    /// When `status` last changed.
    pub status_changed_at: DateTime<Utc>,
    /// When the provider was last asked about it.
    pub last_checked_at: Option<DateTime<Utc>>,
    /// When the approval watcher should next ask (only while waiting).
    pub next_check_at: Option<DateTime<Utc>>,
    /// Consecutive failed checks (drives the back-off).
    pub check_failures: u32,
    /// The sealed secret the provider signs pushed receipts with, once registered.
    pub webhook_secret_ciphertext: Option<String>,
}

/// A practitioner's own link to the group account.
#[derive(Debug, Clone)]
pub struct LinkRow {
    /// Internal id.
    pub id: String,
    /// The practitioner.
    pub user_id: String,
    /// Which provider.
    pub provider: Provider,
    /// The group account it uses.
    pub account_id: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

/// What a finished approval check decided.
#[derive(Debug, Clone, Copy)]
pub enum CheckOutcome {
    /// The provider decided: store the new status and stop checking.
    Decided(ConnectionStatus),
    /// Still pending: check again at the given time.
    StillWaiting { next_check_at: DateTime<Utc> },
    /// The provider failed: check again later with one more failure counted.
    Failed { next_check_at: DateTime<Utc> },
}

/// An insert that hit a unique constraint: somebody else got there first.
#[derive(Debug)]
pub enum InsertOutcome<T> {
    /// Stored.
    Inserted(T),
    /// A row with the same key exists.
    AlreadyExists,
}

/// Who may remove a group account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountDeletionRule<'a> {
    /// Whoever asks (an administrator).
    Anyone,
    /// Only if this user (internal id) holds the one and only individual link to it.
    SoleLinkedUser(&'a str),
}

/// What [`Store::delete_account`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountDeletion {
    /// The account and its links are gone; the audit entry is written.
    Deleted,
    /// The group has no account with that provider.
    NoAccount,
    /// Others are linked (or the user is not): nothing changed.
    NotSoleLinkedUser,
}

impl Store {
    /// The group's account with a provider, if any.
    pub async fn find_account(
        &self,
        group_id: &str,
        provider: Provider,
    ) -> Result<Option<AccountRow>, StoreError> {
        provider_accounts::Entity::find()
            .filter(provider_accounts::Column::GroupId.eq(group_id))
            .filter(provider_accounts::Column::Provider.eq(provider.code()))
            .one(self.connection())
            .await?
            .map(account_from_model)
            .transpose()
    }

    /// All of a group's accounts.
    pub async fn list_accounts(&self, group_id: &str) -> Result<Vec<AccountRow>, StoreError> {
        provider_accounts::Entity::find()
            .filter(provider_accounts::Column::GroupId.eq(group_id))
            .all(self.connection())
            .await?
            .into_iter()
            .map(account_from_model)
            .collect()
    }

    /// A user's individual link to a provider, if any.
    pub async fn find_link(
        &self,
        user_id: &str,
        provider: Provider,
    ) -> Result<Option<LinkRow>, StoreError> {
        provider_links::Entity::find()
            .filter(provider_links::Column::UserId.eq(user_id))
            .filter(provider_links::Column::Provider.eq(provider.code()))
            .one(self.connection())
            .await?
            .map(link_from_model)
            .transpose()
    }

    /// All of a user's individual links.
    pub async fn list_links(&self, user_id: &str) -> Result<Vec<LinkRow>, StoreError> {
        provider_links::Entity::find()
            .filter(provider_links::Column::UserId.eq(user_id))
            .all(self.connection())
            .await?
            .into_iter()
            .map(link_from_model)
            .collect()
    }

    /// Stores a new group account, the creator's individual link if given, and the audit
    /// entry, all in one transaction. Reports `AlreadyExists` if the group got an account for
    /// that provider in the meantime.
    pub async fn create_account(
        &self,
        account: &AccountRow,
        link: Option<&LinkRow>,
        audit: &AuditEntry,
    ) -> Result<InsertOutcome<()>, StoreError> {
        let txn = self.begin_write().await?;
        let inserted = provider_accounts::Entity::insert(account_to_active(account))
            .exec_without_returning(&txn)
            .await;
        match inserted {
            Err(error) if is_unique_violation(&error) => {
                txn.rollback().await?;
                return Ok(InsertOutcome::AlreadyExists);
            }
            other => {
                other?;
            }
        }
        if let Some(link) = link {
            insert_link(&txn, account.group_id.as_str(), link).await?;
        }
        self.insert_audit_in(&txn, audit).await?;
        txn.commit().await?;
        Ok(InsertOutcome::Inserted(()))
    }

    /// Whether a practice other than `group_id` holds this provider username.
    pub async fn username_held_by_another_group(
        &self,
        group_id: &str,
        provider: Provider,
        username: &str,
    ) -> Result<bool, StoreError> {
        Ok(provider_accounts::Entity::find()
            .filter(provider_accounts::Column::Provider.eq(provider.code()))
            .filter(provider_accounts::Column::Username.eq(username))
            .filter(provider_accounts::Column::GroupId.ne(group_id))
            .count(self.connection())
            .await?
            > 0)
    }

    /// Stores an individual link and its audit entry. `AlreadyExists` if the user already has
    /// a link to that provider.
    pub async fn create_link(
        &self,
        group_id: &str,
        link: &LinkRow,
        audit: &AuditEntry,
    ) -> Result<InsertOutcome<()>, StoreError> {
        let txn = self.begin_write().await?;
        match insert_link(&txn, group_id, link).await {
            Err(StoreError::Database(error)) if is_unique_violation(&error) => {
                txn.rollback().await?;
                return Ok(InsertOutcome::AlreadyExists);
            }
            other => other?,
        }
        self.insert_audit_in(&txn, audit).await?;
        txn.commit().await?;
        Ok(InsertOutcome::Inserted(()))
    }

    /// Removes a user's individual link. Returns whether there was one.
    pub async fn delete_link(
        &self,
        user_id: &str,
        provider: Provider,
        audit: &AuditEntry,
    ) -> Result<bool, StoreError> {
        let txn = self.begin_write().await?;
        let deleted = provider_links::Entity::delete_many()
            .filter(provider_links::Column::UserId.eq(user_id))
            .filter(provider_links::Column::Provider.eq(provider.code()))
            .exec(&txn)
            .await?
            .rows_affected;
        if deleted > 0 {
            self.insert_audit_in(&txn, audit).await?;
        }
        txn.commit().await?;
        Ok(deleted > 0)
    }

    /// Removes a group account and every individual link to it, if `rule` allows, deciding
    /// inside the write transaction that deletes. On PostgreSQL the account row is locked
    /// first (`FOR UPDATE`): a colleague's concurrent link must lock it too (its foreign-key
    /// check takes `FOR KEY SHARE`), so either their link commits first and is counted here,
    /// or it waits for this delete and then finds no account. SQLite's `BEGIN IMMEDIATE`
    /// serialises the two anyway.
    pub async fn delete_account(
        &self,
        group_id: &str,
        provider: Provider,
        rule: AccountDeletionRule<'_>,
        audit: &AuditEntry,
    ) -> Result<AccountDeletion, StoreError> {
        let txn = self.begin_write().await?;
        let Some(account) = provider_accounts::Entity::find()
            .filter(provider_accounts::Column::GroupId.eq(group_id))
            .filter(provider_accounts::Column::Provider.eq(provider.code()))
            .lock_exclusive()
            .one(&txn)
            .await?
        else {
            txn.rollback().await?;
            return Ok(AccountDeletion::NoAccount);
        };
        if let AccountDeletionRule::SoleLinkedUser(user_id) = rule {
            let linked_users: Vec<String> = provider_links::Entity::find()
                .select_only()
                .column(provider_links::Column::UserId)
                .filter(provider_links::Column::AccountId.eq(account.id.as_str()))
                .into_tuple()
                .all(&txn)
                .await?;
            if linked_users.len() != 1 || linked_users[0] != user_id {
                txn.rollback().await?;
                return Ok(AccountDeletion::NotSoleLinkedUser);
            }
        }
        provider_links::Entity::delete_many()
            .filter(provider_links::Column::AccountId.eq(account.id.as_str()))
            .exec(&txn)
            .await?;
        provider_accounts::Entity::delete_by_id(account.id)
            .exec(&txn)
            .await?;
        self.insert_audit_in(&txn, audit).await?;
        txn.commit().await?;
        Ok(AccountDeletion::Deleted)
    }

    /// Stores the sealed webhook secret of an account.
    pub async fn set_webhook_secret(
        &self,
        account_id: &str,
        sealed: &str,
    ) -> Result<(), StoreError> {
        let txn = self.begin_write().await?;
        provider_accounts::Entity::update_many()
            .col_expr(
                provider_accounts::Column::WebhookSecretCiphertext,
                Expr::value(sealed),
            )
            .filter(provider_accounts::Column::Id.eq(account_id))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(())
    }

    /// An account by id.
    pub async fn account_by_id(&self, account_id: &str) -> Result<Option<AccountRow>, StoreError> {
        provider_accounts::Entity::find_by_id(account_id.to_owned())
            .one(self.connection())
            .await?
            .map(account_from_model)
            .transpose()
    }

    /// Every `ACTIVE` group account (the inbox poller visits each).
    pub async fn active_accounts(&self) -> Result<Vec<AccountRow>, StoreError> {
        provider_accounts::Entity::find()
            .filter(provider_accounts::Column::Status.eq(ConnectionStatus::Active.code()))
            .order_by_asc(provider_accounts::Column::Id)
            .all(self.connection())
            .await?
            .into_iter()
            .map(account_from_model)
            .collect()
    }

    /// Accounts waiting for approval whose next check is due, oldest first.
    pub async fn due_waiting_accounts(
        &self,
        now: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<AccountRow>, StoreError> {
        provider_accounts::Entity::find()
            .filter(
                provider_accounts::Column::Status.eq(ConnectionStatus::WaitingForApproval.code()),
            )
            .filter(provider_accounts::Column::NextCheckAt.lte(to_millis(now)))
            .order_by_asc(provider_accounts::Column::NextCheckAt)
            .limit(limit)
            .all(self.connection())
            .await?
            .into_iter()
            .map(account_from_model)
            .collect()
    }

    /// Claims a due check for this node by moving `next_check_at` to the end of a lease. Only
    /// one node's conditional update can match, so several nodes never check the same account
    /// at once; a node that dies mid-check leaves the lease to expire.
    pub async fn claim_check(
        &self,
        account: &AccountRow,
        lease_until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let Some(expected) = account.next_check_at else {
            return Ok(false);
        };
        let txn = self.begin_write().await?;
        let claimed = provider_accounts::Entity::update_many()
            .col_expr(
                provider_accounts::Column::NextCheckAt,
                Expr::value(to_millis(lease_until)),
            )
            .filter(provider_accounts::Column::Id.eq(account.id.as_str()))
            .filter(
                provider_accounts::Column::Status.eq(ConnectionStatus::WaitingForApproval.code()),
            )
            .filter(provider_accounts::Column::NextCheckAt.eq(to_millis(expected)))
            .exec(&txn)
            .await?
            .rows_affected;
        txn.commit().await?;
        Ok(claimed == 1)
    }

    /// Records the result of an approval check. A decided status is stored only if the account
    /// is still waiting (it may have been disconnected meanwhile); returns whether it changed.
    pub async fn finish_check(
        &self,
        account: &AccountRow,
        outcome: CheckOutcome,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        audit: Option<&AuditEntry>,
    ) -> Result<bool, StoreError> {
        let txn = self.begin_write().await?;
        let mut update = provider_accounts::Entity::update_many().col_expr(
            provider_accounts::Column::LastCheckedAt,
            Expr::value(to_millis(now)),
        );
        update = match outcome {
            CheckOutcome::Decided(status) => update
                .col_expr(
                    provider_accounts::Column::Status,
                    Expr::value(status.code()),
                )
                .col_expr(
                    provider_accounts::Column::StatusChangedAt,
                    Expr::value(to_millis(now)),
                )
                .col_expr(
                    provider_accounts::Column::NextCheckAt,
                    Expr::value(Option::<i64>::None),
                )
                .col_expr(provider_accounts::Column::CheckFailures, Expr::value(0)),
            CheckOutcome::StillWaiting { next_check_at } => update
                .col_expr(
                    provider_accounts::Column::NextCheckAt,
                    Expr::value(to_millis(next_check_at)),
                )
                .col_expr(provider_accounts::Column::CheckFailures, Expr::value(0)),
            CheckOutcome::Failed { next_check_at } => update
                .col_expr(
                    provider_accounts::Column::NextCheckAt,
                    Expr::value(to_millis(next_check_at)),
                )
                .col_expr(
                    provider_accounts::Column::CheckFailures,
                    Expr::col(provider_accounts::Column::CheckFailures).add(1),
                ),
        };
        let changed = update
            .filter(provider_accounts::Column::Id.eq(account.id.as_str()))
            .filter(
                provider_accounts::Column::Status.eq(ConnectionStatus::WaitingForApproval.code()),
            )
            // Only while this node still holds the claim: a check that outlived its lease must
            // not overwrite the schedule of the node that took over.
            .filter(provider_accounts::Column::NextCheckAt.eq(to_millis(lease_until)))
            .exec(&txn)
            .await?
            .rows_affected
            == 1;
        if changed && let Some(audit) = audit {
            self.insert_audit_in(&txn, audit).await?;
        }
        txn.commit().await?;
        Ok(changed)
    }
}

async fn insert_link(
    connection: &impl ConnectionTrait,
    group_id: &str,
    link: &LinkRow,
) -> Result<(), StoreError> {
    provider_links::Entity::insert(provider_links::ActiveModel {
        id: Set(link.id.clone()),
        group_id: Set(group_id.to_owned()),
        user_id: Set(link.user_id.clone()),
        provider: Set(link.provider.code().to_owned()),
        account_id: Set(link.account_id.clone()),
        created_at: Set(to_millis(link.created_at)),
    })
    .exec_without_returning(connection)
    .await?;
    Ok(())
}

fn account_to_active(account: &AccountRow) -> provider_accounts::ActiveModel {
    provider_accounts::ActiveModel {
        id: Set(account.id.clone()),
        group_id: Set(account.group_id.clone()),
        provider: Set(account.provider.code().to_owned()),
        username: Set(account.username.clone()),
        password_ciphertext: Set(account.password_ciphertext.clone()),
        status: Set(account.status.code().to_owned()),
        origin: Set(account.origin.code().to_owned()),
        practice_name: Set(account.practice_name.clone()),
        contact_email: Set(account.contact_email.clone()),
        created_by_user_id: Set(account.created_by_user_id.clone()),
        created_at: Set(to_millis(account.created_at)),
        status_changed_at: Set(to_millis(account.status_changed_at)),
        last_checked_at: Set(account.last_checked_at.map(to_millis)),
        next_check_at: Set(account.next_check_at.map(to_millis)),
        check_failures: Set(account.check_failures as i32),
        webhook_secret_ciphertext: Set(account.webhook_secret_ciphertext.clone()),
    }
}

fn corrupt(table: &'static str, problem: String) -> StoreError {
    StoreError::Corrupt { table, problem }
}

fn account_from_model(model: provider_accounts::Model) -> Result<AccountRow, StoreError> {
    Ok(AccountRow {
        provider: Provider::from_code(&model.provider).ok_or_else(|| {
            corrupt(
                "provider_accounts",
                format!("provider {:?}", model.provider),
            )
        })?,
        status: ConnectionStatus::from_code(&model.status)
            .ok_or_else(|| corrupt("provider_accounts", format!("status {:?}", model.status)))?,
        origin: AccountOrigin::from_code(&model.origin)
            .ok_or_else(|| corrupt("provider_accounts", format!("origin {:?}", model.origin)))?,
        id: model.id,
        group_id: model.group_id,
        username: model.username,
        password_ciphertext: model.password_ciphertext,
        practice_name: model.practice_name,
        contact_email: model.contact_email,
        created_by_user_id: model.created_by_user_id,
        created_at: from_millis(model.created_at),
        status_changed_at: from_millis(model.status_changed_at),
        last_checked_at: model.last_checked_at.map(from_millis),
        next_check_at: model.next_check_at.map(from_millis),
        check_failures: u32::try_from(model.check_failures).unwrap_or(0),
        webhook_secret_ciphertext: model.webhook_secret_ciphertext,
    })
}

fn link_from_model(model: provider_links::Model) -> Result<LinkRow, StoreError> {
    Ok(LinkRow {
        provider: Provider::from_code(&model.provider)
            .ok_or_else(|| corrupt("provider_links", format!("provider {:?}", model.provider)))?,
        id: model.id,
        user_id: model.user_id,
        account_id: model.account_id,
        created_at: from_millis(model.created_at),
    })
}
