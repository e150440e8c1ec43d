//! Load through the gateway: client threads in the client pod sending requests back to back
//! (a new connection each), every result recorded with its start time; which side served it
//! (a pod straight from the gateway, a pod through the node-local activator, Knative's
//! activator) and a per-flip table of how long requests kept going to the old side.
use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::coldstart::net::{enter, exchange, request_text};

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Rec {
    pub start: Instant,
    pub end: Instant,
    pub status: u16,
    pub body: String,
    /// The backend's `X-Peer` (who connected to it) and the gateway's `X-Upstream`.
    pub peer: Option<IpAddr>,
    pub upstream: Option<String>,
    pub error: Option<String>,
}

/// Who answered a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A pod, connected to by the gateway itself.
    Direct(IpAddr),
    /// A pod, connected to by someone else (the node-local activator).
    ViaNode(IpAddr),
    /// Knative's activator stand-in.
    Knative,
    /// An error or a non-200 status.
    Failed,
}

/// The addresses that tell the sides apart.
#[derive(Debug, Clone, Copy)]
pub struct Sides {
    pub gateway: IpAddr,
    pub knative_activator: IpAddr,
}

impl Sides {
    pub fn of(&self, r: &Rec) -> Side {
        let from = r
            .body
            .trim()
            .strip_prefix("hello from ")
            .and_then(|ip| ip.parse::<IpAddr>().ok());
        match (r.status, from) {
            (200, Some(ip)) if ip == self.knative_activator => Side::Knative,
            (200, Some(ip)) if r.peer == Some(self.gateway) => Side::Direct(ip),
            (200, Some(ip)) => Side::ViaNode(ip),
            _ => Side::Failed,
        }
    }
}

/// One request to the gateway from the calling thread (already in the client namespace).
pub fn request_here(gateway: SocketAddr, host: &str, timeout: Duration) -> Rec {
    let start = Instant::now();
    let res = TcpStream::connect_timeout(&gateway, Duration::from_secs(5))
        .map_err(anyhow::Error::from)
        .and_then(|mut s| {
            s.set_nodelay(true)?;
            exchange(
                &mut s,
                request_text("GET", "/", host, &[]).as_bytes(),
                timeout,
            )
        });
    let end = Instant::now();
    match res {
        Ok(r) => Rec {
            start,
            end,
            status: r.status,
            peer: r.header("x-peer").and_then(|p| p.parse().ok()),
            upstream: r.header("x-upstream").map(str::to_owned),
            body: r.body,
            error: None,
        },
        Err(e) => Rec {
            start,
            end,
            status: 0,
            body: String::new(),
            peer: None,
            upstream: None,
            error: Some(format!("{e:#}")),
        },
    }
}

/// One request to the gateway from namespace `ns`, on its own thread.
pub fn request_in(ns: &str, gateway: SocketAddr, host: &str, timeout: Duration) -> JoinHandle<Rec> {
    let (ns, host) = (ns.to_owned(), host.to_owned());
    std::thread::spawn(move || {
        if let Err(e) = enter(&ns) {
            let now = Instant::now();
            return Rec {
                start: now,
                end: now,
                status: 0,
                body: String::new(),
                peer: None,
                upstream: None,
                error: Some(format!("setns {ns}: {e}")),
            };
        }
        request_here(gateway, &host, timeout)
    })
}

/// Client threads sending requests back to back until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Rec>>>,
}

