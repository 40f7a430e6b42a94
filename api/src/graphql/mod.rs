//! The GraphQL API: schema assembly and thin resolvers. The only module that knows
//! async-graphql. Resolvers take the principal, parse input into domain types, call a service
//! and map the result; errors leave only through [`error::ApiError`].

mod audit;
mod credits;
mod delegations;
pub mod error;
mod integrations;
pub mod limits;
mod me;
mod messaging;
pub(crate) use messaging::SubscribedAt;
mod types;

use std::time::Duration;

use async_graphql::{Context, MergedObject, MergedSubscription, Schema, SchemaBuilder};

use crate::domain::audit::Principal;
use crate::domain::integrations::IntegrationService;
use crate::events::EventBus;
use crate::store::Store;
use error::ApiError;

/// The executable schema.
pub type AppSchema = Schema<Query, Mutation, Subscription>;

/// Read operations.
#[derive(MergedObject, Default)]
pub struct Query(
    me::MeQuery,
    integrations::IntegrationQuery,
    credits::CreditsQuery,
    messaging::MessagingQuery,
    delegations::DelegationQuery,
    audit::AuditQuery,
);

/// Write operations.
#[derive(MergedObject, Default)]
pub struct Mutation(
    integrations::IntegrationMutation,
    credits::CreditsMutation,
    messaging::MessagingMutation,
    delegations::DelegationMutation,
);

/// Live updates over WebSocket (graphql-transport-ws; send the token in `connection_init`).
#[derive(MergedSubscription, Default)]
pub struct Subscription(
    integrations::IntegrationSubscription,
    messaging::MessagingSubscription,
);

/// The schema's shape without any data attached: enough to export the SDL.
pub fn schema_builder() -> SchemaBuilder<Query, Mutation, Subscription> {
    Schema::build(
        Query::default(),
        Mutation::default(),
        Subscription::default(),
    )
}

/// The SDL, as checked in at `schema.graphql`.
pub fn sdl() -> String {
    schema_builder().finish().sdl()
}

/// What resolvers need.
#[derive(Clone)]
pub struct Services {
    /// Integration rules.
    pub integrations: IntegrationService,
    /// Credit rules.
    pub credits: crate::domain::credits::CreditService,
    /// Messaging rules.
    pub messaging: crate::domain::messaging::MessagingService,
    /// Storage (for read models such as the audit trail).
    pub store: Store,
    /// Change notifications (what subscriptions wait on).
    pub events: EventBus,
}

/// Limits applied to every operation, on every transport.
pub struct Limits {
    /// Size, aliases, depth, directives, directory calls.
    pub operation: limits::OperationLimits,
    /// Maximum complexity (a list's children count once per item its `first` asks for).
    pub max_complexity: usize,
    /// Whether introspection is answered.
    pub introspection: bool,
    /// Request buckets per user (this node's).
    pub user_requests: crate::ratelimit::TokenBuckets,
    /// Request buckets per client address (this node's).
    pub address_requests: crate::ratelimit::TokenBuckets,
}

/// The schema with services and limits.
pub fn build_schema(services: Services, limits: Limits) -> AppSchema {
    let mut builder = schema_builder()
        .data(services.integrations.clone())
        .data(services)
        .data(messaging::SharedReads::default())
        .extension(limits::Limiter::new(
            limits.operation,
            limits.user_requests,
            limits.address_requests,
        ))
        // Depth is measured by the limiter, which gives introspection its own allowance.
        .limit_complexity(limits.max_complexity)
        .limit_recursive_depth(32)
        .limit_directives(10);
    if !limits.introspection {
        builder = builder.disable_introspection().disable_suggestions();
    }
    builder.finish()
}

/// The caller of one request, attached by the HTTP layer after verifying the token.
#[derive(Clone, Debug)]
pub struct Caller(pub Option<Principal>);

/// The operation's name, for logs and metrics: `operationName` when the client sent one, else
/// the name of a document that starts with a named operation (`query Name …`), read without
/// parsing the whole document. `None` for anonymous operations.
pub(crate) fn operation_name(request: &async_graphql::Request) -> Option<&str> {
    if let Some(name) = request.operation_name.as_deref() {
        return Some(name);
    }
    let mut rest = request.query.as_str();
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ',' || c == '\u{feff}');
        match rest.strip_prefix('#') {
            Some(comment) => rest = comment.split_once('\n').map_or("", |(_, after)| after),
            None => break,
        }
    }
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let rest = ["query", "mutation", "subscription"]
        .iter()
        .find_map(|keyword| rest.strip_prefix(keyword))
        .filter(|rest| !rest.starts_with(is_name_char))?;
    let rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
    let name = &rest[..rest.find(|c: char| !is_name_char(c)).unwrap_or(rest.len())];
    (!name.is_empty()).then_some(name)
}

/// The authenticated caller, or `UNAUTHENTICATED`.
pub(crate) fn principal<'a>(ctx: &'a Context<'_>) -> Result<&'a Principal, ApiError> {
    match ctx.data_opt::<Caller>() {
        // A WebSocket outlives its token: operations after `exp` (plus the leeway the token
        // was verified with, as for HTTP) are refused.
        Some(Caller(Some(principal))) if principal.is_honoured_at(chrono::Utc::now()) => {
            Ok(principal)
        }
        Some(Caller(Some(_))) => Err(ApiError::new(
            "UNAUTHENTICATED",
            "the bearer token has expired (including the allowed clock skew); get a fresh one, and on a WebSocket reconnect with it",
        )),
        _ => Err(ApiError::unauthenticated()),
    }
}

/// Completes when the principal's token stops being honoured (a subscription then ends; the
/// WebSocket closes the connection at the same moment).
pub(crate) async fn token_expiry(principal: &Principal) {
    let left = (principal.expires_at - chrono::Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO);
    tokio::time::sleep(left).await;
}

pub(crate) fn services<'a>(ctx: &'a Context<'_>) -> &'a Services {
    ctx.data_unchecked::<Services>()
}

#[cfg(test)]
mod tests {
    use super::operation_name;

    #[test]
    fn the_operation_name_comes_from_operation_name_or_the_documents_first_operation() {
        let name = |query: &str, given: Option<&str>| {
            let mut request = async_graphql::Request::new(query);
            if let Some(given) = given {
                request = request.operation_name(given);
            }
            operation_name(&request).map(str::to_owned)
        };
        assert_eq!(
            name("{ me { id } }", Some("Given")).as_deref(),
            Some("Given")
        );
        assert_eq!(name("query Me { me { id } }", None).as_deref(), Some("Me"));
        assert_eq!(
            name("# a comment\n  mutation\tLink_1($x: Int) { a }", None).as_deref(),
            Some("Link_1")
        );
        assert_eq!(name("subscription{ a }", None), None);
        assert_eq!(name("{ me { id } }", None), None);
        assert_eq!(name("queryX { a }", None), None);
        assert_eq!(
            name("fragment F on Me { id } query Later { a }", None),
            None
        );
    }
}
