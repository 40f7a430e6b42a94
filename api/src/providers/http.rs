//! What both adapters share: the client with its timeouts, the one dispatcher every call goes
//! through (which also reports each call to the [`CallObserver`]), and the classification of
//! transport failures, throttling and unreadable bodies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Response, StatusCode};
use serde::de::DeserializeOwned;

use super::{CallObserver, CallOutcome, ProviderError, Route, Unavailability, Upstream};

/// Whom an adapter calls and who hears about each call (metrics); cheap to clone.
#[derive(Clone)]
pub(super) struct Calls {
    upstream: Upstream,
    observer: Option<Arc<dyn CallObserver>>,
}

impl Calls {
    /// Calls to `upstream` that nobody observes (until [`Calls::observed_by`]).
    pub(super) fn new(upstream: Upstream) -> Self {
        Self {
            upstream,
            observer: None,
        }
    }

    /// Reports every call to `observer`.
    pub(super) fn observed_by(self, observer: Arc<dyn CallObserver>) -> Self {
        Self {
            observer: Some(observer),
            ..self
        }
    }
}

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
/// into `Unavailable`; any other answer is for the adapter to read. Every call is reported to
/// the observer with its route, how it ended and how long it took (never its URL or body).
pub(super) async fn dispatch(
    calls: &Calls,
    route: Route,
    request: reqwest::RequestBuilder,
) -> Result<Response, ProviderError> {
    let started = Instant::now();
    let result = request.send().await;
    if let Some(observer) = &calls.observer {
        let outcome = match &result {
            Ok(response) => outcome_of_status(response.status()),
            Err(error) if error.is_timeout() => CallOutcome::Timeout,
            Err(error) if error.is_connect() => CallOutcome::ConnectFailed,
            Err(_) => CallOutcome::TransportError,
        };
        observer.call_finished(calls.upstream, route, outcome, started.elapsed());
    }
    let response = result.map_err(transport_failure)?;
    match unavailable_status(&response) {
        Some(error) => Err(error),
        None => Ok(response),
    }
}

/// How an answered call ended, by its status alone.
fn outcome_of_status(status: StatusCode) -> CallOutcome {
    if status == StatusCode::TOO_MANY_REQUESTS {
        CallOutcome::RateLimited
    } else if status.is_server_error() {
        CallOutcome::ServerError
    } else if status.is_client_error() {
        CallOutcome::Refused
    } else {
        CallOutcome::Ok
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
    use std::sync::Mutex;

    use wiremock::matchers::path;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;

    #[derive(Default)]
    struct Recorded(Mutex<Vec<(Upstream, Route, CallOutcome)>>);

    impl CallObserver for Recorded {
        fn call_finished(
            &self,
            upstream: Upstream,
            route: Route,
            outcome: CallOutcome,
            _: Duration,
        ) {
            self.0.lock().unwrap().push((upstream, route, outcome));
        }
    }

    #[tokio::test]
    async fn the_dispatcher_reports_each_call_with_its_route_and_how_it_ended() {
        crate::install_crypto_provider();
        let server = MockServer::start().await;
        for (at, status) in [
            ("/ok", 200),
            ("/refused", 401),
            ("/busy", 429),
            ("/down", 503),
        ] {
            Mock::given(path(at))
                .respond_with(ResponseTemplate::new(status))
                .mount(&server)
                .await;
        }
        Mock::given(path("/slow"))
            .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(2)))
            .mount(&server)
            .await;
        let recorded = Arc::new(Recorded::default());
        let calls = Calls::new(Upstream::Argus).observed_by(recorded.clone());
        let client = build_client(Duration::from_millis(300)).unwrap();
        for (at, route) in [
            ("/ok", Route::Account),
            ("/refused", Route::Send),
            ("/busy", Route::Directory),
            ("/down", Route::Status),
            ("/slow", Route::Inbox),
        ] {
            let _ = dispatch(&calls, route, client.get(endpoint(&server.uri(), at))).await;
        }
        // Nothing listens on port 9 of loopback.
        let _ = dispatch(&calls, Route::Ack, client.get("http://127.0.0.1:9/")).await;
        // Nobody observing: the call still works.
        let unobserved = Calls::new(Upstream::Payments);
        let response = dispatch(
            &unobserved,
            Route::Charge,
            client.get(endpoint(&server.uri(), "/ok")),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            *recorded.0.lock().unwrap(),
            vec![
                (Upstream::Argus, Route::Account, CallOutcome::Ok),
                (Upstream::Argus, Route::Send, CallOutcome::Refused),
                (Upstream::Argus, Route::Directory, CallOutcome::RateLimited),
                (Upstream::Argus, Route::Status, CallOutcome::ServerError),
                (Upstream::Argus, Route::Inbox, CallOutcome::Timeout),
                (Upstream::Argus, Route::Ack, CallOutcome::ConnectFailed),
            ]
        );
    }

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
