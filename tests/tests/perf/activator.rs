//! `activator` (`--activator`, or no scenario flag): the Proxy path through the agent's activator, end to end in
//! network namespaces (`redirector_tests::coldstart`), release builds. Results go to
//! `target/perf/activator.{json,md}`; targets are reported (met / not met), never asserted.
//!
//! 1. Cold-start overhead: client time to first byte of a request to a zero-scaled service
//!    minus the instance's own start-to-ready time (`last_cold_start`: `ready_us -
//!    started_us`), over N cold starts (idle timeout 0.3 s brings it back to zero between
//!    runs). Parts: wake -> started (namespace, veth, exec), started -> ready (the app's
//!    `STARTUP_DELAY_MS`, exec, 5 ms probe cadence), ready -> first byte (plus the request's
//!    way to the wake). Target p99 <= 10 ms.
//! 2. Warm proxied requests: a service held in Proxy (`target_burst_capacity = -1`, so every
//!    request goes through the activator) against the same instance addressed directly, at
//!    a fixed open-loop rate of 1,000 req/s over keep-alive connections from the client
//!    namespace, interleaved rounds; latency from the scheduled send time when the
//!    connection was still busy then (coordinated omission), else from the actual send.
//!    Target: added p99 <= 1 ms.
//! 3. Throughput: `wrk` from the client namespace through the activator (the VIP), through
//!    nginx and through haproxy (reverse proxies in the node namespace, configured alike:
//!    HTTP, kept-alive connections to the same instance, one worker per CPU, no logging),
//!    and directly to the instance as the app's own ceiling; interleaved rounds, median; CPU
//!    time per request of each proxy from /proc. Target: activator >= nginx (haproxy is
//!    reported beside it).
//! 4. Agent memory with 10,000 held requests (an instance that takes 10 minutes to start):
//!    the agent's VmRSS while /status shows them all held. Target <= 200 MiB.
//!
//! `ACT_ONLY=memory` runs part 4 alone (memory is not sensitive to CPU load).
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Barrier},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use redirector_tests::coldstart::{is_root, net, run, wait_for, Config, Env, Scale, Svc};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(30);
/// Where nginx listens in the node namespace (the activator is on :8012 of the same address).
const NGINX: &str = "10.244.0.1:8081";
/// Where haproxy listens in the node namespace.
const HAPROXY: &str = "10.244.0.1:8082";
const HELD: usize = 10_000;

fn out_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("perf")
}

/// Nearest-rank percentile of `v` (sorted in place).
fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

// ---------------------------------------------------------------------------------------
// HDR-style histogram: log-linear buckets over nanoseconds, 128 sub-buckets per power of
// two above 256 ns (relative error below 0.8 %), exact below.

const SUB: u64 = 256;
const HALF: u64 = SUB / 2;

#[derive(Clone)]
struct Hist {
    counts: Vec<u64>,
    total: u64,
    max: u64,
    min: u64,
    sum: u128,
}

impl Hist {
    fn new() -> Self {
        Self {
            counts: vec![0; (SUB + 57 * HALF) as usize],
            total: 0,
            max: 0,
            min: u64::MAX,
            sum: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros() as u64;
        let shift = msb - 7;
        let mantissa = v >> shift;
        (SUB + (shift - 1) * HALF + (mantissa - HALF)) as usize
    }

    /// The highest value that lands in bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let shift = (i - SUB) / HALF + 1;
        let mantissa = (i - SUB) % HALF + HALF;
        ((mantissa + 1) << shift) - 1
    }

    fn record(&mut self, d: Duration) {
        let v = d.as_nanos().min(u64::MAX as u128) as u64;
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
        self.min = self.min.min(v);
        self.sum += v as u128;
    }

    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.total += o.total;
        self.max = self.max.max(o.max);
        self.min = self.min.min(o.min);
        self.sum += o.sum;
    }

    /// Value at quantile `q`, in µs.
    fn quantile_us(&self, q: f64) -> f64 {
        if self.total == 0 {
            return f64::NAN;
        }
        let want = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Self::upper(i).min(self.max) as f64 / 1e3;
            }
        }
        self.max as f64 / 1e3
    }

    fn mean_us(&self) -> f64 {
        if self.total == 0 {
            return f64::NAN;
        }
        self.sum as f64 / self.total as f64 / 1e3
    }
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1 over blocking sockets made in the client namespace.

/// Reads one response off a keep-alive connection; its status code.
fn read_response(r: &mut BufReader<TcpStream>) -> Result<u16> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("connection closed before the response");
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let (mut len, mut chunked, mut close) = (0usize, false, false);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("connection closed in the headers");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                len = v.parse().unwrap_or(0);
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.eq_ignore_ascii_case("chunked");
            } else if k.eq_ignore_ascii_case("connection") {
                close = v.eq_ignore_ascii_case("close");
            }
        }
    }
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .with_context(|| format!("bad chunk size {line:?}"))?;
            let mut skip = vec![0u8; size + 2];
            r.read_exact(&mut skip)?;
            if size == 0 {
                break;
            }
        }
    } else {
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
    }
    if close {
        bail!("server closed the keep-alive connection");
    }
    Ok(status)
}

struct Load {
    hist: Hist,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
}

