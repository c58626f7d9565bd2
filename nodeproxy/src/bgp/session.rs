//! One BGP session with one router (RFC 4271's FSM, active side only): connect, OPEN,
//! KEEPALIVE, then UPDATEs following the wanted routes, until stopped. Each session is
//! its own task with its own deadlines, so a peer that is slow, wrong or silent only
//! affects itself. A failed session reports why and retries with a growing delay.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout};

use super::routes::{self, Routes};
use super::wire::{self, Families, Message, Notification, Speaker, code};

/// Everything a session needs; a change restarts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub peer_asn: u32,
    pub my_asn: u32,
    pub hold_time: u16,
    pub keepalive: Option<u16>,
    pub source: Option<IpAddr>,
    pub password: Option<String>,
    /// This node's IPv4 address: router id and next hop.
    pub node_ip: Ipv4Addr,
}

impl PeerConfig {
    /// What the OPEN offers: IPv4 unicast always, IPv6 unicast on a session over IPv6,
    /// whose local address is the IPv6 routes' next hop.
    pub fn families(&self) -> Families {
        Families {
            ipv4: true,
            ipv6: self.address.is_ipv6(),
        }
    }
}

/// FSM states as RFC 4271 names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Idle,
    Connect,
    OpenSent,
    OpenConfirm,
    Established,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "Idle",
            State::Connect => "Connect",
            State::OpenSent => "OpenSent",
            State::OpenConfirm => "OpenConfirm",
            State::Established => "Established",
        }
    }
}

/// What a session reports: its state, a one-word reason and the details.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub state: State,
    pub reason: String,
    pub message: String,
    pub announced: usize,
}

impl Report {
    fn new(state: State, reason: &str, message: impl Into<String>) -> Self {
        Self {
            state,
            reason: reason.into(),
            message: message.into(),
            announced: 0,
        }
    }
}

/// Time to wait for a TCP connection, and for the peer's OPEN (RFC 4271 suggests a
/// large value; a router answers at once or not at all).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Retry delays after a failure: 1 s doubling up to 30 s.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// On stop: time between withdrawing every route and closing, so the router moves the
/// traffic to the other nodes while this one still serves it.
pub const WITHDRAW_GRACE: Duration = Duration::from_secs(1);

/// Why a session attempt ended.
struct Ended {
    report: Report,
    /// A stop was asked for: do not retry.
    stopped: bool,
}

/// Runs the session until `stop` turns true, retrying after failures. Progress goes to
/// `report`.
pub async fn run(
    cfg: PeerConfig,
    mut routes: watch::Receiver<Routes>,
    mut stop: watch::Receiver<bool>,
    report: watch::Sender<Report>,
) {
    let mut delay = RETRY_MIN;
    loop {
        if *stop.borrow() {
            return;
        }
        let started = Instant::now();
        let ended = attempt(&cfg, &mut routes, &mut stop, &report).await;
        tracing::info!(peer = %cfg.name, reason = %ended.report.reason, "BGP session ended: {}", ended.report.message);
        let _ = report.send(ended.report);
        if ended.stopped {
            return;
        }
        // A session that stayed up a while restarts at once; a failing one backs off.
        if started.elapsed() > RETRY_MAX {
            delay = RETRY_MIN;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            // A dropped sender stops the session too.
            r = stop.changed() => if r.is_err() { return },
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

fn failed(reason: &str, message: impl Into<String>) -> Ended {
    Ended {
        report: Report::new(State::Idle, reason, message),
        stopped: false,
    }
}

/// `struct tcp_md5sig` of linux/tcp.h; libc has the constant but not the struct.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: u32,
    key: [u8; 80],
}

/// Turns on TCP MD5 signatures (RFC 2385) towards `peer` with `password`.
fn set_md5(socket: &TcpSocket, peer: SocketAddr, password: &str) -> std::io::Result<()> {
    if password.len() > 80 {
        return Err(std::io::Error::other(
            "TCP MD5 password longer than 80 bytes",
        ));
    }
    // SAFETY: all-zero is a valid value of this plain C struct.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    match peer.ip() {
        IpAddr::V4(ip) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut sig.addr as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
        }
        IpAddr::V6(ip) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut sig.addr as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = ip.octets();
        }
    }
    sig.keylen = password.len() as u16;
    sig.key[..password.len()].copy_from_slice(password.as_bytes());
    // SAFETY: setsockopt with a pointer to a live struct of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            &sig as *const TcpMd5Sig as *const libc::c_void,
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

