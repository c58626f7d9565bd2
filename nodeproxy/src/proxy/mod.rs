//! kube-proxy's job in nftables. Pipeline: watch events → [`index`] (the model and what
//! changed; [`convert`] turns API objects into [`model`] values) → [`ruleset`] (pure: the
//! rules of each Service) → [`sync`] (what is programmed, full or incremental
//! transactions) → [`nft`] (the kernel).

pub mod claims;
pub mod convert;
pub mod drift;
pub mod index;
pub mod model;
pub mod netlink;
pub mod nft;
#[cfg(test)]
mod nftcheck;
pub mod ruleset;
pub mod sync;
