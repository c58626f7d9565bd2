//! The AWS provider: annotations and class settings ([`annotations`]), the pure desired
//! model ([`model`]), diff and apply ([`deploy`]) over the SDK client ([`client`]), and
//! the orphan sweep ([`gc`]).

pub mod annotations;
pub mod api;
pub mod client;
pub mod deploy;
#[cfg(test)]
pub mod fake;
pub mod gc;
pub mod inventory;
pub mod model;
pub mod naming;
pub mod settings;
pub mod subnets;
