//! Injected faults: the queue of faults a namespace has asked for, matching a call to an emulated
//! service (an SMD provider or the payment gateway) against it, and the answer a triggered fault
//! gives instead of the normal one, in that service's error shape.
//!
//! Faults are taken from the queue while the namespace lock is held, and answered after it is
//! released: a timeout fault sleeps, and nothing may sleep holding the lock.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::payments::{PaymentsError, PaymentsErrorCode};
use crate::provider::{Provider, ProviderError, ProviderErrorCode, Service};
use crate::random::NamespaceRandom;

/// The longest a timeout fault may hold a request, in real seconds.
const LONGEST_HOLD_SECONDS: u64 = 300;

/// The body a malformed fault answers with at an SMD provider: JSON cut off mid-value.
const TRUNCATED_JSON_BODY: &str = r#"{"status":"ACTIVE","registeredAt":"20"#;

/// The body a malformed fault answers with at the payment gateway: a charge cut off mid-value.
const TRUNCATED_PAYMENTS_JSON_BODY: &str = r#"{"id":"ch_sandbox","status":"succ"#;

/// What a fault does to the call it hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FaultKind {
    ServerError,
    RateLimited,
    Timeout,
    Malformed,
}

/// Which route of a service a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum FaultRoute {
    Registrations,
    Account,
    Sessions,
    Enrolments,
    /// Argus directory search.
    Directory,
    /// Argus messages: sending one and reading its status.
    Messages,
    /// Either provider's inbox: listing and acknowledging.
    Inbox,
    /// ReferralNet provider search.
    Providers,
    /// ReferralNet dispatch: sending one and reading its receipt.
    Dispatch,
    /// ReferralNet webhook settings (PUT, GET, DELETE); not the pushes themselves.
    Webhook,
    /// Both payments charge calls: creating a charge and reading one.
    Charges,
    #[serde(rename = "payment-methods")]
    PaymentMethods,
    #[serde(rename = "*")]
    Every,
}

impl FaultRoute {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FaultRoute::Registrations => "registrations",
            FaultRoute::Account => "account",
            FaultRoute::Sessions => "sessions",
            FaultRoute::Enrolments => "enrolments",
            FaultRoute::Directory => "directory",
            FaultRoute::Messages => "messages",
            FaultRoute::Inbox => "inbox",
            FaultRoute::Providers => "providers",
            FaultRoute::Dispatch => "dispatch",
            FaultRoute::Webhook => "webhook",
            FaultRoute::Charges => "charges",
            FaultRoute::PaymentMethods => "payment-methods",
            FaultRoute::Every => "*",
        }
    }

    fn exists_at(self, service: Service) -> bool {
        matches!(
            (self, service),
            (FaultRoute::Every, _)
                | (
                    FaultRoute::Account | FaultRoute::Inbox,
                    Service::Argus | Service::ReferralNet
                )
                | (
                    FaultRoute::Registrations | FaultRoute::Directory | FaultRoute::Messages,
                    Service::Argus
                )
                | (
                    FaultRoute::Sessions
                        | FaultRoute::Enrolments
                        | FaultRoute::Providers
                        | FaultRoute::Dispatch
                        | FaultRoute::Webhook,
                    Service::ReferralNet
                )
                | (
                    FaultRoute::Charges | FaultRoute::PaymentMethods,
                    Service::Payments
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
    provider: Service,
    route: FaultRoute,
    kind: FaultKind,
    count: u32,
    status: Option<u16>,
    retry_after_seconds: Option<u64>,
    hold_seconds: Option<u64>,
}

/// A fault waiting in the queue, as the control API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Fault {
    id: String,
    provider: Service,
    route: FaultRoute,
    kind: FaultKind,
    /// How many more calls this fault will hit.
    count: u32,
    status: u16,
    retry_after_seconds: u64,
    hold_seconds: u64,
}

/// What a fault answers with, checked: a 5xx status, a Retry-After, and a hold of at most
/// [`LONGEST_HOLD_SECONDS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FaultAnswer {
    pub(crate) kind: FaultKind,
    pub(crate) status: u16,
    pub(crate) retry_after_seconds: u64,
    pub(crate) hold_seconds: u64,
}

