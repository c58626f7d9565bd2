//! Load-balancer providers: AWS (NLBs through ELBv2) and address pools.

pub mod aws;
pub mod pool;
