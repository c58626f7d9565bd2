//! berth's node agent: Services and EndpointSlices become one nftables table per address
//! family on each node, with a fixed set of chains and per-Service data in map elements.
//!
//! [`proxy`] is kube-proxy's job (watch events → index → pure ruleset → sync → nft).
//! Beside it, [`l2`] announces pool addresses on the node's network (one node per
//! address, chosen through a Lease each), and [`bgp`] announces them to BGP routers
//! from every node that serves them. [`runtime`] wires them to the cluster.

pub mod bgp;
pub mod error;
pub mod events;
pub mod healthcheck;
pub mod l2;
pub mod metrics;
pub mod proxy;
pub mod runtime;

pub use error::Error;
pub use runtime::{Args, run};
