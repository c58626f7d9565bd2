//! The server against loopback clients.

use super::*;

use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn routes(path: &str) -> Reply {
    match path {
        "/healthz" => Reply::text(200, "ok\n"),
        "/json" => Reply::json(503, &serde_json::json!({"healthy": false})),
        _ => Reply::not_found(),
    }
}

async fn start(limits: Limits) -> (SocketAddr, Server, tokio::task::JoinHandle<()>) {
    let listener = bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = Server::new(limits);
    let task = tokio::spawn(server.clone().serve(listener, routes));
    (addr, server, task)
}

/// Sends `request` and reads until the server closes the connection.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until the server closes `s` (EOF or reset); how long that took.
async fn closed_after(mut s: TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((start + within).into(), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn routes_get_and_head_only() {
    let (addr, _server, task) = start(Limits::default()).await;
    let ok = exchange(addr, b"GET /healthz?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(ok.ends_with("\r\n\r\nok\n"), "{ok}");
    assert!(
        ok.to_ascii_lowercase().contains("connection: close"),
        "{ok}"
    );
    let json = exchange(addr, b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(json.starts_with("HTTP/1.1 503 "), "{json}");
    assert!(json.contains("application/json"), "{json}");
    let head = exchange(addr, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");
    let post = exchange(
        addr,
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    assert!(
        post.to_ascii_lowercase().contains("allow: get, head"),
        "{post}"
    );
    let missing = exchange(addr, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
    task.abort();
}

#[tokio::test]
async fn oversized_heads_are_refused() {
    let limits = Limits {
        max_head_bytes: 1024,
        ..Limits::default()
    };
    let (addr, _server, task) = start(limits).await;
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(2000)
    );
    let reply = exchange(addr, big.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");
    // A head that never ends is cut off at the read buffer, not buffered without end.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .expect("write");
    let header = format!("X-Pad: {}\r\n", "a".repeat(1000));
    let mut sent = 0;
    while sent < 64 * 1024 {
        if s.write_all(header.as_bytes()).await.is_err() {
            break;
        }
        sent += header.len();
    }
    assert!(
        closed_after(s, Duration::from_secs(2)).await.is_some(),
        "an endless head keeps its connection"
    );
    task.abort();
}

#[tokio::test]
async fn idle_and_slow_connections_are_closed() {
    let limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        connection_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let (addr, server, task) = start(limits).await;
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .await
        .expect("write");
    let silent = TcpStream::connect(addr).await.expect("connect");
    for s in [idle, silent] {
        let took = closed_after(s, Duration::from_secs(3)).await;
        assert!(took.is_some(), "an idle connection stayed open");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(server.open_connections(), 0);
    task.abort();

    // A client dripping its head (the header timeout is far away) still meets the
    // connection timeout.
    let limits = Limits {
        header_read_timeout: Duration::from_secs(30),
        connection_timeout: Duration::from_millis(400),
        ..Limits::default()
    };
    let (addr, _server, task) = start(limits).await;
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    let drip = tokio::spawn(async move {
        let start = Instant::now();
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: abcdefghijklmnopqrstuvwxyz" {
            if slow.write_all(&[*b]).await.is_err() {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    });
    let closed = drip.await.expect("drip task");
    assert!(
        closed.is_some_and(|d| d < Duration::from_secs(2)),
        "a dripping client outlived the connection timeout: {closed:?}"
    );
    task.abort();
}

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[tokio::test]
async fn the_cap_holds_and_a_new_client_is_still_answered() {
    let cap = 8;
    let limits = Limits {
        max_connections: cap,
        ..Limits::default()
    };
    let (addr, server, task) = start(limits).await;
    let before = open_descriptors();
    let mut idle = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .expect("write");
        idle.push(s);
    }
    // Let the server accept everything it is going to.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        server.open_connections() <= cap,
        "{}",
        server.open_connections()
    );
    // This process holds both ends: 100 client sockets, and at most the cap (plus the
    // one accepted socket waiting for a slot) on the server side.
    let grown = open_descriptors().saturating_sub(before);
    assert!(
        grown <= 100 + cap + 1,
        "{grown} descriptors for 100 clients"
    );
    let started = Instant::now();
    let ok = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // The connections that lost their slot were closed by the server.
    let mut closed = 0;
    for s in idle {
        if closed_after(s, Duration::from_millis(200)).await.is_some() {
            closed += 1;
        }
    }
    assert!(
        closed >= 100 - cap,
        "only {closed} of 100 idle connections closed"
    );
    task.abort();
}

#[tokio::test]
async fn dropping_the_server_closes_its_connections() {
    let (addr, server, task) = start(Limits::default()).await;
    let s = TcpStream::connect(addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.open_connections(), 1);
    task.abort();
    assert!(closed_after(s, Duration::from_secs(2)).await.is_some());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(server.open_connections(), 0);
}

#[test]
fn accept_backoff_doubles_caps_and_resets() {
    let mut b = Backoff::default();
    assert_eq!(b.next_pause(), Duration::from_millis(5));
    assert_eq!(b.next_pause(), Duration::from_millis(10));
    for _ in 0..40 {
        b.next_pause();
    }
    assert_eq!(b.next_pause(), Duration::from_secs(1));
    b.reset();
    assert_eq!(b.next_pause(), Duration::from_millis(5));
}

/// Connections waiting in the accept queue of the listening socket on `port`
/// (`/proc/net/tcp` shows it as the receive queue of a LISTEN entry).
fn accept_queue(port: u16) -> Option<usize> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
        let listening = *f.get(3)? == "0A";
        let rx = f.get(4)?.split(':').nth(1)?;
        (listening && local_port == port).then(|| usize::from_str_radix(rx, 16).ok())?
    })
}

/// A burst of handshakes larger than the usual default backlogs queues whole while the
/// server is not accepting, so no client is left half-connected waiting for SYN-ACK
/// retransmissions (which would keep it out of the timeouts for seconds).
#[tokio::test]
async fn a_burst_beyond_the_default_backlogs_queues_whole() {
    const BURST: usize = 300;
    let listener = bind_now("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut clients = Vec::new();
    for _ in 0..BURST {
        // Past a full queue the kernel drops the SYN and the connect hangs in retries.
        match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
            Ok(Ok(c)) => clients.push(c),
            Ok(Err(e)) => panic!("connect: {e}"),
            Err(_) => break,
        }
    }
    assert_eq!(
        clients.len(),
        BURST,
        "handshakes completed before the queue was full"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut queued = accept_queue(addr.port());
    while queued != Some(BURST) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        queued = accept_queue(addr.port());
    }
    assert_eq!(queued, Some(BURST), "handshakes queued at the listener");
    drop(listener);
}
