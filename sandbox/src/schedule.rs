//! A namespace's scheduled events (from a scenario): registration decisions, suspensions,
//! inbound referrals and faults, each at a sandbox time.
//!
//! Events fire when the namespace's clock has passed their time: every request runs
//! [`Schedule::take_due`] before it reads or changes the namespace, and an event takes effect
//! as of its own time (a referral is received at the event's time, a decision is made at it), so
//! what any request sees is exactly what it would see had the event fired on the dot.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::accounts::Decision;
use crate::faults::Fault;
use crate::provider::Provider;

/// What a scheduled account change does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AccountChange {
    /// Decides a pending registration: approved.
    Approve,
    /// Decides a pending registration: rejected.
    Reject,
    /// Suspends an active account.
    Suspend,
    /// Lifts a suspension.
    Reinstate,
}

impl AccountChange {
    /// The registration decision this change makes, if it is one.
    pub(crate) fn decision(self) -> Option<Decision> {
        match self {
            AccountChange::Approve => Some(Decision::Approve),
            AccountChange::Reject => Some(Decision::Reject),
            AccountChange::Suspend | AccountChange::Reinstate => None,
        }
    }
}

/// What happens when an event fires.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub(crate) enum ScheduledAction {
    /// An account changes: a registration is decided, an account suspended or reinstated.
    Account {
        provider: Provider,
        username: String,
        change: AccountChange,
    },
    /// A directory practitioner sends the account a referral (as `POST /_sandbox/inbound`).
    Inbound {
        provider: Provider,
        account: String,
        from_hpii: Option<String>,
        recipient_hpii: Option<String>,
        recipient_name: Option<String>,
        text: Option<String>,
    },
    /// A counted fault joins the queue.
    Fault { fault: Fault },
}

/// One event waiting for the clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ScheduledEvent {
    pub(crate) at: DateTime<Utc>,
    #[serde(flatten)]
    pub(crate) action: ScheduledAction,
}

/// An event that has fired, and what came of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FiredEvent {
    pub(crate) at: DateTime<Utc>,
    #[serde(flatten)]
    pub(crate) action: ScheduledAction,
    /// `done`, or why nothing happened (e.g. the registration was already decided).
    pub(crate) outcome: String,
}

/// The most fired events a namespace remembers; older ones are forgotten first.
const FIRED_KEPT: usize = 1_000;

/// A namespace's events: those waiting, in time order (ties in the order given), and those
/// that fired.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Schedule {
    pending: Vec<ScheduledEvent>,
    fired: Vec<FiredEvent>,
}

impl Schedule {
    /// A schedule of these events, sorted by time; events at the same time keep their order.
    pub(crate) fn of(mut events: Vec<ScheduledEvent>) -> Schedule {
        events.sort_by_key(|event| event.at);
        Schedule {
            pending: events,
            fired: Vec::new(),
        }
    }

    /// Whether an event is due at sandbox time `now` (cheap: it looks at the first only).
    pub(crate) fn has_due(&self, now: DateTime<Utc>) -> bool {
        self.pending.first().is_some_and(|event| event.at <= now)
    }

    /// Removes and returns the first event due by `now`.
    pub(crate) fn take_due(&mut self, now: DateTime<Utc>) -> Option<ScheduledEvent> {
        self.has_due(now).then(|| self.pending.remove(0))
    }

    /// Records what came of an event.
    pub(crate) fn record(&mut self, event: ScheduledEvent, outcome: String) {
        if self.fired.len() >= FIRED_KEPT {
            self.fired.remove(0);
        }
        self.fired.push(FiredEvent {
            at: event.at,
            action: event.action,
            outcome,
        });
    }

    /// The events still waiting, soonest first.
    pub(crate) fn pending(&self) -> &[ScheduledEvent] {
        &self.pending
    }

    /// The events that fired, in the order they fired.
    pub(crate) fn fired(&self) -> &[FiredEvent] {
        &self.fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    fn decision(at: DateTime<Utc>, username: &str) -> ScheduledEvent {
        ScheduledEvent {
            at,
            action: ScheduledAction::Account {
                provider: Provider::Argus,
                username: username.to_owned(),
                change: AccountChange::Approve,
            },
        }
    }

    fn username(event: &ScheduledEvent) -> &str {
        match &event.action {
            ScheduledAction::Account { username, .. } => username,
            _ => panic!("not an account change"),
        }
    }

    #[test]
    fn events_come_due_in_time_order_and_ties_keep_the_order_given() {
        let start = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap();
        let mut schedule = Schedule::of(vec![
            decision(start + Duration::hours(2), "late"),
            decision(start + Duration::hours(1), "first"),
            decision(start + Duration::hours(1), "second"),
        ]);
        assert!(schedule.take_due(start).is_none());
        let due_at_one = start + Duration::hours(1);
        assert_eq!(username(&schedule.take_due(due_at_one).unwrap()), "first");
        assert_eq!(username(&schedule.take_due(due_at_one).unwrap()), "second");
        assert!(schedule.take_due(due_at_one).is_none());
        assert_eq!(schedule.pending().len(), 1);
    }

    #[test]
    fn an_event_survives_a_round_trip_through_json() {
        let start = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap();
        let event = decision(start, "bondi.clinic");
        let text = serde_json::to_string(&event).unwrap();
        assert_eq!(
            text,
            r#"{"at":"2030-01-01T00:00:00Z","kind":"account","provider":"argus","username":"bondi.clinic","change":"approve"}"#
        );
        let back: ScheduledEvent = serde_json::from_str(&text).unwrap();
        assert_eq!(username(&back), "bondi.clinic");

        let answer = crate::faults::FaultAnswer::check(
            crate::faults::FaultKind::RateLimited,
            None,
            Some(120),
            None,
        )
        .unwrap();
        let fault = Fault::queued(
            crate::provider::Service::ReferralNet,
            crate::faults::FaultRoute::Dispatch,
            answer,
            2,
            &mut crate::random::NamespaceRandom::seeded(1, "default"),
        );
        let mut schedule = Schedule::of(vec![ScheduledEvent {
            at: start,
            action: ScheduledAction::Fault { fault },
        }]);
        let due = schedule.take_due(start).unwrap();
        schedule.record(due, "done".to_owned());
        let text = serde_json::to_string(&schedule).unwrap();
        let back: Schedule = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
        assert!(text.contains(r#""kind":"fault","fault":{"id":"#), "{text}");
        assert!(text.contains(r#""retryAfterSeconds":120"#), "{text}");
        assert!(text.contains(r#""outcome":"done""#), "{text}");
    }
}
