//! kube-proxy's job in nftables. Pipeline: watch events → [`index`] (the model and what
//! changed; [`convert`] turns API objects into [`model`] values) → [`ruleset`] (pure: the
//! rules of each Service) → [`sync`] (what is programmed, full or incremental
//! transactions) → [`nlnft`] (incremental element batches over netlink) or [`nft`] (full
//! syncs) → the kernel; [`nlct`] deletes stale UDP conntrack entries.

pub mod claims;
pub mod convert;
pub mod drift;
pub mod index;
pub mod model;
pub mod netlink;
pub mod nft;
#[cfg(test)]
mod nftcheck;
pub mod nlct;
pub mod nlnft;
pub mod ruleset;
pub mod sync;
