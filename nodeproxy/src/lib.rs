//! berth's node agent: Services and EndpointSlices become one nftables table per address
//! family on each node, with a fixed set of chains and per-Service data in map elements.
//!
//! Pipeline: watch events → [`index`] (the model and what changed) → [`ruleset`] (pure:
//! rules of each Service) → [`sync`] (what is programmed, full or incremental
//! transactions) → [`nft`] (the kernel).
//!
//! Beside it, [`announcer`] announces pool addresses on the node's network (one node per
//! address, chosen through a Lease each): decisions in [`announce`], kernel in [`l2`].

pub mod announce;
pub mod announcer;
pub mod convert;
pub mod error;
pub mod healthcheck;
pub mod http;
pub mod index;
pub mod l2;
pub mod metrics;
pub mod model;
pub mod nft;
#[cfg(test)]
mod nftcheck;
pub mod ruleset;
pub mod runtime;
pub mod sync;

pub use error::Error;
pub use runtime::{Args, run};
