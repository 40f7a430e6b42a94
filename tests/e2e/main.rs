//! End-to-end tests: the real gateway and the real sandbox, both started in-process on port 0
//! and spoken to over loopback HTTP and WebSocket. With `TEST_DATABASE_URL=postgres://…` every
//! test gets a fresh PostgreSQL database instead of a fresh SQLite file.

mod alerts;
mod auth;
mod caps;
mod credits;
mod delegation;
mod helpers;
mod http_spec;
mod inbox;
mod integrations;
mod limits;
mod messaging;
mod nodes;
mod observability;
mod permissions;
mod platform;
mod readme;
mod registration;
mod schema;
mod ws;