async fn connect(cfg: &PeerConfig) -> Result<TcpStream, Ended> {
    let socket = match cfg.address {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| failed("SocketError", format!("socket: {e}")))?;
    if let Some(pw) = &cfg.password {
        set_md5(&socket, cfg.address, pw)
            .map_err(|e| failed("AuthenticationFailed", format!("TCP MD5: {e}")))?;
    }
    if let Some(src) = cfg.source {
        socket
            .bind(SocketAddr::new(src, 0))
            .map_err(|e| failed("InvalidConfig", format!("bind sourceAddress {src}: {e}")))?;
    }
    match timeout(CONNECT_TIMEOUT, socket.connect(cfg.address)).await {
        Ok(Ok(s)) => Ok(s),
        // A reset: the router is there but takes no session from this node.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(failed(
            "ConnectionRefused",
            format!(
                "connect {}: {e}; is BGP running there with this node as a neighbor?",
                cfg.address
            ),
        )),
        Ok(Err(e)) => Err(failed(
            "Unreachable",
            format!("connect {}: {e}", cfg.address),
        )),
        // With TCP MD5 on, silence is what a wrong password looks like: the router drops
        // badly signed segments. Without it, the router is down or filtered, or it
        // expects a password and drops unsigned segments.
        Err(_) if cfg.password.is_some() => Err(failed(
            "AuthenticationFailed",
            format!(
                "no answer from {} within {}s with TCP MD5 on: the router drops segments signed with another password (or it is down)",
                cfg.address,
                CONNECT_TIMEOUT.as_secs()
            ),
        )),
        Err(_) => Err(failed(
            "Unreachable",
            format!(
                "no answer from {} within {}s; if the router expects a TCP MD5 password, it drops unsigned segments",
                cfg.address,
                CONNECT_TIMEOUT.as_secs()
            ),
        )),
    }
}

async fn read_message(stream: &mut (impl AsyncRead + Unpin)) -> Result<Message, String> {
    let mut head = [0u8; wire::HEADER];
    stream
        .read_exact(&mut head)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let (kind, len) = wire::header(&head).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| format!("read: {e}"))?;
    wire::parse(kind, &body).map_err(|e| e.to_string())
}

async fn send(stream: &mut (impl AsyncWrite + Unpin), msg: &[u8]) -> Result<(), Ended> {
    stream
        .write_all(msg)
        .await
        .map_err(|e| failed("ConnectionLost", format!("write: {e}")))
}

/// Sends a NOTIFICATION and ends the attempt with it.
async fn notify(stream: &mut TcpStream, n: Notification, reason: &str, message: String) -> Ended {
    let _ = timeout(
        Duration::from_secs(1),
        stream.write_all(&wire::notification(n)),
    )
    .await;
    failed(reason, message)
}

fn received(n: Notification) -> Ended {
    failed(
        n.reason(),
        format!(
            "router sent NOTIFICATION: {} ({}/{})",
            n.text(),
            n.code,
            n.subcode
        ),
    )
}

/// One connection from connect to its end.
async fn attempt(
    cfg: &PeerConfig,
    routes: &mut watch::Receiver<Routes>,
    stop: &mut watch::Receiver<bool>,
    report: &watch::Sender<Report>,
) -> Ended {
    // Until established, the report keeps the last failure's reason and words: a peer
    // that keeps failing shows why, not that it is trying again.
    report.send_modify(|r| r.state = State::Connect);
    let mut stream = tokio::select! {
        r = connect(cfg) => match r { Ok(s) => s, Err(e) => return e },
        _ = stop.changed() => return Ended { report: Report::new(State::Idle, "Stopped", "agent stopping"), stopped: true },
    };
    let _ = stream.set_nodelay(true);
    let (theirs, hold_for) = match handshake(cfg, &mut stream, report).await {
        Ok(h) => h,
        Err(e) => return e,
    };
    let next_hop_v6 = match stream.local_addr() {
        Ok(SocketAddr::V6(a)) if !a.ip().is_unspecified() => Some(*a.ip()),
        _ => None,
    };
    let speaker = Speaker {
        my_asn: cfg.my_asn,
        peer_asn: cfg.peer_asn,
        next_hop: cfg.node_ip,
        next_hop_v6,
        router_id: cfg.node_ip,
        four_octet_as: theirs.four_octet_as,
        families: cfg.families().and(theirs.families),
    };
    established(cfg, stream, speaker, hold_for, routes, stop, report).await
}