impl Load {
    /// `n` threads in namespace `ns`, each sending `GET /` with `Host: host` to `gateway`
    /// and pausing `pause` between requests.
    pub fn start(ns: &str, gateway: SocketAddr, host: &str, n: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let (ns, host, stop) = (ns.to_owned(), host.to_owned(), stop.clone());
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    if let Err(e) = enter(&ns) {
                        let now = Instant::now();
                        out.push(Rec {
                            start: now,
                            end: now,
                            status: 0,
                            body: String::new(),
                            peer: None,
                            upstream: None,
                            error: Some(format!("setns {ns}: {e}")),
                        });
                        return out;
                    }
                    while !stop.load(Ordering::Relaxed) {
                        out.push(request_here(gateway, &host, Duration::from_secs(30)));
                        std::thread::sleep(pause);
                    }
                    out
                })
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops the threads and returns every result, by start time.
    pub fn stop(self) -> Vec<Rec> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<Rec> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_default())
            .collect();
        all.sort_by_key(|r| r.start);
        all
    }
}

/// A flip: when the SKS was written, to which mode, and (optionally) when the agent's maps
/// showed it and when the gateway's addresses changed.
#[derive(Debug, Clone)]
pub struct Flip {
    pub at: Instant,
    pub to_proxy: bool,
    pub agent_at: Option<Instant>,
    pub gateway_at: Option<Instant>,
}

/// One row of the per-flip table (times in ms after the SKS write).
#[derive(Debug, Clone, Default)]
pub struct FlipRow {
    pub to_proxy: bool,
    pub agent_ms: Option<u128>,
    pub gateway_ms: Option<u128>,
    /// Serve→Proxy: the start of the last request the pod got straight from the gateway.
    /// Proxy→Serve: the start of the first such request.
    pub direct_ms: Option<u128>,
    /// The start of the last request served on the old mode's side (the wrong side of the
    /// flip): Serve→Proxy, straight from the gateway to the pod; Proxy→Serve, through an
    /// activator (node-local or Knative's). `None`: none after the write.
    pub wrong_ms: Option<u128>,
    pub direct: usize,
    pub via_node: usize,
    pub knative: usize,
    pub failed: usize,
}

/// The table: for each flip, the requests started from its write to the next flip's.
pub fn flip_rows(recs: &[Rec], flips: &[Flip], sides: &Sides) -> Vec<FlipRow> {
    let ms = |t: Instant, from: Instant| t.saturating_duration_since(from).as_millis();
    flips
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let until = flips.get(i + 1).map(|n| n.at);
            let win: Vec<&Rec> = recs
                .iter()
                .filter(|r| r.start >= f.at && until.is_none_or(|u| r.start < u))
                .collect();
            let mut row = FlipRow {
                to_proxy: f.to_proxy,
                agent_ms: f.agent_at.map(|t| ms(t, f.at)),
                gateway_ms: f.gateway_at.map(|t| ms(t, f.at)),
                ..Default::default()
            };
            let mut direct_starts = Vec::new();
            for r in &win {
                let side = sides.of(r);
                match side {
                    Side::Direct(_) => {
                        row.direct += 1;
                        direct_starts.push(ms(r.start, f.at));
                    }
                    Side::ViaNode(_) => row.via_node += 1,
                    Side::Knative => row.knative += 1,
                    Side::Failed => row.failed += 1,
                }
                let wrong = match side {
                    Side::Direct(_) => f.to_proxy,
                    Side::ViaNode(_) | Side::Knative => !f.to_proxy,
                    Side::Failed => false,
                };
                if wrong {
                    row.wrong_ms = row.wrong_ms.max(Some(ms(r.start, f.at)));
                }
            }
            row.direct_ms = if f.to_proxy {
                direct_starts.last().copied()
            } else {
                direct_starts.first().copied()
            };
            row
        })
        .collect()
}

