//! Test servers and clients (the `rt-server` / `rt-client` binaries) run in namespaces, and
//! the kernel's checksum-error counters.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

use crate::netns::{Netns, Proc};

/// Paths of the test binaries (`bins!()` fills them in from an integration test).
#[derive(Debug, Clone)]
pub struct Bins {
    pub server: PathBuf,
    pub client: PathBuf,
}

/// The paths of `rt-server` and `rt-client`; only usable in this package's integration tests.
#[macro_export]
macro_rules! bins {
    () => {
        $crate::traffic::Bins {
            server: env!("CARGO_BIN_EXE_rt-server").into(),
            client: env!("CARGO_BIN_EXE_rt-client").into(),
        }
    };
}

/// A running `rt-server`.
pub struct Server {
    pub name: String,
    pub proc: Proc,
}

impl Server {
    /// Starts `rt-server --name NAME` in `ns` on the given sockets; waits for "ready".
    pub fn start(
        bins: &Bins,
        ns: &Netns,
        name: &str,
        tcp: &[SocketAddr],
        udp: &[SocketAddr],
    ) -> Result<Self> {
        let mut cmd = ns.command(bins.server.to_str().unwrap());
        cmd.args(["--name", name]);
        for a in tcp {
            cmd.args(["--tcp", &a.to_string()]);
        }
        for a in udp {
            cmd.args(["--udp", &a.to_string()]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting rt-server")?;
        let stdout = child.stdout.take().unwrap();
        let proc = Proc {
            child,
            what: format!("rt-server {name}"),
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(l) if l.trim() == "ready" => Ok(Server {
                name: name.to_owned(),
                proc,
            }),
            other => bail!("rt-server {name} in {} did not start: {other:?}", ns.name),
        }
    }
}

/// What `rt-client` prints.
#[derive(Debug, Clone, Deserialize)]
pub struct Summary {
    pub ok: usize,
    pub failed: usize,
    pub errors: Vec<String>,
    /// Server identity → answered requests.
    pub identities: BTreeMap<String, usize>,
    /// Client addresses the servers reported.
    pub server_peers: BTreeSet<String>,
    /// Peer addresses of the client's sockets (TCP) or reply sources (UDP).
    pub socket_peers: BTreeSet<String>,
    pub conns: usize,
    pub keepalive_conns: usize,
    pub keepalive_requests: usize,
    pub unstable_conns: usize,
    pub unstable: Vec<serde_json::Value>,
}

impl Summary {
    /// Fails unless every request succeeded (and there was at least one).
    #[track_caller]
    pub fn assert_all_ok(&self, what: &str) {
        assert!(
            self.failed == 0 && self.ok > 0,
            "{what}: {} ok, {} failed; errors: {:?}",
            self.ok,
            self.failed,
            self.errors
        );
    }

    pub fn identities(&self) -> BTreeSet<&str> {
        self.identities.keys().map(String::as_str).collect()
    }
}

/// What `rt-client` should do.
#[derive(Debug, Clone)]
pub struct ClientArgs {
    pub target: SocketAddr,
    pub udp: bool,
    /// Requests on new connections (fixed run) or new-connection loop threads (loop run).
    pub new: usize,
    /// Kept-alive connections.
    pub keepalive: usize,
    /// Requests per kept-alive connection (loop run: 0 = until stopped).
    pub per_conn: usize,
    pub interval_ms: u64,
    /// Padding: bytes added to each HTTP answer, or to each UDP datagram (≤ 1200).
    pub pad: usize,
    /// The cgroup the client runs in (a node's, whose agent then translates its sockets);
    /// `None`: the test's own.
    pub cgroup: Option<PathBuf>,
}

impl ClientArgs {
    pub fn tcp(target: SocketAddr, new: usize, keepalive: usize, per_conn: usize) -> Self {
        ClientArgs {
            target,
            udp: false,
            new,
            keepalive,
            per_conn,
            interval_ms: 0,
            pad: 0,
            cgroup: None,
        }
    }

    /// The same client, run in `cgroup`.
    pub fn in_cgroup(mut self, cgroup: &std::path::Path) -> Self {
        self.cgroup = Some(cgroup.to_owned());
        self
    }
    pub fn udp(target: SocketAddr, new: usize, keepalive: usize, per_conn: usize) -> Self {
        ClientArgs {
            udp: true,
            ..Self::tcp(target, new, keepalive, per_conn)
        }
    }
    fn args(&self) -> Vec<String> {
        let mut v = vec![
            "--target".to_owned(),
            self.target.to_string(),
            "--new".into(),
            self.new.to_string(),
            "--keepalive".into(),
            self.keepalive.to_string(),
            "--per-conn".into(),
            self.per_conn.to_string(),
            "--interval-ms".into(),
            self.interval_ms.to_string(),
            "--pad".into(),
            self.pad.to_string(),
        ];
        if self.udp {
            v.push("--udp".into());
        }
        v
    }
}

fn parse_summary(out: &[u8]) -> Result<Summary> {
    serde_json::from_slice(out)
        .with_context(|| format!("rt-client output {:?}", String::from_utf8_lossy(out)))
}

/// Runs `rt-client` in `ns` to completion.
pub fn run_client(bins: &Bins, ns: &Netns, args: &ClientArgs) -> Result<Summary> {
    let mut cmd = ns.command(bins.client.to_str().unwrap());
    crate::cgroup::place(&mut cmd, args.cgroup.as_deref())?;
    let out = cmd
        .args(args.args())
        .stdin(Stdio::null())
        .output()
        .context("running rt-client")?;
    if !out.status.success() {
        bail!(
            "rt-client failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_summary(&out.stdout)
}

/// `rt-client` looping until stopped.
pub struct ClientLoop {
    proc: Proc,
    stop_file: PathBuf,
}

impl ClientLoop {
    pub fn start(bins: &Bins, ns: &Netns, args: &ClientArgs, stop_file: PathBuf) -> Result<Self> {
        let _ = std::fs::remove_file(&stop_file);
        let mut cmd = ns.command(bins.client.to_str().unwrap());
        crate::cgroup::place(&mut cmd, args.cgroup.as_deref())?;
        let child = cmd
            .args(args.args())
            .arg("--stop-file")
            .arg(&stop_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting rt-client")?;
        Ok(ClientLoop {
            proc: Proc {
                child,
                what: "rt-client loop".into(),
            },
            stop_file,
        })
    }

    /// Stops the loop and returns its summary.
    pub fn stop(mut self) -> Result<Summary> {
        std::fs::write(&self.stop_file, b"stop")?;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        use std::io::Read;
        if let Some(mut s) = self.proc.child.stdout.take() {
            s.read_to_end(&mut stdout)?;
        }
        if let Some(mut s) = self.proc.child.stderr.take() {
            s.read_to_end(&mut stderr)?;
        }
        let st = self.proc.child.wait()?;
        if !st.success() {
            bail!(
                "rt-client loop failed ({st}): {}",
                String::from_utf8_lossy(&stderr)
            );
        }
        parse_summary(&stdout)
    }
}

/// Checksum-error counters of a namespace: every `*CsumErrors` field of `/proc/net/snmp`,
/// `/proc/net/snmp6` and `/proc/net/netstat`, keyed like `Tcp.InCsumErrors`.
pub fn csum_errors(ns: &Netns) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for file in ["/proc/net/snmp", "/proc/net/netstat"] {
        let text = ns.exec("cat", &[file])?;
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let (Some((p, names)), Some((_, values))) =
                (names.split_once(':'), values.split_once(':'))
            else {
                continue;
            };
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
                if n.contains("CsumErrors") {
                    out.insert(format!("{p}.{n}"), v.parse().unwrap_or(0));
                }
            }
        }
    }
    for line in ns.exec("cat", &["/proc/net/snmp6"])?.lines() {
        let mut it = line.split_whitespace();
        if let (Some(n), Some(v)) = (it.next(), it.next()) {
            if n.contains("CsumErrors") {
                out.insert(n.to_owned(), v.parse().unwrap_or(0));
            }
        }
    }
    if out.is_empty() {
        bail!("no checksum counters found in {}", ns.name);
    }
    Ok(out)
}