impl FaultAnswer {
    /// Checks the optional settings of a fault (defaults: status 503, Retry-After 30 s, hold
    /// 30 s); the message names the field in the control API's words.
    pub(crate) fn check(
        kind: FaultKind,
        status: Option<u16>,
        retry_after_seconds: Option<u64>,
        hold_seconds: Option<u64>,
    ) -> Result<FaultAnswer, String> {
        let status = status.unwrap_or(503);
        if !(500..=599).contains(&status) {
            return Err(format!("status must be from 500 to 599, got {status}"));
        }
        let hold_seconds = hold_seconds.unwrap_or(30);
        if hold_seconds > LONGEST_HOLD_SECONDS {
            return Err(format!(
                "holdSeconds must be at most {LONGEST_HOLD_SECONDS}, got {hold_seconds}"
            ));
        }
        Ok(FaultAnswer {
            kind,
            status,
            retry_after_seconds: retry_after_seconds.unwrap_or(30),
            hold_seconds,
        })
    }
}

/// Checks that `route` exists at `service`.
pub(crate) fn check_route(service: Service, route: FaultRoute) -> Result<(), String> {
    if route.exists_at(service) {
        Ok(())
    } else {
        Err(format!(
            "{} has no route {:?}",
            service.as_str(),
            route.as_str()
        ))
    }
}

impl Fault {
    /// Checks a fault request; the message says what to fix. The id comes from the namespace's
    /// random stream.
    pub(crate) fn from_request(
        request: FaultRequest,
        random: &mut NamespaceRandom,
    ) -> Result<Fault, String> {
        check_route(request.provider, request.route)?;
        if request.count == 0 {
            return Err("count must be at least 1".to_owned());
        }
        let answer = FaultAnswer::check(
            request.kind,
            request.status,
            request.retry_after_seconds,
            request.hold_seconds,
        )?;
        Ok(Fault::queued(
            request.provider,
            request.route,
            answer,
            request.count,
            random,
        ))
    }

    /// A fault for the next `count` matching calls (already checked).
    pub(crate) fn queued(
        provider: Service,
        route: FaultRoute,
        answer: FaultAnswer,
        count: u32,
        random: &mut NamespaceRandom,
    ) -> Fault {
        Fault {
            id: random_uuid(random),
            provider,
            route,
            kind: answer.kind,
            count,
            status: answer.status,
            retry_after_seconds: answer.retry_after_seconds,
            hold_seconds: answer.hold_seconds,
        }
    }

    fn triggered(&self, service: Service) -> TriggeredFault {
        TriggeredFault {
            service,
            kind: self.kind,
            status: self.status,
            retry_after_seconds: self.retry_after_seconds,
            hold_seconds: self.hold_seconds,
        }
    }
}

/// A version 4 UUID from the namespace's random stream.
pub(crate) fn random_uuid(random: &mut NamespaceRandom) -> String {
    uuid::Builder::from_random_bytes(random.next_generator().r#gen())
        .into_uuid()
        .to_string()
}

/// A fault that hits every matching call while the sandbox clock is in `[from, until)`
/// (scenarios: "Argus answers 503 between t1 and t2").
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct FaultWindow {
    id: String,
    provider: Service,
    route: FaultRoute,
    kind: FaultKind,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
    status: u16,
    retry_after_seconds: u64,
    hold_seconds: u64,
}

impl FaultWindow {
    /// A window (already checked: the route exists, `from` < `until`).
    pub(crate) fn new(
        provider: Service,
        route: FaultRoute,
        answer: FaultAnswer,
        (from, until): (DateTime<Utc>, DateTime<Utc>),
        random: &mut NamespaceRandom,
    ) -> FaultWindow {
        FaultWindow {
            id: random_uuid(random),
            provider,
            route,
            kind: answer.kind,
            from,
            until,
            status: answer.status,
            retry_after_seconds: answer.retry_after_seconds,
            hold_seconds: answer.hold_seconds,
        }
    }

    fn covers(&self, service: Service, route: FaultRoute, now: DateTime<Utc>) -> bool {
        self.provider == service
            && self.route.matches(route)
            && self.from <= now
            && now < self.until
    }
}

/// The faults of one namespace: counted ones in the order they were added, and windows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct FaultQueue {
    faults: Vec<Fault>,
    #[serde(default)]
    windows: Vec<FaultWindow>,
}

