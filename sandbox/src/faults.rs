//! Injected faults: the queue of faults a namespace has asked for, matching a provider call
//! against it, and the answer a triggered fault gives instead of the normal one.
//!
//! Faults are taken from the queue while the namespace lock is held, and answered after it is
//! released: a timeout fault sleeps, and nothing may sleep holding the lock.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::provider::{Provider, ProviderError, ProviderErrorCode};

/// The longest a timeout fault may hold a request, in real seconds.
const LONGEST_HOLD_SECONDS: u64 = 300;

/// The body a malformed fault answers with: JSON cut off mid-value.
const TRUNCATED_JSON_BODY: &str = r#"{"status":"ACTIVE","registeredAt":"20"#;

/// What a fault does to the call it hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FaultKind {
    ServerError,
    RateLimited,
    Timeout,
    Malformed,
}

/// Which provider route a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum FaultRoute {
    Registrations,
    Account,
    Sessions,
    Enrolments,
    #[serde(rename = "*")]
    Every,
}

impl FaultRoute {
    fn as_str(self) -> &'static str {
        match self {
            FaultRoute::Registrations => "registrations",
            FaultRoute::Account => "account",
            FaultRoute::Sessions => "sessions",
            FaultRoute::Enrolments => "enrolments",
            FaultRoute::Every => "*",
        }
    }

    fn exists_at(self, provider: Provider) -> bool {
        matches!(
            (self, provider),
            (FaultRoute::Every | FaultRoute::Account, _)
                | (FaultRoute::Registrations, Provider::Argus)
                | (
                    FaultRoute::Sessions | FaultRoute::Enrolments,
                    Provider::ReferralNet
                )
        )
    }

    fn matches(self, route: FaultRoute) -> bool {
        self == FaultRoute::Every || self == route
    }
}

/// A request to inject a fault, as `POST /_sandbox/faults` receives it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct FaultRequest {
    provider: Provider,
    route: FaultRoute,
    kind: FaultKind,
    count: u32,
    status: Option<u16>,
    retry_after_seconds: Option<u64>,
    hold_seconds: Option<u64>,
}

/// A fault waiting in the queue, as the control API shows it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Fault {
    id: String,
    provider: Provider,
    route: FaultRoute,
    kind: FaultKind,
    /// How many more calls this fault will hit.
    count: u32,
    status: u16,
    retry_after_seconds: u64,
    hold_seconds: u64,
}

impl Fault {
    /// Checks a fault request; the message says what to fix.
    pub(crate) fn from_request(request: FaultRequest) -> Result<Fault, String> {
        if !request.route.exists_at(request.provider) {
            return Err(format!(
                "{} has no route {:?}",
                request.provider.as_str(),
                request.route.as_str()
            ));
        }
        if request.count == 0 {
            return Err("count must be at least 1".to_owned());
        }
        let status = request.status.unwrap_or(503);
        if !(500..=599).contains(&status) {
            return Err(format!("status must be from 500 to 599, got {status}"));
        }
        let hold_seconds = request.hold_seconds.unwrap_or(30);
        if hold_seconds > LONGEST_HOLD_SECONDS {
            return Err(format!(
                "holdSeconds must be at most {LONGEST_HOLD_SECONDS}, got {hold_seconds}"
            ));
        }
        Ok(Fault {
            id: Uuid::new_v4().to_string(),
            provider: request.provider,
            route: request.route,
            kind: request.kind,
            count: request.count,
            status,
            retry_after_seconds: request.retry_after_seconds.unwrap_or(30),
            hold_seconds,
        })
    }
}

/// The faults of one namespace, in the order they were added.
#[derive(Clone, Debug, Default)]
pub(crate) struct FaultQueue {
    faults: Vec<Fault>,
}

impl FaultQueue {
    /// Adds a fault behind those already waiting.
    pub(crate) fn add(&mut self, fault: Fault) {
        self.faults.push(fault);
    }

    /// The faults still waiting, oldest first.
    pub(crate) fn remaining(&self) -> &[Fault] {
        &self.faults
    }

    /// Removes every waiting fault.
    pub(crate) fn clear(&mut self) {
        self.faults.clear();
    }

