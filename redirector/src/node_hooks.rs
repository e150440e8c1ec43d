//! The node-wide hooks the agent sets up beside its interfaces: the activator's listeners
//! with their per-service ports (`sk_lookup`), and the socket hooks on a cgroup. Each says
//! in the log what it chose, and falls back to the packet path rather than half-attach.
use std::{os::fd::AsFd, sync::Arc};

use crate::{
    activator::Activator,
    config::{Config, NodeConfig},
    datapath::Datapath,
};

/// Starts the activator's listeners (`[activator] listen`) and, where the kernel has
/// `sk_lookup` (5.9) and every activator address has a listener, steers the per-service
/// ports (`[activator] service_ports`) to them. Returns the listener threads and the
/// per-service ports in effect (`None`: every service on the listener's port).
pub async fn start_activator(
    activator: &Arc<Activator>,
    cfg: &Config,
    dp: &mut Datapath,
) -> (Vec<std::thread::JoinHandle<()>>, Option<(u16, u16)>) {
    let mut threads = Vec::new();
    let mut sockets = Vec::new();
    if !cfg.activator.listen {
        return (threads, None);
    }
    for addr in &cfg.node.activator {
        match crate::activator::spawn_listeners(activator.clone(), *addr).await {
            Ok(l) => {
                tracing::info!(%addr, threads = l.threads.len(), "activator listening");
                threads.extend(l.threads);
                sockets.push((*addr, l.socket));
            }
            Err(e) => tracing::error!(%addr, error = %e, "activator can't listen"),
        }
    }
    let Some(ports) = cfg.activator.service_ports else {
        return (threads, None);
    };
    let steered = if !crate::datapath::kernel().sk_lookup {
        Err("the kernel has no sk_lookup (5.9)".to_owned())
    } else if sockets.is_empty() || sockets.len() != cfg.node.activator.len() {
        Err("not every activator address has a listener of this agent".to_owned())
    } else {
        let fds: Vec<_> = sockets.iter().map(|(a, s)| (*a, s.as_fd())).collect();
        dp.steer_activator(&fds, ports).map_err(|e| e.to_string())
    };
    match steered {
        Ok(()) => {
            tracing::info!(
                first = ports.0,
                count = ports.1,
                "activator ports per service: proxied flows never share a tuple"
            );
            (threads, Some(ports))
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                "per-service activator ports off: every service on the listener's port"
            );
            (threads, None)
        }
    }
}

/// Attaches the socket hooks where `[node] cgroup` says, or logs why not: the packet path
/// then serves every client (it always serves traffic from the network).
pub fn hook_sockets(dp: &mut Datapath, node: &NodeConfig) {
    use crate::{config::SocketCgroup, datapath::sockets};
    let cgroup = match &node.cgroup {
        SocketCgroup::Off => {
            let n = sockets::detach_sockets(dp.pin_path());
            tracing::info!(
                detached = n,
                "socket hooks off (node.cgroup = \"off\"): every client takes the packet path"
            );
            return;
        }
        // A hybrid host (cgroup v1 controllers) keeps the v2 hierarchy below `unified`.
        SocketCgroup::Path(p)
            if !sockets::is_cgroup2(p) && sockets::is_cgroup2(&p.join("unified")) =>
        {
            tracing::info!(cgroup = %p.display(), "not cgroup v2; using its unified hierarchy");
            p.join("unified")
        }
        SocketCgroup::Path(p) => p.clone(),
        SocketCgroup::Auto => match sockets::find_cgroup2() {
            Some(p) => p,
            None => {
                tracing::warn!(
                    "no cgroup v2 mount of the hierarchy's root: socket hooks off, every client \
                     takes the packet path (mount one, or set node.cgroup)"
                );
                return;
            }
        },
    };
    if !crate::datapath::kernel().sock_addr {
        tracing::warn!(
            "the kernel has no cgroup sock_addr hooks: every client takes the packet path"
        );
        return;
    }
    match dp.attach_sockets(&cgroup) {
        Ok(r) => {
            tracing::info!(
                cgroup = %cgroup.display(),
                replaced = r.replaced,
                attached = r.attached,
                "socket hooks attached: connect() to a VIP goes straight to its target"
            );
            for (prog, why) in r.skipped {
                tracing::warn!(program = prog, reason = %why, "optional socket hook not attached");
            }
        }
        Err(e) => tracing::error!(
            error = %e,
            "socket hooks not attached: every client takes the packet path"
        ),
    }
}