/// Open-loop `GET /` at `rate` req/s for `dur` over `conns` keep-alive connections from the
/// client namespace; connection k sends requests k, k + conns, k + 2 conns, ... of one global
/// schedule.
fn open_loop(ns: &str, addr: SocketAddr, rate: u32, dur: Duration, conns: usize) -> Result<Load> {
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let total = (dur.as_secs_f64() * rate as f64) as u64;
    let barrier = Arc::new(Barrier::new(conns + 1));
    let (t0_tx, t0_rx) = mpsc::channel::<Instant>();
    let t0_rx = Arc::new(std::sync::Mutex::new(t0_rx));
    let mut threads = Vec::new();
    for k in 0..conns {
        let (ns, barrier, t0_rx) = (ns.to_owned(), barrier.clone(), t0_rx.clone());
        threads.push(std::thread::spawn(move || -> Result<Load> {
            net::enter(&ns)?;
            let req = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
            let connect = || -> Result<(TcpStream, BufReader<TcpStream>)> {
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let r = BufReader::new(s.try_clone()?);
                Ok((s, r))
            };
            let conn = connect();
            barrier.wait();
            let t0 = *t0_rx.lock().unwrap().recv().as_ref().unwrap();
            let (mut w, mut r) = conn?;
            let mut out = Load {
                hist: Hist::new(),
                ok: 0,
                errors: 0,
                first_error: None,
                elapsed: Duration::ZERO,
            };
            let mut prev_done = t0;
            let mut seq = k as u64;
            while seq < total {
                let intended = t0 + period * seq as u32;
                let now = Instant::now();
                if intended > now {
                    std::thread::sleep(intended - now);
                }
                let send = Instant::now();
                let start = if prev_done > intended { intended } else { send };
                let res = w
                    .write_all(req.as_bytes())
                    .map_err(anyhow::Error::from)
                    .and_then(|_| read_response(&mut r));
                let done = Instant::now();
                match res {
                    Ok(200) => {
                        out.ok += 1;
                        out.hist.record(done - start);
                    }
                    other => {
                        out.errors += 1;
                        if out.first_error.is_none() {
                            out.first_error = Some(format!("{other:?}"));
                        }
                        (w, r) = connect()?;
                    }
                }
                prev_done = done;
                seq += conns as u64;
            }
            out.elapsed = t0.elapsed();
            Ok(out)
        }));
    }
    barrier.wait();
    let t0 = Instant::now() + Duration::from_millis(20);
    for _ in 0..conns {
        let _ = t0_tx.send(t0);
    }
    let mut all = Load {
        hist: Hist::new(),
        ok: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    for t in threads {
        let l = t
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        all.hist.merge(&l.hist);
        all.ok += l.ok;
        all.errors += l.errors;
        all.first_error = all.first_error.or(l.first_error);
        all.elapsed = all.elapsed.max(l.elapsed);
    }
    Ok(all)
}

// ---------------------------------------------------------------------------------------
// Helpers around the harness.

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn len(v: &Value) -> usize {
    v.as_array().map_or(0, |a| a.len())
}

fn sc<'a>(st: &'a Value, svc: &Svc) -> &'a Value {
    &st["scalers"][svc.full_name()]
}

fn act<'a>(st: &'a Value, svc: &Svc) -> &'a Value {
    &st["activator"][svc.full_name()]
}

/// PID of the agent: the `redirector` process in the node namespace.
fn agent_pid(env: &Env) -> Result<i32> {
    run("ip", &["netns", "pids", &env.node])?
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "redirector")
        })
        .context("no redirector process in the node namespace")
}

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
fn rss_kib(pid: i32) -> Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// `pid` and its direct children (nginx's master and workers; haproxy is one process).
fn with_children(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if proc_stat(p).is_some_and(|f| f.get(1).and_then(|v| v.parse::<i32>().ok()) == Some(pid)) {
            out.push(p);
        }
    }
    out
}

