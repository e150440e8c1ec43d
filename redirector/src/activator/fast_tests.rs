//! The fast path (`fast.rs`) against a scripted local instance: chunked and large
//! responses, pipelined requests, request bodies, `Connection: close` from either side, an
//! instance dying mid-request (502, connection not reused), hand-off to hyper (404).
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{watch, Notify},
};

use super::{fast, wire, Activator, Instance, ServiceState};
use crate::config::{ActivatorConfig, Protocol};

const BIG: usize = 1 << 20;

/// Answers by path: `/chunked`, `/big` (1 MiB), `/die` (closes without answering),
/// `/close` (answers with `Connection: close`, then closes), else echoes the request head
/// and body as the body. Counts accepted connections.
async fn instance(accepts: Arc<AtomicUsize>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            accepts.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let (head_len, path, body_len) = loop {
                        let mut h = [httparse::EMPTY_HEADER; 32];
                        let mut r = httparse::Request::new(&mut h);
                        if let Ok(httparse::Status::Complete(n)) = r.parse(&buf) {
                            let cl = r
                                .headers
                                .iter()
                                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                                .map_or(0, |h| {
                                    std::str::from_utf8(h.value).unwrap().parse().unwrap()
                                });
                            break (n, r.path.unwrap().to_owned(), cl);
                        }
                        let mut b = [0u8; 4096];
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&b[..n]),
                        }
                    };
                    while buf.len() < head_len + body_len {
                        let mut b = [0u8; 4096];
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&b[..n]),
                        }
                    }
                    let msg: Vec<u8> = buf.drain(..head_len + body_len).collect();
                    let resp = match path.as_str() {
                        "/die" => return,
                        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".to_vec(),
                        "/big" => {
                            let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n").into_bytes();
                            r.extend(std::iter::repeat_n(b'x', BIG));
                            r
                        }
                        "/close" => b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye".to_vec(),
                        _ => {
                            let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", msg.len()).into_bytes();
                            r.extend_from_slice(&msg);
                            r
                        }
                    };
                    if s.write_all(&resp).await.is_err() || path == "/close" {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// An activator (fast path) for one service on `upstream`, or for none.
async fn activator(upstream: Option<SocketAddr>) -> SocketAddr {
    let (addr, tx) = activator_with(upstream).await;
    if let Some(tx) = tx {
        std::mem::forget(tx);
    }
    addr
}

/// `activator`, with the sender of the service's instances.
async fn activator_with(
    upstream: Option<SocketAddr>,
) -> (SocketAddr, Option<watch::Sender<super::Instances>>) {
    let act = Activator::new(ActivatorConfig::default(), None);
    let mut sender = None;
    let svc = upstream.map(|u| {
        let (tx, rx) = watch::channel(Arc::new(vec![Instance::new(u, 0)]));
        sender = Some(tx);
        Arc::new(ServiceState::new(
            "default/t".into(),
            Protocol::Http,
            Duration::from_secs(5),
            0,
            rx,
            Arc::new(Notify::new()),
        ))
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let tracker = Arc::new(());
        while let Ok((s, peer)) = l.accept().await {
            fast::spawn(
                act.clone(),
                svc.clone(),
                s,
                peer,
                graceful.watcher(),
                tracker.clone(),
            );
        }
    });
    (addr, sender)
}

/// Writes `req` and reads until the activator closes.
async fn exchange(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the activator closes the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

async fn setup() -> (SocketAddr, Arc<AtomicUsize>) {
    let accepts = Arc::new(AtomicUsize::new(0));
    let up = instance(accepts.clone()).await;
    (activator(Some(up)).await, accepts)
}

/// An instance that refuses the connection (gone before its endpoint) got nothing: the
/// request waits for another instance instead of failing with a 502.
#[tokio::test]
async fn refused_connection_waits_for_another_instance() {
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = gone.local_addr().unwrap();
    drop(gone);
    let (addr, tx) = activator_with(Some(dead)).await;
    let tx = tx.unwrap();
    let live = instance(Arc::new(AtomicUsize::new(0))).await;
    let replace = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = tx.send(Arc::new(vec![Instance::new(live, 0)]));
        tx
    });
    let out = exchange(
        addr,
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    drop(replace.await);
}

#[tokio::test]
async fn chunked_response_then_keep_alive() {
    let (a, accepts) = setup().await;
    let r = exchange(
        a,
        b"GET /chunked HTTP/1.1\r\nHost: h\r\n\r\nGET /chunked HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    let one = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let two = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    assert_eq!(r, format!("{one}{two}"));
    assert_eq!(accepts.load(Ordering::SeqCst), 1, "one instance connection");
}

#[tokio::test]
async fn pipelined_requests_answered_in_order() {
    let (a, _) = setup().await;
    let r = exchange(
        a,
        b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\nGET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (ia, ib, ic) = (
        r.find("GET /a ").unwrap(),
        r.find("GET /b ").unwrap(),
        r.find("GET /c ").unwrap(),
    );
    assert!(ia < ib && ib < ic, "{r}");
    assert_eq!(r.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{r}");
}

#[tokio::test]
async fn request_body_and_proxy_headers() {
    let (a, _) = setup().await;
    let r = exchange(
        a,
        b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nKeep-Alive: 5\r\nConnection: close\r\n\r\nabcde",
    )
    .await;
    let body = r.split_once("\r\n\r\n").unwrap().1;
    assert!(
        body.starts_with("POST /echo HTTP/1.1\r\nHost: h\r\n"),
        "{body}"
    );
    assert!(body.contains("content-length: 5\r\n"), "{body}");
    assert!(body.contains("k-proxy-request: activator\r\n"), "{body}");
    assert!(body.contains("x-forwarded-for: 127.0.0.1\r\n"), "{body}");
    assert!(!body.to_ascii_lowercase().contains("keep-alive"), "{body}");
    assert!(!body.to_ascii_lowercase().contains("connection:"), "{body}");
    assert!(body.ends_with("\r\n\r\nabcde"), "{body}");
    // The body arrives late and in pieces.
    let mut s = TcpStream::connect(a).await.unwrap();
    s.write_all(
        b"PUT /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nConnection: close\r\n\r\nab",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"cd").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.ends_with("\r\n\r\nabcd"), "{out}");
}

#[tokio::test]
async fn connection_close_from_the_instance_keeps_the_client() {
    let (a, accepts) = setup().await;
    let r = exchange(
        a,
        b"GET /close HTTP/1.1\r\nHost: h\r\n\r\nGET /close HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        r,
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye\
         HTTP/1.1 200 OK\r\nContent-Length: 3\r\nconnection: close\r\n\r\nbye"
    );
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        2,
        "a new instance connection each"
    );
}

#[tokio::test]
async fn instance_dying_mid_request_gives_502_and_a_new_connection() {
    let (a, accepts) = setup().await;
    let r = exchange(
        a,
        b"POST /die HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nxGET /ok HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (first, second) = r.split_at(r.find("HTTP/1.1 200").expect("second answered"));
    assert!(first.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{r}");
    assert!(
        first.ends_with("redirector activator: the instance failed\n"),
        "{r}"
    );
    assert!(second.contains("GET /ok HTTP/1.1\r\n"), "{r}");
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        2,
        "the failed connection is not reused"
    );
}

#[tokio::test]
async fn large_response_streamed() {
    let (a, _) = setup().await;
    let r = exchange(
        a,
        b"GET /big HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = r.split_once("\r\n\r\n").unwrap();
    assert!(head.contains(&format!("Content-Length: {BIG}")), "{head}");
    assert_eq!(body.len(), BIG);
    assert!(body.bytes().all(|b| b == b'x'));
}

#[tokio::test]
async fn unknown_service_goes_to_hyper() {
    let a = activator(None).await;
    let r = exchange(a, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
    // A probe after a fast-path request on the same connection: hyper takes over there.
    let (a, _) = setup().await;
    let r = exchange(
        a,
        b"GET /x HTTP/1.1\r\nHost: h\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\nK-Network-Probe: activator\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.contains("GET /x HTTP/1.1\r\n"), "{r}");
    assert!(r.ends_with("\r\n\r\nactivator\n"), "{r}");
}

#[test]
fn chunk_scanner_finds_the_end_across_reads() {
    let body = b"5;x=y\r\nhello\r\n0\r\nT: v\r\n\r\nNEXT";
    for split in 1..body.len() {
        let mut c = wire::Chunks::default();
        let n1 = c.scan(&body[..split]).unwrap();
        let n2 = c.scan(&body[n1..]).unwrap();
        assert!(c.done(), "split {split}");
        assert_eq!(n1 + n2, body.len() - 4, "split {split}");
    }
    assert!(wire::Chunks::default().scan(b"zz\r\n").is_err());
}

#[test]
fn requests_that_go_to_hyper() {
    let mut out = Vec::new();
    for r in [
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET http://x/ HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
        b"GET / HTTP/1.1\r\nK-Network-Probe: activator\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
    ] {
        assert!(
            matches!(wire::request(r, &mut out), wire::Parsed::Hyper),
            "{}",
            String::from_utf8_lossy(r)
        );
    }
    assert!(matches!(
        wire::request(b"GET / HTTP/1.1\r\nHo", &mut out),
        wire::Parsed::Partial
    ));
}
