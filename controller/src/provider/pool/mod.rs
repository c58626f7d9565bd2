//! The pool provider: addresses from a class's ranges, allocated from Service status.

pub mod allocation;
