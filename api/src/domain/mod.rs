//! The product's rules, free of frameworks: the values users hand us (parsed once into types
//! that cannot hold bad data), the errors users can see, and the services that apply the seed
//! article's flow. Nothing here knows async-graphql, sea-orm or reqwest.

pub mod audit;
pub mod credits;
pub mod error;
pub mod hl7;
pub mod integrations;
pub mod messaging;
pub mod pricing;
pub mod types;

pub use error::GatewayError;
