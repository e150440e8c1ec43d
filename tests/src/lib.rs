//! Harness for redirector's network-namespace integration tests: namespaces and veths
//! ([`netns`], [`topo`]), the agent under test ([`agent`]), test servers and clients
//! ([`traffic`]), load across control-plane changes ([`load`]), the standard two-node cluster ([`cluster`]) and kube-proxy's rules on its
//! nodes ([`kubeproxy`]).
//!
//! Every test needs root; without it tests fail with "needs root: ...".
pub mod agent;
pub mod cgroup;
pub mod cluster;
pub mod coldstart;
pub mod ingress;
pub mod kubeapi;
pub mod kubeproxy;
pub mod load;
pub mod netns;
pub mod topo;
pub mod traffic;
