//! Groups and users, provisioned from verified token claims.

use chrono::Utc;
use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter};

use super::entities::{groups, users};
use super::{Store, StoreError, new_id, to_millis};
use crate::domain::audit::AuditEntry;
use crate::domain::types::{Hpii, Role};

/// What setting a practitioner's HPI-I did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HpiiChange {
    /// They already had it; nothing was written.
    Unchanged,
    /// It is now theirs, replacing `previous` (`None`: their first).
    Set {
        /// The HPI-I it replaced.
        previous: Option<String>,
    },
    /// Another user of the practice holds it; nothing changed.
    HeldByAnother,
}

/// A stored user.
#[derive(Debug, Clone)]
pub struct UserRow {
    /// Internal id.
    pub id: String,
    /// The group (practice) id from the token.
    pub group_id: String,
    /// The token's `sub`.
    pub subject: String,
    /// The role the latest token gave.
    pub role: Role,
    /// The display name the latest token gave.
    pub name: String,
    /// The practitioner's HPI-I, once they set it.
    pub hpii: Option<Hpii>,
}

impl Store {
    /// Finds or creates the group and the user named by verified claims, and keeps the stored
    /// role and name equal to the token's (the PMS is the source of truth for both).
    pub async fn provision_user(
        &self,
        group_id: &str,
        subject: &str,
        role: Role,
        name: &str,
    ) -> Result<UserRow, StoreError> {
        if let Some(existing) = self.find_user(group_id, subject).await?
            && existing.role == role
            && existing.name == name
        {
            return Ok(existing);
        }
        let now = to_millis(Utc::now());
        let txn = self.begin_write().await?;
        groups::Entity::insert(groups::ActiveModel {
            id: Set(group_id.to_owned()),
            created_at: Set(now),
        })
        .on_conflict(
            OnConflict::column(groups::Column::Id)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
        users::Entity::insert(users::ActiveModel {
            id: Set(new_id()),
            group_id: Set(group_id.to_owned()),
            subject: Set(subject.to_owned()),
            role: Set(role.code().to_owned()),
            name: Set(name.to_owned()),
            created_at: Set(now),
            updated_at: Set(now),
            hpii: Set(None),
        })
        .on_conflict(
            OnConflict::columns([users::Column::GroupId, users::Column::Subject])
                .update_columns([
                    users::Column::Role,
                    users::Column::Name,
                    users::Column::UpdatedAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
        txn.commit().await?;
        self.find_user(group_id, subject)
            .await?
            .ok_or_else(|| StoreError::Corrupt {
                table: "users",
                problem: "user missing right after upsert".into(),
            })
    }

    /// Gives a practitioner an HPI-I, with its audit event in the same transaction.
    /// `audit` is asked for the event once the previous HPI-I is known. The unique index
    /// `ux_users_group_hpii` decides between concurrent claims of one HPI-I: exactly one
    /// update succeeds and the others violate it, which is reported as `HeldByAnother` (and
    /// audited through `audit` outside the failed transaction, which PostgreSQL has aborted).
    pub async fn set_user_hpii(
        &self,
        user_id: &str,
        hpii: &Hpii,
        audit: impl Fn(&HpiiChange) -> AuditEntry,
    ) -> Result<HpiiChange, StoreError> {
        use sea_orm::QuerySelect;
        use sea_orm::sea_query::Expr;
        let txn = self.begin_write().await?;
        // Locked so that the previous HPI-I named in the audit event is the one replaced
        // (SQLite's write lock, taken by BEGIN IMMEDIATE, already serialises this).
        let previous = users::Entity::find_by_id(user_id.to_owned())
            .lock_exclusive()
            .one(&txn)
            .await?
            .and_then(|user| user.hpii);
        if previous.as_deref() == Some(hpii.as_str()) {
            txn.rollback().await?;
            return Ok(HpiiChange::Unchanged);
        }
        let updated = users::Entity::update_many()
            .col_expr(users::Column::Hpii, Expr::value(hpii.as_str()))
            .col_expr(users::Column::UpdatedAt, Expr::value(to_millis(Utc::now())))
            .filter(users::Column::Id.eq(user_id))
            .exec(&txn)
            .await;
        match updated {
            Err(error) if super::is_unique_violation(&error) => {
                txn.rollback().await?;
                let change = HpiiChange::HeldByAnother;
                self.insert_audit(&audit(&change)).await?;
                Ok(change)
            }
            Err(error) => Err(error.into()),
            Ok(_) => {
                let change = HpiiChange::Set { previous };
                self.insert_audit_in(&txn, &audit(&change)).await?;
                txn.commit().await?;
                Ok(change)
            }
        }
    }

    /// A user by id.
    pub async fn user_by_id(&self, user_id: &str) -> Result<Option<UserRow>, StoreError> {
        users::Entity::find_by_id(user_id.to_owned())
            .one(self.connection())
            .await?
            .map(user_from_model)
            .transpose()
    }

    /// A user of a group by their `sub` (any role).
    pub async fn user_by_subject(
        &self,
        group_id: &str,
        subject: &str,
    ) -> Result<Option<UserRow>, StoreError> {
        self.find_user(group_id, subject).await
    }

    /// The practitioner of a group with this HPI-I.
    pub async fn practitioner_by_hpii(
        &self,
        group_id: &str,
        hpii: &Hpii,
    ) -> Result<Option<UserRow>, StoreError> {
        users::Entity::find()
            .filter(users::Column::GroupId.eq(group_id))
            .filter(users::Column::Hpii.eq(hpii.as_str()))
            .filter(users::Column::Role.eq(Role::Practitioner.code()))
            .one(self.connection())
            .await?
            .map(user_from_model)
            .transpose()
    }

    async fn find_user(
        &self,
        group_id: &str,
        subject: &str,
    ) -> Result<Option<UserRow>, StoreError> {
        let row = users::Entity::find()
            .filter(users::Column::GroupId.eq(group_id))
            .filter(users::Column::Subject.eq(subject))
            .one(self.connection())
            .await?;
        row.map(user_from_model).transpose()
    }
}

fn user_from_model(model: users::Model) -> Result<UserRow, StoreError> {
    let role = Role::from_code(&model.role).ok_or_else(|| StoreError::Corrupt {
        table: "users",
        problem: format!("unknown role {:?}", model.role),
    })?;
    Ok(UserRow {
        id: model.id,
        group_id: model.group_id,
        subject: model.subject,
        role,
        name: model.name,
        hpii: model
            .hpii
            .map(|hpii| {
                Hpii::parse(&hpii).map_err(|problem| StoreError::Corrupt {
                    table: "users",
                    problem: format!("hpii {hpii:?}: {problem}"),
                })
            })
            .transpose()?,
    })
}
