//! BGP announcement: the `BGPPeer` resource (one router the node agents open sessions
//! to) and the per-class advertisement block (`spec.pool.bgp`). The shapes follow
//! MetalLB's `BGPPeer`/`BGPAdvertisement` and Cilium's BGP peering so their users find
//! the same fields.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Default BGP port.
pub const DEFAULT_PORT: u16 = 179;
/// Default hold time in seconds (RFC 4271 suggests 90).
pub const DEFAULT_HOLD_SECONDS: u16 = 90;
/// Field manager prefix of the node agents' status writes: `berth-nodeproxy/<node>`,
/// so each agent owns its own entry of `status.nodes`.
pub const STATUS_MANAGER_PREFIX: &str = "berth-nodeproxy/";

/// A BGP router the node agents peer with. Every node matching `nodeSelector` (all nodes
/// without one) opens its own session and announces the pool addresses it serves, with
/// itself as next hop; the router spreads traffic over them (ECMP).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "berth.dev",
    version = "v1alpha1",
    kind = "BGPPeer",
    status = "BGPPeerStatus",
    shortname = "bgppeer",
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".spec.address"}"#,
    printcolumn = r#"{"name":"Peer ASN","type":"integer","jsonPath":".spec.peerASN"}"#,
    printcolumn = r#"{"name":"My ASN","type":"integer","jsonPath":".spec.myASN"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!has(self.keepaliveTime) || !has(self.holdTime) || self.holdTime == 0 || self.keepaliveTime < self.holdTime")
    .message("keepaliveTime must be shorter than holdTime"))]
#[serde(rename_all = "camelCase")]
pub struct BGPPeerSpec {
    /// The router's address (IPv4 or IPv6). A session to an IPv6 address also offers
    /// IPv6 unicast (MP-BGP): the pool's IPv6 addresses go to the router with the node's
    /// address on that session as next hop, when the router agrees to the family.
    #[schemars(length(min = 2, max = 45))]
    #[x_kube(validation = Rule::new("isIP(self)").message("address must be an IP address"))]
    pub address: String,
    /// The router's AS number.
    #[serde(rename = "peerASN")]
    #[schemars(range(min = 1, max = 4294967295u32))]
    pub peer_asn: u32,
    /// The nodes' AS number (the same on every node).
    #[serde(rename = "myASN")]
    #[schemars(range(min = 1, max = 4294967295u32))]
    pub my_asn: u32,
    /// TCP port of the router (default 179).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// TCP MD5 signature (RFC 2385) with the password in this Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// Hold time proposed in OPEN, in seconds: 0 or 3..65535 (default 90).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == 0 || self >= 3").message("holdTime must be 0 or at least 3 seconds"))]
    #[schemars(range(max = 65535))]
    pub hold_time: Option<u32>,
    /// Seconds between KEEPALIVEs (default: a third of the negotiated hold time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub keepalive_time: Option<u32>,
    /// Local address of the session (default: chosen by the node's routing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isIP(self)").message("sourceAddress must be an IP address"))]
    #[schemars(length(max = 45))]
    pub source_address: Option<String>,
    /// Only nodes with matching labels peer with this router (default: every node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

/// A key of a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Key in the Secret's data (default `password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// What each node's session with the router is doing, written by that node's agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeerStatus {
    /// One entry per node that peers with the router.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<BGPSessionStatus>,
}

/// One node's session.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BGPSessionStatus {
    pub node: String,
    /// FSM state: `Idle`, `Connect`, `OpenSent`, `OpenConfirm` or `Established`.
    pub state: String,
    /// Why the session is not established, as a word: `Connecting`, `Unreachable` (no
    /// route, or no answer), `ConnectionRefused` (the router resets the connection),
    /// `AuthenticationFailed` (no answer with TCP MD5 on: a wrong password looks like
    /// that), `BadPeerAS`, `HoldTimerExpired`, `Notification`, `SecretNotFound` (the
    /// `passwordSecretRef` Secret or key is missing), `InvalidConfig`; `Established` when
    /// it is.
    pub reason: String,
    /// The last error in words (the router's NOTIFICATION, the socket error), or what
    /// is announced.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Prefixes announced to the router.
    #[serde(default)]
    pub announced: u32,
    /// When `state` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// Advertisement settings of a pool class (`spec.pool.bgp`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BgpAdvertisement {
    /// Announce the class's Service addresses to the BGP peers (default true when the
    /// block is present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Only to these BGPPeers, by name (default: every peer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub peers: Option<Vec<String>>,
    /// Standard communities on the routes, `65000:100` (or a well-known name:
    /// `no-export`, `no-advertise`, `no-export-subconfed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        inner(regex(
            pattern = r"^([0-9]{1,5}:[0-9]{1,5}|no-export|no-advertise|no-export-subconfed)$"
        ))
    )]
    pub communities: Option<Vec<String>>,
    /// LOCAL_PREF on the routes (sent to iBGP peers only, as RFC 4271 says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_pref: Option<u32>,
}

/// Parses a community of [`BgpAdvertisement::communities`].
pub fn parse_community(s: &str) -> Result<u32, String> {
    match s {
        "no-export" => return Ok(0xFFFF_FF01),
        "no-advertise" => return Ok(0xFFFF_FF02),
        "no-export-subconfed" => return Ok(0xFFFF_FF03),
        _ => {}
    }
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("community {s:?} is not ASN:VALUE"))?;
    let a: u16 = a
        .parse()
        .map_err(|_| format!("community {s:?}: {a:?} is not 0..65535"))?;
    let b: u16 = b
        .parse()
        .map_err(|_| format!("community {s:?}: {b:?} is not 0..65535"))?;
    Ok((u32::from(a) << 16) | u32::from(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn peer_spec_parses_metallb_like_yaml() {
        let spec: BGPPeerSpec = serde_yaml::from_str(
            "address: 198.18.0.200\npeerASN: 64512\nmyASN: 64513\nholdTime: 9\nkeepaliveTime: 3\npasswordSecretRef: {name: r, namespace: kube-system}\nnodeSelector: {matchLabels: {rack: a}}\n",
        )
        .unwrap_or_default();
        assert_eq!(spec.address, "198.18.0.200");
        assert_eq!((spec.peer_asn, spec.my_asn), (64512, 64513));
        assert_eq!((spec.hold_time, spec.keepalive_time), (Some(9), Some(3)));
        assert!(spec.password_secret_ref.is_some() && spec.node_selector.is_some());
    }

    #[test]
    fn crd_is_cluster_scoped_validated_and_status_is_a_map_by_node() {
        let crd = BGPPeer::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        let json = serde_json::to_value(&crd).unwrap_or_default();
        let schema = &json["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let text = schema.to_string();
        assert!(text.contains("isIP(self)"), "{text}");
        assert!(text.contains("keepaliveTime must be shorter"), "{text}");
        let nodes = &schema["properties"]["status"]["properties"]["nodes"];
        assert_eq!(nodes["x-kubernetes-list-type"], "map", "{nodes}");
        assert_eq!(nodes["x-kubernetes-list-map-keys"][0], "node");
    }

    #[test]
    fn communities_parse() {
        assert_eq!(parse_community("65000:100"), Ok((65000 << 16) | 100));
        assert_eq!(parse_community("no-export"), Ok(0xFFFF_FF01));
        assert!(parse_community("65536:1").is_err());
        assert!(parse_community("1").is_err());
    }
}
