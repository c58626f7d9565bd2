//! What both berth binaries share, written once: leader fencing ([`fence`]) and
//! watch → store feeding ([`watch`]).

pub mod fence;
pub mod watch;

pub use fence::{Fence, Fenced};
