//! The kernel edge: `nft -f -` for transactions, `conntrack -D` for stale UDP flows.

use std::net::IpAddr;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::error::Error;
use crate::proxy::model::Family;
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

/// `conntrack` arguments deleting UDP flows to `fe` that were NATed to `endpoint`.
pub fn conntrack_args(fe: &Frontend, endpoint: &IpAddr) -> Vec<String> {
    let family = match Family::of(&fe.addr) {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    };
    vec![
        "-D".into(),
        "-f".into(),
        family.into(),
        "-p".into(),
        "udp".into(),
        "--orig-dst".into(),
        fe.addr.to_string(),
        "--orig-port-dst".into(),
        fe.port.to_string(),
        "--reply-src".into(),
        endpoint.to_string(),
    ]
}

/// Deletes stale UDP flows; "no entries" is not an error.
pub async fn clear_udp(stale: &[(Frontend, IpAddr)]) {
    for (fe, ep) in stale {
        let args = conntrack_args(fe, ep);
        match Command::new("conntrack")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
        {
            Ok(_) => {
                tracing::debug!(frontend = %fe.addr, port = fe.port, endpoint = %ep, "cleared UDP conntrack")
            }
            Err(e) => tracing::warn!("conntrack: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::model::Protocol;

    #[test]
    fn conntrack_deletes_by_frontend_and_endpoint() {
        let fe = Frontend {
            addr: "10.96.0.10".parse().expect("ip"),
            protocol: Protocol::Udp,
            port: 53,
        };
        let args = conntrack_args(&fe, &"10.244.1.2".parse().expect("ip"));
        assert_eq!(
            args.join(" "),
            "-D -f ipv4 -p udp --orig-dst 10.96.0.10 --orig-port-dst 53 --reply-src 10.244.1.2"
        );
    }
}
