//! redirector: an eBPF data plane for Knative-style scale-to-zero. The agent programs BPF
//! maps so that service VIPs lead to pods (Serve) or to the activator (Proxy); a mode flip
//! is one map write instead of an Endpoints rewrite propagated by kube-proxy.
pub mod activator;
pub mod addr;
pub mod agent;
pub mod config;
pub mod control;
pub mod datapath;
pub mod k8s;
pub mod knative;
pub mod maglev;
pub mod metrics;
pub mod netlink;
pub mod node_hooks;
pub mod scaler;
pub mod serving;
pub mod status;
