//! Direct peer probes on the node network, so that a dead node's pool addresses move in
//! well under a second instead of after a whole Lease duration, without renewing Leases
//! faster (the apiserver's load stays the same).
//!
//! Every agent sends each peer a small UDP datagram every `interval`, naming itself and
//! the peers it has not heard from lately. A peer is *silent* here when nothing from it
//! arrived within `dead_after`; it is *dead* when it is silent here and a witness, another
//! peer this agent still hears, reports it silent too. So:
//! - an agent that hears no peer at all declares nobody dead (it is the isolated one, most
//!   likely), and a two-node cluster, which has no witness, keeps the Lease timing;
//! - a peer never heard is never dead (probes blocked by a firewall: Leases alone decide);
//! - a datagram counts only from the address the peer advertises on its heartbeat Lease.
//!
//! Dead only lets the next node take the Lease before it expires: the taker still writes
//! the Lease (guarded by its resourceVersion), and a holder that is alive after all sees
//! the Lease taken and stops announcing. The Lease stays the source of truth.
//!
//! The datagram is one line of text (`berth-peer-probe/1 <node> <silent,...>`): no crate
//! fits a message this small, and a text line is easy to read in a packet capture.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::metrics::Metrics;

/// Annotation on an agent's heartbeat Lease: where it listens for probes (`ip:port`).
pub const ANNOTATION: &str = "berth.dev/peer-probe";

const MAGIC: &str = "berth-peer-probe/1";

/// Longest datagram read; a longer one is not a probe.
const MAX_DATAGRAM: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeConfig {
    /// How often every peer is told this agent is alive.
    pub interval: Duration,
    /// A peer not heard from for this long is silent.
    pub dead_after: Duration,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            dead_after: Duration::from_millis(500),
        }
    }
}

/// One probe: who sends it and whom it has not heard from lately.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub node: String,
    pub silent: BTreeSet<String>,
}

pub fn encode(h: &Hello) -> Vec<u8> {
    let silent: Vec<&str> = h.silent.iter().map(String::as_str).collect();
    format!("{MAGIC} {} {}", h.node, silent.join(",")).into_bytes()
}

/// `None` for anything that is not a well-formed probe.
pub fn decode(bytes: &[u8]) -> Option<Hello> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.split(' ');
    if parts.next()? != MAGIC {
        return None;
    }
    let node = parts.next().filter(|n| !n.is_empty())?.to_string();
    let silent = parts
        .next()
        .unwrap_or_default()
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    parts.next().is_none().then_some(Hello { node, silent })
}

/// What this agent has heard from its peers: when each last spoke, and whom it reported
/// silent then. Pure.
#[derive(Debug, Default)]
pub struct PeerView {
    heard: BTreeMap<String, (Instant, BTreeSet<String>)>,
}

impl PeerView {
    pub fn heard(&mut self, hello: Hello, now: Instant) {
        self.heard.insert(hello.node, (now, hello.silent));
    }

    /// Forgets nodes that are no peers any more.
    pub fn retain(&mut self, peers: &BTreeMap<String, SocketAddr>) {
        self.heard.retain(|n, _| peers.contains_key(n));
    }

    fn recent(&self, node: &str, now: Instant, dead_after: Duration) -> bool {
        self.heard
            .get(node)
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) < dead_after)
    }

    /// Peers heard before but not within `dead_after`.
    pub fn silent(
        &self,
        peers: &BTreeMap<String, SocketAddr>,
        me: &str,
        now: Instant,
        dead_after: Duration,
    ) -> BTreeSet<String> {
        peers
            .keys()
            .filter(|n| n.as_str() != me && self.heard.contains_key(*n))
            .filter(|n| !self.recent(n, now, dead_after))
            .cloned()
            .collect()
    }

    /// Silent peers that a witness (a peer heard within `dead_after`) reports silent too.
    pub fn dead(
        &self,
        peers: &BTreeMap<String, SocketAddr>,
        me: &str,
        now: Instant,
        dead_after: Duration,
    ) -> BTreeSet<String> {
        let silent = self.silent(peers, me, now, dead_after);
        let witnesses: Vec<&BTreeSet<String>> = peers
            .keys()
            .filter(|n| n.as_str() != me && self.recent(n, now, dead_after))
            .filter_map(|n| self.heard.get(n).map(|(_, s)| s))
            .collect();
        silent
            .into_iter()
            .filter(|n| witnesses.iter().any(|w| w.contains(n)))
            .collect()
    }
}

/// The probes' shared state: the peers (from the heartbeat Leases), what was heard, and
/// the peers found dead.
#[derive(Default)]
struct State {
    peers: BTreeMap<String, SocketAddr>,
    view: PeerView,
    dead: BTreeSet<String>,
}

/// This agent's probes: a thread of its own sends and receives them, so a busy async
/// runtime neither delays them nor makes this agent look dead.
pub struct Probes {
    me: String,
    port: u16,
    state: Mutex<State>,
    /// Woken when the dead set changes: the announcer decides at once.
    wake: Arc<Notify>,
}

