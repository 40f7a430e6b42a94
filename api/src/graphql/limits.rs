//! Limits enforced inside the GraphQL layer, so HTTP and WebSocket share them: request rate
//! (per user and per client address), operation size, aliases, depth (introspection measured on
//! its own allowance, so the playground's schema query passes), directives, and the directory
//! calls one operation may cause. Complexity (lists weighted by their `first`) is async-graphql's
//! own rule, configured in [`super::build_schema`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextExecute, NextParseQuery, NextPrepareRequest,
};
use async_graphql::parser::types::{ExecutableDocument, OperationType, Selection, SelectionSet};
use async_graphql::{Name, Positioned, Request, Response, ServerError, ServerResult, Variables};

use super::Caller;
use crate::domain::CallBudget;
use crate::ratelimit::{TokenBuckets, retry_after_seconds};

/// The client's network address, attached by the transport.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddress(pub IpAddr);

/// Attached to requests that arrived by HTTP GET: only queries may run, and whether the
/// document tried something else is recorded for the transport (which answers 405).
#[derive(Debug, Clone, Default)]
pub struct ReadOnly(Arc<AtomicBool>);

impl ReadOnly {
    /// Whether the document held a mutation or subscription and was refused.
    pub fn was_refused(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// How much one operation may ask for.
#[derive(Debug, Clone, Copy)]
pub struct OperationLimits {
    /// Largest operation text, in bytes.
    pub max_query_bytes: usize,
    /// Most aliased fields in one document.
    pub max_aliases: usize,
    /// Deepest selection outside introspection.
    pub max_depth: usize,
    /// Deepest selection inside `__schema` / `__type` (GraphiQL's own query needs about 15).
    pub max_introspection_depth: usize,
    /// Most directives in one document.
    pub max_directives: usize,
    /// Directory provider calls one operation may cause.
    pub directory_calls_per_operation: u32,
}

/// Installs the limits on a schema (one instance shared by every request of this node).
pub struct Limiter {
    limits: OperationLimits,
    users: Arc<TokenBuckets>,
    addresses: Arc<TokenBuckets>,
}

impl Limiter {
    /// Limits plus the node's request buckets.
    pub fn new(limits: OperationLimits, users: TokenBuckets, addresses: TokenBuckets) -> Self {
        Self {
            limits,
            users: Arc::new(users),
            addresses: Arc::new(addresses),
        }
    }
}

impl ExtensionFactory for Limiter {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(LimiterExtension {
            limits: self.limits,
            users: self.users.clone(),
            addresses: self.addresses.clone(),
            field_order: Mutex::new(HashMap::new()),
        })
    }
}

struct LimiterExtension {
    limits: OperationLimits,
    users: Arc<TokenBuckets>,
    addresses: Arc<TokenBuckets>,
    /// Each operation's top-level response keys in document order (one extension instance
    /// serves one request).
    field_order: Mutex<HashMap<Option<String>, Vec<String>>>,
}

/// A refusal with its code, shaped like every other error the gateway returns.
pub(crate) fn refusal(
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
) -> ServerError {
    let mut error = ServerError::new(message, None);
    let extensions = error.extensions.get_or_insert_with(Default::default);
    extensions.set("code", code);
    if let Some(seconds) = retry_after {
        extensions.set("retryAfterSeconds", seconds);
    }
    error
}

#[async_trait::async_trait]
impl Extension for LimiterExtension {
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        mut request: Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<Request> {
        // A fresh allowance per operation, on either transport.
        request = request.data(CallBudget::new(self.limits.directory_calls_per_operation));
        next.run(ctx, request).await
    }

    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        // Rate first: a refused request costs nothing more.
        if let Some(ClientAddress(address)) = ctx.data_opt::<ClientAddress>()
            && let Err(wait) = self.addresses.take(&address.to_string())
        {
            let seconds = retry_after_seconds(wait);
            return Err(refusal(
                "RATE_LIMITED",
                format!(
                    "too many requests from your network address; wait {seconds} s and try again"
                ),
                Some(seconds),
            ));
        }
        if let Some(Caller(Some(principal))) = ctx.data_opt::<Caller>()
            && let Err(wait) = self.users.take(&principal.user_id)
        {
            let seconds = retry_after_seconds(wait);
            return Err(refusal(
                "RATE_LIMITED",
                format!("too many requests from your login; wait {seconds} s and try again"),
                Some(seconds),
            ));
        }
        if query.len() > self.limits.max_query_bytes {
            return Err(refusal(
                "BAD_USER_INPUT",
                format!(
                    "the operation is {} bytes; at most {} are allowed",
                    query.len(),
                    self.limits.max_query_bytes
                ),
                None,
            ));
        }
        let document = next.run(ctx, query, variables).await?;
        if let Some(read_only) = ctx.data_opt::<ReadOnly>()
            && document
                .operations
                .iter()
                .any(|(_, operation)| operation.node.ty != OperationType::Query)
        {
            read_only.0.store(true, Ordering::Release);
            return Err(refusal(
                "BAD_USER_INPUT",
                "mutations and subscriptions must be sent with POST".into(),
                None,
            ));
        }
        let shape = Shape::of(&document);
        if shape.fields > MAX_EXPANDED_FIELDS {
            return Err(refusal(
                "BAD_USER_INPUT",
                format!(
                    "the document expands to more than {MAX_EXPANDED_FIELDS} fields (each fragment counts wherever it is spread); ask for less"
                ),
                None,
            ));
        }
        let limits = &self.limits;
        let checks = [
            (
                shape.aliases,
                limits.max_aliases,
                "the document uses {n} aliases; at most {max} are allowed",
            ),
            (
                shape.directives,
                limits.max_directives,
                "the document uses {n} directives; at most {max} are allowed",
            ),
            (
                shape.depth,
                limits.max_depth,
                "the query is too deep: {n} levels of fields where at most {max} are allowed",
            ),
            (
                shape.introspection_depth,
                limits.max_introspection_depth,
                "the introspection query is too deep: {n} levels where at most {max} are allowed",
            ),
        ];
        if let Some((n, max, message)) = checks.into_iter().find(|(n, max, _)| n > max) {
            let message = message
                .replace("{n}", &n.to_string())
                .replace("{max}", &max.to_string());
            return Err(refusal("BAD_USER_INPUT", message, None));
        }
        let orders = document
            .operations
            .iter()
            .map(|(name, operation)| {
                let mut keys = Vec::new();
                top_level_keys(&document, &operation.node.selection_set, &mut keys, 0);
                (name.map(|name| name.to_string()), keys)
            })
            .collect();
        *self
            .field_order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = orders;
        Ok(document)
    }

