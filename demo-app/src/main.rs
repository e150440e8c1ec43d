//! A small app for the demo and the tests: HTTP/1.1 with keep-alive on $PORT answering
//! `hello from <addr>`, or with `MODE=line` a line protocol that echoes lines upper-cased.
//! `STARTUP_DELAY_MS` simulates a slow start (the time the instance itself needs).
//! Paths: `/` hello, `/healthz` 200, `/sleep?ms=N` answers after N ms, `/crash` exits.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    time::Duration,
};

fn main() {
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(8080);
    if let Some(ms) = std::env::var("STARTUP_DELAY_MS").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let line_mode = std::env::var("MODE").is_ok_and(|m| m == "line");
    let listener = TcpListener::bind(("::", port))
        .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
        .unwrap_or_else(|e| {
            eprintln!("redirector-hello: bind {port}: {e}");
            std::process::exit(1)
        });
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = stream.set_nodelay(true);
            if line_mode {
                line(stream)
            } else {
                http(stream)
            }
        });
    }
}

fn line(stream: TcpStream) {
    let Ok(mut out) = stream.try_clone() else { return };
    for l in BufReader::new(stream).lines() {
        let Ok(l) = l else { return };
        if out.write_all(format!("{}\n", l.to_uppercase()).as_bytes()).is_err() {
            return;
        }
    }
}

fn http(stream: TcpStream) {
    let me = stream.local_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let Ok(mut out) = stream.try_clone() else { return };
    let mut r = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if r.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut len = 0usize;
        let mut close = false;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        let text = if path.starts_with("/crash") {
            std::process::exit(3);
        } else if let Some(ms) = path.strip_prefix("/sleep?ms=").and_then(|v| v.parse().ok()) {
            std::thread::sleep(Duration::from_millis(ms));
            format!("slept {ms} ms on {me}\n")
        } else {
            format!("hello from {me}\n")
        };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{text}",
            text.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if out.write_all(resp.as_bytes()).is_err() || close {
            return;
        }
    }
}
