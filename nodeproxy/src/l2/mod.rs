//! L2 announcement of pool addresses: one node per address, chosen through a Lease each.
//! Decisions in [`announce`] (pure), I/O in [`announcer`], the kernel in [`link`].

pub mod announce;
pub mod announcer;
pub mod link;
pub mod schedule;
