//! Audit events: who did what to which target, with what outcome, under which request id.
//! Never the clinical content, never a password.

use crate::domain::types::Role;

/// How an audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome {
    /// It happened.
    Success,
    /// It was attempted and failed (provider said no, provider down, bad input).
    Failure,
    /// It was refused by a rule (role, rate limit, state).
    Denied,
}

impl AuditOutcome {
    /// Storage code.
    pub fn code(self) -> &'static str {
        match self {
            AuditOutcome::Success => "SUCCESS",
            AuditOutcome::Failure => "FAILURE",
            AuditOutcome::Denied => "DENIED",
        }
    }

    /// Parses a storage code.
    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "SUCCESS" => Some(AuditOutcome::Success),
            "FAILURE" => Some(AuditOutcome::Failure),
            "DENIED" => Some(AuditOutcome::Denied),
            _ => None,
        }
    }
}

/// Action names recorded in the trail (stable: administrators filter on them).
pub mod actions {
    /// An existing provider account became the group's account.
    pub const LINK_GROUP_ACCOUNT: &str = "LINK_GROUP_ACCOUNT";
    /// A practitioner linked individually.
    pub const LINK_INDIVIDUAL: &str = "LINK_INDIVIDUAL";
    /// A new provider account was registered.
    pub const REGISTER_ACCOUNT: &str = "REGISTER_ACCOUNT";
    /// The provider decided a registration (actor: the gateway).
    pub const REGISTRATION_DECIDED: &str = "REGISTRATION_DECIDED";
    /// Stored credentials were checked against the provider.
    pub const VALIDATE_LOGIN: &str = "VALIDATE_LOGIN";
    /// A practitioner's individual link was removed.
    pub const DISCONNECT_INDIVIDUAL: &str = "DISCONNECT_INDIVIDUAL";
    /// The group account (and every link to it) was removed.
    pub const DISCONNECT_GROUP_ACCOUNT: &str = "DISCONNECT_GROUP_ACCOUNT";
    /// A practitioner set or changed their HPI-I, or was refused one another user holds.
    pub const SET_HPII: &str = "SET_HPII";
}

/// The authenticated caller, as provisioned from a verified token.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Internal user id.
    pub user_id: String,
    /// The token's `sub`.
    pub subject: String,
    /// The token's `group`: every query is scoped by it.
    pub group_id: String,
    /// The token's `role`.
    pub role: Role,
    /// The token's `name`.
    pub name: String,
    /// The id of the HTTP request (or WebSocket connection) this principal arrived with.
    pub request_id: String,
    /// When this identity stops being honoured: the token's `exp` plus the configured leeway
    /// (see `auth`). HTTP requests and WebSocket operations both check it through
    /// [`Principal::is_honoured_at`].
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

impl Principal {
    /// Whether the token behind this principal still counts at `now`.
    pub fn is_honoured_at(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        now < self.expires_at
    }
}

/// One audit event before it is stored.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    /// The group it belongs to.
    pub group_id: String,
    /// Internal id of the acting user; `None` when the gateway itself acted.
    pub actor_user_id: Option<String>,
    /// The acting user's `sub`, or `gateway`.
    pub actor_subject: String,
    /// One of [`actions`].
    pub action: String,
    /// What was acted on, e.g. `provider:ARGUS`.
    pub target: String,
    /// How it ended.
    pub outcome: AuditOutcome,
    /// A short, safe explanation (an error code, a status); never secrets or clinical text.
    pub detail: Option<String>,
    /// Correlates with logs.
    pub request_id: String,
    /// The practitioner (their `sub`) the actor acted for under a sending delegation; `None`
    /// when the actor acted in their own name.
    pub on_behalf_of: Option<String>,
}

impl AuditEntry {
    /// An event caused by a user.
    pub fn by(principal: &Principal, action: &str, target: String, outcome: AuditOutcome) -> Self {
        Self {
            group_id: principal.group_id.clone(),
            actor_user_id: Some(principal.user_id.clone()),
            actor_subject: principal.subject.clone(),
            action: action.to_owned(),
            target,
            outcome,
            detail: None,
            request_id: principal.request_id.clone(),
            on_behalf_of: None,
        }
    }

    /// An event caused by the gateway's own background work.
    pub fn by_gateway(group_id: &str, action: &str, target: String, outcome: AuditOutcome) -> Self {
        Self {
            group_id: group_id.to_owned(),
            actor_user_id: None,
            actor_subject: "gateway".to_owned(),
            action: action.to_owned(),
            target,
            outcome,
            detail: None,
            request_id: uuid::Uuid::new_v4().to_string(),
            on_behalf_of: None,
        }
    }

    /// Names the practitioner the actor acted for (a delegated send, preview or note read).
    pub fn on_behalf_of(mut self, practitioner_subject: Option<&str>) -> Self {
        self.on_behalf_of = practitioner_subject.map(str::to_owned);
        self
    }

    /// Adds a short, safe explanation.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}