impl Probes {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds `port` on every address of the node (IPv6 and IPv4 where the node has IPv6,
    /// else IPv4) and starts the probe thread.
    pub fn start(
        me: &str,
        port: u16,
        cfg: ProbeConfig,
        wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> io::Result<Arc<Self>> {
        let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port))
            .or_else(|_| UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, port)))?;
        let probes = Arc::new(Self {
            me: me.to_string(),
            port: socket.local_addr()?.port(),
            state: Mutex::default(),
            wake,
        });
        let worker = probes.clone();
        std::thread::Builder::new()
            .name("peer-probes".into())
            .spawn(move || worker.run(socket, cfg, &metrics))?;
        Ok(probes)
    }

    /// The port probes arrive on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The peers to probe: every other agent's advertised address.
    pub fn set_peers(&self, mut peers: BTreeMap<String, SocketAddr>) {
        peers.remove(&self.me);
        let mut s = self.lock();
        s.view.retain(&peers);
        s.dead.retain(|n| peers.contains_key(n));
        s.peers = peers;
    }

    /// The peers found dead by probes now.
    pub fn dead(&self) -> BTreeSet<String> {
        self.lock().dead.clone()
    }

    fn run(&self, socket: UdpSocket, cfg: ProbeConfig, metrics: &Metrics) {
        let v6 = socket.local_addr().is_ok_and(|a| a.is_ipv6());
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut next_send = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_send {
                self.send_all(&socket, v6, cfg, metrics);
                self.judge(cfg, metrics);
                next_send = now + cfg.interval;
            }
            let wait = next_send
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            if socket.set_read_timeout(Some(wait)).is_err() {
                std::thread::sleep(wait);
                continue;
            }
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => self.receive(&buf[..n], from),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => tracing::debug!("peer probe receive: {e}"),
            }
        }
    }

    fn send_all(&self, socket: &UdpSocket, v6: bool, cfg: ProbeConfig, metrics: &Metrics) {
        let (peers, hello) = {
            let s = self.lock();
            let silent = s
                .view
                .silent(&s.peers, &self.me, Instant::now(), cfg.dead_after);
            let hello = Hello {
                node: self.me.clone(),
                silent,
            };
            (s.peers.values().copied().collect::<Vec<_>>(), hello)
        };
        let datagram = encode(&hello);
        for to in peers {
            let to = if v6 { mapped(to) } else { to };
            match socket.send_to(&datagram, to) {
                Ok(_) => metrics.peer_probe_sent(),
                // An unreachable peer is what the probes are there to find out.
                Err(e) => tracing::trace!(peer = %to, "peer probe send: {e}"),
            }
        }
    }

    /// Counts a probe only from the address its sender advertises.
    fn receive(&self, bytes: &[u8], from: SocketAddr) {
        let Some(hello) = decode(bytes) else {
            return;
        };
        let mut s = self.lock();
        let expected = s.peers.get(&hello.node).map(|a| a.ip().to_canonical());
        if expected == Some(from.ip().to_canonical()) {
            s.view.heard(hello, Instant::now());
        } else {
            tracing::debug!(claimed = %hello.node, from = %from, "peer probe from an address that is not the node's; ignored");
        }
    }

    /// Recomputes the dead peers; a change wakes the announcer.
    fn judge(&self, cfg: ProbeConfig, metrics: &Metrics) {
        let changed = {
            let mut s = self.lock();
            let dead = s
                .view
                .dead(&s.peers, &self.me, Instant::now(), cfg.dead_after);
            if dead == s.dead {
                false
            } else {
                for n in dead.difference(&s.dead) {
                    tracing::info!(peer = %n, "peer agent silent here and at a witness: seen dead, its addresses may be taken before their Leases expire");
                }
                for n in s.dead.difference(&dead) {
                    tracing::info!(peer = %n, "peer agent heard again");
                }
                metrics.peers_dead(dead.len());
                s.dead = dead;
                true
            }
        };
        if changed {
            self.wake.notify_one();
        }
    }
}

/// `addr` as an IPv4-mapped IPv6 address, for a socket bound to `[::]`.
fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    }
}

