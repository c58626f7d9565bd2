//! The admin HTTP server both binaries use (health, readiness, metrics, and the node
//! agent's health-check NodePorts), on hyper.
//!
//! These listeners face whole networks (the node agent's on `0.0.0.0` of every node), so
//! no client may hold the process's resources: the request head must arrive within
//! [`Limits::header_read_timeout`], a connection lives at most
//! [`Limits::connection_timeout`] whatever it does, each serves one request (no
//! keep-alive), heads are capped at [`Limits::max_head_bytes`], and at most
//! [`Limits::max_connections`] connections are open across every listener of one
//! [`Server`], so the process's descriptors stay bounded by the cap plus a constant.
//! When the cap is reached a new connection takes the slot of the oldest one: requests
//! are answered in microseconds, so the oldest connections are the idle ones, and a
//! flood of idle connections cannot lock a health probe out. Accept errors (`EMFILE`)
//! back off instead of spinning.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Open connections across all listeners of a [`Server`] by default: far below the usual
/// 1024 descriptors a process may hold, far above what probes and scrapers need.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// What one client may take from the server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The whole request head must arrive within this.
    pub header_read_timeout: Duration,
    /// A connection is closed this long after it was accepted, whatever it is doing.
    pub connection_timeout: Duration,
    /// Open connections across every listener of the server.
    pub max_connections: usize,
    /// Largest request head (request line and headers); larger ones get 431.
    pub max_head_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(10),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_head_bytes: 8 * 1024,
        }
    }
}

/// hyper's read buffer cannot be smaller than this; heads are limited separately.
const MIN_READ_BUFFER: usize = 8 * 1024;

/// One response: status, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body)
    }

    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        Self::new(status, "application/json", body.to_string())
    }

    /// Prometheus text exposition.
    pub fn metrics(body: String) -> Self {
        Self::new(200, crate::metrics::CONTENT_TYPE, body)
    }

    pub fn not_found() -> Self {
        Self::text(404, "not found\n")
    }
}

/// Answers a request path (without the query). Called for GET and HEAD only.
pub trait Handler: Send + Sync + 'static {
    fn reply(&self, path: &str) -> Reply;
}

impl<F: Fn(&str) -> Reply + Send + Sync + 'static> Handler for F {
    fn reply(&self, path: &str) -> Reply {
        self(path)
    }
}

/// Serves any number of listeners under one set of [`Limits`] and one connection cap.
/// Cheap to clone; clones share the cap.
#[derive(Clone)]
pub struct Server {
    limits: Limits,
    slots: Arc<Slots>,
}

impl Default for Server {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl Server {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            slots: Arc::new(Slots::new(limits.max_connections.max(1))),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Connections open now across every listener of this server.
    pub fn open_connections(&self) -> usize {
        self.slots.open()
    }

    /// Serves `listener` until the returned future is dropped (which also closes its
    /// open connections).
    pub async fn serve(self, listener: TcpListener, handler: impl Handler) {
        let handler: Arc<dyn Handler> = Arc::new(handler);
        let mut connections = JoinSet::new();
        let mut backoff = Backoff::default();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let stream = match accepted {
                Ok((stream, _)) => {
                    backoff.reset();
                    stream
                }
                Err(e) => {
                    // Out of descriptors or memory, or one connection gone before it was
                    // accepted: retrying at once would spin while nothing changes.
                    let pause = backoff.next_pause();
                    tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "admin server cannot accept");
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            let slot = self.slots.admit().await;
            connections.spawn(connection(stream, slot, self.limits, handler.clone()));
        }
    }
}

/// Pending handshakes a listener queues (the kernel caps it at `net.core.somaxconn`).
/// The default backlogs (128 in std, 1024 in tokio) overflow when a flood arrives faster
/// than the accept loop runs; the kernel then drops the handshake's last ACK, the client
/// believes it is connected, and the connection is only accepted, and so only timed
/// out, after seconds of SYN-ACK retransmissions.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener (SO_REUSEADDR, so a restart rebinds at once) with
/// [`LISTEN_BACKLOG`], on the first address `addr` resolves to.
pub async fn bind(addr: impl ToSocketAddrs) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        match bind_now(a) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
    }))
}

/// Binds without awaiting (for callers holding a lock); needs a Tokio runtime.
pub fn bind_now(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn connection(stream: TcpStream, slot: Slot, limits: Limits, handler: Arc<dyn Handler>) {
    let service = service_fn(move |req: Request<Incoming>| {
        let reply = respond(handler.as_ref(), &req);
        async move { Ok::<_, Infallible>(reply) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_head_bytes.max(MIN_READ_BUFFER))
        .max_header_size(limits.max_head_bytes)
        .keep_alive(false);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    // Per-connection outcomes are logged at debug only: a client must not be able to
    // flood the log either.
    tokio::select! {
        served = conn => {
            if let Err(e) = served {
                tracing::debug!(error = %e, "admin connection ended");
            }
        }
        _ = tokio::time::sleep(limits.connection_timeout) => {
            tracing::debug!("admin connection closed: open longer than the connection timeout");
        }
        _ = slot.evicted.cancelled() => {
            tracing::debug!("admin connection closed: its slot went to a newer connection");
        }
    }
}

/// The response to one request. Pure apart from the handler.
fn respond<B>(handler: &dyn Handler, req: &Request<B>) -> Response<Full<Bytes>> {
    let reply = if req.method() == Method::GET || req.method() == Method::HEAD {
        handler.reply(req.uri().path())
    } else {
        Reply::text(405, "only GET and HEAD\n")
    };
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(reply.content_type),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    }
    response
}

/// The connection cap: a permit per open connection, and the open connections by age so
/// the oldest can be told to give its permit up.
struct Slots {
    permits: Arc<Semaphore>,
    open: Mutex<BTreeMap<u64, CancellationToken>>,
    next_id: AtomicU64,
}

/// One open connection's place under the cap; dropping it frees the place.
struct Slot {
    id: u64,
    evicted: CancellationToken,
    slots: Arc<Slots>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.open_map().remove(&self.id);
    }
}

impl Slots {
    fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            open: Mutex::default(),
            next_id: AtomicU64::new(0),
        }
    }

    fn open_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, CancellationToken>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open(&self) -> usize {
        self.open_map().len()
    }

    /// A place for a just-accepted connection; when none is free, the oldest connection
    /// is closed and its place taken once its socket is gone (so at most one accepted
    /// socket waits beyond the cap).
    async fn admit(self: &Arc<Self>) -> Slot {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if let Some((_, oldest)) = self.open_map().pop_first() {
                    oldest.cancel();
                }
                match self.permits.clone().acquire_owned().await {
                    Ok(permit) => permit,
                    // The semaphore is never closed.
                    Err(_) => unreachable!("connection semaphore closed"),
                }
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let evicted = CancellationToken::new();
        self.open_map().insert(id, evicted.clone());
        Slot {
            id,
            evicted,
            slots: self.clone(),
            _permit: permit,
        }
    }
}

/// Pauses after accept errors: 5 ms doubling to 1 s, reset by a successful accept.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    fn next_pause(&mut self) -> Duration {
        let pause = Self::FIRST
            .saturating_mul(1 << self.failures.min(16))
            .min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        pause
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests;
