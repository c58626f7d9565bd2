//! What both berth binaries share, written once: leader fencing ([`fence`]), the
//! hardened admin HTTP server ([`admin`]), Prometheus metrics ([`metrics`]), logging
//! ([`logging`]) and the shutdown signal ([`signal`]).

pub mod admin;
pub mod fence;
pub mod logging;
pub mod metrics;
pub mod signal;

pub use fence::{Fence, Fenced};
