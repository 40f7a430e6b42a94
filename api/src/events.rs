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

/// The publish side shared by services and subscriptions.
#[derive(Debug, Clone)]
pub struct EventBus {
    integrations: broadcast::Sender<IntegrationChanged>,
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
        Self { integrations }
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
}
