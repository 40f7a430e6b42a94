//! GraphQL over WebSocket, the graphql-transport-ws protocol, served by the gateway itself so
//! every rule of the protocol and every limit holds: `connection_init` within a deadline (else
//! 4408), a refused token closes with 4403, `subscribe` before the acknowledgement with 4401, a
//! second `connection_init` with 4429, a reused operation id with 4409, an unreadable message
//! with 4400, a subprotocol other than graphql-transport-ws with 4406, an oversized frame with
//! 1009. An operation the gateway refuses before running it (a document that does not parse or
//! validate, a limit) is answered with an `error` message carrying each error's code; results
//! arrive as `next` and end with `complete`. Subscriptions are capped per connection and per user
//! (an `error` with `RATE_LIMITED`), and a connection is closed (4403) when its token expires.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::domain::audit::Principal;
use crate::graphql::limits::ClientAddress;
use crate::graphql::{AppSchema, Caller};

/// The close code a stopping node sends (RFC 6455 "going away"); clients reconnect, and the
/// load balancer sends them to another node.
const GOING_AWAY: u16 = 1001;
const GOING_AWAY_REASON: &str = "the server is shutting down; reconnect";

/// The only subprotocol spoken.
pub(crate) const PROTOCOL: &str = "graphql-transport-ws";

/// Limits of one node's WebSockets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WsLimits {
    pub init_timeout: Duration,
    pub subscriptions_per_connection: usize,
    pub subscriptions_per_user: usize,
    pub max_response_bytes: usize,
}

/// Open operations per user on this node, over all their connections.
#[derive(Debug, Default, Clone)]
pub(crate) struct OpenOperations(Arc<Mutex<HashMap<String, usize>>>);

impl OpenOperations {
    /// Operations open on this node, over every user (the metrics' gauge).
    pub(crate) fn total(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .sum()
    }

    fn try_open(&self, user_id: &str, max: usize) -> Option<OpenGuard> {
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = counts.entry(user_id.to_owned()).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(OpenGuard {
            counts: self.clone(),
            user_id: user_id.to_owned(),
        })
    }
}

struct OpenGuard {
    counts: OpenOperations,
    user_id: String,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.user_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.user_id);
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientMessage {
    ConnectionInit {
        #[serde(default)]
        payload: Option<Value>,
    },
    Ping {
        #[serde(default)]
        payload: Option<Value>,
    },
    Pong {
        #[allow(dead_code)]
        #[serde(default)]
        payload: Option<Value>,
    },
    Subscribe {
        id: String,
        payload: Value,
    },
    Complete {
        id: String,
    },
}

/// What an operation's task hands to the connection's writer.
enum Outgoing {
    Text(String),
    Finished(String),
}

/// Everything a connection needs from the node.
pub(crate) struct Connection {
    pub schema: AppSchema,
    pub limits: WsLimits,
    pub open: OpenOperations,
    pub address: IpAddr,
    pub metrics: crate::metrics::Metrics,
    /// The node's stop: every connection closes with 1001 (going away) when it starts.
    pub drain: crate::drain::Drain,
}

/// The client closed: send the reply to its close frame, which the WebSocket library has
/// queued but writes only on the next flush. Dropping the socket without it makes clients see
/// an abnormal closure (1006) instead of their own code echoed (RFC 6455, section 5.5.1).
async fn answer_close(socket: &mut WebSocket) {
    let _ = futures::SinkExt::flush(socket).await;
}

/// Closes the socket with a protocol close code.
async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

