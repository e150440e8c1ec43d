//! Hostile and broken clients against the activator (fast path and hyper path), with
//! local instances: client errors are not blamed on the instance, slow clients time out,
//! a response with both Content-Length and Transfer-Encoding is refused on both paths, a
//! client that never reads gives its instance slot back, and both paths share one grammar.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{watch, Notify},
};

use super::{fast, wire, Activator, Instance, ServiceState};
use crate::config::{ActivatorConfig, Protocol};

const BIG: usize = 16 << 20;

/// A hyper HTTP/1.1 instance: reads the whole request body, then answers `/big` with
/// `BIG` bytes and anything else with the body's length.
async fn hyper_instance() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let svc = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let big = req.uri().path() == "/big";
                    let body = req.into_body().collect().await?.to_bytes();
                    let out = if big {
                        Bytes::from(vec![b'x'; BIG])
                    } else {
                        Bytes::from(body.len().to_string())
                    };
                    Ok::<_, hyper::Error>(hyper::Response::new(Full::new(out)))
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    addr
}

/// An instance that answers every request head with `resp`, then closes.
async fn raw_instance(resp: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut b = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
                let _ = s.write_all(resp).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// An activator for one service on `upstream` with `cfg`.
async fn activator(
    upstream: SocketAddr,
    cc: u32,
    cfg: ActivatorConfig,
    protocol: Protocol,
) -> (SocketAddr, Arc<ServiceState>, Arc<Activator>) {
    let act = Activator::new(cfg, None);
    let (tx, rx) = watch::channel(Arc::new(vec![Instance::new(upstream, cc)]));
    std::mem::forget(tx);
    let svc = Arc::new(ServiceState::new(
        "default/t".into(),
        protocol,
        Duration::from_secs(10),
        cc,
        rx,
        Arc::new(Notify::new()),
    ));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (a, s) = (act.clone(), svc.clone());
    tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        while let Ok((c, peer)) = l.accept().await {
            fast::spawn(a.clone(), Some(s.clone()), c, peer, graceful.watcher(), ());
        }
    });
    (addr, svc, act)
}

