//! Test client: HTTP/1.1 requests over new and kept-alive TCP connections, or UDP datagrams
//! over new and reused sockets, to one address; prints a JSON summary on stdout.
//!
//! ```text
//! rt-client --target ADDR [--udp] [--new N] [--keepalive C] [--per-conn R]
//!           [--stop-file F] [--interval-ms MS] [--timeout-ms MS] [--pad BYTES]
//! ```
//! Without `--stop-file`: N requests on new connections (sequential) and C concurrent
//! kept-alive connections of R requests each. With `--stop-file`: N threads looping over new
//! connections and C threads on kept-alive connections (reconnecting after R requests; R=0
//! never) until the file exists, pausing MS between requests.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use serde_json::{json, Value};

#[derive(Clone)]
struct Opts {
    target: SocketAddr,
    udp: bool,
    new: usize,
    keepalive: usize,
    per_conn: usize,
    stop_file: Option<PathBuf>,
    interval: Duration,
    timeout: Duration,
    pad: usize,
}

/// One answered request.
struct Answer {
    id: String,
    server_peer: String,
    socket_peer: String,
}

/// One connection (or UDP socket) and what answered on it.
#[derive(Default)]
struct ConnLog {
    keepalive: bool,
    requests: usize,
    ok: usize,
    ids: BTreeSet<String>,
}

#[derive(Default)]
struct Totals {
    ok: usize,
    failed: usize,
    errors: Vec<String>,
    identities: BTreeMap<String, usize>,
    server_peers: BTreeSet<String>,
    socket_peers: BTreeSet<String>,
    conns: Vec<ConnLog>,
}

impl Totals {
    fn record(&mut self, conn: &mut ConnLog, r: Result<Answer, String>) {
        conn.requests += 1;
        match r {
            Ok(a) => {
                self.ok += 1;
                conn.ok += 1;
                *self.identities.entry(a.id.clone()).or_default() += 1;
                self.server_peers.insert(a.server_peer);
                self.socket_peers.insert(a.socket_peer);
                conn.ids.insert(a.id);
            }
            Err(e) => {
                self.failed += 1;
                if self.errors.len() < 20 {
                    self.errors.push(e);
                }
            }
        }
    }
}

fn usage() -> ! {
    eprintln!("usage: rt-client --target ADDR [--udp] [--new N] [--keepalive C] [--per-conn R] [--stop-file F] [--interval-ms MS] [--timeout-ms MS] [--pad BYTES]");
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut o = Opts {
        target: "0.0.0.0:0".parse().unwrap(),
        udp: false,
        new: 0,
        keepalive: 0,
        per_conn: 10,
        stop_file: None,
        interval: Duration::ZERO,
        timeout: Duration::from_secs(5),
        pad: 0,
    };
    let mut target = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        let mut num = || val().parse::<u64>().unwrap_or_else(|_| usage());
        match a.as_str() {
            "--target" => {
                o.target = val().parse().unwrap_or_else(|_| usage());
                target = true;
            }
            "--udp" => o.udp = true,
            "--new" => o.new = num() as usize,
            "--keepalive" => o.keepalive = num() as usize,
            "--per-conn" => o.per_conn = num() as usize,
            "--interval-ms" => o.interval = Duration::from_millis(num()),
            "--timeout-ms" => o.timeout = Duration::from_millis(num()),
            "--stop-file" => o.stop_file = Some(val().into()),
            "--pad" => o.pad = num() as usize,
            _ => usage(),
        }
    }
    if !target {
        usage();
    }
    o
}

fn answer(body: &[u8], socket_peer: SocketAddr) -> Result<(Answer, Value), String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("bad body {:?}: {e}", String::from_utf8_lossy(body)))?;
    let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let a = Answer {
        id: field("id"),
        // The address only: ports differ per connection.
        server_peer: field("peer")
            .parse::<SocketAddr>()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|_| field("peer")),
        socket_peer: socket_peer.to_string(),
    };
    Ok((a, v))
}

/// A TCP connection that speaks HTTP/1.1.
struct Http {
    out: TcpStream,
    reader: BufReader<TcpStream>,
    peer: SocketAddr,
    pad: usize,
}

impl Http {
    fn connect(o: &Opts) -> Result<Self, String> {
        let s = TcpStream::connect_timeout(&o.target, o.timeout)
            .map_err(|e| format!("connect {}: {e}", o.target))?;
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(o.timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(o.timeout))
            .map_err(|e| e.to_string())?;
        let peer = s.peer_addr().map_err(|e| format!("peer_addr: {e}"))?;
        let out = s.try_clone().map_err(|e| e.to_string())?;
        Ok(Self {
            out,
            reader: BufReader::new(s),
            peer,
            pad: o.pad,
        })
    }

    fn request(&mut self, close: bool) -> Result<Answer, String> {
        let req = format!(
            "GET /?pad={} HTTP/1.1\r\nHost: rt\r\n{}\r\n",
            self.pad,
            if close { "Connection: close\r\n" } else { "" }
        );
        self.out
            .write_all(req.as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        let mut status = String::new();
        self.reader
            .read_line(&mut status)
            .map_err(|e| format!("read status: {e}"))?;
        if !status.starts_with("HTTP/1.1 200") {
            return Err(format!("bad status line {status:?}"));
        }
        let mut len = None;
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| format!("read header: {e}"))?;
            if n == 0 {
                return Err("eof in headers".into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                }
            }
        }
        let mut body = vec![0u8; len.ok_or("no content-length")?];
        self.reader
            .read_exact(&mut body)
            .map_err(|e| format!("read body: {e}"))?;
        answer(&body, self.peer).map(|(a, _)| a)
    }
}

