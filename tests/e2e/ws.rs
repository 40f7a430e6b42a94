//! A small graphql-transport-ws client over a real WebSocket, for tests that need to see the
//! protocol's messages and close codes exactly.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::TestApp;

pub(crate) struct WsClient {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    /// Messages read while waiting for another operation's.
    pending: Vec<Value>,
    /// The last id [`WsClient::run`] used.
    next_id: u32,
}

/// What the server did next.
#[derive(Debug)]
pub(crate) enum WsEvent {
    Message(Value),
    Closed(u16, String),
}

impl WsClient {
    /// Connects offering graphql-transport-ws.
    pub(crate) async fn connect(app: &TestApp) -> Self {
        Self::connect_offering(app, Some("graphql-transport-ws")).await
    }

    pub(crate) async fn connect_offering(app: &TestApp, protocol: Option<&str>) -> Self {
        Self::connect_to(app.address, protocol).await
    }

    /// Connects to the gateway at `address` (any node).
    pub(crate) async fn connect_to(address: std::net::SocketAddr, protocol: Option<&str>) -> Self {
        let mut request = format!("ws://{address}/graphql/ws")
            .into_client_request()
            .unwrap();
        if let Some(protocol) = protocol {
            request
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
        }
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("websocket connects");
        Self {
            socket,
            pending: Vec::new(),
            next_id: 0,
        }
    }

    /// Connects and completes `connection_init` with a bearer token.
    pub(crate) async fn ready(app: &TestApp, token: &str) -> Self {
        Self::ready_at(app.address, token).await
    }

    /// Like [`WsClient::ready`], on the gateway at `address` (any node).
    pub(crate) async fn ready_at(address: std::net::SocketAddr, token: &str) -> Self {
        let mut client = Self::connect_to(address, Some("graphql-transport-ws")).await;
        client
            .send(json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}}))
            .await;
        match client.next_event().await {
            WsEvent::Message(message) if message["type"] == "connection_ack" => client,
            other => panic!("no connection_ack: {other:?}"),
        }
    }

    pub(crate) async fn send(&mut self, message: Value) {
        self.send_text(message.to_string()).await;
    }

    pub(crate) async fn send_text(&mut self, text: String) {
        let _ = self.socket.send(Message::text(text)).await;
    }

    pub(crate) async fn subscribe(&mut self, id: &str, query: &str) {
        self.send(json!({"id": id, "type": "subscribe", "payload": {"query": query}}))
            .await;
    }

    /// Runs one operation (sent as `subscribe`) and returns its first result shaped like an
    /// HTTP answer: `next`'s payload, or `{"errors": …}` for an `error` message.
    pub(crate) async fn run(&mut self, query: &str, variables: Value) -> Value {
        self.next_id += 1;
        let id = format!("run-{}", self.next_id);
        self.send(json!({"id": id, "type": "subscribe", "payload": {"query": query, "variables": variables}}))
            .await;
        let message = self.result_of(&id).await;
        if message["type"] == "error" {
            json!({"errors": message["payload"]})
        } else {
            message["payload"].clone()
        }
    }

    /// The next protocol message or the close, waiting up to 15 s.
    pub(crate) async fn next_event(&mut self) -> WsEvent {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(15), self.socket.next())
                .await
                .expect("the server answers in time");
            match frame {
                None => return WsEvent::Closed(1006, "closed without a close frame".into()),
                Some(Err(error)) => return WsEvent::Closed(1006, error.to_string()),
                Some(Ok(Message::Text(text))) => {
                    return WsEvent::Message(serde_json::from_str(&text).unwrap());
                }
                Some(Ok(Message::Close(frame))) => {
                    return match frame {
                        Some(frame) => WsEvent::Closed(frame.code.into(), frame.reason.to_string()),
                        None => WsEvent::Closed(1005, String::new()),
                    };
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Closes the connection with `code`, as a client leaving normally does, and returns how
    /// the server answered: its close frame, or 1006 when it dropped the connection instead.
    pub(crate) async fn close_with(&mut self, code: u16) -> WsEvent {
        let _ = self
            .socket
            .send(Message::Close(Some(
                tokio_tungstenite::tungstenite::protocol::CloseFrame {
                    code: code.into(),
                    reason: "bye".into(),
                },
            )))
            .await;
        self.next_event().await
    }

    /// The close code the server ends the connection with (skipping messages before it).
    pub(crate) async fn close_code(&mut self) -> u16 {
        loop {
            if let WsEvent::Closed(code, _) = self.next_event().await {
                return code;
            }
        }
    }

    /// The `next` or `error` message for operation `id` (skipping others).
    pub(crate) async fn result_of(&mut self, id: &str) -> Value {
        let is_result = |message: &Value| {
            message["id"] == id && (message["type"] == "next" || message["type"] == "error")
        };
        if let Some(index) = self.pending.iter().position(is_result) {
            return self.pending.remove(index);
        }
        loop {
            match self.next_event().await {
                WsEvent::Message(message)
                    if message["id"] == id
                        && (message["type"] == "next" || message["type"] == "error") =>
                {
                    return message;
                }
                WsEvent::Message(other) => {
                    if other["type"] != "complete" {
                        self.pending.push(other);
                    }
                }
                WsEvent::Closed(code, reason) => {
                    panic!("closed {code} {reason} while waiting for {id}")
                }
            }
        }
    }
}

/// The first error code of a `next` or `error` message.
pub(crate) fn ws_error_code(message: &Value) -> Option<&str> {
    let errors = if message["type"] == "error" {
        &message["payload"]
    } else {
        &message["payload"]["errors"]
    };
    errors[0]["extensions"]["code"].as_str()
}
