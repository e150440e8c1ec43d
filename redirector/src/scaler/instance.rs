//! One instance of a service: a process in a network namespace of its own, attached to the
//! node by a veth like a pod. Started with `ip netns exec`, probed at a 5 ms cadence,
//! stopped with SIGTERM then SIGKILL.
use std::{
    net::{IpAddr, SocketAddr},
    process::Stdio,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::{Child, Command},
};

use crate::config::{Readiness, ScaleConfig};

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("`{cmd}` failed: {msg}")]
    Cmd { cmd: String, msg: String },
    #[error("starting {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
}

async fn ip(args: &[&str]) -> Result<(), InstanceError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| InstanceError::Cmd {
            cmd: format!("ip {}", args.join(" ")),
            msg: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(InstanceError::Cmd {
            cmd: format!("ip {}", args.join(" ")),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Where an instance lives on the node.
#[derive(Debug, Clone)]
pub struct Placement {
    pub netns: String,
    pub host_if: String,
    pub v4: Option<IpAddr>,
    pub v6: Option<IpAddr>,
    /// Node address the instance routes through (IPv4); IPv6 uses fe80::1 on the veth.
    pub gw4: Option<IpAddr>,
}

/// A running process.
pub struct Running {
    pub child: Child,
}

/// Creates the namespace and veth, and starts the process.
pub async fn start(p: &Placement, cfg: &ScaleConfig) -> Result<Running, InstanceError> {
    prepare(p).await?;
    spawn(p, cfg)
}

/// Creates the instance's sandbox: namespace, veth, addresses, routes. Done ahead of time
/// for a spare, so a cold start only has to start the process.
pub async fn prepare(p: &Placement) -> Result<(), InstanceError> {
    // Leftovers of an instance that was not cleaned up (e.g. an agent killed hard).
    let _ = ip(&["netns", "del", &p.netns]).await;
    let _ = ip(&["link", "del", &p.host_if]).await;
    ip(&["netns", "add", &p.netns]).await?;
    let setup = async {
        ip(&[
            "link", "add", &p.host_if, "type", "veth", "peer", "name", "eth0", "netns", &p.netns,
        ])
        .await?;
        ip(&["-n", &p.netns, "link", "set", "lo", "up"]).await?;
        ip(&["-n", &p.netns, "link", "set", "eth0", "up"]).await?;
        ip(&["link", "set", &p.host_if, "up"]).await?;
        if let Some(v4) = p.v4 {
            ip(&[
                "-n",
                &p.netns,
                "addr",
                "add",
                &format!("{v4}/32"),
                "dev",
                "eth0",
            ])
            .await?;
            if let Some(gw) = p.gw4 {
                ip(&[
                    "-n",
                    &p.netns,
                    "route",
                    "add",
                    &gw.to_string(),
                    "dev",
                    "eth0",
                ])
                .await?;
                ip(&[
                    "-n",
                    &p.netns,
                    "route",
                    "add",
                    "default",
                    "via",
                    &gw.to_string(),
                    "dev",
                    "eth0",
                ])
                .await?;
            }
            ip(&["route", "replace", &v4.to_string(), "dev", &p.host_if]).await?;
        }
        if let Some(v6) = p.v6 {
            ip(&["addr", "add", "fe80::1/64", "dev", &p.host_if, "nodad"]).await?;
            ip(&[
                "-n",
                &p.netns,
                "addr",
                "add",
                &format!("{v6}/128"),
                "dev",
                "eth0",
                "nodad",
            ])
            .await?;
            ip(&[
                "-n", &p.netns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ])
            .await?;
            ip(&["-6", "route", "replace", &v6.to_string(), "dev", &p.host_if]).await?;
        }
        Ok::<(), InstanceError>(())
    };
    if let Err(e) = setup.await {
        let _ = ip(&["netns", "del", &p.netns]).await;
        return Err(e);
    }
    Ok(())
}

/// Starts the process inside a prepared sandbox (setns before exec: no `ip netns exec`).
pub fn spawn(p: &Placement, cfg: &ScaleConfig) -> Result<Running, InstanceError> {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(format!("/run/netns/{}", p.netns)).map_err(|source| {
        InstanceError::Spawn {
            command: cfg.command.clone(),
            source,
        }
    })?;
    let ns_fd = ns.as_raw_fd();
    let mut cmd = Command::new(&cfg.command);
    cmd.args(&cfg.args)
        .env("PORT", cfg.port.to_string())
        .envs(cfg.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    // SAFETY: between fork and exec we only call setns(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| InstanceError::Spawn {
        command: cfg.command.clone(),
        source,
    })?;
    drop(ns);
    Ok(Running { child })
}

/// One readiness probe.
pub async fn probe(addr: SocketAddr, readiness: &Readiness) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        match readiness {
            Readiness::Tcp => Some(true),
            Readiness::Http(path) => {
                let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: redirector-probe\r\nConnection: close\r\n\r\n");
                s.write_all(req.as_bytes()).await.ok()?;
                let mut buf = [0u8; 16];
                let mut got = 0;
                while got < 12 {
                    let n = s.read(&mut buf[got..]).await.ok()?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                let line = std::str::from_utf8(&buf[..got]).ok()?;
                Some(line.starts_with("HTTP/1.") && line.get(9..10) == Some("2"))
            }
        }
    };
    tokio::time::timeout(Duration::from_millis(200), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Removes an instance's namespace and route (the veth goes with the namespace).
pub async fn cleanup(p: &Placement) {
    let _ = ip(&["netns", "del", &p.netns]).await;
    if let Some(v4) = p.v4 {
        let _ = ip(&["route", "del", &v4.to_string()]).await;
    }
    if let Some(v6) = p.v6 {
        let _ = ip(&["-6", "route", "del", &v6.to_string()]).await;
    }
}

/// Removes instance namespaces left by agents that are gone (their pid tag is dead).
pub async fn reap_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("rdi-") else {
            continue;
        };
        let Some((tag, _)) = rest.split_once('-') else {
            continue;
        };
        let alive = tag
            .parse::<u32>()
            .is_ok_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            tracing::info!(netns = %name, "removing a stale instance namespace");
            let _ = ip(&["netns", "del", &name]).await;
        }
    }
}