/// Prints the table to stderr (shown with `--nocapture` or on failure).
pub fn print_rows(title: &str, rows: &[FlipRow]) {
    let opt = |v: Option<u128>| v.map_or("-".to_owned(), |v| v.to_string());
    eprintln!("{title}");
    eprintln!(
        "{:>4} {:<14} {:>9} {:>11} {:>10} {:>7} {:>8} {:>8} {:>7}",
        "flip",
        "to",
        "agent ms",
        "gateway ms",
        "direct ms",
        "direct",
        "via-node",
        "knative",
        "failed"
    );
    for (i, r) in rows.iter().enumerate() {
        eprintln!(
            "{:>4} {:<14} {:>9} {:>11} {:>10} {:>7} {:>8} {:>8} {:>7}",
            i + 1,
            if r.to_proxy {
                "Serve→Proxy"
            } else {
                "Proxy→Serve"
            },
            opt(r.agent_ms),
            opt(r.gateway_ms),
            opt(r.direct_ms),
            r.direct,
            r.via_node,
            r.knative,
            r.failed
        );
    }
    eprintln!(
        "(ms after the SKS write. agent: when `redirector status` first showed the mode (an \
         upper bound of the map write); gateway: when its addresses changed; direct: \
         Serve→Proxy = start of the last request the pod got straight from the gateway, \
         Proxy→Serve = start of the first)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(start: Instant, status: u16, from: &str, peer: &str) -> Rec {
        Rec {
            start,
            end: start,
            status,
            body: format!("hello from {from}\n"),
            peer: peer.parse().ok(),
            upstream: None,
            error: None,
        }
    }

    #[test]
    fn sides_and_flip_rows() {
        let sides = Sides {
            gateway: "10.244.2.40".parse().unwrap(),
            knative_activator: "10.244.2.31".parse().unwrap(),
        };
        let pod: IpAddr = "10.244.2.3".parse().unwrap();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let recs = vec![
            rec(at(0), 200, "10.244.2.3", "10.244.2.40"),
            rec(at(50), 200, "10.244.2.3", "10.244.2.40"),
            rec(at(80), 200, "10.244.2.3", "10.244.0.1"),
            rec(at(120), 200, "10.244.2.31", "10.244.2.40"),
            rec(at(130), 502, "10.244.2.3", "10.244.2.40"),
            rec(at(200), 200, "10.244.2.31", "10.244.2.40"),
            rec(at(260), 200, "10.244.2.3", "10.244.2.40"),
        ];
        assert_eq!(sides.of(&recs[0]), Side::Direct(pod));
        assert_eq!(sides.of(&recs[2]), Side::ViaNode(pod));
        assert_eq!(sides.of(&recs[3]), Side::Knative);
        assert_eq!(sides.of(&recs[4]), Side::Failed);
        // "hello from 10.244.2.30" is not the pod 10.244.2.3.
        assert_eq!(
            sides.of(&rec(at(0), 200, "10.244.2.30", "10.244.2.40")),
            Side::Direct("10.244.2.30".parse().unwrap())
        );
        let flips = [
            Flip {
                at: at(10),
                to_proxy: true,
                agent_at: Some(at(30)),
                gateway_at: None,
            },
            Flip {
                at: at(150),
                to_proxy: false,
                agent_at: None,
                gateway_at: Some(at(250)),
            },
        ];
        let rows = flip_rows(&recs, &flips, &sides);
        assert_eq!(rows.len(), 2);
        let r = &rows[0];
        assert_eq!((r.direct, r.via_node, r.knative, r.failed), (1, 1, 1, 1));
        assert_eq!((r.agent_ms, r.direct_ms), (Some(20), Some(40)));
        assert_eq!(r.wrong_ms, Some(40), "Serve→Proxy: the last direct request");
        let r = &rows[1];
        assert_eq!(
            (r.direct, r.knative, r.gateway_ms, r.direct_ms),
            (1, 1, Some(100), Some(110))
        );
        assert_eq!(
            r.wrong_ms,
            Some(50),
            "Proxy→Serve: the last through an activator"
        );
        // A flip with nothing on the old side after its write.
        let rows = flip_rows(&recs[5..], &flips[1..], &sides);
        assert_eq!(rows[0].wrong_ms, Some(50));
        let rows = flip_rows(&recs[6..], &flips[1..], &sides);
        assert_eq!(rows[0].wrong_ms, None);
    }
}