/// OPEN sent, the router's OPEN checked (its AS, the hold time), KEEPALIVEs exchanged:
/// the router's OPEN and the agreed hold time (None: no hold timer).
async fn handshake(
    cfg: &PeerConfig,
    stream: &mut TcpStream,
    report: &watch::Sender<Report>,
) -> Result<(wire::Open, Option<Duration>), Ended> {
    let open = wire::open(cfg.my_asn, cfg.hold_time, cfg.node_ip, cfg.families())
        .map_err(|e| failed("InvalidConfig", e.to_string()))?;
    send(stream, &open).await?;
    report.send_modify(|r| r.state = State::OpenSent);
    let theirs = match timeout(OPEN_TIMEOUT, read_message(stream)).await {
        Err(_) => return Err(failed("OpenTimeout", "no OPEN from the router within 30s")),
        Ok(Err(e)) => return Err(failed("ConnectionLost", format!("waiting for OPEN: {e}"))),
        Ok(Ok(Message::Notification(n))) => return Err(received(n)),
        Ok(Ok(Message::Open(o))) => o,
        Ok(Ok(other)) => {
            let n = Notification {
                code: code::FSM_ERROR,
                subcode: 0,
            };
            let msg = format!("expected OPEN, got {other:?}");
            return Err(notify(stream, n, "Notification", msg).await);
        }
    };
    if theirs.asn != cfg.peer_asn {
        let n = Notification {
            code: code::OPEN_ERROR,
            subcode: code::BAD_PEER_AS,
        };
        let msg = format!(
            "Bad Peer AS: the router at {} says AS {}, peerASN is {}",
            cfg.address, theirs.asn, cfg.peer_asn
        );
        return Err(notify(stream, n, "BadPeerAS", msg).await);
    }
    let hold = cfg.hold_time.min(theirs.hold_time);
    if hold == 1 || hold == 2 {
        let n = Notification {
            code: code::OPEN_ERROR,
            subcode: code::UNACCEPTABLE_HOLD_TIME,
        };
        let msg = format!("hold time {hold}s is not allowed");
        return Err(notify(stream, n, "OpenError", msg).await);
    }
    send(stream, &wire::keepalive()).await?;
    report.send_modify(|r| r.state = State::OpenConfirm);
    let hold_for = (hold > 0).then(|| Duration::from_secs(u64::from(hold)));
    match timeout(hold_for.unwrap_or(OPEN_TIMEOUT), read_message(stream)).await {
        Err(_) => {
            let n = Notification {
                code: code::HOLD_TIMER_EXPIRED,
                subcode: 0,
            };
            let msg = "no KEEPALIVE after OPEN".to_string();
            Err(notify(stream, n, "HoldTimerExpired", msg).await)
        }
        Ok(Err(e)) => Err(failed(
            "ConnectionLost",
            format!("waiting for KEEPALIVE: {e}"),
        )),
        Ok(Ok(Message::Notification(n))) => Err(received(n)),
        Ok(Ok(Message::Keepalive)) => Ok((theirs, hold_for)),
        Ok(Ok(other)) => {
            let n = Notification {
                code: code::FSM_ERROR,
                subcode: 0,
            };
            let msg = format!("expected KEEPALIVE, got {other:?}");
            Err(notify(stream, n, "Notification", msg).await)
        }
    }
}

/// Sends what moves the router from `sent` to `wanted`, leaving out the routes the
/// session does not carry; their count.
async fn advertise(
    stream: &mut (impl AsyncWrite + Unpin),
    speaker: &Speaker,
    sent: &mut Routes,
    wanted: &Routes,
) -> Result<usize, Ended> {
    let carried: Routes = wanted
        .iter()
        .filter(|(ip, _)| speaker.carries(ip))
        .map(|(ip, a)| (*ip, a.clone()))
        .collect();
    let (withdraw, announce) = routes::diff(sent, &carried);
    let msgs = speaker
        .updates(&withdraw, &announce)
        .map_err(|e| failed("InvalidConfig", e.to_string()))?;
    for m in msgs {
        send(stream, &m).await?;
    }
    let left_out = wanted.len() - carried.len();
    *sent = carried;
    Ok(left_out)
}

/// The Established report's words: the families agreed to, and why routes are left out.
fn up_message(cfg: &PeerConfig, speaker: &Speaker, left_out: usize) -> String {
    let mut msg = format!(
        "session with {} (AS {}) up, {}",
        cfg.address,
        cfg.peer_asn,
        speaker.families.text()
    );
    if left_out > 0 {
        let why = if !cfg.families().ipv6 {
            "IPv6 routes need a BGPPeer with an IPv6 address"
        } else if !speaker.families.ipv6 {
            "the router did not agree to IPv6 unicast"
        } else if !speaker.families.ipv4 {
            "the router did not agree to IPv4 unicast"
        } else {
            "the session has no IPv6 local address for their next hop"
        };
        msg += &format!("; {left_out} routes not announced: {why}");
    }
    msg
}

