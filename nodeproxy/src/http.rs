//! A minimal HTTP/1.1 responder for the admin and health-check endpoints (one request
//! per connection, GET only), so the agent needs no web framework.

use std::future::Future;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A response: status, content type, body.
pub type Response = (u16, &'static str, String);

/// The path of a request head, if it is one.
pub fn request_path(head: &str) -> Option<&str> {
    let line = head.lines().next()?;
    let mut parts = line.split_whitespace();
    let _method = parts.next()?;
    let target = parts.next()?;
    Some(target.split('?').next().unwrap_or(target))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

pub fn format_response((status, ctype, body): &Response) -> String {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason(*status),
        body.len()
    )
}

/// Serves `listener` forever, answering each request with `handler(path)`.
pub async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(String) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response> + Send,
{
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            while len < buf.len() {
                match sock.read(&mut buf[len..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => len += n,
                }
                if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let resp = match request_path(&head) {
                Some(p) => handler(p.to_string()).await,
                None => (400, "text/plain", "bad request\n".into()),
            };
            let _ = sock.write_all(format_response(&resp).as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_path_without_query() {
        assert_eq!(
            request_path("GET /healthz?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some("/healthz")
        );
        assert_eq!(request_path(""), None);
        assert_eq!(request_path("GET"), None);
    }

    #[test]
    fn formats_status_and_length() {
        let r = format_response(&(503, "application/json", "{}".into()));
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(r.contains("Content-Length: 2\r\n"));
        assert!(r.ends_with("\r\n\r\n{}"));
    }
}