fn udp_socket(o: &Opts) -> Result<UdpSocket, String> {
    let bind: SocketAddr = if o.target.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let s = UdpSocket::bind(bind).map_err(|e| format!("udp bind: {e}"))?;
    s.set_read_timeout(Some(o.timeout))
        .map_err(|e| e.to_string())?;
    Ok(s)
}

fn udp_request(o: &Opts, s: &UdpSocket, seq: u64) -> Result<Answer, String> {
    let payload = format!("ping {seq} {}", "x".repeat(o.pad.min(1200)));
    s.send_to(payload.as_bytes(), o.target)
        .map_err(|e| format!("udp send: {e}"))?;
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = s
            .recv_from(&mut buf)
            .map_err(|e| format!("udp recv (seq {seq}): {e}"))?;
        let (a, v) = answer(&buf[..n], from)?;
        // A late answer to an earlier datagram: skip it.
        if v.get("req").and_then(Value::as_str) == Some(payload.as_str()) {
            return Ok(a);
        }
    }
}

/// A fixed run gives up after this many failed requests (the outcome is clear by then).
const MAX_FAILED: usize = 10;

fn stopped(o: &Opts) -> bool {
    o.stop_file.as_ref().is_some_and(|f| f.exists())
}

fn given_up(o: &Opts, totals: &Mutex<Totals>) -> bool {
    o.stop_file.is_none() && totals.lock().unwrap().failed >= MAX_FAILED
}

/// One connection's worth of requests: `count` requests (0 = until stopped).
fn run_conn(o: &Opts, keepalive: bool, count: usize, seq0: u64, totals: &Mutex<Totals>) {
    let mut log = ConnLog {
        keepalive,
        ..ConnLog::default()
    };
    let mut i = 0usize;
    let record = |log: &mut ConnLog, r| totals.lock().unwrap().record(log, r);
    if o.udp {
        match udp_socket(o) {
            Ok(s) => loop {
                let r = udp_request(o, &s, seq0 + i as u64);
                record(&mut log, r);
                i += 1;
                if (count != 0 && i >= count) || (count == 0 && stopped(o)) || given_up(o, totals) {
                    break;
                }
                thread::sleep(o.interval);
            },
            Err(e) => record(&mut log, Err(e)),
        }
    } else {
        match Http::connect(o) {
            Ok(mut h) => loop {
                let last = count != 0 && i + 1 >= count;
                let r = h.request(!keepalive || last);
                let failed = r.is_err();
                record(&mut log, r);
                i += 1;
                if failed || last || (count == 0 && stopped(o)) || given_up(o, totals) {
                    break;
                }
                thread::sleep(o.interval);
            },
            Err(e) => record(&mut log, Err(e)),
        }
    }
    totals.lock().unwrap().conns.push(log);
}

fn main() {
    let o = parse_args();
    let totals = Arc::new(Mutex::new(Totals::default()));
    let mut threads = Vec::new();
    for t in 0..o.keepalive {
        let (o, totals) = (o.clone(), totals.clone());
        threads.push(thread::spawn(move || {
            let seq0 = (t as u64 + 1) << 32;
            if o.stop_file.is_some() {
                let mut n = 0u64;
                while !stopped(&o) {
                    run_conn(&o, true, o.per_conn, seq0 + (n << 20), &totals);
                    n += 1;
                    thread::sleep(o.interval);
                }
            } else {
                run_conn(&o, true, o.per_conn.max(1), seq0, &totals);
            }
        }));
    }
    let loops = if o.stop_file.is_some() { o.new } else { 1 };
    for t in 0..loops {
        let (o, totals) = (o.clone(), totals.clone());
        threads.push(thread::spawn(move || {
            let mut n = 0u64;
            loop {
                if o.stop_file.is_some() {
                    if stopped(&o) {
                        break;
                    }
                } else if n as usize >= o.new || given_up(&o, &totals) {
                    break;
                }
                run_conn(&o, false, 1, ((t as u64) << 40) + n, &totals);
                n += 1;
                thread::sleep(o.interval);
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    let t = totals.lock().unwrap();
    let unstable: Vec<Value> = t
        .conns
        .iter()
        .filter(|c| c.ids.len() > 1)
        .take(20)
        .map(|c| json!({ "ids": c.ids, "requests": c.requests, "keepalive": c.keepalive }))
        .collect();
    let summary = json!({
        "ok": t.ok,
        "failed": t.failed,
        "errors": t.errors,
        "identities": t.identities,
        "server_peers": t.server_peers,
        "socket_peers": t.socket_peers,
        "conns": t.conns.len(),
        "keepalive_conns": t.conns.iter().filter(|c| c.keepalive && c.ok > 1).count(),
        "keepalive_requests": t.conns.iter().filter(|c| c.keepalive).map(|c| c.ok).sum::<usize>(),
        "unstable_conns": t.conns.iter().filter(|c| c.ids.len() > 1).count(),
        "unstable": unstable,
    });
    println!("{summary}");
}