/// Fields of /proc/<pid>/stat after the command name (field 3 onwards).
fn proc_stat(pid: i32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User + system CPU time of `pids`, in clock ticks.
fn cpu_ticks(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|p| proc_stat(*p))
        .map(|f| {
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            n(11) + n(12)
        })
        .sum()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Raises this process's RLIMIT_NOFILE soft limit to its hard limit (at least `want`);
/// children (the agent) inherit it. Returns the new soft limit.
fn raise_nofile(want: u64) -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        // Above the hard limit only where that is permitted (CAP_SYS_RESOURCE).
        if lim.rlim_max < want {
            let up = libc::rlimit {
                rlim_cur: want,
                rlim_max: want,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &up) == 0 {
                return Ok(want);
            }
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// The 1-minute load average (other work on the machine skews every number here).
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// `haproxy -v`'s version, e.g. `2.6.12-1+deb12u4`.
fn haproxy_version() -> String {
    run("haproxy", &["-v"])
        .ok()
        .and_then(|o| o.split_whitespace().nth(2).map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn machine() -> (usize, String) {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = run("uname", &["-r"]).unwrap_or_default().trim().to_owned();
    (nproc, kernel)
}

// ---------------------------------------------------------------------------------------
// 1. Cold starts.

struct ColdSample {
    ttfb_us: f64,
    started_us: f64,
    ready_us: f64,
    flipped_us: f64,
}

/// One `GET /` on a fresh connection from the client namespace: time to first byte (from
/// before connect) and the status.
fn timed_get(ns: &str, addr: SocketAddr) -> Result<(Duration, u16)> {
    net::in_netns(ns, move || {
        let t0 = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(LONG))?;
        s.write_all(
            format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )?;
        let mut first = [0u8; 1];
        s.read_exact(&mut first)?;
        let ttfb = t0.elapsed();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        let mut raw = first.to_vec();
        raw.extend_from_slice(&rest);
        let r = net::parse(&raw)?;
        Ok((ttfb, r.status))
    })
}

struct Cold {
    startup_delay_ms: u64,
    samples: Vec<ColdSample>,
    /// The agent's WARN / ERROR log lines during the cold starts.
    warnings: Vec<String>,
}

fn cold_starts(n: usize) -> Result<Cold> {
    const DELAY_MS: u64 = 100;
    let mut scale = Scale::hello(&[("STARTUP_DELAY_MS", &DELAY_MS.to_string())]);
    scale.idle_timeout_secs = 0.3;
    scale.stable_window_secs = 1.0;
    scale.max_scale = 1;
    let svc = Svc::new("cold", "10.96.0.40", scale);
    let env = Env::start("pc", &Config::one(svc.clone()))?;
    let mut samples = Vec::new();
    for i in 0..n {
        let st = env.wait_status("the service at zero, in proxy", LONG, |s| {
            sc(s, &svc)["mode"] == "proxy" && len(&sc(s, &svc)["instances"]) == 0
        })?;
        let before = u(&sc(&st, &svc)["cold_starts"]);
        // A service at zero for a while: the agent's prepared spare sandbox (an instance
        // namespace with no process yet) is in place, as it would be after a real idle spell.
        std::thread::sleep(Duration::from_millis(500));
        let _ = wait_for("a prepared sandbox", Duration::from_secs(5), || {
            (env.instance_netns().len() > env.running_instances().len()).then_some(())
        });
        let (ttfb, status) = timed_get(&env.client, svc.addr())?;
        if status != 200 {
            bail!("cold start {i}: status {status}");
        }
        let st = env.wait_status("the cold start's timeline", LONG, |s| {
            let x = sc(s, &svc);
            u(&x["cold_starts"]) == before + 1 && u(&x["last_cold_start"]["ready_us"]) > 0
        })?;
        let cs = &sc(&st, &svc)["last_cold_start"];
        samples.push(ColdSample {
            ttfb_us: ttfb.as_secs_f64() * 1e6,
            started_us: u(&cs["started_us"]) as f64,
            ready_us: u(&cs["ready_us"]) as f64,
            flipped_us: u(&cs["flipped_us"]) as f64,
        });
    }
    let warnings = env
        .log()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .map(str::to_owned)
        .collect();
    Ok(Cold {
        startup_delay_ms: DELAY_MS,
        samples,
        warnings,
    })
}

// ---------------------------------------------------------------------------------------
// 2 + 3. Warm traffic: open-loop latency, then throughput against nginx.

struct Warm {
    rate: u32,
    secs: f64,
    conns: usize,
    proxied: Load,
    direct: Load,
    forwarded: u64,
    /// Per round: (activator p50, activator p99, direct p50, direct p99), µs.
    rounds: Vec<[f64; 4]>,
}

/// The throughput columns, in this order.
const TP_COLS: [&str; 4] = ["activator", "nginx", "haproxy", "direct"];

struct Throughput {
    /// Per round, req/s in [`TP_COLS`] order.
    rounds: Vec<[f64; 4]>,
    /// CPU time of the proxy process(es), µs: (activator, nginx, haproxy), summed over rounds.
    cpu_us: [f64; 3],
    requests: [f64; 3],
    secs: u64,
    conns: u32,
    errors: Vec<String>,
}

/// Median of each column over the rounds: (activator, nginx, haproxy, direct).
fn tp_medians(t: &Throughput) -> [f64; 4] {
    let mut out = [0.0; 4];
    for (c, o) in out.iter_mut().enumerate() {
        let mut v: Vec<f64> = t.rounds.iter().map(|r| r[c]).collect();
        *o = pct(&mut v, 0.5);
    }
    out
}

/// The Debian package `pkg`'s binary (`/usr/sbin/<pkg>`), installed if missing.
fn ensure_pkg(pkg: &str) -> Result<PathBuf> {
    for p in [format!("/usr/sbin/{pkg}"), format!("/usr/bin/{pkg}")] {
        if Path::new(&p).exists() {
            return Ok(p.into());
        }
    }
    println!("{pkg} missing: installing it");
    let st = Command::new("apt-get")
        .args(["install", "-y", pkg])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("apt-get install {pkg} failed ({st})");
    }
    Ok(format!("/usr/sbin/{pkg}").into())
}

/// A reverse proxy we started, and the signal that stops it gracefully.
struct Proxy(Child, libc::c_int);

impl Drop for Proxy {
    fn drop(&mut self) {
        // SAFETY: signalling our own child (nginx's master: SIGQUIT stops its workers too;
        // haproxy: SIGTERM).
        unsafe { libc::kill(self.0.id() as i32, self.1) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_nginx(env: &Env, upstream: &str) -> Result<Proxy> {
    let bin = ensure_pkg("nginx")?;
    let dir = env.dir.join("nginx");
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let conf = format!(
        "worker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         \x20 upstream app {{ server {upstream}; keepalive 64; }}\n\
         \x20 server {{\n    listen {NGINX};\n    location / {{\n      proxy_pass http://app;\n\
         \x20     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
    );
    let file = dir.join("nginx.conf");
    std::fs::write(&file, conf)?;
    let log = std::fs::File::create(dir.join("stderr.log"))?;
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", env.node))
        .arg(&bin)
        .arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&file)
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting nginx")?;
    let ng = Proxy(child, libc::SIGQUIT);
    let logs = [dir.join("stderr.log"), dir.join("error.log")];
    wait_proxy(env, ng, "nginx", NGINX, &logs)
}

/// Waits until the proxy `name` answers `GET /` with 200 on `listen` in the node namespace.
fn wait_proxy(
    env: &Env,
    mut p: Proxy,
    name: &str,
    listen: &str,
    logs: &[PathBuf],
) -> Result<Proxy> {
    let addr: SocketAddr = listen.parse()?;
    let node = env.node.clone();
    let up = wait_for(
        &format!("{name} answering"),
        Duration::from_secs(10),
        || {
            if !matches!(p.0.try_wait(), Ok(None)) {
                return Some(false);
            }
            net::get(&node, addr, "/", Duration::from_secs(2))
                .ok()
                .filter(|r| r.status == 200)
                .map(|_| true)
        },
    );
    if !matches!(up, Ok(true)) {
        let err: String = logs
            .iter()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .collect();
        let _ = p.0.kill();
        bail!("{name} did not come up: {err}");
    }
    Ok(p)
}

/// haproxy configured like nginx: HTTP mode, kept-alive connections to the instance
/// (`http-reuse always`), one thread per CPU (`nbthread`), no logging.
fn start_haproxy(env: &Env, upstream: &str) -> Result<Proxy> {
    let bin = ensure_pkg("haproxy")?;
    let dir = env.dir.join("haproxy");
    std::fs::create_dir_all(&dir)?;
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let conf = format!(
        "global\n  nbthread {nproc}\n  maxconn 4096\n  pidfile {d}/haproxy.pid\n\n\
         defaults\n  mode http\n  option http-keep-alive\n  http-reuse always\n\
         \x20 timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n\
         frontend fe\n  bind {HAPROXY}\n  default_backend app\n\n\
         backend app\n  http-reuse always\n  server app {upstream}\n",
        d = dir.display()
    );
    let file = dir.join("haproxy.cfg");
    std::fs::write(&file, conf)?;
    let log = std::fs::File::create(dir.join("stderr.log"))?;
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", env.node))
        .arg(&bin)
        // Foreground, no daemon.
        .arg("-db")
        .arg("-f")
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting haproxy")?;
    wait_proxy(
        env,
        Proxy(child, libc::SIGTERM),
        "haproxy",
        HAPROXY,
        &[dir.join("stderr.log")],
    )
}

/// `wrk` from the client namespace: requests/s, and what went wrong if anything did.
fn wrk(ns: &str, url: &str, secs: u64, conns: u32) -> Result<(f64, Option<String>)> {
    let out = run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "wrk",
            "-t2",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            url,
        ],
    )?;
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{out}"))?;
    let bad = out
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .map(|l| format!("{url}: {}", l.trim()));
    Ok((rps, bad))
}

fn warm(quick: bool) -> Result<(Warm, Throughput)> {
    let mut scale = Scale::hello(&[]);
    scale.min_scale = 1;
    scale.max_scale = 1;
    scale.target_burst_capacity = -1.0;
    scale.idle_timeout_secs = 3600.0;
    scale.target_concurrency = 1000.0;
    let svc = Svc::new("warm", "10.96.0.41", scale);
    let env = Env::start("pw", &Config::one(svc.clone()))?;
    let st = env.wait_status("one ready instance", LONG, |s| {
        len(&sc(s, &svc)["ready"]) == 1
    })?;
    if sc(&st, &svc)["mode"] != "proxy" {
        bail!("target_burst_capacity = -1 but the service is not in proxy: {st}");
    }
    let direct: SocketAddr = sc(&st, &svc)["ready"][0]
        .as_str()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("the ready instance's address: {st}"))?;
    let vip = svc.addr();
    println!("warm: VIP {vip} (proxy, through the activator), instance {direct}");

    // 2. Open-loop latency, interleaved rounds.
    let (rounds, secs, conns, rate) = if quick {
        (1, 2.0, 8, 1000)
    } else {
        (6, 3.0, 16, 1000)
    };
    let dur = Duration::from_secs_f64(secs);
    // Warm-up: the activator's upstream pool, the instance's threads, conntrack.
    for a in [vip, direct] {
        open_loop(&env.client, a, rate, Duration::from_secs(1), conns)?;
    }
    let fwd0 = u(&act(&env.status()?, &svc)["forwarded"]);
    let mut proxied = Load {
        hist: Hist::new(),
        ok: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    let mut direct_load = Load {
        hist: Hist::new(),
        ok: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    let mut per_round = Vec::new();
    for r in 0..rounds {
        let mut row = [0.0; 4];
        let order = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for via_activator in order {
            let (a, acc) = if via_activator {
                (vip, &mut proxied)
            } else {
                (direct, &mut direct_load)
            };
            let l = open_loop(&env.client, a, rate, dur, conns)?;
            println!(
                "  round {r} {}: {} ok, {} errors, p50 {:.1} us, p99 {:.1} us",
                if via_activator { "activator" } else { "direct" },
                l.ok,
                l.errors,
                l.hist.quantile_us(0.5),
                l.hist.quantile_us(0.99)
            );
            let col = if via_activator { 0 } else { 2 };
            row[col] = l.hist.quantile_us(0.5);
            row[col + 1] = l.hist.quantile_us(0.99);
            acc.hist.merge(&l.hist);
            acc.ok += l.ok;
            acc.errors += l.errors;
            acc.first_error = acc.first_error.take().or(l.first_error);
            acc.elapsed += l.elapsed;
        }
        per_round.push(row);
    }
    let forwarded = u(&act(&env.status()?, &svc)["forwarded"]) - fwd0;
    let warm = Warm {
        rate,
        secs: secs * rounds as f64,
        conns,
        proxied,
        direct: direct_load,
        forwarded,
        rounds: per_round,
    };

    // 3. Throughput: activator (VIP) vs nginx vs haproxy vs direct, interleaved.
    let ng = start_nginx(&env, &direct.to_string())?;
    let hp = start_haproxy(&env, &direct.to_string())?;
    let (rounds, secs, wconns) = if quick { (1, 2, 50) } else { (3, 8, 50) };
    let urls = [
        format!("http://{vip}/"),
        format!("http://{NGINX}/"),
        format!("http://{HAPROXY}/"),
        format!("http://{direct}/"),
    ];
    for u in &urls {
        wrk(&env.client, u, 1, wconns)?;
    }
    let mut tp = Throughput {
        rounds: Vec::new(),
        secs,
        conns: wconns,
        errors: Vec::new(),
        cpu_us: [0.0; 3],
        requests: [0.0; 3],
    };
    let agent = agent_pid(&env)?;
    let nginx_pid = ng.0.id() as i32;
    let haproxy_pid = hp.0.id() as i32;
    for r in 0..rounds {
        let mut row = [0.0; 4];
        // Rotate the order each round.
        for k in 0..4 {
            let c = (k + r) % 4;
            let pids = match c {
                0 => vec![agent],
                1 => with_children(nginx_pid),
                2 => with_children(haproxy_pid),
                _ => Vec::new(),
            };
            let cpu0 = cpu_ticks(&pids);
            let (rps, bad) = wrk(&env.client, &urls[c], secs, wconns)?;
            if c < 3 {
                tp.cpu_us[c] += (cpu_ticks(&pids) - cpu0) as f64 * 1e6 / clock_ticks();
                tp.requests[c] += rps * secs as f64;
            }
            row[c] = rps;
            tp.errors.extend(bad);
        }
        println!(
            "  round {r}: activator {:.0} req/s, nginx {:.0} req/s, haproxy {:.0} req/s, direct {:.0} req/s",
            row[0], row[1], row[2], row[3]
        );
        tp.rounds.push(row);
    }
    Ok((warm, tp))
}

// ---------------------------------------------------------------------------------------
// 4. Memory with 10,000 held requests.

struct Memory {
    held: u64,
    rss_idle_kib: u64,
    rss_held_kib: u64,
    hwm_kib: u64,
    fds: usize,
    connect_secs: f64,
    nofile: u64,
}

/// Opens `n` connections from the client namespace, each with a `GET /` written, and keeps
/// them open until `release` fires; reports the number opened on `opened`.
fn hold_requests(
    ns: String,
    addr: SocketAddr,
    n: usize,
    opened: mpsc::Sender<Result<usize>>,
    release: tokio::sync::oneshot::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if let Err(e) = net::enter(&ns) {
            let _ = opened.send(Err(e.into()));
            return;
        }
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = opened.send(Err(e.into()));
                return;
            }
        };
        rt.block_on(async move {
            use tokio::io::AsyncWriteExt;
            let gate = Arc::new(tokio::sync::Semaphore::new(256));
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..n {
                let gate = gate.clone();
                tasks.spawn(async move {
                    let _p = gate.acquire().await?;
                    let mut s = tokio::time::timeout(
                        Duration::from_secs(20),
                        tokio::net::TcpStream::connect(addr),
                    )
                    .await??;
                    s.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
                        .await?;
                    Ok::<_, anyhow::Error>(s)
                });
            }
            let mut streams = Vec::with_capacity(n);
            let mut first_err = None;
            while let Some(r) = tasks.join_next().await {
                match r {
                    Ok(Ok(s)) => streams.push(s),
                    Ok(Err(e)) => first_err = first_err.or(Some(e)),
                    Err(e) => first_err = first_err.or(Some(e.into())),
                }
            }
            let res = match first_err {
                Some(e) if streams.len() < n => {
                    Err(e.context(format!("only {} of {n} connections opened", streams.len())))
                }
                _ => Ok(streams.len()),
            };
            let _ = opened.send(res);
            let _ = release.await;
            drop(streams);
        });
    })
}

