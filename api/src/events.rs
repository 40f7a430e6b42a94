//! Change notifications: what subscriptions wait on instead of re-reading the database.
//!
//! An [`Event`] says *that* something changed and names it by ids only (a group, a message id);
//! a subscriber that cares re-reads through the normal, group-scoped queries, so an event can
//! never show one practice another's data.
//!
//! Where events come from:
//! - **PostgreSQL** (several nodes may share the database): triggers on the tables that
//!   subscriptions show (`m20261202_000008_change_notifications`) call `pg_notify` inside the
//!   writing transaction, so PostgreSQL delivers the event only when — and if — it commits,
//!   whichever node (or code path) made the change. Each node holds one `LISTEN` connection
//!   (`store::notify`) and hands what arrives to its local subscribers. After that connection
//!   is lost and re-established, the node publishes [`Event::Resync`] locally: every subscriber
//!   re-reads once, so nothing that committed while it was deaf is missed. Events that no
//!   trigger publishes go out through `pg_notify` on their own (see [`EventBus::publish`]).
//! - **SQLite** (one node): the services publish after their transaction commits, straight to
//!   the in-process bus.
//!
//! To add a kind of event: add a variant (with ids only), give it a `group_id`, publish it with
//! [`EventBus::publish`] after the change commits, and wait for it in the subscription with
//! [`Subscriber::next`]. If a database trigger publishes it on PostgreSQL, list it in
//! [`Event::published_by_database`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::domain::types::Provider;

/// The PostgreSQL `NOTIFY` channel every node listens on.
pub const CHANNEL: &str = "smd_changes";

/// Something changed that a subscription may show. Ids only, never content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A group's connection to a provider changed (linked, decided, disconnected).
    IntegrationChanged {
        /// Whose.
        group_id: String,
        /// Which provider (`None`: unknown to this node's version, re-read all).
        #[serde(default, with = "provider_code")]
        provider: Option<Provider>,
    },
    /// A message was created, changed status, was received or was assigned.
    MessageChanged {
        /// The practice it belongs to.
        group_id: String,
        /// Which message.
        message_id: String,
    },
    /// A sent message was flagged as needing its sender's attention, or expired (a flag is not
    /// a status change, so no trigger publishes it: the alert worker and the outbox do).
    MessageNeedsAttention {
        /// The practice it belongs to.
        group_id: String,
        /// Which message.
        message_id: String,
    },
    /// Events may have been missed (the database listener reconnected, or this subscriber fell
    /// behind): re-read everything once. Local to a node; never sent between nodes.
    Resync,
}

impl Event {
    /// The practice the change belongs to (`None` for [`Event::Resync`], which concerns all).
    pub fn group_id(&self) -> Option<&str> {
        match self {
            Event::IntegrationChanged { group_id, .. }
            | Event::MessageChanged { group_id, .. }
            | Event::MessageNeedsAttention { group_id, .. } => Some(group_id),
            Event::Resync => None,
        }
    }

    /// Whether, on PostgreSQL, a trigger already publishes this event in the writing
    /// transaction (so the service's own publish must not send it again).
    pub fn published_by_database(&self) -> bool {
        matches!(
            self,
            Event::IntegrationChanged { .. } | Event::MessageChanged { .. }
        )
    }

    /// Whether the event concerns `group_id` (a resync concerns everyone).
    pub fn concerns(&self, group_id: &str) -> bool {
        self.group_id().is_none_or(|group| group == group_id)
    }

