//! The AWS provider: annotations and class settings ([`annotations`]), the pure desired
//! model ([`model`]), diff and apply ([`deploy`]) over the SDK client ([`client`]), and
//! the orphan sweep ([`gc`]).

pub mod annotations;
pub mod client;
pub mod deploy;
pub mod gc;
pub mod model;
