//! Admin HTTP: `/healthz` (the process runs), `/readyz` (every watch delivered its first
//! list), `/metrics` (Prometheus text). A few lines of HTTP/1.1 on purpose: no client data
//! reaches it beyond the request line.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// Status line and body for a request path. Pure.
pub fn respond(path: &str, metrics: &Metrics) -> (&'static str, &'static str, String) {
    let text = "text/plain; charset=utf-8";
    match path.split('?').next().unwrap_or("") {
        "/healthz" | "/livez" => ("200 OK", text, "ok\n".into()),
        "/readyz" => {
            if metrics.ready.load(Ordering::Relaxed) {
                ("200 OK", text, "ready\n".into())
            } else {
                (
                    "503 Service Unavailable",
                    text,
                    "waiting for the first list of every watch\n".into(),
                )
            }
        }
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        _ => ("404 Not Found", text, "not found\n".into()),
    }
}

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // Read until the end of the request head (or the buffer is full).
            while len < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    stream.read(&mut buf[len..]),
                )
                .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => {
                        len += n;
                        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                }
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, ctype, body) = respond(path, &metrics);
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let m = Metrics::default();
        assert_eq!(respond("/healthz", &m).0, "200 OK");
        assert_eq!(respond("/readyz", &m).0, "503 Service Unavailable");
        m.ready.store(true, Ordering::Relaxed);
        assert_eq!(respond("/readyz", &m).0, "200 OK");
        assert!(respond("/metrics", &m).2.contains("berth_leader 0"));
        assert_eq!(respond("/nope", &m).0, "404 Not Found");
    }
}