    /// The `NOTIFY` payload (JSON; the triggers write the same shape).
    pub fn to_payload(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a `NOTIFY` payload. Anything unreadable (a newer node's event kind) becomes a
    /// resync: re-reading is always safe.
    pub fn from_payload(payload: &str) -> Event {
        match serde_json::from_str::<Event>(payload) {
            Ok(Event::Resync) | Err(_) => Event::Resync,
            Ok(event) => event,
        }
    }
}

mod provider_code {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::domain::types::Provider;

    pub(super) fn serialize<S: Serializer>(
        provider: &Option<Provider>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match provider {
            Some(provider) => serializer.serialize_str(provider.code()),
            None => serializer.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Provider>, D::Error> {
        let code = Option::<String>::deserialize(deserializer)?;
        Ok(code.as_deref().and_then(Provider::from_code))
    }
}

/// Sends an event to every node (PostgreSQL: `pg_notify`). Implemented by `store::notify`.
pub trait SharedChannel: Send + Sync + std::fmt::Debug {
    /// Publishes `event` to every node, this one included (it comes back through the
    /// listener). Failures are logged, not returned: the change itself has committed.
    fn send(&self, event: Event);
}

/// The publish side shared by services, the database listener and subscriptions.
#[derive(Debug, Clone)]
pub struct EventBus {
    /// Each event with its delivery number on this node.
    local: broadcast::Sender<(u64, Event)>,
    delivered: Arc<AtomicU64>,
    shared: Option<Arc<dyn SharedChannel>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

/// How many events a slow subscriber may fall behind before it is told to resync.
const BUFFER: usize = 4096;

impl EventBus {
    /// A bus for one node alone (SQLite): what is published is delivered here.
    pub fn new() -> Self {
        let (local, _) = broadcast::channel(BUFFER);
        Self {
            local,
            delivered: Arc::default(),
            shared: None,
        }
    }

    /// A bus whose events travel between nodes through `shared`; what arrives from it is
    /// handed to [`EventBus::deliver`].
    pub fn shared(shared: Arc<dyn SharedChannel>) -> Self {
        let (local, _) = broadcast::channel(BUFFER);
        Self {
            local,
            delivered: Arc::default(),
            shared: Some(shared),
        }
    }

    /// Announces a committed change. Call it after the transaction commits.
    pub fn publish(&self, event: Event) {
        match &self.shared {
            None => self.deliver(event),
            Some(_) if event.published_by_database() => {}
            Some(shared) => shared.send(event),
        }
    }

    /// Hands an event to this node's subscribers (the database listener calls it; so does
    /// [`EventBus::publish`] on a node alone). Having no subscribers is fine.
    pub fn deliver(&self, event: Event) {
        let number = self.delivered.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self.local.send((number, event));
    }

    /// Announces that a group's provider connection changed.
    pub fn integration_changed(&self, group_id: &str, provider: Provider) {
        self.publish(Event::IntegrationChanged {
            group_id: group_id.to_owned(),
            provider: Some(provider),
        });
    }

    /// Announces that a message was created, changed status, arrived or was assigned.
    pub fn message_changed(&self, group_id: &str, message_id: &str) {
        self.publish(Event::MessageChanged {
            group_id: group_id.to_owned(),
            message_id: message_id.to_owned(),
        });
    }

    /// Announces that a sent message was flagged as needing attention (or expired).
    pub fn message_needs_attention(&self, group_id: &str, message_id: &str) {
        self.publish(Event::MessageNeedsAttention {
            group_id: group_id.to_owned(),
            message_id: message_id.to_owned(),
        });
    }

    /// Starts listening: every event from now on, in order.
    pub fn subscribe(&self) -> Subscriber {
        Subscriber {
            receiver: self.local.subscribe(),
            last: 0,
        }
    }

    /// Open subscribers on this node (diagnostics).
    pub fn subscriber_count(&self) -> usize {
        self.local.receiver_count()
    }
}

/// One subscription's view of the bus.
#[derive(Debug)]
pub struct Subscriber {
    receiver: broadcast::Receiver<(u64, Event)>,
    last: u64,
}

impl Subscriber {
    /// Waits for the next event; a subscriber that fell behind gets [`Event::Resync`] instead
    /// of what it missed. `None` when the bus is gone (the node is stopping).
    pub async fn next(&mut self) -> Option<Event> {
        match self.receiver.recv().await {
            Ok((number, event)) => {
                self.last = number;
                Some(event)
            }
            Err(broadcast::error::RecvError::Lagged(_)) => Some(Event::Resync),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The node-wide delivery number of the last event [`Subscriber::next`] returned: every
    /// subscriber sees the same number for the same delivery, and a later delivery has a
    /// larger one (subscribers woken by one event may share one re-read started after it).
    pub fn last_number(&self) -> u64 {
        self.last
    }

    /// Waits for the next event that concerns `group_id` (or a resync).
    pub async fn next_for(&mut self, group_id: &str) -> Option<Event> {
        loop {
            let event = self.next().await?;
            if event.concerns(group_id) {
                return Some(event);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_unknown_ones_become_a_resync() {
        let events = [
            Event::IntegrationChanged {
                group_id: "g1".into(),
                provider: Some(Provider::ReferralNet),
            },
            Event::MessageChanged {
                group_id: "g1".into(),
                message_id: "m1".into(),
            },
            Event::MessageNeedsAttention {
                group_id: "g1".into(),
                message_id: "m1".into(),
            },
        ];
        for event in events {
            assert_eq!(Event::from_payload(&event.to_payload()), event);
        }
        // The triggers' shape (see the migration).
        assert_eq!(
            Event::from_payload(r#"{"kind":"message_changed","group_id":"g2","message_id":"m2"}"#),
            Event::MessageChanged {
                group_id: "g2".into(),
                message_id: "m2".into()
            }
        );
        assert_eq!(
            Event::from_payload(
                r#"{"kind":"integration_changed","group_id":"g2","provider":"ARGUS"}"#
            ),
            Event::IntegrationChanged {
                group_id: "g2".into(),
                provider: Some(Provider::Argus)
            }
        );
        assert_eq!(
            Event::from_payload(r#"{"kind":"from_a_newer_node","group_id":"g"}"#),
            Event::Resync
        );
        assert_eq!(Event::from_payload("not json"), Event::Resync);
    }

    #[tokio::test]
    async fn a_subscriber_sees_its_groups_events_and_a_resync_when_it_falls_behind() {
        let bus = EventBus::new();
        let mut mine = bus.subscribe();
        bus.message_changed("other", "m0");
        bus.message_changed("g1", "m1");
        assert_eq!(
            mine.next_for("g1").await,
            Some(Event::MessageChanged {
                group_id: "g1".into(),
                message_id: "m1".into()
            })
        );
        for index in 0..BUFFER + 1 {
            bus.message_changed("g1", &format!("m{index}"));
        }
        assert_eq!(mine.next().await, Some(Event::Resync));
    }
}
