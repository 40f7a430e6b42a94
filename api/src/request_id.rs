//! Request ids: every response carries `x-request-id`, and the same id is in the request's log
//! line, its tracing span and the audit rows it writes. A client's id is kept only when it is
//! 1–64 of `A–Z a–z 0–9 - . _ :` (so it cannot break a log line or a header); otherwise, or
//! when there is none, the gateway makes a UUID.
//!
//! tower-http's `SetRequestIdLayer` keeps any id already in the header, so an unsafe one is
//! dropped first and `SetRequestIdLayer` then makes a fresh one; `PropagateRequestIdLayer` copies
//! the id to the response, whatever answered (a handler, the 404 fallback, the body limit's 413).

use axum::Router;
use axum::extract::Request;
use tower::ServiceBuilder;
use tower::util::MapRequestLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

/// The header, in requests and responses.
pub(crate) const HEADER: &str = "x-request-id";

/// Longest id kept from a client.
const MAX_LENGTH: usize = 64;

/// Whether a client's id may be kept as it is.
pub(crate) fn is_safe(value: &str) -> bool {
    (1..=MAX_LENGTH).contains(&value.len())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'))
}

/// Removes an `x-request-id` that is not safe to keep, so a fresh one replaces it.
fn drop_unsafe_request_id(mut request: Request) -> Request {
    let unsafe_id = request
        .headers()
        .get_all(HEADER)
        .iter()
        .enumerate()
        .any(|(index, value)| index > 0 || !value.to_str().is_ok_and(is_safe));
    if unsafe_id {
        request.headers_mut().remove(HEADER);
    }
    request
}

/// Wraps every route of `router` (and its fallback) so each request has a safe id and each
/// response carries it.
pub(crate) fn with_request_ids(router: Router) -> Router {
    router.layer(
        ServiceBuilder::new()
            .layer(MapRequestLayer::new(drop_unsafe_request_id))
            .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
            .layer(PropagateRequestIdLayer::x_request_id()),
    )
}

#[cfg(test)]
mod tests {
    use super::is_safe;

    #[test]
    fn only_short_plain_ids_are_kept() {
        for kept in [
            "abc",
            "0b5e9a4c-1f2d-4c3b-9e8f-000000000001",
            "trace.span:01_x",
        ] {
            assert!(is_safe(kept), "{kept:?}");
        }
        let long = "a".repeat(65);
        for replaced in [
            "",
            "a b",
            "a\nb",
            "a\r\nSet-Cookie: x",
            "ü",
            "a/b",
            "<script>",
            &long,
        ] {
            assert!(!is_safe(replaced), "{replaced:?}");
        }
    }
}
