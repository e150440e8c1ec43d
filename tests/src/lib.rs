//! Harness for redirector's network-namespace integration tests: namespaces and veths
//! ([`netns`], [`topo`]), the agent under test ([`agent`]), test servers and clients
//! ([`traffic`]) and the standard two-node cluster ([`cluster`]).
//!
//! Every test needs root; without it tests fail with "needs root: ...".
pub mod agent;
pub mod cgroup;
pub mod cluster;
pub mod coldstart;
pub mod kubeapi;
pub mod netns;
pub mod topo;
pub mod traffic;
