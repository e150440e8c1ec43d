//! The `redirector` binary: the per-node agent and its tools.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use redirector::{agent, config::DEFAULT_PIN_PATH, k8s, status};

#[derive(Parser)]
#[command(version, about = "eBPF data plane for Knative-style scale-to-zero")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ActivatorArg {
    Node,
    Knative,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load, attach and pin the datapath, and program it from a config file.
    Agent {
        /// TOML config; the embedded default when omitted.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides node.pin_path.
        #[arg(long)]
        pin_path: Option<PathBuf>,
        /// File written once the agent is ready.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Services from Kubernetes: Knative ServerlessServices, Services and
        /// EndpointSlices (KUBECONFIG, ~/.kube/config or the in-cluster service account)
        /// instead of the config's [[service]] entries; the config still gives [node].
        #[arg(long)]
        kubernetes: bool,
        /// With --kubernetes: what Proxy leads to, the node-local activator or Knative's
        /// activators (knative-serving/activator-service, subset by numActivators).
        #[arg(long, value_enum, default_value_t = ActivatorArg::Node, requires = "kubernetes")]
        activator: ActivatorArg,
        /// With --kubernetes: this node's name.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// With --kubernetes: Knative's autoscaler (websocket), told about held requests
        /// and activator concurrency; default in a cluster:
        /// ws://autoscaler.knative-serving.svc.cluster.local:8080, elsewhere none.
        #[arg(long, requires = "kubernetes")]
        autoscaler_url: Option<String>,
    },
    /// Services, modes, backends and counters from the pinned maps.
    Status {
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Detach every program and remove the pinned maps.
    Uninstall {
        #[arg(long, default_value = DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Probe what the running kernel offers the datapath (tcx, helpers, socket hooks,
    /// sk_lookup, batch map operations, BTF) and print one line, or JSON.
    Probe {
        #[arg(long)]
        json: bool,
    },
    /// Check a config file and exit.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
                // kube's watcher warns on every failed list attempt (several a second per
                // resource during an outage); the agent's own watch loop logs an outage
                // once, and each retry at debug.
                .add_directive(
                    "kube_runtime::watcher=error"
                        .parse()
                        .expect("a valid directive"),
                ),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Agent {
            config,
            pin_path,
            ready_file,
            kubernetes,
            activator,
            node_name,
            autoscaler_url,
        } => {
            let kubernetes = kubernetes.then(|| k8s::KubeOptions {
                activator: match activator {
                    ActivatorArg::Node => k8s::ActivatorSource::Node,
                    ActivatorArg::Knative => k8s::ActivatorSource::Knative,
                },
                node_name,
                ..Default::default()
            });
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(async move {
                let kubernetes = kubernetes.map(|k| k8s::KubeOptions {
                    waker: k8s::autoscaler::waker(autoscaler_url),
                    ..k
                });
                agent::run(agent::AgentOptions {
                    config,
                    pin_path,
                    ready_file,
                    kubernetes,
                })
                .await
            })?;
        }
        Cmd::Status { pin_path, json } => {
            let s = status::read(&pin_path)
                .with_context(|| format!("reading the maps pinned under {}", pin_path.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", status::render(&s));
            }
        }
        Cmd::Uninstall { pin_path } => {
            let done = agent::uninstall(&pin_path)?;
            if done == agent::Uninstalled::default() {
                println!(
                    "nothing to remove: no links, no maps under {}",
                    pin_path.display()
                );
            } else {
                println!(
                    "detached {} links, removed {} maps under {}",
                    done.links,
                    done.maps,
                    pin_path.display()
                );
            }
        }
        Cmd::Probe { json } => {
            let k = redirector::datapath::kernel();
            if json {
                println!("{}", serde_json::to_string_pretty(k)?);
            } else {
                println!("{}", k.line());
            }
        }
        Cmd::Check { config } => {
            let c = redirector::config::Config::load(&config)?;
            println!("{}: ok, {} services", config.display(), c.services.len());
        }
    }
    Ok(())
}
