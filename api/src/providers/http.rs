//! What both adapters share: the client with its timeouts, and the classification of
//! transport failures, throttling and unreadable bodies.

use std::time::Duration;

use reqwest::{Response, StatusCode};
use serde::de::DeserializeOwned;

use super::{ProviderError, Unavailability};

/// One pooled client for all provider calls; no call can hang longer than `timeout`.
pub(super) fn build_client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("smd-gateway/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// Joins a configured base URL and a path without doubling slashes.
pub(super) fn endpoint(base_url: &str, path: &str) -> String {
    format!("{}{}", base_url.trim_end_matches('/'), path)
}

/// One path segment with every byte but ASCII letters, digits, `-` and `_` percent-encoded,
/// so a value from outside (a card token, an id a provider sent) can never add a segment
/// (`/`), start a query or fragment (`?`, `#`) or smuggle an escape (`%`). Empty, `.` and `..`
/// are refused without a request: URL parsers treat `%2e%2e` like `..` and climb a level.
/// (`Url::path_segments_mut` would drop a `..` segment silently and pass `%` through, so it
/// is not used.)
pub(super) fn path_segment(value: &str) -> Result<String, ProviderError> {
    if matches!(value, "" | "." | "..") {
        return Err(ProviderError::Refused {
            code: "invalid_path_segment".into(),
            message: "an identifier cannot be empty, . or ..".into(),
        });
    }
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    Ok(encoded)
}

/// Sends a request and turns the ways it can fail to answer usefully — no answer, 429, 5xx —
/// into `Unavailable`; any other answer is for the adapter to read.
pub(super) async fn dispatch(request: reqwest::RequestBuilder) -> Result<Response, ProviderError> {
    let response = request.send().await.map_err(transport_failure)?;
    match unavailable_status(&response) {
        Some(error) => Err(error),
        None => Ok(response),
    }
}

/// A request that never got an HTTP answer.
pub(super) fn transport_failure(error: reqwest::Error) -> ProviderError {
    let (kind, reason) = if error.is_timeout() {
        (Unavailability::Timeout, "timed out".to_owned())
    } else if error.is_connect() {
        (
            Unavailability::ConnectFailed,
            "could not connect".to_owned(),
        )
    } else {
        // Without the URL: it can carry a card token or a message id, and this text is logged.
        (
            Unavailability::Transport,
            format!("transport error: {}", error.without_url()),
        )
    };
    ProviderError::Unavailable {
        kind,
        reason,
        retry_after: None,
    }
}

/// 429 and 5xx: the provider is overloaded or down, try later.
pub(super) fn unavailable_status(response: &Response) -> Option<ProviderError> {
    let status = response.status();
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        return Some(ProviderError::Unavailable {
            kind: if status == StatusCode::TOO_MANY_REQUESTS {
                Unavailability::RateLimited
            } else {
                Unavailability::ServerError
            },
            reason: format!("HTTP {status}"),
            retry_after,
        });
    }
    None
}

/// Reads a JSON body; an unreadable one means the provider is not answering usefully.
pub(super) async fn read_json<T: DeserializeOwned>(response: Response) -> Result<T, ProviderError> {
    let status = response.status();
    let bytes = response.bytes().await.map_err(transport_failure)?;
    serde_json::from_slice(&bytes).map_err(|error| ProviderError::Unavailable {
        kind: Unavailability::MalformedReply,
        reason: format!("malformed body with HTTP {status}: {error}"),
        retry_after: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_segment_keeps_only_letters_digits_dash_and_underscore() {
        let segment = |value: &str| path_segment(value).unwrap();
        assert_eq!(segment("pm_sandbox_approve"), "pm_sandbox_approve");
        assert_eq!(segment("AR-00012"), "AR-00012");
        assert_eq!(segment("../charges"), "%2E%2E%2Fcharges");
        assert_eq!(segment("%2e%2e"), "%252e%252e");
        assert_eq!(segment("a?b#c d"), "a%3Fb%23c%20d");
        assert_eq!(segment("..."), "%2E%2E%2E");
        for climbing in ["", ".", ".."] {
            assert!(path_segment(climbing).is_err(), "{climbing:?}");
        }
    }
}
