//! Load generators and probes, run in a bed's client namespace: `wrk` (kept-alive), the
//! in-process new-connection generator, and the flip prober.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use redirector_tests::netns::Netns;

use super::{
    pct,
    pin::{self, Pinning},
    rules::sa,
    VIP, VIP_PORT,
};

/// Runs `f` on a thread inside the network namespace at `path`.
pub(super) fn enter(path: &str) -> Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// One short connection: connect, GET with `Connection: close`, read to EOF. The answering
/// server's id.
pub(super) fn one_request(to: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: rt\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::with_capacity(512);
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    if !text.starts_with("HTTP/1.1 200") {
        bail!("unexpected answer: {}", text.lines().next().unwrap_or(""));
    }
    let id = text
        .split("\"id\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("")
        .to_owned();
    Ok(id)
}

#[derive(Debug, Clone, Default)]
pub(super) struct Load {
    pub(super) rate: f64,
    /// Requests (kept-alive) or connections (new) completed in the measured run.
    pub(super) count: u64,
    pub(super) p50_us: f64,
    pub(super) p99_us: f64,
    pub(super) errors: u64,
}

/// New connections: `threads` clients in the client namespace, each in a loop of
/// connect + request + close for `dur`, on the load side's CPUs.
pub(super) fn new_conns(
    ns: &Netns,
    to: SocketAddr,
    threads: usize,
    dur: Duration,
    pinning: &Pinning,
) -> Result<Load> {
    let path = ns.path();
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for _ in 0..threads {
        let (path, stop, cpus) = (path.clone(), stop.clone(), pinning.load.clone());
        hs.push(std::thread::spawn(move || -> Result<(Vec<f64>, u64)> {
            enter(&path)?;
            pin::this_thread(&cpus)?;
            let mut lat = Vec::with_capacity(200_000);
            let mut errors = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match one_request(to, Duration::from_secs(2)) {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e6),
                    Err(_) => errors += 1,
                }
            }
            Ok((lat, errors))
        }));
    }
    let t0 = Instant::now();
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for h in hs {
        let (l, e) = h.join().expect("load thread")?;
        all.extend(l);
        errors += e;
    }
    let el = t0.elapsed().as_secs_f64();
    Ok(Load {
        rate: all.len() as f64 / el,
        count: all.len() as u64,
        p50_us: pct(&all, 0.5),
        p99_us: pct(&all, 0.99),
        errors,
    })
}

/// wrk's threads: one per pinned load CPU (two threads sharing one CPU only add switches),
/// two when unpinned.
pub(super) fn wrk_threads(pinning: &Pinning) -> usize {
    pinning.load.as_ref().map_or(2, |c| c.len().max(1))
}

pub(super) fn wrk_dur_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mul) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e6)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60e6)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * mul)
}

/// Kept-alive connections: `wrk --latency` in the client namespace, one wrk thread per CPU
/// of the load side (under `taskset` when it is pinned; two threads unpinned).
pub(super) fn wrk(
    ns: &Netns,
    to: SocketAddr,
    conns: usize,
    dur: Duration,
    pinning: &Pinning,
) -> Result<Load> {
    let url = format!("http://{to}/");
    let d = format!("{}s", dur.as_secs().max(1));
    let c = conns.to_string();
    let t = format!("-t{}", wrk_threads(pinning));
    let mut args = pinning.load_prefix();
    args.extend(
        ["wrk", &t, "-c", &c, "-d", &d, "--latency", &url]
            .iter()
            .map(|a| a.to_string()),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ns.exec(args[0], &args[1..])?;
    let mut l = Load::default();
    for line in out.lines() {
        let t = line.trim();
        if let Some((n, _)) = t.split_once(" requests in ") {
            l.count = n.trim().parse().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Requests/sec:") {
            l.rate = v.trim().parse().unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("50%") {
            l.p50_us = wrk_dur_us(v).unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("99%") {
            l.p99_us = wrk_dur_us(v).unwrap_or(f64::NAN);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            l.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            l.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    if l.rate.is_nan() || l.rate <= 0.0 {
        bail!("wrk produced no rate:\n{out}");
    }
    Ok(l)
}

/// `k` new connections to `to` from the client namespace, one after the other: the id of
/// the server that answered each (`Err` text for a failed one).
pub(super) fn answers(ns: &Netns, to: SocketAddr, k: usize) -> Result<Vec<String>> {
    let path = ns.path();
    std::thread::spawn(move || -> Result<Vec<String>> {
        enter(&path)?;
        Ok((0..k)
            .map(|_| {
                one_request(to, Duration::from_secs(2)).unwrap_or_else(|e| format!("error: {e}"))
            })
            .collect())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("answers thread panicked"))?
}

/// A thread in the client namespace that, once armed, opens new connections to the VIP
/// until one is answered by `want`; reports the time since the arming instant.
pub(super) struct Prober {
    pub(super) tx: mpsc::Sender<(Instant, &'static str)>,
    pub(super) rx: mpsc::Receiver<Result<(Duration, u32)>>,
}

impl Prober {
    pub(super) fn new(ns: &Netns, pinning: &Pinning) -> Self {
        let (tx, jobs) = mpsc::channel::<(Instant, &'static str)>();
        let (done, rx) = mpsc::channel();
        let (path, cpus) = (ns.path(), pinning.load.clone());
        std::thread::spawn(move || {
            if let Err(e) = enter(&path).and_then(|_| pin::this_thread(&cpus)) {
                let _ = done.send(Err(e));
                return;
            }
            for (t0, want) in jobs {
                let mut n = 0u32;
                let r = loop {
                    n += 1;
                    if let Ok(id) = one_request(sa(VIP, VIP_PORT), Duration::from_millis(500)) {
                        if id == want {
                            break Ok((t0.elapsed(), n));
                        }
                    }
                    if t0.elapsed() > Duration::from_secs(600) {
                        break Err(anyhow::anyhow!("no connection reached {want} in 600 s"));
                    }
                };
                if done.send(r).is_err() {
                    return;
                }
            }
        });
        Prober { tx, rx }
    }

    /// Arms the prober at `t0` (just before the flip starts).
    pub(super) fn arm(&self, t0: Instant, want: &'static str) {
        self.tx.send((t0, want)).expect("prober alive");
    }

    pub(super) fn landed(&self) -> Result<(Duration, u32)> {
        self.rx.recv()?
    }
}
