//! A harness for profiling the warm proxied path (ignored; run by hand):
//! `BENCH_LISTEN=127.0.0.1:18012 BENCH_UPSTREAM=127.0.0.1:18080 BENCH_SECS=20 \
//!  cargo test --release -p redirector --lib activator::bench -- --ignored --nocapture`
//! then drive it with `wrk` (or run the test binary under callgrind). The service is the
//! connection's, as with the datapath's conntrack; `BENCH_CC` sets containerConcurrency.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::{watch, Notify};

use super::{fast, Activator, Instance, ServiceState};
use crate::config::{ActivatorConfig, Protocol};

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

#[test]
#[ignore]
fn warm_path() {
    let listen: SocketAddr = env("BENCH_LISTEN", "127.0.0.1:18012".parse().unwrap());
    let upstream: SocketAddr = env("BENCH_UPSTREAM", "127.0.0.1:18080".parse().unwrap());
    let secs: u64 = env("BENCH_SECS", 20);
    let cc: u32 = env("BENCH_CC", 0);
    let threads: usize = env("BENCH_THREADS", 2);
    let act = Activator::new(ActivatorConfig::default(), None);
    let (_tx, rx) = watch::channel(Arc::new(vec![Instance::new(upstream, cc)]));
    let svc = Arc::new(ServiceState::new(
        "default/warm".into(),
        Protocol::Http,
        Duration::from_secs(30),
        cc,
        rx,
        Arc::new(Notify::new()),
    ));
    let mut hs = Vec::new();
    for _ in 0..threads {
        let act = act.clone();
        let svc = svc.clone();
        hs.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let sock = tokio::net::TcpSocket::new_v4().unwrap();
                sock.set_reuseaddr(true).unwrap();
                sock.set_reuseport(true).unwrap();
                sock.bind(listen).unwrap();
                let l = sock.listen(4096).unwrap();
                let graceful = hyper_util::server::graceful::GracefulShutdown::new();
                let tracker = Arc::new(());
                let stop = tokio::time::sleep(Duration::from_secs(secs));
                tokio::pin!(stop);
                loop {
                    tokio::select! {
                        r = l.accept() => {
                            let (s, peer) = r.unwrap();
                            let _ = s.set_nodelay(true);
                            fast::spawn(act.clone(), Some(svc.clone()), s, peer, graceful.watcher(), tracker.clone());
                        }
                        _ = &mut stop => break,
                    }
                }
            });
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    eprintln!(
        "forwarded {}",
        svc.forwarded.load(std::sync::atomic::Ordering::Relaxed)
    );
}