async fn established(
    cfg: &PeerConfig,
    stream: TcpStream,
    speaker: Speaker,
    hold: Option<Duration>,
    routes: &mut watch::Receiver<Routes>,
    stop: &mut watch::Receiver<bool>,
    report: &watch::Sender<Report>,
) -> Ended {
    let keepalive_every = hold.map(|h| {
        let configured = cfg.keepalive.map(|k| Duration::from_secs(u64::from(k)));
        configured
            .unwrap_or(h / 3)
            .min(h / 3)
            .max(Duration::from_millis(500))
    });
    // Hold time 0: neither side sends KEEPALIVEs nor expects them.
    let far = Duration::from_secs(3600 * 24 * 365);
    let up = |announced: usize, left_out: usize| Report {
        state: State::Established,
        reason: "Established".into(),
        message: up_message(cfg, &speaker, left_out),
        announced,
    };
    let (mut reader, mut writer) = stream.into_split();
    let mut sent = Routes::new();
    let wanted = routes.borrow_and_update().clone();
    let left_out = match advertise(&mut writer, &speaker, &mut sent, &wanted).await {
        Ok(n) => n,
        Err(e) => return e,
    };
    let _ = report.send(up(sent.len(), left_out));
    tracing::info!(peer = %cfg.name, routes = sent.len(), "BGP session established");
    let mut next_keepalive = Instant::now() + keepalive_every.unwrap_or(far);
    let mut hold_deadline = Instant::now() + hold.unwrap_or(far);
    // Reading runs in its own task so a half-read message is never lost to a select.
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let _reading = AbortOnDrop(tokio::spawn(async move {
        loop {
            let r = read_message(&mut reader).await;
            let end = r.is_err();
            if tx.send(r).await.is_err() || end {
                return;
            }
        }
    }));
    loop {
        tokio::select! {
            _ = sleep_until(next_keepalive) => {
                if let Err(e) = send(&mut writer, &wire::keepalive()).await {
                    return e;
                }
                next_keepalive = Instant::now() + keepalive_every.unwrap_or(far);
            }
            _ = sleep_until(hold_deadline) => {
                let n = Notification { code: code::HOLD_TIMER_EXPIRED, subcode: 0 };
                let _ = send(&mut writer, &wire::notification(n)).await;
                let secs = hold.unwrap_or(far).as_secs();
                return failed("HoldTimerExpired", format!("nothing from the router for {secs}s"));
            }
            msg = rx.recv() => {
                hold_deadline = Instant::now() + hold.unwrap_or(far);
                match msg {
                    None => return failed("ConnectionLost", "router closed the session"),
                    Some(Err(e)) => return failed("ConnectionLost", format!("router closed the session: {e}")),
                    Some(Ok(Message::Notification(n))) => return received(n),
                    Some(Ok(Message::RouteRefresh)) => {
                        let all = std::mem::take(&mut sent);
                        if let Err(e) = advertise(&mut writer, &speaker, &mut sent, &all).await {
                            return e;
                        }
                    }
                    Some(Ok(Message::Open(_))) => {
                        let n = Notification { code: code::FSM_ERROR, subcode: 0 };
                        let _ = send(&mut writer, &wire::notification(n)).await;
                        return failed("Notification", "OPEN in Established");
                    }
                    Some(Ok(Message::Keepalive | Message::Update)) => {}
                }
            }
            changed = routes.changed() => {
                if changed.is_err() {
                    // The speaker dropped this session's routes: it is stopping it.
                    return graceful(&mut writer, &speaker, &mut sent).await;
                }
                let wanted = routes.borrow_and_update().clone();
                match advertise(&mut writer, &speaker, &mut sent, &wanted).await {
                    Ok(left_out) => drop(report.send(up(sent.len(), left_out))),
                    Err(e) => return e,
                }
            }
            _ = stop.changed() => return graceful(&mut writer, &speaker, &mut sent).await,
        }
    }
}

/// Withdraws everything, lets the router move the traffic away, then sends Cease.
async fn graceful(
    writer: &mut (impl AsyncWrite + Unpin),
    speaker: &Speaker,
    sent: &mut Routes,
) -> Ended {
    let _ = advertise(writer, speaker, sent, &Routes::new()).await;
    tokio::time::sleep(WITHDRAW_GRACE).await;
    let n = Notification {
        code: code::CEASE,
        subcode: code::ADMINISTRATIVE_SHUTDOWN,
    };
    let _ = send(writer, &wire::notification(n)).await;
    let _ = writer.shutdown().await;
    Ended {
        report: Report::new(State::Idle, "Stopped", "agent stopping: routes withdrawn"),
        stopped: true,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
