//! What both berth binaries share, written once: leader fencing ([`fence`]).

pub mod fence;

pub use fence::{Fence, Fenced};