    /// The executor resolves a merged root object area by area, so top-level fields would come
    /// back grouped by area; the specification wants them in document order.
    async fn execute(
        &self,
        ctx: &ExtensionContext<'_>,
        operation_name: Option<&str>,
        next: NextExecute<'_>,
    ) -> Response {
        let mut response = next.run(ctx, operation_name).await;
        let order = {
            let orders = self
                .field_order
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match operation_name {
                Some(name) => orders.get(&Some(name.to_owned())).cloned(),
                // Without a name, the document has exactly one operation.
                None => orders.values().next().cloned(),
            }
        };
        if let (Some(order), async_graphql::Value::Object(data)) = (order, &mut response.data) {
            let mut sorted = async_graphql::indexmap::IndexMap::with_capacity(data.len());
            for key in order {
                let name = Name::new(key);
                if let Some(value) = data.shift_remove(&name) {
                    sorted.insert(name, value);
                }
            }
            sorted.extend(std::mem::take(data));
            *data = sorted;
        }
        response
    }
}

/// The response keys of a selection set in document order, fragments expanded in place.
fn top_level_keys(
    document: &ExecutableDocument,
    set: &Positioned<SelectionSet>,
    keys: &mut Vec<String>,
    fragment_nesting: usize,
) {
    for item in &set.node.items {
        match &item.node {
            Selection::Field(field) => {
                let key = field.node.response_key().node.to_string();
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
            Selection::InlineFragment(fragment) => {
                top_level_keys(
                    document,
                    &fragment.node.selection_set,
                    keys,
                    fragment_nesting,
                );
            }
            Selection::FragmentSpread(spread) => {
                if fragment_nesting < 8
                    && let Some(fragment) = document.fragments.get(&spread.node.fragment_name.node)
                {
                    top_level_keys(
                        document,
                        &fragment.node.selection_set,
                        keys,
                        fragment_nesting + 1,
                    );
                }
            }
        }
    }
}

/// What a document asks for, counted through fragments (each fragment counted where it is
/// spread, so spreading one fragment many times cannot hide aliases).
#[derive(Debug, Default, PartialEq, Eq)]
struct Shape {
    aliases: usize,
    directives: usize,
    depth: usize,
    introspection_depth: usize,
    /// Fields visited with every fragment expanded where it is spread.
    fields: usize,
}

/// The walk stops expanding after this many fields: fragments spreading fragments many times
/// over would otherwise cost exponential time to count. Such a document is refused.
const MAX_EXPANDED_FIELDS: usize = 5_000;

impl Shape {
    fn of(document: &ExecutableDocument) -> Self {
        let mut shape = Shape::default();
        for (_, operation) in document.operations.iter() {
            shape.directives += operation.node.directives.len();
            walk(
                document,
                &operation.node.selection_set,
                1,
                None,
                &mut Vec::new(),
                &mut shape,
            );
        }
        shape
    }
}

/// `introspection_from` is the depth at which a `__schema`/`__type` field started, if inside one.
fn walk(
    document: &ExecutableDocument,
    set: &Positioned<SelectionSet>,
    depth: usize,
    introspection_from: Option<usize>,
    fragment_path: &mut Vec<String>,
    shape: &mut Shape,
) {
    for item in &set.node.items {
        if shape.fields > MAX_EXPANDED_FIELDS {
            return;
        }
        match &item.node {
            Selection::Field(field) => {
                let field = &field.node;
                shape.fields += 1;
                shape.aliases += usize::from(field.alias.is_some());
                shape.directives += field.directives.len();
                let name = field.name.node.as_str();
                let inside = introspection_from
                    .or((name == "__schema" || name == "__type").then_some(depth));
                match inside {
                    Some(start) => {
                        shape.introspection_depth =
                            shape.introspection_depth.max(depth - start + 1);
                    }
                    None => shape.depth = shape.depth.max(depth),
                }
                walk(
                    document,
                    &field.selection_set,
                    depth + 1,
                    inside,
                    fragment_path,
                    shape,
                );
            }
            Selection::InlineFragment(fragment) => {
                shape.directives += fragment.node.directives.len();
                walk(
                    document,
                    &fragment.node.selection_set,
                    depth,
                    introspection_from,
                    fragment_path,
                    shape,
                );
            }
            Selection::FragmentSpread(spread) => {
                shape.directives += spread.node.directives.len();
                let name = spread.node.fragment_name.node.as_str();
                if fragment_path.iter().any(|seen| seen == name) {
                    // A cycle (validation refuses it too); never follow it.
                    shape.fields = MAX_EXPANDED_FIELDS + 1;
                    return;
                }
                if let Some(fragment) = document.fragments.get(&spread.node.fragment_name.node) {
                    shape.directives += fragment.node.directives.len();
                    fragment_path.push(name.to_owned());
                    walk(
                        document,
                        &fragment.node.selection_set,
                        depth,
                        introspection_from,
                        fragment_path,
                        shape,
                    );
                    fragment_path.pop();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(query: &str) -> Shape {
        Shape::of(&async_graphql::parser::parse_query(query).unwrap())
    }

    #[test]
    fn aliases_are_counted_through_every_spread_of_a_fragment() {
        let counted =
            shape("query { ...F ...F ...F } fragment F on Query { a: me { id } b: me { id } }");
        assert_eq!(counted.aliases, 6);
    }

    #[test]
    fn depth_counts_fields_not_fragments() {
        assert_eq!(shape("{ me { id } }").depth, 2);
        assert_eq!(
            shape("{ ... on Query { me { ...U } } } fragment U on Me { id }").depth,
            2
        );
    }

    #[test]
    fn introspection_is_measured_on_its_own() {
        let counted = shape(
            "{ me { id } __schema { types { fields { type { ofType { ofType { ofType { name } } } } } } } }",
        );
        assert_eq!(counted.depth, 2);
        assert_eq!(counted.introspection_depth, 8);
    }

    #[test]
    fn a_fragment_cycle_is_refused_instead_of_followed() {
        let counted =
            shape("{ ...A } fragment A on Query { me { id } ...B } fragment B on Query { ...A }");
        assert!(counted.fields > MAX_EXPANDED_FIELDS);
    }

    #[test]
    fn fragments_that_multiply_stop_being_counted_early() {
        // Each level spreads the next ten times: 10^8 fields if expanded fully.
        let mut query = String::from("{ ...F0 }");
        for level in 0..8 {
            let spreads = format!("...F{} ", level + 1).repeat(10);
            query.push_str(&format!(" fragment F{level} on Query {{ {spreads} }}"));
        }
        query.push_str(" fragment F8 on Query { me { id } }");
        let counted = shape(&query);
        assert!(counted.fields > MAX_EXPANDED_FIELDS);
    }

    #[test]
    fn directives_are_counted_everywhere() {
        let counted = shape("query Q @a { me @b { id @c } ... on Query @d { me { id } } }");
        assert_eq!(counted.directives, 4);
    }
}
