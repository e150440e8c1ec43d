//! The node-wide hooks the agent sets up beside its interfaces: the activator's listeners,
//! guarded and with their per-service ports (`sk_lookup`), and the socket hooks on a cgroup. Each says
//! in the log what it chose, and falls back to the packet path rather than half-attach.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    sync::Arc,
};

use crate::{
    activator::Activator,
    config::{Accept, Config, NodeConfig},
    datapath::Datapath,
};

/// Starts the activator's listeners and steers the datapath's flows to them. With
/// `[activator] accept = "delivered"` (the default) and `sk_lookup` (5.9), each listener is
/// bound to loopback on its `node.activator` port and `sk_lookup` hands it only the flows
/// the datapath delivered to that address: a connection made to `node.activator` directly
/// (from outside the node, or from a pod) finds no socket and is refused. Otherwise the
/// listeners are bound to `node.activator` itself, as the log says. Where the kernel has
/// `sk_lookup`, the per-service ports (`[activator] service_ports`) are steered too.
/// Returns the listener threads and the per-service ports in effect (`None`: every service
/// on the listener's port).
pub async fn start_activator(
    activator: &Arc<Activator>,
    cfg: &Config,
    dp: &mut Datapath,
) -> (Vec<std::thread::JoinHandle<()>>, Option<(u16, u16)>) {
    let mut threads = Vec::new();
    if !cfg.activator.listen {
        return (threads, None);
    }
    let sk_lookup = crate::datapath::kernel().sk_lookup;
    let guard = match cfg.activator.accept {
        Accept::Any => {
            tracing::info!(
                "activator.accept = \"any\": the activator takes any connection that reaches \
                 node.activator"
            );
            false
        }
        Accept::Delivered if !sk_lookup => {
            tracing::warn!(
                "the kernel has no sk_lookup (5.9): the activator listens on node.activator and \
                 takes any connection that reaches it (activator.accept = \"delivered\" needs it)"
            );
            false
        }
        Accept::Delivered => true,
    };
    let wanted = cfg.node.activator.len();
    if guard {
        let sockets = listen(activator, &cfg.node.activator, true, &mut threads).await;
        let ports = cfg.activator.service_ports;
        let steered = if sockets.len() != wanted {
            Err("not every activator address has a loopback listener".to_owned())
        } else {
            let fds: Vec<_> = sockets.iter().map(|(a, s)| (*a, s.as_fd())).collect();
            dp.steer_activator(&fds, ports.unwrap_or((0, 0)), true)
                .map_err(|e| e.to_string())
        };
        match steered {
            Ok(()) => {
                tracing::info!(
                    "activator on loopback: only flows the datapath delivered reach it; a \
                     connection made to node.activator directly is refused"
                );
                log_ports(ports);
                return (threads, ports);
            }
            Err(e) => tracing::warn!(
                error = %e,
                "activator not steered from loopback: it listens on node.activator and takes \
                 any connection that reaches it"
            ),
        }
    }
    let sockets = listen(activator, &cfg.node.activator, false, &mut threads).await;
    let Some(ports) = cfg.activator.service_ports else {
        return (threads, None);
    };
    let steered = if !sk_lookup {
        Err("the kernel has no sk_lookup (5.9)".to_owned())
    } else if sockets.is_empty() || sockets.len() != wanted {
        Err("not every activator address has a listener of this agent".to_owned())
    } else {
        let fds: Vec<_> = sockets.iter().map(|(a, s)| (*a, s.as_fd())).collect();
        dp.steer_activator(&fds, ports, false)
            .map_err(|e| e.to_string())
    };
    match steered {
        Ok(()) => {
            log_ports(Some(ports));
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

fn log_ports(ports: Option<(u16, u16)>) {
    if let Some((first, count)) = ports {
        tracing::info!(
            first,
            count,
            "activator ports per service: proxied flows never share a tuple"
        );
    }
}

/// Starts a listener for each of `addrs` (on its port of loopback when `loopback`), adding
/// its threads to `threads`. Returns each address with one of its listening sockets.
async fn listen(
    activator: &Arc<Activator>,
    addrs: &[SocketAddr],
    loopback: bool,
    threads: &mut Vec<std::thread::JoinHandle<()>>,
) -> Vec<(SocketAddr, std::os::fd::OwnedFd)> {
    let mut sockets = Vec::new();
    for addr in addrs {
        let bind = if !loopback {
            *addr
        } else if addr.is_ipv4() {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        } else {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        };
        match crate::activator::spawn_listeners(activator.clone(), bind).await {
            Ok(l) => {
                tracing::info!(%addr, %bind, threads = l.threads.len(), "activator listening");
                threads.extend(l.threads);
                sockets.push((*addr, l.socket));
            }
            Err(e) => tracing::error!(%addr, %bind, error = %e, "activator can't listen"),
        }
    }
    sockets
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