/// Runs one connection to its end. `authenticate` turns `connection_init`'s payload into a
/// principal (or refuses it); `subprotocol_ok` says whether the client offered ours.
pub(crate) async fn serve<A, Fut>(
    mut socket: WebSocket,
    connection: Connection,
    subprotocol_ok: bool,
    authenticate: A,
) where
    A: FnOnce(Value) -> Fut,
    Fut: std::future::Future<Output = Option<Principal>>,
{
    let _open = connection.drain.websocket_opened();
    if !subprotocol_ok {
        close(&mut socket, 4406, "Subprotocol not acceptable").await;
        return;
    }
    let drain = connection.drain.clone();
    let going_away = drain.closing();
    tokio::pin!(going_away);
    // Before the acknowledgement: only `connection_init` (and pings) until the deadline.
    let deadline = tokio::time::Instant::now() + connection.limits.init_timeout;
    let principal = loop {
        let received = tokio::select! {
            () = &mut going_away => {
                close(&mut socket, GOING_AWAY, GOING_AWAY_REASON).await;
                return;
            }
            received = tokio::time::timeout_at(deadline, socket.recv()) => received,
        };
        let message = match received {
            Err(_) => {
                close(&mut socket, 4408, "Connection initialisation timeout").await;
                return;
            }
            Ok(None) => return,
            Ok(Some(Err(_))) => {
                close(&mut socket, 1009, "Message too big or unreadable").await;
                return;
            }
            Ok(Some(Ok(message))) => message,
        };
        match parse(&message) {
            Parsed::Message(ClientMessage::ConnectionInit { payload }) => {
                match authenticate(payload.unwrap_or(Value::Null)).await {
                    Some(principal) => break principal,
                    None => {
                        close(&mut socket, 4403, "Forbidden").await;
                        return;
                    }
                }
            }
            Parsed::Message(ClientMessage::Ping { payload }) => {
                if send_json(&mut socket, &pong(payload)).await.is_err() {
                    return;
                }
            }
            Parsed::Message(ClientMessage::Pong { .. }) | Parsed::Ignore => {}
            Parsed::Message(ClientMessage::Subscribe { .. } | ClientMessage::Complete { .. }) => {
                close(&mut socket, 4401, "Unauthorized").await;
                return;
            }
            Parsed::Closed => {
                answer_close(&mut socket).await;
                return;
            }
            Parsed::Invalid(reason) => {
                close(&mut socket, 4400, &reason).await;
                return;
            }
        }
    };
    if send_json(&mut socket, &json!({"type": "connection_ack"}))
        .await
        .is_err()
    {
        return;
    }
    run_acknowledged(socket, connection, principal).await;
}