/// The probe address in a heartbeat Lease's annotation, when it has a valid one.
pub fn advertised(value: &str) -> Option<SocketAddr> {
    value.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use super::*;

    static T0: LazyLock<Instant> = LazyLock::new(Instant::now);

    fn at(ms: u64) -> Instant {
        *T0 + Duration::from_millis(ms)
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn peers(names: &[&str]) -> BTreeMap<String, SocketAddr> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let addr: SocketAddr = format!("198.18.{}.10:7947", i + 1).parse().expect("addr");
                (n.to_string(), addr)
            })
            .collect()
    }

    fn hello(node: &str, silent: &[&str]) -> Hello {
        Hello {
            node: node.into(),
            silent: set(silent),
        }
    }

    const DEAD_AFTER: Duration = Duration::from_millis(500);

    #[test]
    fn probes_round_trip_and_junk_is_refused() {
        for h in [hello("berth-node-1", &[]), hello("n1", &["n2", "n3"])] {
            assert_eq!(decode(&encode(&h)), Some(h));
        }
        for junk in [
            &b""[..],
            b"berth-peer-probe/1",
            b"berth-peer-probe/1  a",
            b"other/1 n1 ",
            b"berth-peer-probe/1 n1 a b",
            &[0xff, 0xfe],
        ] {
            assert_eq!(decode(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn a_peer_silent_here_and_at_a_witness_is_dead() {
        let all = peers(&["me", "a", "b"]);
        let mut v = PeerView::default();
        v.heard(hello("a", &[]), at(0));
        v.heard(hello("b", &[]), at(0));
        assert!(v.dead(&all, "me", at(400), DEAD_AFTER).is_empty());
        // a stops; b keeps talking but has not noticed yet: silent here, not dead.
        v.heard(hello("b", &[]), at(600));
        assert_eq!(v.silent(&all, "me", at(600), DEAD_AFTER), set(&["a"]));
        assert!(v.dead(&all, "me", at(600), DEAD_AFTER).is_empty());
        // b reports a silent too.
        v.heard(hello("b", &["a"]), at(700));
        assert_eq!(v.dead(&all, "me", at(700), DEAD_AFTER), set(&["a"]));
        // a speaks again: alive at once.
        v.heard(hello("a", &[]), at(750));
        assert!(v.dead(&all, "me", at(750), DEAD_AFTER).is_empty());
    }

    #[test]
    fn an_agent_that_hears_nobody_declares_nobody_dead() {
        let all = peers(&["me", "a", "b"]);
        let mut v = PeerView::default();
        v.heard(hello("a", &["b"]), at(0));
        v.heard(hello("b", &["a"]), at(0));
        // Both silent here, each reporting the other: the witnesses are silent themselves.
        assert_eq!(v.silent(&all, "me", at(900), DEAD_AFTER), set(&["a", "b"]));
        assert!(v.dead(&all, "me", at(900), DEAD_AFTER).is_empty());
    }

    #[test]
    fn two_nodes_have_no_witness_and_unheard_peers_never_die() {
        let two = peers(&["me", "a"]);
        let mut v = PeerView::default();
        v.heard(hello("a", &[]), at(0));
        assert!(v.dead(&two, "me", at(5_000), DEAD_AFTER).is_empty());
        // c never spoke (its probes blocked): neither silent nor dead, whatever b says.
        let three = peers(&["me", "b", "c"]);
        let mut v = PeerView::default();
        v.heard(hello("b", &["c"]), at(5_000));
        assert!(v.silent(&three, "me", at(5_000), DEAD_AFTER).is_empty());
        assert!(v.dead(&three, "me", at(5_000), DEAD_AFTER).is_empty());
    }

    #[test]
    fn a_witness_only_counts_for_peers_silent_here() {
        let all = peers(&["me", "a", "b"]);
        let mut v = PeerView::default();
        v.heard(hello("a", &[]), at(0));
        // b cannot hear a (a one-way fault between them); this agent hears a fine.
        v.heard(hello("b", &["a"]), at(0));
        assert!(v.dead(&all, "me", at(100), DEAD_AFTER).is_empty());
    }

    /// Two agents on loopback hear each other; one stops and a third, reporting it silent,
    /// makes it dead; the announcer is woken.
    #[tokio::test]
    async fn probes_over_loopback_find_a_stopped_peer() {
        let cfg = ProbeConfig {
            interval: Duration::from_millis(20),
            dead_after: Duration::from_millis(150),
        };
        let wake = Arc::new(Notify::new());
        let metrics = Arc::new(Metrics::default());
        let a = Probes::start("a", 0, cfg, wake.clone(), metrics.clone()).expect("a");
        let b = Probes::start("b", 0, cfg, Arc::new(Notify::new()), metrics).expect("b");
        // c is a peer only as far as a knows: it talks from a socket the test drives.
        let c = UdpSocket::bind("127.0.0.1:0").expect("c");
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let all = BTreeMap::from([
            ("a".to_string(), loopback(a.port())),
            ("b".to_string(), loopback(b.port())),
            ("c".to_string(), c.local_addr().expect("c addr")),
        ]);
        a.set_peers(all.clone());
        b.set_peers(all);
        let say = |silent: &[&str]| {
            let _ = c.send_to(&encode(&hello("c", silent)), loopback(a.port()));
        };
        say(&[]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(a.dead().is_empty(), "{:?}", a.dead());
        // a now expects b at another address: what b sends is refused (a spoof, as far as
        // a knows) and b falls silent; c, still heard, reports it silent too.
        a.lock()
            .peers
            .insert("b".into(), SocketAddr::from(([127, 0, 0, 2], b.port())));
        let woken = tokio::spawn({
            let wake = wake.clone();
            async move { wake.notified().await }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.dead() != set(&["b"]) && Instant::now() < deadline {
            say(&["b"]);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(a.dead(), set(&["b"]));
        tokio::time::timeout(Duration::from_secs(1), woken)
            .await
            .expect("announcer woken")
            .expect("join");
    }
}