/// Sends `req` and reads until the activator closes (at most 10 s).
async fn exchange(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// True when the activator closes `s` within `within`.
async fn closed(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 4096];
    let end = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(end, s.read(&mut b)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..300 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test]
async fn client_errors_do_not_mark_the_instance() {
    let (addr, svc, _) = activator(
        hyper_instance().await,
        0,
        ActivatorConfig::default(),
        Protocol::Http,
    )
    .await;
    // A malformed chunked body (hyper path).
    let r = exchange(
        addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(svc.try_acquire().is_some(), "instance marked failed");
    // An upload aborted midway (large body: hyper path).
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(svc.try_acquire().is_some(), "instance marked failed");
    // h2c prior knowledge to an HTTP/1.1-only instance.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("http://x/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 502);
    assert!(svc.try_acquire().is_some(), "instance marked failed");
    // Other clients are still served at once.
    let r = exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test]
async fn slow_heads_and_idle_connections_are_closed() {
    let cfg = ActivatorConfig {
        header_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let (addr, _, _) = activator(hyper_instance().await, 0, cfg, Protocol::Http).await;
    let limit = Duration::from_secs(8);
    // Slowloris on the fast path: a head that never ends.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    assert!(closed(&mut s, limit).await, "unfinished head kept open");
    // A connection that never sends anything.
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert!(closed(&mut s, limit).await, "silent connection kept open");
    // Idle after a fast-path request.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(closed(&mut s, limit).await, "idle keep-alive kept open");
    // An unfinished head on a connection hyper serves (after a probe it answered).
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nK-Network-Probe: activator\r\n\r\nGET / HT")
        .await
        .unwrap();
    assert!(
        closed(&mut s, limit).await,
        "unfinished head kept open by hyper"
    );
}

#[tokio::test]
async fn content_length_with_transfer_encoding_refused_on_both_paths() {
    let up = raw_instance(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let (addr, _, _) = activator(up, 0, ActivatorConfig::default(), Protocol::Http).await;
    let fast = exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(fast.starts_with("HTTP/1.1 502"), "fast path: {fast}");
    let hyper = exchange(
        addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(hyper.starts_with("HTTP/1.1 502"), "hyper path: {hyper}");
}

#[tokio::test]
async fn client_that_never_reads_gives_the_slot_back() {
    let cfg = ActivatorConfig {
        write_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let (addr, svc, _) = activator(hyper_instance().await, 1, cfg, Protocol::Http).await;
    let in_flight = || svc.in_flight.load(std::sync::atomic::Ordering::SeqCst);
    for req in [
        &b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req).await.unwrap();
        wait_until("the request is in flight", || in_flight() == 1).await;
        wait_until("the slot is given back", || in_flight() == 0).await;
        drop(s);
    }
}

#[tokio::test]
async fn one_grammar_on_both_paths() {
    let (addr, _, _) = activator(
        hyper_instance().await,
        0,
        ActivatorConfig::default(),
        Protocol::Http,
    )
    .await;
    for req in [
        &b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: +5\r\n\r\nhello"[..],
        b"GET /a<b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /a>b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /a`b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ] {
        let r = exchange(addr, req).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    }
    let up = raw_instance(b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello").await;
    let (addr, _, _) = activator(up, 0, ActivatorConfig::default(), Protocol::Http).await;
    let fast = exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(fast.starts_with("HTTP/1.1 502"), "fast path: {fast}");
    let hyper = exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").await;
    assert!(hyper.starts_with("HTTP/1.1 502"), "hyper path: {hyper}");
}

#[test]
fn fast_path_grammar_is_hypers() {
    let mut out = Vec::new();
    for r in [
        &b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello"[..],
        b"GET /a<b HTTP/1.1\r\n\r\n",
        b"GET /a`b HTTP/1.1\r\n\r\n",
    ] {
        assert!(
            matches!(wire::request(r, &mut out), wire::Parsed::Hyper),
            "{}",
            String::from_utf8_lossy(r)
        );
    }
    for r in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
        // Not text: hyper reads no coding from it (so: until close), the fast path refuses.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \xffx, chunked\r\n\r\n",
    ] {
        assert!(
            wire::response(r, false, &mut out).is_err(),
            "{}",
            String::from_utf8_lossy(r)
        );
    }
    // Chunk size lines and trailers as hyper's decoder reads them.
    for bad in [
        &b"\r\n0\r\n\r\n"[..],
        b";x\r\n0\r\n\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"5;a\nb\r\nhello\r\n0\r\n\r\n",
        b"0\r\nbad trailer\r\n\r\n",
    ] {
        let r = wire::Chunks::default().scan(bad);
        assert!(r.is_err(), "{}", String::from_utf8_lossy(bad));
    }
    let mut c = wire::Chunks::default();
    c.scan(b"000000000000000005 ;x\r\nhello\r\n0\r\nT: v\r\n\r\n")
        .unwrap();
    assert!(c.done());
    let r = wire::response(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
        false,
        &mut out,
    )
    .unwrap()
    .unwrap();
    assert_eq!(r.framing, wire::Framing::Length(5));
    assert!(String::from_utf8_lossy(&out).contains("Content-Length: 5\r\n"));
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_and_big_heads_refused() {
    let cfg = ActivatorConfig {
        max_connections: 2,
        ..Default::default()
    };
    let act = Activator::new(cfg, None);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(act.clone().serve(l));
    let a = TcpStream::connect(addr).await.unwrap();
    let _b = TcpStream::connect(addr).await.unwrap();
    wait_until("two connections are counted", || act.connections.now() == 2).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed(&mut c, Duration::from_secs(5)).await,
        "over the cap, kept"
    );
    assert_eq!(act.connections.overflowed(), 1);
    drop(a);
    wait_until("the closed one is uncounted", || act.connections.now() == 1).await;
    let mut d = TcpStream::connect(addr).await.unwrap();
    assert!(
        !closed(&mut d, Duration::from_millis(300)).await,
        "under the cap, closed"
    );
    // A request head over 64 KiB: 431 (hyper's answer; its buffer stays bounded).
    let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 70 * 1024));
    d.write_all(&head).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), d.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

const MEM_CHILD: &str = "REDIRECTOR_ACTIVATOR_MEM_CHILD";

/// An activator in a child process takes 1,000 connections with 48 KiB unfinished request
/// heads; once they close, its memory goes back near where it was.
#[test]
fn memory_is_given_back_when_slow_clients_go() {
    if let Ok(addr) = std::env::var(MEM_CHILD) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = TcpListener::bind(&addr).await.unwrap();
            Activator::new(ActivatorConfig::default(), None)
                .serve(l)
                .await;
        });
        return;
    }
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "activator::hardening_tests::memory_is_given_back_when_slow_clients_go",
            "--test-threads=1",
        ])
        .env(MEM_CHILD, addr.to_string())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(child);
    let pid = child.0.id();
    let connect = || {
        (0..100).find_map(|_| {
            std::net::TcpStream::connect(addr).ok().or_else(|| {
                std::thread::sleep(Duration::from_millis(50));
                None
            })
        })
    };
    drop(connect().expect("the activator never came up"));
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_kib(pid);
    let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 48 * 1024));
    let mut conns = Vec::new();
    for _ in 0..1000 {
        let mut s = connect().unwrap();
        std::io::Write::write_all(&mut s, &head).unwrap();
        conns.push(s);
    }
    std::thread::sleep(Duration::from_secs(1));
    let peak = rss_kib(pid);
    assert!(
        peak > before + 30_000,
        "flood did not show: {before} -> {peak} KiB"
    );
    drop(conns);
    let mut after = 0;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        after = rss_kib(pid);
        if after < before + (peak - before) / 4 {
            return;
        }
    }
    panic!("memory kept after the clients left: {before} -> {peak} -> {after} KiB");
}
