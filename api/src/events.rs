//! In-process change notifications. Subscriptions use them to wake at once; because another
//! gateway node may make the change, subscribers also re-read the database on a slow tick, so
//! nothing depends on the notification reaching them.

use tokio::sync::broadcast;

use crate::domain::types::Provider;

/// A group's connection to a provider changed (linked, decided, disconnected).
#[derive(Debug, Clone)]
pub struct IntegrationChanged {
    /// Whose.
    pub group_id: String,
    /// Which provider.
    pub provider: Provider,
}

/// A sent message was flagged as needing its sender's attention (or expired).
#[derive(Debug, Clone)]
pub struct MessageNeedsAttention {
    /// Whose practice.
    pub group_id: String,
    /// The sending practitioner (internal user id).
    pub owner_user_id: String,
}

/// The publish side shared by services and subscriptions.
#[derive(Debug, Clone)]
pub struct EventBus {
    integrations: broadcast::Sender<IntegrationChanged>,
    attention: broadcast::Sender<MessageNeedsAttention>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    /// A bus that buffers up to 1024 events per slow subscriber (a lagging subscriber re-reads).
    pub fn new() -> Self {
        let (integrations, _) = broadcast::channel(1024);
        let (attention, _) = broadcast::channel(1024);
        Self {
            integrations,
            attention,
        }
    }

    /// Announces a change; having no subscribers is fine.
    pub fn integration_changed(&self, group_id: &str, provider: Provider) {
        let _ = self.integrations.send(IntegrationChanged {
            group_id: group_id.to_owned(),
            provider,
        });
    }

    /// Listens for integration changes.
    pub fn subscribe_integrations(&self) -> broadcast::Receiver<IntegrationChanged> {
        self.integrations.subscribe()
    }

    /// Announces that one of `owner_user_id`'s sent messages needs attention (after the flag
    /// committed); having no subscribers is fine.
    pub fn message_needs_attention(&self, group_id: &str, owner_user_id: &str) {
        let _ = self.attention.send(MessageNeedsAttention {
            group_id: group_id.to_owned(),
            owner_user_id: owner_user_id.to_owned(),
        });
    }

    /// Listens for messages flagged as needing attention.
    pub fn subscribe_attention(&self) -> broadcast::Receiver<MessageNeedsAttention> {
        self.attention.subscribe()
    }
}