    /// Uses up one hit of the oldest fault matching this call, if any.
    pub(crate) fn take_matching(
        &mut self,
        provider: Provider,
        route: FaultRoute,
    ) -> Option<TriggeredFault> {
        let position = self
            .faults
            .iter()
            .position(|fault| fault.provider == provider && fault.route.matches(route))?;
        let fault = &mut self.faults[position];
        fault.count -= 1;
        let triggered = TriggeredFault {
            provider,
            kind: fault.kind,
            status: fault.status,
            retry_after_seconds: fault.retry_after_seconds,
            hold_seconds: fault.hold_seconds,
        };
        if fault.count == 0 {
            self.faults.remove(position);
        }
        Some(triggered)
    }
}

/// A fault that hit a call, to be answered once the namespace lock is released.
#[derive(Debug)]
pub(crate) struct TriggeredFault {
    provider: Provider,
    kind: FaultKind,
    status: u16,
    retry_after_seconds: u64,
    hold_seconds: u64,
}

impl TriggeredFault {
    /// The answer the call gets instead of its normal one.
    pub(crate) async fn respond(self) -> Response {
        tracing::info!(provider = self.provider.as_str(), kind = ?self.kind, "injected fault hit a call");
        match self.kind {
            FaultKind::ServerError => {
                let status =
                    StatusCode::from_u16(self.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                self.unavailable(
                    status,
                    "the service is temporarily unavailable (injected fault)",
                )
                .into_response()
            }
            FaultKind::RateLimited => {
                let mut response = self
                    .unavailable(
                        StatusCode::TOO_MANY_REQUESTS,
                        format!(
                            "too many requests; retry after {} seconds (injected fault)",
                            self.retry_after_seconds
                        ),
                    )
                    .into_response();
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(self.retry_after_seconds),
                );
                response
            }
            FaultKind::Timeout => {
                tokio::time::sleep(Duration::from_secs(self.hold_seconds)).await;
                self.unavailable(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the service did not answer in time (injected fault)",
                )
                .into_response()
            }
            FaultKind::Malformed => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                TRUNCATED_JSON_BODY,
            )
                .into_response(),
        }
    }

    fn unavailable(&self, status: StatusCode, message: impl Into<String>) -> ProviderError {
        ProviderError::new(
            self.provider,
            status,
            ProviderErrorCode::ServiceTemporaryUnavailable,
            message,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(provider: Provider, route: FaultRoute, kind: FaultKind, count: u32) -> Fault {
        Fault::from_request(FaultRequest {
            provider,
            route,
            kind,
            count,
            status: None,
            retry_after_seconds: None,
            hold_seconds: None,
        })
        .unwrap()
    }

    #[test]
    fn faults_hit_matching_calls_in_the_order_they_were_added_until_used_up() {
        let mut queue = FaultQueue::default();
        queue.add(fault(
            Provider::Argus,
            FaultRoute::Account,
            FaultKind::Malformed,
            1,
        ));
        queue.add(fault(
            Provider::Argus,
            FaultRoute::Every,
            FaultKind::ServerError,
            1,
        ));

        let kind_of = |triggered: Option<TriggeredFault>| triggered.map(|fault| fault.kind);
        assert_eq!(
            kind_of(queue.take_matching(Provider::ReferralNet, FaultRoute::Account)),
            None
        );
        assert_eq!(
            kind_of(queue.take_matching(Provider::Argus, FaultRoute::Account)),
            Some(FaultKind::Malformed)
        );
        assert_eq!(
            kind_of(queue.take_matching(Provider::Argus, FaultRoute::Account)),
            Some(FaultKind::ServerError)
        );
        assert_eq!(
            kind_of(queue.take_matching(Provider::Argus, FaultRoute::Account)),
            None
        );
        assert!(queue.remaining().is_empty());
    }

    #[test]
    fn a_fault_on_a_route_the_provider_lacks_is_refused() {
        let request = FaultRequest {
            provider: Provider::Argus,
            route: FaultRoute::Sessions,
            kind: FaultKind::Timeout,
            count: 1,
            status: None,
            retry_after_seconds: None,
            hold_seconds: None,
        };
        assert_eq!(
            Fault::from_request(request).unwrap_err(),
            r#"argus has no route "sessions""#
        );
    }
}
