//! End-to-end tests of the sandbox: a real server on a free port, spoken to over HTTP.

mod argus;
mod binary;
mod control;
mod faults;
mod helpers;
mod messaging;
mod namespaces;
mod payments;
mod referralnet;
mod registrations;
mod scenarios;
mod state;
