//! The Knative side of the node-local activator against local stand-ins (no root needed):
//! a test autoscaler (a websocket server on 127.0.0.1 that decodes every frame as
//! `WireStatMessages`, as Knative's statserver does) and test queue-proxies (hyper servers
//! answering `queue` only to a `K-Network-Probe: queue` probe).
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use redirector::knative::{
    probe::{PodProbe, ACTIVATOR_USER_AGENT},
    probe_until_ready, probe_until_ready_with, ProbeConfig, Prober, ReporterConfig, RevisionSample,
    StatReporter, WireStatMessage, WireStatMessages,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
    time::{timeout, Instant},
};
use tokio_tungstenite::tungstenite::Message;

/// A frame as the test autoscaler received it.
#[derive(Debug)]
struct Frame {
    messages: Vec<WireStatMessage>,
}

/// A test autoscaler: accepts websocket connections on `listener`, decodes every binary
/// frame and forwards it. Text frames fail the test (Knative's statserver drops them).
/// Returns a handle that, when sent to, closes the current connections and stops accepting.
fn autoscaler(listener: TcpListener, frames: mpsc::UnboundedSender<Frame>) -> oneshot::Sender<()> {
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut conns = Vec::new();
        loop {
            tokio::select! {
                r = listener.accept() => {
                    let Ok((stream, _)) = r else { continue };
                    let frames = frames.clone();
                    conns.push(tokio::spawn(async move {
                        let mut ws = tokio_tungstenite::accept_async(stream).await.expect("websocket handshake");
                        while let Some(m) = ws.next().await {
                            match m {
                                Ok(Message::Binary(b)) => {
                                    let w = WireStatMessages::from_bytes(&b).expect("frame is WireStatMessages");
                                    let _ = frames.send(Frame { messages: w.messages });
                                }
                                Ok(Message::Text(t)) => panic!("text frame {t:?}: stats must be binary"),
                                Ok(Message::Close(_)) | Err(_) => break,
                                Ok(_) => {}
                            }
                        }
                        let _ = ws.close(None).await;
                    }));
                }
                _ = &mut stop_rx => break,
            }
        }
        for c in conns {
            c.abort();
        }
    });
    stop_tx
}

/// Waits for a stat message for `ns/name` matching `pred`, skipping others.
async fn expect_msg(
    rx: &mut mpsc::UnboundedReceiver<Frame>,
    ns: &str,
    name: &str,
    within: Duration,
    pred: impl Fn(&WireStatMessage) -> bool,
) -> WireStatMessage {
    let deadline = Instant::now() + within;
    loop {
        let f = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no matching stat for {ns}/{name} within {within:?}"))
            .expect("autoscaler gone");
        for m in f.messages {
            if m.namespace == ns && m.name == name && pred(&m) {
                return m;
            }
        }
    }
}

fn conc(m: &WireStatMessage) -> f64 {
    m.stat
        .as_ref()
        .expect("stat present")
        .average_concurrent_requests
}

fn config(url: String) -> ReporterConfig {
    ReporterConfig {
        url,
        pod_name: "activator-node-a".into(),
        report_interval: Duration::from_millis(200),
        sample_interval: Duration::from_millis(20),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        ..Default::default()
    }
}

type States = Arc<Mutex<Vec<RevisionSample>>>;

fn set(states: &States, ns: &str, rev: &str, concurrency: f64, requests: u64) {
    let mut s = states.lock().unwrap();
    s.retain(|r| !(r.namespace == ns && r.revision == rev));
    s.push(RevisionSample {
        namespace: ns.into(),
        revision: rev.into(),
        concurrency,
        requests,
    });
}

