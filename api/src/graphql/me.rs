//! Who the caller is.

use async_graphql::{Context, Object, SimpleObject};

use super::error::ApiError;
use super::types::Role;
use super::{principal, services};

/// The signed-in user, as the gateway knows them from the verified token.
#[derive(SimpleObject)]
#[graphql(complex)]
pub struct Me {
    /// The user's id in the practice-management system (the token's `sub`).
    pub id: String,
    /// Display name (the token's `name`).
    pub name: String,
    /// What the user may do.
    pub role: Role,
    /// The practice (group) the user belongs to; everything the API shows is scoped to it.
    pub group_id: String,
    /// Whether this user may send secure messages (practitioners only).
    pub can_send_secure_messages: bool,
}

#[async_graphql::ComplexObject]
impl Me {
    /// Your HPI-I, once set with `setMyHpii` (practitioners; read only when asked for).
    async fn hpii(&self, ctx: &Context<'_>) -> Result<Option<String>, ApiError> {
        Ok(services(ctx)
            .messaging
            .my_hpii(principal(ctx)?)
            .await?
            .map(|hpii| hpii.as_str().to_owned()))
    }
}

#[derive(Default)]
pub struct MeQuery;

#[Object]
impl MeQuery {
    /// The signed-in user.
    async fn me(&self, ctx: &Context<'_>) -> Result<Me, ApiError> {
        let principal = principal(ctx)?;
        let role = Role::from(principal.role);
        Ok(Me {
            id: principal.subject.clone(),
            name: principal.name.clone(),
            role,
            group_id: principal.group_id.clone(),
            can_send_secure_messages: role == Role::Practitioner,
        })
    }
}
