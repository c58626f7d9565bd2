//! Plays a pod's containers in the simulated cluster: an HTTP server on each `--tcp` port
//! answering with the pod's name (and, at `/clientip`, the caller's address), the nginx
//! welcome page on each `--nginx` port, and a UDP echo on each `--udp` port that answers
//! `<pod name> <payload>`.

use std::net::SocketAddr;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    name: String,
    #[arg(long)]
    tcp: Vec<u16>,
    #[arg(long)]
    nginx: Vec<u16>,
    #[arg(long)]
    udp: Vec<u16>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut tasks = tokio::task::JoinSet::new();
    for (port, nginx) in args
        .tcp
        .iter()
        .map(|p| (*p, false))
        .chain(args.nginx.iter().map(|p| (*p, true)))
    {
        // `::` takes IPv4 too (bindv6only is off): IPv6 endpoints answer like IPv4 ones.
        let listener = TcpListener::bind(("::", port)).await?;
        let name = args.name.clone();
        tasks.spawn(async move {
            loop {
                if let Ok((stream, peer)) = listener.accept().await {
                    tokio::spawn(serve_http(stream, peer, name.clone(), nginx));
                }
            }
        });
    }
    for port in args.udp {
        let socket = UdpSocket::bind(("0.0.0.0", port)).await?;
        let name = args.name.clone();
        tasks.spawn(async move {
            let mut buf = vec![0u8; 65535];
            loop {
                if let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                    let mut reply = format!("{name} ").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
    }
    eprintln!("berth-podserver {} ready", args.name);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

const NGINX_PAGE: &str = "<!DOCTYPE html>\n<html>\n<head>\n<title>Welcome to nginx!</title>\n</head>\n<body>\n<h1>Welcome to nginx!</h1>\n<p>If you see this page, the nginx web server is successfully installed and\nworking. Further configuration is required.</p>\n<p><em>Thank you for using nginx.</em></p>\n</body>\n</html>\n";

async fn serve_http(mut stream: TcpStream, peer: SocketAddr, name: String, nginx: bool) {
    // IPv4 callers arrive as `::ffff:a.b.c.d` on the dual-stack socket: report them as IPv4.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Keep-alive: answer each request head until the client closes.
    loop {
        let head_end = loop {
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break Some(pos + 4);
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > 64 * 1024 {
                break None;
            }
        };
        let Some(end) = head_end else { return };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end);
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        let close = head.to_ascii_lowercase().contains("connection: close");
        let (ctype, body) = if path == "/clientip" {
            ("text/plain", format!("{}\n", peer.ip()))
        } else if nginx {
            ("text/html", NGINX_PAGE.to_string())
        } else {
            ("text/plain", format!("{name}\n"))
        };
        let server = if nginx { "nginx" } else { "berth-podserver" };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nServer: {server}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
             X-Berth-Pod: {name}\r\nX-Berth-Client: {peer}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" },
        );
        if stream.write_all(resp.as_bytes()).await.is_err() || close {
            return;
        }
    }
}
