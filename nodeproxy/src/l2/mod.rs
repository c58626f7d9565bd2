//! L2 announcement of pool addresses: one node per address, chosen through a Lease each.
//! Decisions in [`announce`] (pure), I/O in [`announcer`], the kernel in [`link`]; which
//! agents are alive to be ranked in [`heartbeat`], sped up by direct peer [`probe`]s.

pub mod announce;
pub mod announcer;
pub mod heartbeat;
pub mod link;
pub mod probe;
pub mod schedule;
