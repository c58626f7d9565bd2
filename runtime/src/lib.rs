//! What both berth binaries share, written once: leader fencing ([`fence`]), Leases ([`lease`]).

pub mod fence;
pub mod lease;

pub use fence::{Fence, Fenced};