impl FaultQueue {
    /// Adds a fault behind those already waiting.
    pub(crate) fn add(&mut self, fault: Fault) {
        self.faults.push(fault);
    }

    /// Adds a window of sandbox time in which matching calls fail.
    pub(crate) fn add_window(&mut self, window: FaultWindow) {
        self.windows.push(window);
    }

    /// The faults still waiting, oldest first.
    pub(crate) fn remaining(&self) -> &[Fault] {
        &self.faults
    }

    /// The windows not yet over at sandbox time `now`.
    pub(crate) fn windows(&self, now: DateTime<Utc>) -> Vec<&FaultWindow> {
        self.windows
            .iter()
            .filter(|window| now < window.until)
            .collect()
    }

    /// Removes every waiting fault and window.
    pub(crate) fn clear(&mut self) {
        self.faults.clear();
        self.windows.clear();
    }

    /// Uses up one hit of the oldest counted fault matching this call, if any; else the first
    /// window covering sandbox time `now` answers it.
    pub(crate) fn take_matching(
        &mut self,
        service: Service,
        route: FaultRoute,
        now: DateTime<Utc>,
    ) -> Option<TriggeredFault> {
        let Some(position) = self
            .faults
            .iter()
            .position(|fault| fault.provider == service && fault.route.matches(route))
        else {
            return self
                .windows
                .iter()
                .find(|window| window.covers(service, route, now))
                .map(|window| TriggeredFault {
                    service,
                    kind: window.kind,
                    status: window.status,
                    retry_after_seconds: window.retry_after_seconds,
                    hold_seconds: window.hold_seconds,
                });
        };
        let fault = &mut self.faults[position];
        fault.count -= 1;
        let triggered = fault.triggered(service);
        if fault.count == 0 {
            self.faults.remove(position);
        }
        Some(triggered)
    }
}

/// A fault that hit a call, to be answered once the namespace lock is released.
#[derive(Debug)]
pub(crate) struct TriggeredFault {
    service: Service,
    kind: FaultKind,
    status: u16,
    retry_after_seconds: u64,
    hold_seconds: u64,
}