#[tokio::test]
async fn wake_and_periodic_stats_reach_the_autoscaler() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _stop = autoscaler(listener, tx);

    let reporter = StatReporter::start(config(url));
    let states: States = Arc::default();
    set(&states, "team-a", "hello-00001", 0.0, 0);
    let run = {
        let (r, s) = (reporter.clone(), states.clone());
        tokio::spawn(async move { r.run(move || s.lock().unwrap().clone()).await })
    };

    // A held request: the activator wakes the revision, the stat arrives at once.
    let t0 = Instant::now();
    reporter.wake("team-a", "hello-00001", 1.0);
    let m = expect_msg(
        &mut rx,
        "team-a",
        "hello-00001",
        Duration::from_secs(5),
        |m| conc(m) > 0.0,
    )
    .await;
    let s = m.stat.as_ref().unwrap();
    assert_eq!(s.pod_name, "activator-node-a");
    assert_eq!(s.average_concurrent_requests, 1.0);
    assert_eq!(s.request_count, 1.0);
    assert_eq!(s.average_proxied_concurrent_requests, 0.0);
    assert_eq!(s.proxied_request_count, 0.0);
    assert_eq!(s.timestamp, 0, "the autoscaler stamps stats on receipt");
    assert!(reporter.connected());
    eprintln!("wake reached the autoscaler in {:?}", t0.elapsed());

    // Three requests held for a while: periodic reports carry concurrency > 0 (after the
    // first period's adjustment for what the wake already said).
    set(&states, "team-a", "hello-00001", 3.0, 0);
    let m = expect_msg(
        &mut rx,
        "team-a",
        "hello-00001",
        Duration::from_secs(5),
        |m| conc(m) >= 2.9,
    )
    .await;
    assert_eq!(m.stat.unwrap().pod_name, "activator-node-a");

    // Served: 3 requests done, nothing held. One report with the requests, one with 0,
    // then silence for this revision.
    set(&states, "team-a", "hello-00001", 0.0, 3);
    expect_msg(
        &mut rx,
        "team-a",
        "hello-00001",
        Duration::from_secs(5),
        |m| m.stat.as_ref().unwrap().request_count == 3.0,
    )
    .await;
    expect_msg(
        &mut rx,
        "team-a",
        "hello-00001",
        Duration::from_secs(5),
        |m| conc(m) == 0.0 && m.stat.as_ref().unwrap().request_count == 0.0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    while let Ok(f) = rx.try_recv() {
        assert!(
            f.messages.iter().all(|m| m.name != "hello-00001"),
            "an idle revision is no longer reported: {f:?}"
        );
    }

    // A request arriving without a wake (the sampler sees it first) is also reported at once
    // with concurrency 1, as Knative's activator reports a first request.
    set(&states, "team-b", "api-00003", 1.0, 0);
    let m = expect_msg(
        &mut rx,
        "team-b",
        "api-00003",
        Duration::from_secs(5),
        |_| true,
    )
    .await;
    assert_eq!(conc(&m), 1.0);

    let c = reporter.counters();
    assert_eq!(c.connects, 1);
    assert!(c.frames_sent >= 4 && c.messages_sent >= 4, "{c:?}");
    reporter.shutdown();
    timeout(Duration::from_secs(2), run).await.unwrap().unwrap();
}

