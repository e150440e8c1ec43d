//! Test client for tuple collisions: in each round, two TCP connections from ONE local
//! address and port (both sockets `SO_REUSEADDR`, bound to it) to two targets at the same
//! time, each sending one HTTP request and reading the answer to its end.
//!
//! `rt-collide --bind ADDR:PORT --to VIP:PORT --to VIP:PORT [--rounds N]` prints one JSON
//! object: `ok` (answers read), `failed`, `ids` (who answered, per target), `peers` (what
//! `getpeername` showed, per target) and `errors`. Round `r` binds port `PORT + r`.
use std::{collections::BTreeSet, net::SocketAddr};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
};

fn usage() -> ! {
    eprintln!("usage: rt-collide --bind ADDR:PORT --to ADDR:PORT --to ADDR:PORT [--rounds N]");
    std::process::exit(2)
}

struct Args {
    bind: SocketAddr,
    to: Vec<SocketAddr>,
    rounds: u16,
}

fn args() -> Args {
    let mut a = Args {
        bind: "0.0.0.0:0".parse().unwrap_or_else(|_| usage()),
        to: Vec::new(),
        rounds: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--bind" => a.bind = v.parse().unwrap_or_else(|_| usage()),
            "--to" => a.to.push(v.parse().unwrap_or_else(|_| usage())),
            "--rounds" => a.rounds = v.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    if a.to.len() != 2 || a.bind.port() == 0 {
        usage();
    }
    a
}

/// One request on a connected socket: (who answered, the socket's peer).
async fn request(bind: SocketAddr, to: SocketAddr) -> Result<(String, String), String> {
    let s = if bind.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    s.set_reuseaddr(true).map_err(|e| e.to_string())?;
    s.bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
    let mut c = s
        .connect(to)
        .await
        .map_err(|e| format!("connect {to} from {bind}: {e}"))?;
    let peer = c.peer_addr().map_err(|e| e.to_string())?.to_string();
    let req = format!("GET / HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n");
    c.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write {to}: {e}"))?;
    let mut buf = Vec::new();
    c.read_to_end(&mut buf)
        .await
        .map_err(|e| format!("read {to}: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(|| format!("{to}: no HTTP answer: {text:?}"))?;
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("{to}: body {body:?}: {e}"))?;
    let id = v["id"].as_str().unwrap_or("").to_owned();
    Ok((id, peer))
}

/// `request`, given up after 5 s (a connection that collided with another stalls).
async fn bounded(bind: SocketAddr, to: SocketAddr) -> Result<(String, String), String> {
    tokio::time::timeout(std::time::Duration::from_secs(5), request(bind, to))
        .await
        .unwrap_or_else(|_| Err(format!("{to} from {bind}: no answer within 5 s")))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = args();
    let mut ok = 0;
    let mut failed = 0;
    let mut ids = vec![BTreeSet::new(), BTreeSet::new()];
    let mut peers = vec![BTreeSet::new(), BTreeSet::new()];
    let mut errors = Vec::new();
    for r in 0..a.rounds {
        let bind = SocketAddr::new(a.bind.ip(), a.bind.port() + r);
        // Both connected before either request: the two flows exist at the same time.
        let (x, y) = tokio::join!(bounded(bind, a.to[0]), bounded(bind, a.to[1]));
        for (i, res) in [x, y].into_iter().enumerate() {
            match res {
                Ok((id, peer)) => {
                    ok += 1;
                    ids[i].insert(id);
                    peers[i].insert(peer);
                }
                Err(e) => {
                    failed += 1;
                    errors.push(e);
                }
            }
        }
    }
    let out = serde_json::json!({
        "ok": ok, "failed": failed, "ids": ids, "peers": peers, "errors": errors,
    });
    println!("{out}");
}