impl TriggeredFault {
    /// The answer the call gets instead of its normal one.
    pub(crate) async fn respond(self) -> Response {
        tracing::info!(service = self.service.as_str(), kind = ?self.kind, "injected fault hit a call");
        match self.kind {
            FaultKind::ServerError => {
                let status =
                    StatusCode::from_u16(self.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                self.unavailable(
                    status,
                    "the service is temporarily unavailable (injected fault)",
                )
            }
            FaultKind::RateLimited => {
                let mut response = self.unavailable(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "too many requests; retry after {} seconds (injected fault)",
                        self.retry_after_seconds
                    ),
                );
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
            }
            FaultKind::Malformed => {
                let body = match self.service {
                    Service::Argus | Service::ReferralNet => TRUNCATED_JSON_BODY,
                    Service::Payments => TRUNCATED_PAYMENTS_JSON_BODY,
                };
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    body,
                )
                    .into_response()
            }
        }
    }

    /// The service's own error for a call it could not serve: `serviceTemporaryUnavailable` at
    /// the SMD providers; `rate_limited` (429) or `processing_error` at the payment gateway.
    fn unavailable(&self, status: StatusCode, message: impl Into<String>) -> Response {
        let provider = match self.service {
            Service::Argus => Provider::Argus,
            Service::ReferralNet => Provider::ReferralNet,
            Service::Payments => {
                let code = if status == StatusCode::TOO_MANY_REQUESTS {
                    PaymentsErrorCode::RateLimited
                } else {
                    PaymentsErrorCode::ProcessingError
                };
                return PaymentsError::new(status, code, message).into_response();
            }
        };
        ProviderError::new(
            provider,
            status,
            ProviderErrorCode::ServiceTemporaryUnavailable,
            message,
        )
        .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(provider: Service, route: FaultRoute, kind: FaultKind, count: u32) -> Fault {
        Fault::from_request(
            FaultRequest {
                provider,
                route,
                kind,
                count,
                status: None,
                retry_after_seconds: None,
                hold_seconds: None,
            },
            &mut NamespaceRandom::from_entropy(),
        )
        .unwrap()
    }

    #[test]
    fn faults_hit_matching_calls_in_the_order_they_were_added_until_used_up() {
        let now = Utc::now();
        let mut queue = FaultQueue::default();
        queue.add(fault(
            Service::Argus,
            FaultRoute::Account,
            FaultKind::Malformed,
            1,
        ));
        queue.add(fault(
            Service::Argus,
            FaultRoute::Every,
            FaultKind::ServerError,
            1,
        ));

        let kind_of = |triggered: Option<TriggeredFault>| triggered.map(|fault| fault.kind);
        assert_eq!(
            kind_of(queue.take_matching(Service::ReferralNet, FaultRoute::Account, now)),
            None
        );
        assert_eq!(
            kind_of(queue.take_matching(Service::Argus, FaultRoute::Account, now)),
            Some(FaultKind::Malformed)
        );
        assert_eq!(
            kind_of(queue.take_matching(Service::Argus, FaultRoute::Account, now)),
            Some(FaultKind::ServerError)
        );
        assert_eq!(
            kind_of(queue.take_matching(Service::Argus, FaultRoute::Account, now)),
            None
        );
        assert!(queue.remaining().is_empty());
    }

    #[test]
    fn payments_routes_exist_only_at_the_payment_gateway() {
        assert!(FaultRoute::Charges.exists_at(Service::Payments));
        assert!(FaultRoute::PaymentMethods.exists_at(Service::Payments));
        assert!(FaultRoute::Every.exists_at(Service::Payments));
        assert!(!FaultRoute::Account.exists_at(Service::Payments));
        assert!(!FaultRoute::Charges.exists_at(Service::Argus));
        assert!(!FaultRoute::PaymentMethods.exists_at(Service::ReferralNet));
    }

    #[test]
    fn messaging_routes_exist_only_at_their_provider() {
        for route in [
            FaultRoute::Directory,
            FaultRoute::Messages,
            FaultRoute::Inbox,
        ] {
            assert!(route.exists_at(Service::Argus), "{route:?}");
        }
        for route in [
            FaultRoute::Providers,
            FaultRoute::Dispatch,
            FaultRoute::Inbox,
            FaultRoute::Webhook,
        ] {
            assert!(route.exists_at(Service::ReferralNet), "{route:?}");
        }
        assert!(!FaultRoute::Messages.exists_at(Service::ReferralNet));
        assert!(!FaultRoute::Dispatch.exists_at(Service::Argus));
        assert!(!FaultRoute::Inbox.exists_at(Service::Payments));
    }

    #[test]
    fn a_fault_on_a_route_the_provider_lacks_is_refused() {
        let request = FaultRequest {
            provider: Service::Argus,
            route: FaultRoute::Sessions,
            kind: FaultKind::Timeout,
            count: 1,
            status: None,
            retry_after_seconds: None,
            hold_seconds: None,
        };
        assert_eq!(
            Fault::from_request(request, &mut NamespaceRandom::from_entropy()).unwrap_err(),
            r#"argus has no route "sessions""#
        );
    }
}