async fn run_acknowledged(mut socket: WebSocket, connection: Connection, principal: Principal) {
    let (outgoing, mut results) = mpsc::channel::<Outgoing>(64);
    let mut operations: HashMap<String, JoinHandle<()>> = HashMap::new();
    let expires = tokio::time::Instant::now()
        + (principal.expires_at - chrono::Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
    let token_expiry = tokio::time::sleep_until(expires);
    tokio::pin!(token_expiry);
    let drain = connection.drain.clone();
    let going_away = drain.closing();
    tokio::pin!(going_away);
    loop {
        tokio::select! {
            () = &mut going_away => {
                close(&mut socket, GOING_AWAY, GOING_AWAY_REASON).await;
                break;
            }
            () = &mut token_expiry => {
                close(&mut socket, 4403, "Forbidden: the token expired; reconnect with a fresh one").await;
                break;
            }
            result = results.recv() => {
                let Some(result) = result else { break };
                match result {
                    Outgoing::Text(text) => {
                        if socket.send(Message::Text(text.into())).await.is_err() {
                            break;
                        }
                    }
                    Outgoing::Finished(id) => {
                        operations.remove(&id);
                    }
                }
            }
            message = socket.recv() => {
                let message = match message {
                    None => break,
                    Some(Err(_)) => {
                        close(&mut socket, 1009, "Message too big or unreadable").await;
                        break;
                    }
                    Some(Ok(message)) => message,
                };
                match parse(&message) {
                    Parsed::Closed => {
                        answer_close(&mut socket).await;
                        break;
                    }
                    Parsed::Ignore | Parsed::Message(ClientMessage::Pong { .. }) => {}
                    Parsed::Invalid(reason) => {
                        close(&mut socket, 4400, &reason).await;
                        break;
                    }
                    Parsed::Message(ClientMessage::ConnectionInit { .. }) => {
                        close(&mut socket, 4429, "Too many initialisation requests").await;
                        break;
                    }
                    Parsed::Message(ClientMessage::Ping { payload }) => {
                        if send_json(&mut socket, &pong(payload)).await.is_err() {
                            break;
                        }
                    }
                    Parsed::Message(ClientMessage::Complete { id }) => {
                        if let Some(task) = operations.remove(&id) {
                            task.abort();
                        }
                    }
                    Parsed::Message(ClientMessage::Subscribe { id, payload }) => {
                        if operations.contains_key(&id) {
                            close(&mut socket, 4409, &format!("Subscriber for {id} already exists")).await;
                            break;
                        }
                        match start(&connection, &principal, &id, payload, operations.len(), outgoing.clone()) {
                            Ok(task) => {
                                operations.insert(id, task);
                            }
                            Err(refusal) => {
                                if send_json(&mut socket, &refusal).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    for (_, task) in operations {
        task.abort();
    }
}

/// Starts one operation in its own task, or says why not (an `error` message).
fn start(
    connection: &Connection,
    principal: &Principal,
    id: &str,
    payload: Value,
    open_here: usize,
    outgoing: mpsc::Sender<Outgoing>,
) -> Result<JoinHandle<()>, Value> {
    let refuse = |code: &str, message: String| json!({"type": "error", "id": id, "payload": [{"message": message, "extensions": {"code": code}}]});
    let request: async_graphql::Request = serde_json::from_value(payload).map_err(|_| {
        refuse(
            "BAD_USER_INPUT",
            "the subscribe payload must be {query, variables?, operationName?}".into(),
        )
    })?;
    if open_here >= connection.limits.subscriptions_per_connection {
        return Err(refuse(
            "RATE_LIMITED",
            format!(
                "at most {} operations may be open on one connection; complete one first",
                connection.limits.subscriptions_per_connection
            ),
        ));
    }
    let Some(guard) = connection
        .open
        .try_open(&principal.user_id, connection.limits.subscriptions_per_user)
    else {
        return Err(refuse(
            "RATE_LIMITED",
            format!(
                "at most {} operations may be open for one user; close some subscriptions first",
                connection.limits.subscriptions_per_user
            ),
        ));
    };
    // Logged and counted when the task ends, however it ends (completed, or aborted by the
    // client's `complete` or a closed connection).
    let mut record = connection.metrics.operation_started(
        crate::metrics::Transport::WebSocket,
        &principal.request_id,
        crate::graphql::operation_name(&request),
    );
    record.user(&principal.user_id);
    let request = request
        .data(Caller(Some(principal.clone())))
        .data(ClientAddress(connection.address))
        .data(crate::graphql::SubscribedAt(chrono::Utc::now()));
    let mut stream = connection.schema.execute_stream(request);
    let id = id.to_owned();
    let max_bytes = connection.limits.max_response_bytes;
    Ok(tokio::spawn(async move {
        let _guard = guard;
        let mut record = record;
        let mut first = true;
        while let Some(mut response) = stream.next().await {
            crate::http::fill_error_codes(&mut response);
            record.outcome(crate::graphql::error::outcome_code(&response));
            // Refused before it ran (parse, validation, a limit): the protocol's `error`.
            let refused_before_running = first
                && response.data == async_graphql::Value::Null
                && !response.errors.is_empty()
                && response.errors.iter().all(|error| error.path.is_empty());
            first = false;
            let message = if refused_before_running {
                json!({"type": "error", "id": id, "payload": response.errors})
            } else {
                json!({"type": "next", "id": id, "payload": response})
            };
            let mut text = message.to_string();
            let mut ended = refused_before_running;
            if text.len() > max_bytes {
                text = json!({"type": "error", "id": id, "payload": [{
                    "message": format!("the result is {} bytes; at most {max_bytes} are sent at once — ask for fewer items or fields", text.len()),
                    "extensions": {"code": "BAD_USER_INPUT"}
                }]})
                .to_string();
                ended = true;
            }
            if outgoing.send(Outgoing::Text(text)).await.is_err() {
                return;
            }
            if ended {
                let _ = outgoing.send(Outgoing::Finished(id)).await;
                return;
            }
        }
        let _ = outgoing
            .send(Outgoing::Text(
                json!({"type": "complete", "id": id}).to_string(),
            ))
            .await;
        let _ = outgoing.send(Outgoing::Finished(id)).await;
    }))
}

enum Parsed {
    Message(ClientMessage),
    Ignore,
    Closed,
    Invalid(String),
}

fn parse(message: &Message) -> Parsed {
    match message {
        Message::Text(text) => match serde_json::from_str::<ClientMessage>(text.as_str()) {
            Ok(message) => Parsed::Message(message),
            Err(_) => Parsed::Invalid("Invalid message received".into()),
        },
        Message::Binary(_) => {
            Parsed::Invalid("Invalid message received: binary frames are not used".into())
        }
        Message::Ping(_) | Message::Pong(_) => Parsed::Ignore,
        Message::Close(_) => Parsed::Closed,
    }
}

fn pong(payload: Option<Value>) -> Value {
    match payload {
        Some(payload) => json!({"type": "pong", "payload": payload}),
        None => json!({"type": "pong"}),
    }
}

async fn send_json(socket: &mut WebSocket, value: &Value) -> Result<(), axum::Error> {
    socket.send(Message::Text(value.to_string().into())).await
}
