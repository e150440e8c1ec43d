//! A tiny upgrade-echo server for the activator tests: answers a request carrying
//! `Upgrade: websocket` with `101 Switching Protocols` (and a fixed `Sec-WebSocket-Accept`),
//! then echoes raw bytes until the peer closes. Anything else gets `200 plain http`.
//! Listens on `$PORT` (default 8080).
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
};

fn handle(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    if !head.contains("upgrade: websocket") {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\nplain http\n",
        );
        return;
    }
    let resp = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    if s.write_all(resp.as_bytes()).is_err() {
        return;
    }
    // Bytes that came with the handshake are echoed first.
    if end < buf.len() && s.write_all(&buf[end..]).is_err() {
        return;
    }
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&chunk[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    let listener = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
        eprintln!("rt-ws: bind {port}: {e}");
        std::process::exit(1)
    });
    for s in listener.incoming().flatten() {
        std::thread::spawn(move || handle(s));
    }
}
