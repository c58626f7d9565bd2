//! What both berth binaries share, written once: the hardened admin HTTP server
//! ([`admin`]), Prometheus metrics ([`metrics`]), Leases ([`lease`]) and leader fencing
//! ([`fence`]), Events ([`events`]), watch → store feeding ([`watch`]), logging
//! ([`logging`]) and the shutdown signal ([`signal`]).

pub mod admin;
pub mod events;
pub mod fence;
pub mod lease;
pub mod logging;
pub mod metrics;
pub mod signal;
pub mod watch;

pub use fence::{Fence, Fenced};
