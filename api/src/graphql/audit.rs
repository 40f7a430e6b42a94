//! The group's audit trail, for administrators.

use async_graphql::{Context, Object, SimpleObject};
use chrono::{DateTime, Utc};

use super::error::ApiError;
use super::{principal, services};
use crate::domain::GatewayError;
use crate::domain::types::Role;

/// One audited action. Never contains passwords or clinical content.
#[derive(SimpleObject, Clone)]
pub struct AuditEvent {
    /// Event id (time-ordered).
    pub id: String,
    /// Who acted: a user's `sub`, or `gateway` for the gateway's own background work.
    pub actor: String,
    /// The practitioner (`sub`) the actor acted for under a sending delegation (a delegated
    /// send, preview or note read); null when the actor acted in their own name.
    pub on_behalf_of: Option<String>,
    /// What was done, e.g. `LINK_GROUP_ACCOUNT`, `VALIDATE_LOGIN`.
    pub action: String,
    /// What it was done to, e.g. `provider:ARGUS`.
    pub target: String,
    /// `SUCCESS`, `FAILURE` or `DENIED`.
    pub outcome: String,
    /// A short, safe explanation such as a provider error word or the new status.
    pub detail: Option<String>,
    /// The request id, to correlate with logs.
    pub request_id: String,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
}

/// A page of audit events (a Relay cursor connection).
#[derive(SimpleObject)]
pub struct AuditEventConnection {
    /// The events on this page, each with its cursor.
    pub edges: Vec<AuditEventEdge>,
    /// Where this page sits in the whole list.
    pub page_info: PageInfo,
}

/// One audit event and its cursor.
#[derive(SimpleObject)]
pub struct AuditEventEdge {
    /// Pass as `after` to continue after this event.
    pub cursor: String,
    /// The event.
    pub node: AuditEvent,
}

/// Pagination state of a connection.
#[derive(SimpleObject)]
pub struct PageInfo {
    /// Whether more items follow this page.
    pub has_next_page: bool,
    /// Whether items precede this page.
    pub has_previous_page: bool,
    /// The cursor of the first item on this page.
    pub start_cursor: Option<String>,
    /// The cursor of the last item on this page.
    pub end_cursor: Option<String>,
}

#[derive(Default)]
pub struct AuditQuery;

#[Object]
impl AuditQuery {
    /// The practice's audit events, newest first (administrators only).
    #[graphql(complexity = "first.unwrap_or(20).clamp(1, 100) as usize * child_complexity + 1")]
    async fn audit_events(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "How many events to return (1–100, default 20).")] first: Option<i32>,
        #[graphql(desc = "Return events after this cursor (from `pageInfo.endCursor`).")]
        after: Option<String>,
    ) -> Result<AuditEventConnection, ApiError> {
        let principal = principal(ctx)?;
        if principal.role != Role::Administrator {
            return Err(GatewayError::Forbidden(
                "only administrators can read the practice's audit trail".into(),
            )
            .into());
        }
        let first = first.unwrap_or(20);
        if !(1..=100).contains(&first) {
            return Err(ApiError::bad_input("first must be between 1 and 100"));
        }
        let rows = services(ctx)
            .store
            .list_audit(&principal.group_id, after.as_deref(), first as u64 + 1)
            .await
            .map_err(GatewayError::from)?;
        let has_next_page = rows.len() > first as usize;
        let edges: Vec<AuditEventEdge> = rows
            .into_iter()
            .take(first as usize)
            .map(|row| AuditEventEdge {
                cursor: row.id.clone(),
                node: AuditEvent {
                    id: row.id,
                    actor: row.entry.actor_subject,
                    on_behalf_of: row.entry.on_behalf_of,
                    action: row.entry.action,
                    target: row.entry.target,
                    outcome: row.entry.outcome.code().to_owned(),
                    detail: row.entry.detail,
                    request_id: row.entry.request_id,
                    occurred_at: row.created_at,
                },
            })
            .collect();
        let page_info = PageInfo {
            has_next_page,
            has_previous_page: after.is_some(),
            start_cursor: edges.first().map(|edge| edge.cursor.clone()),
            end_cursor: edges.last().map(|edge| edge.cursor.clone()),
        };
        Ok(AuditEventConnection { edges, page_info })
    }
}
