//! The GraphiQL playground, served entirely from the binary: the page (on a bare `GET /graphql`
//! and `GET /playground`), its pinned production assets under `/playground/assets/{file}`
//! (vendored in `api/assets/playground/`, versions and licences in its README) and
//! `/playground/config.json`. Nothing on the page comes from another host, and every response
//! carries a Content-Security-Policy that says so to the browser.
//!
//! In dev mode the config carries a fresh demo practitioner token for GraphiQL's Headers pane;
//! in production it never does. When the playground is off, none of these routes exist.

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

/// Mints the bearer token GraphiQL's Headers pane starts with (dev mode only).
pub(crate) type DevToken = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Whether the playground is served, and what dev mode pre-fills in it.
#[derive(Clone, Default)]
pub(crate) struct Playground {
    enabled: bool,
    /// Mints the demo practitioner's bearer token; only ever set in dev mode.
    dev_token: Option<DevToken>,
}

impl Playground {
    pub(crate) fn new(enabled: bool, dev_token: Option<DevToken>) -> Self {
        Self { enabled, dev_token }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }
}

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $content_type:literal) => {
        Asset {
            name: $name,
            content_type: $content_type,
            bytes: include_bytes!(concat!("../assets/playground/", $name)),
        }
    };
}

const ASSETS: [Asset; 10] = [
    asset!("graphiql.min.js", "text/javascript; charset=utf-8"),
    asset!("graphiql.min.css", "text/css; charset=utf-8"),
    asset!("react.production.min.js", "text/javascript; charset=utf-8"),
    asset!(
        "react-dom.production.min.js",
        "text/javascript; charset=utf-8"
    ),
    asset!("playground.js", "text/javascript; charset=utf-8"),
    asset!("playground.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("LICENSE-graphiql", "text/plain; charset=utf-8"),
    asset!("LICENSE-react", "text/plain; charset=utf-8"),
    asset!("README.md", "text/markdown; charset=utf-8"),
];

const PAGE_TEMPLATE: &str = include_str!("../assets/playground/index.html");

/// Where the page's assets live.
const ASSET_PREFIX: &str = "/playground/assets/";

/// The page, with each asset's URL carrying a hash of its content: the assets can then be
/// cached for a year, and a new build's page asks for new URLs.
static PAGE: LazyLock<String> = LazyLock::new(|| {
    let mut page = PAGE_TEMPLATE.to_owned();
    for asset in &ASSETS {
        let digest = Sha256::digest(asset.bytes);
        let version: String = digest[..6]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        page = page.replace(
            &format!("{{{{{}}}}}", asset.name),
            &format!("{ASSET_PREFIX}{}?v={version}", asset.name),
        );
    }
    page
});

/// The query editor's text on a first visit.
const DEFAULT_QUERY: &str = "# SMD Gateway. Open Docs (the book icon) for every type and field.\n\
# In dev mode the Headers pane holds a demo practitioner's token (Dr Mei Chen).\n\
\n\
{\n  me {\n    id\n    name\n    role\n  }\n}\n";

/// The routes under `/playground`; none when the playground is off, so they answer 404.
pub(crate) fn router<S>(playground: &Playground) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    if !playground.enabled {
        return Router::new();
    }
    let config_source = playground.clone();
    Router::new()
        .route("/playground", get(|headers: HeaderMap| async move { page(&headers) }))
        .route(
            "/playground/config.json",
            get(move |headers: HeaderMap| {
                let playground = config_source.clone();
                async move { config(&playground, &headers) }
            }),
        )
        .route(
            "/playground/assets/{file}",
            get(|Path(file): Path<String>, headers: HeaderMap| async move {
                asset(&file, &headers)
            }),
        )
}

/// The playground's HTML page.
pub(crate) fn page(request_headers: &HeaderMap) -> Response {
    let mut response = (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page names the current assets; always ask again for it.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE.as_str(),
    )
        .into_response();
    protect(response.headers_mut(), request_headers);
    response
}

fn asset(file: &str, request_headers: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|asset| asset.name == file) else {
        return (StatusCode::NOT_FOUND, "no such playground asset").into_response();
    };
    let mut response = (
        [
            (header::CONTENT_TYPE, asset.content_type),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        asset.bytes,
    )
        .into_response();
    protect(response.headers_mut(), request_headers);
    response
}

fn config(playground: &Playground, request_headers: &HeaderMap) -> Response {
    let headers = playground
        .dev_token
        .as_ref()
        .and_then(|mint| mint())
        .map(|token| serde_json::json!({ "Authorization": format!("Bearer {token}") }));
    let body = serde_json::json!({
        "endpoint": "/graphql",
        "subscriptionPath": "/graphql/ws",
        "defaultQuery": DEFAULT_QUERY,
        "headers": headers,
    });
    let mut response = (
        [
            (header::CONTENT_TYPE, "application/json"),
            // It may hold a token.
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response();
    protect(response.headers_mut(), request_headers);
    response
}

/// The Content-Security-Policy and companions that every playground response carries.
fn protect(headers: &mut HeaderMap, request_headers: &HeaderMap) {
    if let Ok(policy) = HeaderValue::from_str(&content_security_policy(request_headers)) {
        headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// Only this gateway: scripts and styles from files it serves (no inline script), the fonts
/// GraphiQL's stylesheet carries as data URLs, and connections to itself — over HTTP, and the
/// WebSocket of the same host, which older browsers do not count as 'self'.
fn content_security_policy(request_headers: &HeaderMap) -> String {
    let own_websocket = request_headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .filter(|host| is_plain_host(host))
        .map(|host| format!(" ws://{host} wss://{host}"))
        .unwrap_or_default();
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         font-src 'self' data:; connect-src 'self'{own_websocket}; object-src 'none'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

/// A `Host` header worth echoing into a policy: a name or address and a port, nothing that
/// could end a directive or add a source.
fn is_plain_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_names_is_embedded_and_versioned() {
        assert!(!PAGE.contains("{{"), "a placeholder was left: {}", *PAGE);
        for reference in PAGE.split("/playground/assets/").skip(1) {
            let name = reference.split('?').next().unwrap_or_default();
            assert!(
                ASSETS.iter().any(|asset| asset.name == name),
                "the page names {name}, which is not embedded"
            );
            assert!(
                reference
                    .split('"')
                    .next()
                    .unwrap_or_default()
                    .contains("?v=")
            );
        }
    }

    #[test]
    fn the_policy_echoes_only_plain_hosts() {
        let policy_for = |host: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, HeaderValue::from_str(host).unwrap());
            content_security_policy(&headers)
        };
        assert!(
            policy_for("127.0.0.1:8080")
                .contains("connect-src 'self' ws://127.0.0.1:8080 wss://127.0.0.1:8080;")
        );
        assert!(policy_for("[::1]:8080").contains("ws://[::1]:8080"));
        let hostile = policy_for("evil.example; script-src *");
        assert!(hostile.contains("connect-src 'self';"), "{hostile}");
        assert!(!hostile.contains("evil"), "{hostile}");
    }
}