fn memory() -> Result<Memory> {
    let nofile = raise_nofile(65_536)?;
    let mut scale = Scale::hello(&[("STARTUP_DELAY_MS", "600000")]);
    scale.max_scale = 1;
    let mut svc = Svc::new("hold", "10.96.0.42", scale);
    svc.timeout_secs = Some(600.0);
    let mut cfg = Config::one(svc.clone());
    cfg.activator.extend([
        "max_held_per_service = 20000".into(),
        "max_held_total = 40000".into(),
        "drain_timeout_secs = 1".into(),
    ]);
    let env = Env::start("pm", &cfg)?;
    env.wait_status("the service at zero, in proxy", LONG, |s| {
        sc(s, &svc)["mode"] == "proxy"
    })?;
    let pid = agent_pid(&env)?;
    let agent_nofile = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().nth(3).unwrap_or("?").to_owned())
        .unwrap_or_default();
    std::thread::sleep(Duration::from_millis(500));
    let (rss_idle_kib, _) = rss_kib(pid)?;
    println!(
        "memory: agent pid {pid} (open files limit {agent_nofile}), idle VmRSS {:.1} MiB; opening {HELD} held requests",
        rss_idle_kib as f64 / 1024.0
    );

    let (tx, rx) = mpsc::channel();
    let (rel_tx, rel_rx) = tokio::sync::oneshot::channel();
    let t0 = Instant::now();
    let th = hold_requests(env.client.clone(), svc.addr(), HELD, tx, rel_rx);
    let opened = rx
        .recv_timeout(Duration::from_secs(180))
        .context("opening the held connections took too long")??;
    let connect_secs = t0.elapsed().as_secs_f64();
    let held = env
        .wait_status(
            &format!("{HELD} requests held"),
            Duration::from_secs(120),
            |s| u(&act(s, &svc)["held"]) as usize >= HELD,
        )
        .map(|s| u(&act(&s, &svc)["held"]));
    let measured = held.and_then(|held| {
        std::thread::sleep(Duration::from_millis(500));
        let (rss, hwm) = rss_kib(pid)?;
        Ok((held, rss, hwm, open_fds(pid)))
    });
    let _ = rel_tx.send(());
    let _ = th.join();
    let _ = env.wait_status("the hold emptied", LONG, |s| u(&act(s, &svc)["held"]) == 0);
    let (held, rss_held_kib, hwm_kib, fds) =
        measured.with_context(|| format!("{opened} connections opened"))?;
    Ok(Memory {
        held,
        rss_idle_kib,
        rss_held_kib,
        hwm_kib,
        fds,
        connect_secs,
        nofile,
    })
}

// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "benchmark: run by `cargo xtask perf` (all parts) or `--activator`"]
fn activator() {
    let o = crate::selection("--activator");
    if !o.on {
        println!("skipped: PERF_ARGS selects no activator benchmark");
        return;
    }
    if !is_root() {
        panic!("needs root: the activator benchmark builds namespaces and runs the agent");
    }
    let t_all = Instant::now();
    let n_cold = if o.quick { 5 } else { 30 };
    let (nproc, kernel) = machine();
    println!("activator perf: {n_cold} cold starts, quick = {}", o.quick);
    let mut errors: Vec<String> = Vec::new();
    let load_start = loadavg();

    // `ACT_ONLY=memory`: only part 4 (the held-requests memory figure), for checking memory
    // changes without the CPU-heavy parts; unset, every part runs.
    let memory_only = std::env::var("ACT_ONLY").is_ok_and(|v| v == "memory");
    let cold = if memory_only {
        Err(())
    } else {
        cold_starts(n_cold).map_err(|e| errors.push(format!("cold starts: {e:#}")))
    };
    let warm = if memory_only {
        Err(())
    } else {
        warm(o.quick).map_err(|e| errors.push(format!("warm / throughput: {e:#}")))
    };
    let mem = memory().map_err(|e| errors.push(format!("memory: {e:#}")));
    let load_end = loadavg();

    let mut md = String::new();
    md += "# Activator performance\n\n";
    md += &format!(
        "Machine: {nproc} CPUs, kernel {kernel}; load average {load_start:.1} at the start, \
         {load_end:.1} at the end (anything else running skews these numbers). Release build; \
         everything on one machine (client namespace -> node namespace; instances in their own \
         namespaces).{}\n\n",
        if o.quick {
            " `--quick`: short runs, numbers not meaningful."
        } else {
            ""
        }
    );
    md += "| metric | value | target | verdict |\n|---|---:|---:|---|\n";
    let mut targets = serde_json::Map::new();
    let mut details = String::new();
    let mut json = serde_json::Map::new();
    json.insert(
        "machine".into(),
        json!({ "nproc": nproc, "kernel": kernel, "loadavg_start": load_start, "loadavg_end": load_end }),
    );
    json.insert("quick".into(), json!(o.quick));

    if let Ok(c) = &cold {
        let s = &c.samples;
        let col = |f: &dyn Fn(&ColdSample) -> f64| -> (f64, f64) {
            let mut v: Vec<f64> = s.iter().map(f).collect();
            (pct(&mut v, 0.5) / 1e3, pct(&mut v, 0.99) / 1e3)
        };
        let overhead = col(&|x| x.ttfb_us - (x.ready_us - x.started_us));
        let ttfb = col(&|x| x.ttfb_us);
        let wake_started = col(&|x| x.started_us);
        let own = col(&|x| x.ready_us - x.started_us);
        let ready_fb = col(&|x| x.ttfb_us - x.ready_us);
        let flip = col(&|x| x.flipped_us - x.ready_us);
        let met = overhead.1 <= 10.0;
        md += &format!(
            "| cold-start overhead p99 (TTFB - instance start-to-ready), {} cold starts | {:.2} ms | <= 10 ms | {} |\n",
            s.len(),
            overhead.1,
            verdict(met)
        );
        targets.insert(
            "cold_start_overhead_p99_le_10ms".into(),
            json!({ "met": met, "p99_ms": overhead.1 }),
        );
        details += &format!(
            "\n## Cold starts ({} runs, STARTUP_DELAY_MS = {})\n\n| part | p50 ms | p99 ms |\n|---|---:|---:|\n",
            s.len(),
            c.startup_delay_ms
        );
        for (name, v) in [
            ("time to first byte (client)", ttfb),
            ("overhead = TTFB - (ready - started)", overhead),
            (
                "wake -> started (netns, veth, addresses, exec)",
                wake_started,
            ),
            (
                "started -> ready (the instance's own: exec + STARTUP_DELAY_MS + probe cadence)",
                own,
            ),
            ("ready -> first byte (plus request -> wake)", ready_fb),
            ("ready -> flipped to Serve", flip),
        ] {
            details += &format!("| {name} | {:.2} | {:.2} |\n", v.0, v.1);
        }
        if !c.warnings.is_empty() {
            details += &format!(
                "\nThe agent logged {} warnings/errors during the cold starts; the first:\n\n",
                c.warnings.len()
            );
            for w in c.warnings.iter().take(5) {
                details += &format!("    {w}\n");
            }
        }
        json.insert(
            "cold_start".into(),
            json!({
                "runs": s.len(),
                "startup_delay_ms": c.startup_delay_ms,
                "agent_warnings": c.warnings,
                "ms": {
                    "ttfb": { "p50": ttfb.0, "p99": ttfb.1 },
                    "overhead": { "p50": overhead.0, "p99": overhead.1 },
                    "wake_to_started": { "p50": wake_started.0, "p99": wake_started.1 },
                    "started_to_ready": { "p50": own.0, "p99": own.1 },
                    "ready_to_first_byte": { "p50": ready_fb.0, "p99": ready_fb.1 },
                    "ready_to_flipped": { "p50": flip.0, "p99": flip.1 },
                },
                "samples_us": s.iter().map(|x| json!({
                    "ttfb": x.ttfb_us, "started": x.started_us, "ready": x.ready_us, "flipped": x.flipped_us,
                })).collect::<Vec<_>>(),
            }),
        );
    }

    if let Ok((w, tp)) = &warm {
        let q = |h: &Hist| {
            (
                h.quantile_us(0.5),
                h.quantile_us(0.99),
                h.quantile_us(0.999),
                h.max as f64 / 1e3,
                h.mean_us(),
            )
        };
        let (p, d) = (q(&w.proxied.hist), q(&w.direct.hist));
        // Paired by round (each round runs both back to back), median over the rounds: one
        // round disturbed by something else on the machine does not decide.
        let mut added: Vec<f64> = w.rounds.iter().map(|r| r[1] - r[3]).collect();
        let added_p99_ms = pct(&mut added, 0.5) / 1e3;
        let mut added50: Vec<f64> = w.rounds.iter().map(|r| r[0] - r[2]).collect();
        let added_p50_ms = pct(&mut added50, 0.5) / 1e3;
        let met = added_p99_ms <= 1.0;
        md += &format!(
            "| warm proxied request, added p99 vs direct at {} req/s (median of {} paired rounds) | {:.3} ms | <= 1 ms | {} |\n",
            w.rate,
            w.rounds.len(),
            added_p99_ms,
            verdict(met)
        );
        targets.insert(
            "warm_added_p99_le_1ms".into(),
            json!({ "met": met, "added_p99_ms": added_p99_ms, "added_p50_ms": added_p50_ms }),
        );
        details += &format!(
            "\n## Warm requests, open loop at {} req/s over {} keep-alive connections ({:.0} s each way, interleaved)\n\n\
             | path | requests | errors | p50 us | p99 us | p99.9 us | max us | mean us |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
            w.rate, w.conns, w.secs
        );
        for (name, l, v) in [
            ("through the activator (VIP, Proxy)", &w.proxied, p),
            ("direct to the instance", &w.direct, d),
        ] {
            details += &format!(
                "| {name} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
                l.ok, l.errors, v.0, v.1, v.2, v.3, v.4
            );
        }
        details += &format!(
            "\nAdded by the activator, median of the paired rounds: p50 {:.1} us, p99 {:.1} us \
             (all rounds merged: p50 {:.1} us, p99 {:.1} us). The activator's `forwarded` grew by {} \
             (requests sent through the VIP: {}).\n\n\
             | round | activator p50 us | activator p99 us | direct p50 us | direct p99 us |\n|---|---:|---:|---:|---:|\n",
            added_p50_ms * 1e3,
            added_p99_ms * 1e3,
            p.0 - d.0,
            p.1 - d.1,
            w.forwarded,
            w.proxied.ok + w.proxied.errors
        );
        for (i, r) in w.rounds.iter().enumerate() {
            details += &format!(
                "| {i} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
                r[0], r[1], r[2], r[3]
            );
        }
        if let Some(e) = w
            .proxied
            .first_error
            .as_ref()
            .or(w.direct.first_error.as_ref())
        {
            details += &format!("\nFirst error: {e}\n");
        }
        let m = tp_medians(tp);
        // Every benchmark must have produced numbers (all that --quick asserts; targets never).
        for (c, v) in TP_COLS.iter().zip(m) {
            if !(v.is_finite() && v > 0.0) {
                errors.push(format!("throughput: no req/s for {c}"));
            }
        }
        let ratio = m[0] / m[1];
        let ratio_haproxy = m[0] / m[2];
        let met_tp = ratio >= 1.0;
        md += &format!(
            "| throughput activator / nginx (wrk -t2 -c{}) | {:.2}x ({:.0} vs {:.0} req/s) | >= 1.0x | {} |\n",
            tp.conns,
            ratio,
            m[0],
            m[1],
            verdict(met_tp)
        );
        md += &format!(
            "| throughput activator / haproxy (same rounds; reported, no target) | {:.2}x ({:.0} vs {:.0} req/s) | - | - |\n",
            ratio_haproxy, m[0], m[2],
        );
        targets.insert(
            "throughput_activator_ge_nginx".into(),
            json!({ "met": met_tp, "ratio": ratio, "ratio_to_haproxy": ratio_haproxy }),
        );
        details += &format!(
            "\n## Throughput, wrk -t2 -c{} -d{}s from the client namespace, {} interleaved rounds (median)\n\n\
             | round | activator (VIP) req/s | nginx req/s | haproxy req/s | direct req/s |\n|---|---:|---:|---:|---:|\n",
            tp.conns,
            tp.secs,
            tp.rounds.len()
        );
        for (i, r) in tp.rounds.iter().enumerate() {
            details += &format!(
                "| {i} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
                r[0], r[1], r[2], r[3]
            );
        }
        details += &format!(
            "| median | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            m[0], m[1], m[2], m[3]
        );
        let cpu_per: Vec<f64> = (0..3)
            .map(|c| tp.cpu_us[c] / tp.requests[c].max(1.0))
            .collect();
        details += &format!(
            "\nCPU time per request of the proxy itself (user + system, from /proc): activator (the agent) {:.1} us, \
             nginx (master + workers) {:.1} us, haproxy {:.1} us.\n",
            cpu_per[0], cpu_per[1], cpu_per[2]
        );
        details += &format!(
            "\nnginx: `worker_processes auto`, upstream keepalive 64, HTTP/1.1 to the same instance, \
             `access_log off`. haproxy {}: `mode http`, `http-reuse always`, `nbthread {nproc}`, no `log`. \
             direct: wrk straight to the instance (the app's own ceiling).\n",
            haproxy_version()
        );
        for e in &tp.errors {
            details += &format!("\nwrk reported: {e}\n");
        }
        json.insert(
            "warm".into(),
            json!({
                "rate": w.rate, "connections": w.conns, "seconds_each": w.secs,
                "forwarded": w.forwarded,
                "proxied_us": { "p50": p.0, "p99": p.1, "p999": p.2, "max": p.3, "mean": p.4,
                                "requests": w.proxied.ok, "errors": w.proxied.errors },
                "direct_us": { "p50": d.0, "p99": d.1, "p999": d.2, "max": d.3, "mean": d.4,
                               "requests": w.direct.ok, "errors": w.direct.errors },
                "merged_added_p50_us": p.0 - d.0,
                "merged_added_p99_us": p.1 - d.1,
                "added_p50_us_median_of_rounds": added_p50_ms * 1e3,
                "added_p99_us_median_of_rounds": added_p99_ms * 1e3,
                "rounds_us": w.rounds.iter().map(|r| json!({
                    "activator_p50": r[0], "activator_p99": r[1], "direct_p50": r[2], "direct_p99": r[3],
                })).collect::<Vec<_>>(),
            }),
        );
        json.insert(
            "throughput".into(),
            json!({
                "tool": "wrk", "threads": 2, "connections": tp.conns, "seconds": tp.secs,
                "columns": TP_COLS,
                "rounds": tp.rounds.iter().map(|r| json!({ "activator": r[0], "nginx": r[1], "haproxy": r[2], "direct": r[3] })).collect::<Vec<_>>(),
                "median": { "activator": m[0], "nginx": m[1], "haproxy": m[2], "direct": m[3] },
                "ratio_activator_to_nginx": ratio,
                "ratio_activator_to_haproxy": ratio_haproxy,
                "cpu_us_per_request": { "activator": cpu_per[0], "nginx": cpu_per[1], "haproxy": cpu_per[2] },
                "errors": tp.errors,
            }),
        );
    }

    if let Ok(m) = &mem {
        let mib = m.rss_held_kib as f64 / 1024.0;
        let met = mib <= 200.0 && m.held as usize >= HELD;
        md += &format!(
            "| agent VmRSS with {} held requests | {:.1} MiB | <= 200 MiB | {} |\n",
            m.held,
            mib,
            verdict(met)
        );
        targets.insert(
            "memory_10k_held_le_200mib".into(),
            json!({ "met": met, "rss_mib": mib }),
        );
        let per = (m.rss_held_kib as f64 - m.rss_idle_kib as f64) * 1024.0 / m.held.max(1) as f64;
        details += &format!(
            "\n## Memory with {} held requests\n\n- agent VmRSS idle: {:.1} MiB; with the requests held: {:.1} MiB \
             (peak VmHWM {:.1} MiB); {:.0} bytes per held request\n- agent open fds while held: {}\n\
             - opening them took {:.1} s (RLIMIT_NOFILE raised to {} for the test process and the agent it starts)\n",
            m.held,
            m.rss_idle_kib as f64 / 1024.0,
            mib,
            m.hwm_kib as f64 / 1024.0,
            per,
            m.fds,
            m.connect_secs,
            m.nofile
        );
        json.insert(
            "memory".into(),
            json!({
                "held": m.held, "rss_idle_kib": m.rss_idle_kib, "rss_held_kib": m.rss_held_kib,
                "hwm_kib": m.hwm_kib, "bytes_per_held_request": per, "agent_fds": m.fds,
                "connect_seconds": m.connect_secs,
            }),
        );
    }
    json.insert("targets".into(), Value::Object(targets));
    json.insert("errors".into(), json!(errors));
    json.insert("seconds".into(), json!(t_all.elapsed().as_secs_f64()));
    md += &details;
    if !errors.is_empty() {
        md += "\n## Errors\n\n";
        for e in &errors {
            md += &format!("- {e}\n");
        }
    }
    println!("\n{md}");
    println!(
        "activator benchmarks took {:.1} s",
        t_all.elapsed().as_secs_f64()
    );

    let dir = out_dir();
    std::fs::create_dir_all(&dir).expect("creating target/perf");
    std::fs::write(
        dir.join("activator.json"),
        serde_json::to_string_pretty(&Value::Object(json)).unwrap(),
    )
    .expect("writing activator.json");
    std::fs::write(dir.join("activator.md"), &md).expect("writing activator.md");
    println!("wrote {}", dir.join("activator.{json,md}").display());
    assert!(errors.is_empty(), "activator benchmark failed: {errors:#?}");
}
