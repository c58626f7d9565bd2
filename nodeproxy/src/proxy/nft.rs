//! The kernel edge: `nft -f -` for full transactions, the netlink sockets the agent keeps
//! open for incremental element batches ([`crate::proxy::nlnft`]) and stale UDP flows
//! ([`crate::proxy::nlct`]).

use std::net::IpAddr;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::error::Error;
use crate::proxy::nlct::ConntrackSocket;
use crate::proxy::nlnft::{ElementChange, NftSocket};
use crate::proxy::ruleset::Frontend;

/// Applies one transaction atomically (nft commits a whole `-f` input or nothing).
pub async fn apply(transaction: &str, mode: &'static str) -> Result<(), Error> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::io("spawn nft"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(transaction.as_bytes())
            .await
            .map_err(Error::io("write to nft"))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(Error::io("wait for nft"))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(Error::Nft {
            mode,
            status: out.status.to_string(),
            stderr: stderr.chars().take(2000).collect(),
        })
    }
}

/// The netlink sockets kept open across syncs, each opened on first use and dropped after
/// an error (it may still hold answers to the failed request; the next use opens anew).
#[derive(Default)]
pub struct Sockets {
    nft: Option<NftSocket>,
    conntrack: Option<ConntrackSocket>,
}

impl Sockets {
    /// Commits `change` as one nftables batch.
    pub fn apply_elements(&mut self, change: &ElementChange) -> Result<(), Error> {
        let mut sock = match self.nft.take() {
            Some(s) => s,
            None => NftSocket::open().map_err(Error::io("open nftables netlink socket"))?,
        };
        match sock.commit(change) {
            Ok(()) => {
                self.nft = Some(sock);
                Ok(())
            }
            Err(e) => Err(Error::Nft {
                mode: "partial",
                status: "netlink batch refused".into(),
                stderr: e.to_string(),
            }),
        }
    }

    /// Deletes the conntrack entries of stale UDP flows; returns how many went. A failure
    /// is logged: the flows then expire on their own as before berth cleared them.
    pub fn clear_udp(&mut self, stale: &[(Frontend, IpAddr)]) -> usize {
        if stale.is_empty() {
            return 0;
        }
        let result = match self.conntrack.take() {
            Some(s) => Ok(s),
            None => ConntrackSocket::open(),
        }
        .and_then(|mut s| {
            let n = s.delete_udp(stale)?;
            self.conntrack = Some(s);
            Ok(n)
        });
        match result {
            Ok(n) => {
                tracing::debug!(flows = stale.len(), deleted = n, "cleared UDP conntrack");
                n
            }
            Err(e) => {
                tracing::warn!("deleting stale UDP conntrack entries over netlink: {e}");
                0
            }
        }
    }
}
