//! Groups and users, provisioned from verified token claims.

use chrono::Utc;
use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter};

use super::entities::{groups, users};
use super::{Store, StoreError, new_id, to_millis};
use crate::domain::types::Role;

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
    pub hpii: Option<String>,
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

    /// Sets a user's HPI-I.
    pub async fn set_user_hpii(&self, user_id: &str, hpii: &str) -> Result<(), StoreError> {
        use sea_orm::sea_query::Expr;
        let txn = self.begin_write().await?;
        users::Entity::update_many()
            .col_expr(users::Column::Hpii, Expr::value(hpii))
            .filter(users::Column::Id.eq(user_id))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(())
    }

    /// A user by id.
    pub async fn user_by_id(&self, user_id: &str) -> Result<Option<UserRow>, StoreError> {
        users::Entity::find_by_id(user_id.to_owned())
            .one(self.connection())
            .await?
            .map(user_from_model)
            .transpose()
    }

    /// The practitioner of a group with this HPI-I.
    pub async fn practitioner_by_hpii(
        &self,
        group_id: &str,
        hpii: &str,
    ) -> Result<Option<UserRow>, StoreError> {
        users::Entity::find()
            .filter(users::Column::GroupId.eq(group_id))
            .filter(users::Column::Hpii.eq(hpii))
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
        hpii: model.hpii,
    })
}
