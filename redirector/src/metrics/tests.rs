//! /metrics against a strict parser (promtool) and the endpoint against a file
//! descriptor flood.
use super::*;
use std::io::{Read, Write};

/// An agent with four services, as the activator and the scalers report them.
fn agent() -> AgentMetrics {
    let act = Activator::new(Default::default(), None);
    let mut reg = crate::activator::Registry::default();
    let statuses = Arc::new(Mutex::new(BTreeMap::new()));
    for i in 0..4 {
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(Vec::new()));
        let svc = Arc::new(crate::activator::ServiceState::new(
            format!("default/s{i}"),
            crate::config::Protocol::Http,
            std::time::Duration::from_secs(1),
            0,
            rx,
            Arc::new(tokio::sync::Notify::new()),
        ));
        svc.cold_ttfb.observe(std::time::Duration::from_millis(3));
        reg.insert(svc, &[format!("10.0.0.{i}").parse().unwrap()], 80);
        statuses.lock().unwrap().insert(
            format!("default/s{i}"),
            Arc::new(Mutex::new(crate::scaler::ScalerStatus::default())),
        );
    }
    act.set_registry(reg);
    AgentMetrics {
        activator: act,
        statuses,
        flips: AtomicU64::new(0),
        map_update: Histogram::default(),
        pin_path: PathBuf::from("/nonexistent/redirector-test"),
        readiness: Readiness::default(),
    }
}

/// `/readyz` waits for the first sync and for the autoscaler's websocket; `/healthz` never.
#[test]
fn readiness_waits_for_the_sync_and_the_autoscaler() {
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = up.clone();
    let r = Readiness::new(Some(Box::new(move || seen.load(Ordering::Relaxed))));
    assert!(r.check().unwrap_err().contains("first full sync"));
    r.set_synced();
    assert!(r.check().unwrap_err().contains("autoscaler"));
    up.store(true, Ordering::Relaxed);
    assert_eq!(r.check(), Ok(()));
    let a = agent();
    assert!(a.ready().is_err());
    let status = |p: &str| super::endpoint::answer(&a, p).status().as_u16();
    assert_eq!((status("/readyz"), status("/healthz")), (503, 200));
    a.readiness.set_synced();
    assert_eq!(status("/readyz"), 200);
}

#[test]
fn metrics_pass_promtool() {
    let text = agent().metrics();
    let mut p = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; cargo xtask bootstrap installs it)");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {:?}\n{said}\n{text}",
        out.status
    );
    assert_eq!(
        text.matches("# TYPE redirector_activator_in_flight ")
            .count(),
        1
    );
}

struct Empty;
impl Source for Empty {
    fn metrics(&self) -> String {
        String::new()
    }
    fn status_json(&self) -> String {
        "{}".into()
    }
}

fn healthz(addr: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    r.starts_with("HTTP/1.1 200")
}

fn wait_healthz(addr: &str) -> bool {
    (0..40).any(|_| {
        healthz(addr) || {
            std::thread::sleep(std::time::Duration::from_millis(250));
            false
        }
    })
}

const FD_CHILD: &str = "REDIRECTOR_METRICS_FD_CHILD";

/// The endpoint in a child process limited to 64 file descriptors, flooded with 400
/// idle connections: /healthz answers meanwhile and after they close.
#[test]
fn healthz_survives_running_out_of_fds() {
    if let Ok(addr) = std::env::var(FD_CHILD) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _ = rt.block_on(serve(addr.parse().unwrap(), Arc::new(Empty)));
        return;
    }
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "metrics::tests::healthz_survives_running_out_of_fds",
        "--test-threads=1",
    ])
    .env(FD_CHILD, &addr);
    // SAFETY: setrlimit between fork and exec touches only the child.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        });
    }
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(cmd.spawn().unwrap());
    assert!(wait_healthz(&addr), "endpoint never came up");
    let flood: Vec<_> = (0..400)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    assert!(flood.len() > 100, "flood connected only {}", flood.len());
    assert!(wait_healthz(&addr), "/healthz dead while flooded");
    drop(flood);
    assert!(wait_healthz(&addr), "/healthz dead after the flood");
}

#[test]
fn histogram_renders_cumulative_buckets() {
    let h = Histogram::default();
    h.observe(std::time::Duration::from_millis(3));
    h.observe(std::time::Duration::from_millis(30));
    let mut s = String::new();
    h.render(&mut s, "x", "service=\"a\"");
    assert!(s.contains("x_bucket{service=\"a\",le=\"0.005\"} 1"), "{s}");
    assert!(s.contains("x_bucket{service=\"a\",le=\"0.05\"} 2"), "{s}");
    assert!(s.contains("x_count{service=\"a\"} 2"), "{s}");
}
