//! Draining: what a node does between being told to stop and stopping. `/readyz` answers 503
//! from the first moment ([`Drain::start`]); when the node stops accepting
//! ([`Drain::close_connections`]) its WebSockets are closed with the going-away code (1001);
//! and the node counts its open WebSockets so it can wait for their close frames to leave.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// Shared by the HTTP layer, the WebSocket connections and the app's stop sequence.
#[derive(Debug, Clone)]
pub struct Drain {
    /// 0 serving, 1 draining (not ready), 2 closing connections.
    stage: Arc<watch::Sender<u8>>,
    open_websockets: Arc<AtomicUsize>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// Not draining.
    pub fn new() -> Self {
        Self {
            stage: Arc::new(watch::channel(0).0),
            open_websockets: Arc::default(),
        }
    }

    /// Starts draining: `/readyz` answers 503 from now on (idempotent).
    pub fn start(&self) {
        self.stage.send_if_modified(|stage| {
            let changed = *stage < 1;
            *stage = (*stage).max(1);
            changed
        });
    }

    /// Asks every WebSocket to close with 1001 (the node stops accepting now).
    pub fn close_connections(&self) {
        self.stage.send_replace(2);
    }

    /// Whether the node is draining (or closing).
    pub fn is_draining(&self) -> bool {
        *self.stage.borrow() >= 1
    }

    /// Completes once connections are asked to close.
    pub async fn closing(&self) {
        let mut receiver = self.stage.subscribe();
        let _ = receiver.wait_for(|stage| *stage >= 2).await;
    }

    /// Counts a WebSocket as open until the guard drops.
    pub(crate) fn websocket_opened(&self) -> WebSocketGuard {
        self.open_websockets.fetch_add(1, Ordering::SeqCst);
        WebSocketGuard(self.open_websockets.clone())
    }

    /// WebSockets open on this node.
    pub fn open_websockets(&self) -> usize {
        self.open_websockets.load(Ordering::SeqCst)
    }

    /// Waits (up to `limit`) until every WebSocket has closed.
    pub async fn websockets_closed(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.open_websockets() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Keeps a WebSocket counted while it is open.
pub(crate) struct WebSocketGuard(Arc<AtomicUsize>);

impl Drop for WebSocketGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