#[tokio::test]
async fn reconnects_and_delivers_wakes_made_while_down() {
    // Nothing listens yet: the wake is kept until the autoscaler is reachable.
    let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let reporter = StatReporter::start(config(format!("ws://{addr}")));
    reporter.wake("ns", "early", 2.0);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!reporter.connected());

    let listener = TcpListener::bind(addr).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = autoscaler(listener, tx);
    let m = expect_msg(&mut rx, "ns", "early", Duration::from_secs(5), |_| true).await;
    assert_eq!(conc(&m), 2.0);
    assert_eq!(reporter.counters().connects, 1);

    // The autoscaler restarts (connection dropped, port closed, then back).
    stop.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while reporter.connected() {
        assert!(
            Instant::now() < deadline,
            "reporter did not notice the drop"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reporter.wake("ns", "during-restart", 1.0);
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _stop = autoscaler(listener, tx);
    let m = expect_msg(
        &mut rx,
        "ns",
        "during-restart",
        Duration::from_secs(5),
        |_| true,
    )
    .await;
    assert_eq!(conc(&m), 1.0);
    assert_eq!(reporter.counters().connects, 2);
    reporter.shutdown();
}

/// A test queue-proxy: `queue` only to a probe with `K-Network-Probe: queue` and Knative's
/// activator user agent, and only once `ready_after` has passed (503 before); "hello" to
/// anything else.
async fn queue_proxy(ready_after: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let start = Instant::now();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| async move {
                        let probe = req
                            .headers()
                            .get("k-network-probe")
                            .is_some_and(|v| v == "queue")
                            && req
                                .headers()
                                .get("user-agent")
                                .is_some_and(|v| v == ACTIVATOR_USER_AGENT)
                            && req.uri().path() == "/healthz";
                        let resp = if !probe {
                            Response::new(Full::new(Bytes::from_static(b"hello")))
                        } else if start.elapsed() < ready_after {
                            let mut r =
                                Response::new(Full::new(Bytes::from_static(b"queue not ready")));
                            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            r
                        } else {
                            Response::new(Full::new(Bytes::from_static(b"queue")))
                        };
                        Ok::<_, Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A server that answers 200 "hello" to everything (an app without a queue-proxy).
async fn plain_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn unused_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn probes_like_the_knative_activator() {
    let qp = queue_proxy(Duration::ZERO).await;
    let mut p = PodProbe::new(qp, Duration::from_millis(300));
    let a = p.probe().await.unwrap();
    assert_eq!((a.status, a.body.as_ref()), (StatusCode::OK, &b"queue"[..]));
    assert!(a.ready());
    // The keep-alive connection is reused for the next probe.
    assert!(p.ready().await);

    let deadline = Instant::now() + Duration::from_secs(2);
    assert!(probe_until_ready(qp, deadline).await);

    // 200 without the `queue` body is not ready; neither is nothing listening.
    let app = plain_app().await;
    let t = Instant::now();
    assert!(!probe_until_ready(app, t + Duration::from_millis(200)).await);
    assert!(t.elapsed() >= Duration::from_millis(190) && t.elapsed() < Duration::from_secs(2));
    assert!(
        !probe_until_ready(
            unused_addr().await,
            Instant::now() + Duration::from_millis(100)
        )
        .await
    );
}

#[tokio::test]
async fn probe_until_ready_catches_a_late_pod_quickly() {
    let qp = queue_proxy(Duration::from_millis(150)).await;
    let t = Instant::now();
    let cfg = ProbeConfig {
        interval: Duration::from_millis(5),
        ..Default::default()
    };
    assert!(probe_until_ready_with(qp, t + Duration::from_secs(3), &cfg).await);
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(150), "{took:?}");
    assert!(
        took < Duration::from_millis(800),
        "cadence too slow: {took:?}"
    );
}

#[tokio::test]
async fn prober_publishes_the_ready_subset() {
    let good = queue_proxy(Duration::ZERO).await;
    let late = queue_proxy(Duration::from_millis(200)).await;
    let app = plain_app().await;
    let dead = unused_addr().await;
    let prober = Prober::new(ProbeConfig::default());
    let mut ready = prober.subscribe();
    prober.set_endpoints([good], [late, app, dead]);

    let watch = ready.clone();
    let wait_for = move |want: Vec<SocketAddr>| {
        let mut rx = watch.clone();
        async move {
            let mut want = want;
            want.sort();
            timeout(Duration::from_secs(3), rx.wait_for(|s| **s == want))
                .await
                .unwrap_or_else(|_| panic!("ready set never became {want:?}"))
                .unwrap()
                .clone()
        }
    };
    wait_for(vec![good]).await;
    wait_for(vec![good, late]).await;
    // Never the app without a queue-proxy, nor the dead address.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut want = vec![good, late];
    want.sort();
    assert_eq!(*prober.ready(), want);

    // A pod leaving the endpoints leaves the ready set at once.
    prober.set_endpoints([late], [app, dead]);
    assert_eq!(*prober.ready(), vec![late]);
    assert!(ready.has_changed().unwrap());
    let _ = ready.borrow_and_update();

    // A pod that comes back is probed again before it counts.
    prober.set_endpoints([late, good], []);
    wait_for(vec![good, late]).await;
    prober.set_endpoints([], []);
    assert!(prober.ready().is_empty());
}

/// The websocket client speaks plain ws with binary frames only, and answers pings.
#[tokio::test]
async fn frames_are_binary_and_pings_are_answered() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let reporter = StatReporter::start(config(url));
    let (stream, _) = timeout(Duration::from_secs(5), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
    ws.send(Message::Ping(Bytes::from_static(b"x")))
        .await
        .unwrap();
    reporter.wake("ns", "r", 1.0);
    let mut saw_pong = false;
    let mut saw_stat = false;
    while !(saw_pong && saw_stat) {
        match timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Pong(p) => {
                assert_eq!(p.as_ref(), b"x");
                saw_pong = true;
            }
            Message::Binary(b) => {
                let w = WireStatMessages::from_bytes(&b).unwrap();
                assert_eq!(w.messages.len(), 1);
                assert_eq!(
                    (
                        w.messages[0].namespace.as_str(),
                        w.messages[0].name.as_str()
                    ),
                    ("ns", "r")
                );
                saw_stat = true;
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
    reporter.shutdown();
}

/// An autoscaler that stops answering (pings unanswered) is dropped and dialled again.
#[tokio::test]
async fn reconnects_when_pongs_stop() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let reporter = StatReporter::start(ReporterConfig {
        ping_interval: Duration::from_millis(50),
        pong_timeout: Duration::from_millis(300),
        ..config(url)
    });
    // First connection: handshake, then never read (so never pong).
    let (stream, _) = timeout(Duration::from_secs(5), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let _stalled = tokio_tungstenite::accept_async(stream).await.unwrap();
    let t = Instant::now();
    let (stream, _) = timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("no reconnect after the pong timeout")
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
    reporter.wake("ns", "after-stall", 1.0);
    loop {
        match timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Binary(b) => {
                let w = WireStatMessages::from_bytes(&b).unwrap();
                assert_eq!(w.messages[0].name, "after-stall");
                break;
            }
            _ => continue,
        }
    }
    assert_eq!(reporter.counters().connects, 2);
    reporter.shutdown();
}
