//! Test server: answers HTTP/1.1 requests (keep-alive or not) and UDP datagrams with a JSON
//! body naming itself and the peer address it saw.
//!
//! `rt-server --name NAME [--threads N] [--tcp ADDR]... [--udp ADDR]...`; prints `ready` once
//! every socket is bound, then serves until killed. Each TCP connection gets its own thread:
//! a new one per connection by default, or with `--threads N` one of N threads per listener
//! started up front (each accepts, serves that connection to its end, accepts again), so no
//! thread is created per connection (what the benchmarks use).
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
};

fn usage() -> ! {
    eprintln!("usage: rt-server --name NAME [--threads N] [--tcp ADDR]... [--udp ADDR]...");
    std::process::exit(2)
}

/// The answer: `req` is the UDP payload echoed back (or the HTTP padding).
fn body(name: &str, peer: SocketAddr, local: SocketAddr, req: &str) -> String {
    serde_json::json!({
        "id": name, "peer": peer.to_string(), "local": local.to_string(), "req": req
    })
    .to_string()
}

fn serve_conn(name: &str, stream: TcpStream) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    let local = stream.local_addr()?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        // Request line and headers; a request body is not expected.
        let mut close = false;
        let mut first = true;
        let mut pad = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let l = line.trim_end();
            if l.is_empty() {
                if first {
                    continue;
                }
                break;
            }
            if first {
                // `GET /?pad=N`: add N bytes of padding to the answer.
                if let Some(i) = l.find("pad=") {
                    let digits: String = l[i + 4..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    pad = digits.parse().unwrap_or(0).min(16 << 20);
                }
            }
            first = false;
            let lower = l.to_ascii_lowercase();
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let b = body(name, peer, local, &"x".repeat(pad));
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{}",
            b.len(),
            if close { "Connection: close\r\n" } else { "" },
            b
        );
        out.write_all(resp.as_bytes())?;
        if close {
            return Ok(());
        }
    }
}

fn main() {
    let mut name = None;
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    let mut threads = 0usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--name" => name = Some(val()),
            "--threads" => threads = val().parse().unwrap_or_else(|_| usage()),
            "--tcp" => tcp.push(val().parse::<SocketAddr>().unwrap_or_else(|_| usage())),
            "--udp" => udp.push(val().parse::<SocketAddr>().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    let name: &'static str = Box::leak(name.unwrap_or_else(|| usage()).into_boxed_str());
    let mut handles = Vec::new();
    for addr in tcp {
        let l = TcpListener::bind(addr).unwrap_or_else(|e| {
            eprintln!("rt-server: bind tcp {addr}: {e}");
            std::process::exit(1)
        });
        if threads > 0 {
            let l = std::sync::Arc::new(l);
            for _ in 0..threads {
                let l = l.clone();
                handles.push(thread::spawn(move || loop {
                    if let Ok((s, _)) = l.accept() {
                        let _ = serve_conn(name, s);
                    }
                }));
            }
            continue;
        }
        handles.push(thread::spawn(move || {
            for s in l.incoming().flatten() {
                thread::spawn(move || {
                    let _ = serve_conn(name, s);
                });
            }
        }));
    }
    for addr in udp {
        let s = UdpSocket::bind(addr).unwrap_or_else(|e| {
            eprintln!("rt-server: bind udp {addr}: {e}");
            std::process::exit(1)
        });
        handles.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                let Ok((n, peer)) = s.recv_from(&mut buf) else {
                    continue;
                };
                let req = String::from_utf8_lossy(&buf[..n]);
                let _ = s.send_to(body(name, peer, addr, &req).as_bytes(), peer);
            }
        }));
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    for h in handles {
        let _ = h.join();
    }
}
