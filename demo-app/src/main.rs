//! A small app for the demo and the tests: HTTP/1.1 with keep-alive on $PORT answering
//! `hello from <addr>`, or with `MODE=line` a line protocol that echoes lines upper-cased.
//! `STARTUP_DELAY_MS` simulates a slow start. A request with `K-Network-Probe: queue` gets
//! `queue`, as from Knative's queue-proxy.
//! Paths: `/` hello, `/healthz` 200, `/sleep?ms=N` answers after N ms, `/drip?ms=N` sends
//! half its body, pauses N ms, then the rest, `/crash` exits,
//! `/max-in-flight` the most requests it has had in progress at once (probes and this path
//! not counted), for containerConcurrency checks.
//! On SIGTERM it stops accepting, finishes requests in flight (answering them with
//! `Connection: close`), closes idle keep-alive connections and exits — like a pod behind
//! Knative's queue-proxy.
use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

static TERM: AtomicBool = AtomicBool::new(false);
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
static LISTENER_FD: AtomicI32 = AtomicI32::new(-1);
/// Requests in progress now, and the most at once so far.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static MAX_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
    // Wakes the blocking accept (std retries EINTR); shutdown(2) is async-signal-safe.
    let fd = LISTENER_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: shutting down our own listening socket.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    if let Some(ms) = std::env::var("STARTUP_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let line_mode = std::env::var("MODE").is_ok_and(|m| m == "line");
    let listener = TcpListener::bind(("::", port))
        .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
        .unwrap_or_else(|e| {
            eprintln!("redirector-hello: bind {port}: {e}");
            std::process::exit(1)
        });
    LISTENER_FD.store(listener.as_raw_fd(), Ordering::SeqCst);
    // SAFETY: installing an async-signal-safe handler (an atomic store and shutdown(2)).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_term as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
    while !TERM.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                ACTIVE.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let _ = stream.set_nodelay(true);
                    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
                    if line_mode {
                        line(stream)
                    } else {
                        http(stream)
                    }
                    ACTIVE.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(_) if TERM.load(Ordering::SeqCst) => break,
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    drop(listener);
    let t0 = Instant::now();
    while ACTIVE.load(Ordering::SeqCst) > 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads a line, retrying on the read timeout; None on EOF, error, or shutdown while idle.
fn read_line(r: &mut BufReader<TcpStream>, buf: &mut String, idle: bool) -> Option<usize> {
    loop {
        match r.read_line(buf) {
            Ok(0) => return None,
            Ok(n) => return Some(n),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if idle && buf.is_empty() && TERM.load(Ordering::SeqCst) {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
}

fn line(stream: TcpStream) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    for l in BufReader::new(stream).lines() {
        let Ok(l) = l else { return };
        if out
            .write_all(format!("{}\n", l.to_uppercase()).as_bytes())
            .is_err()
        {
            return;
        }
    }
}

fn http(stream: TcpStream) {
    let me = stream
        .local_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut r = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if read_line(&mut r, &mut request_line, true).is_none() {
            return;
        }
        let mut len = 0usize;
        let mut close = false;
        // Knative's activator probes queue-proxy with `K-Network-Probe: queue`; answer as
        // queue-proxy does, so the app can stand in for a pod in tests.
        let mut queue_probe = false;
        loop {
            let mut h = String::new();
            if read_line(&mut r, &mut h, false).is_none() {
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
            if lower.starts_with("k-network-probe:") && lower.ends_with("queue") {
                queue_probe = true;
            }
        }
        let mut body = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match r.read(&mut body[got..]) {
                Ok(0) => return,
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return,
            }
        }
        let close = close || TERM.load(Ordering::SeqCst);
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        let counted = !queue_probe && path != "/max-in-flight";
        if counted {
            let now = IN_FLIGHT.fetch_add(1, Ordering::SeqCst) + 1;
            MAX_IN_FLIGHT.fetch_max(now, Ordering::SeqCst);
        }
        let text = if queue_probe {
            "queue".to_owned()
        } else if path == "/max-in-flight" {
            format!("{}\n", MAX_IN_FLIGHT.load(Ordering::SeqCst))
        } else if path.starts_with("/crash") {
            std::process::exit(3);
        } else if let Some(ms) = path.strip_prefix("/drip?ms=").and_then(|v| v.parse().ok()) {
            // Half the body, a pause of `ms`, the other half.
            let (a, b) = ("drip-one ", "drip-two\n");
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{a}",
                a.len() + b.len(),
                if close { "Connection: close\r\n" } else { "" }
            );
            if counted {
                IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            }
            if out.write_all(head.as_bytes()).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(ms));
            if out.write_all(b.as_bytes()).is_err() || close {
                return;
            }
            continue;
        } else if let Some(ms) = path.strip_prefix("/sleep?ms=").and_then(|v| v.parse().ok()) {
            std::thread::sleep(Duration::from_millis(ms));
            format!("slept {ms} ms on {me}\n")
        } else {
            format!("hello from {me}\n")
        };
        if counted {
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        }
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
