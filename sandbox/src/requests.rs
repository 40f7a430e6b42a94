//! The recent requests each namespace's providers received (method, path without the query,
//! status, time), for a client's developers to see what their code sent and for tests to count
//! provider calls. Never bodies, headers or query strings: they carry passwords and tokens.

use std::collections::VecDeque;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use serde::{Deserialize, Serialize};

use crate::namespace::{CurrentNamespace, SandboxState};

/// Requests kept per namespace; older ones are dropped first.
const KEPT: usize = 2_000;

/// One request a provider received.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RequestRecord {
    /// `argus`, `referralnet` or `payments`.
    pub provider: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Wall-clock time, RFC 3339.
    pub at: String,
}

/// The log of one namespace.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct RequestLog {
    records: VecDeque<RequestRecord>,
}

impl RequestLog {
    fn push(&mut self, record: RequestRecord) {
        if self.records.len() >= KEPT {
            self.records.pop_front();
        }
        self.records.push_back(record);
    }

    /// Oldest first, optionally one provider's.
    pub(crate) fn list(&self, provider: Option<&str>) -> Vec<RequestRecord> {
        self.records
            .iter()
            .filter(|record| provider.is_none_or(|wanted| record.provider == wanted))
            .cloned()
            .collect()
    }
}

fn provider_of(path: &str) -> Option<&'static str> {
    ["argus", "referralnet", "payments"]
        .into_iter()
        .find(|provider| {
            path.strip_prefix('/')
                .and_then(|rest| rest.strip_prefix(provider))
                .is_some_and(|rest| rest.starts_with('/'))
        })
}

/// Middleware: records provider requests after they are answered.
pub(crate) async fn record(
    State(state): State<SandboxState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(provider) = provider_of(request.uri().path()) else {
        return next.run(request).await;
    };
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let (mut parts, body) = request.into_parts();
    let Ok(namespace) =
        <CurrentNamespace as axum::extract::FromRequestParts<SandboxState>>::from_request_parts(
            &mut parts, &state,
        )
        .await;
    let response = next.run(Request::from_parts(parts, body)).await;
    let record = RequestRecord {
        provider: provider.to_owned(),
        method,
        path,
        status: response.status().as_u16(),
        at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    namespace.with_state(|state| state.requests.push(record));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_provider_paths_are_recorded() {
        assert_eq!(provider_of("/argus/v1/account"), Some("argus"));
        assert_eq!(
            provider_of("/referralnet/api/sessions"),
            Some("referralnet")
        );
        assert_eq!(provider_of("/payments/v1/charges"), Some("payments"));
        assert_eq!(provider_of("/_sandbox/requests"), None);
        assert_eq!(provider_of("/argusx/v1"), None);
    }

    #[test]
    fn the_log_keeps_the_newest_requests() {
        let mut log = RequestLog::default();
        for index in 0..(KEPT + 5) {
            log.push(RequestRecord {
                provider: "argus".to_owned(),
                method: "GET".into(),
                path: format!("/argus/{index}"),
                status: 200,
                at: String::new(),
            });
        }
        let kept = log.list(Some("argus"));
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept[0].path, "/argus/5");
        assert!(log.list(Some("payments")).is_empty());
    }
}
