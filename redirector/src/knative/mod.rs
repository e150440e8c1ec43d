//! Knative integration of the node-local activator: it speaks to Knative's autoscaler and
//! to revision pods the way Knative's own activator does, so a revision scaled to zero wakes
//! up on the first request the node-local activator holds.
//!
//! - [`stats`]: the autoscaler's protobuf stat messages (`WireStatMessages`) and a
//!   [`StatReporter`] that sends them over a durable websocket: at once for a revision that
//!   gets its first request ([`StatReporter::wake`]), then every second with the average
//!   concurrency (held + in flight) and the request count.
//! - [`probe`]: `K-Network-Probe: queue` probing of a revision's pods; [`Prober`] publishes
//!   the ready subset of a set of candidate endpoints.
//!
//! Wiring:
//!
//! ```ignore
//! let reporter = StatReporter::start(ReporterConfig { url, ..Default::default() });
//! let (r, a) = (reporter.clone(), activator.clone());
//! tokio::spawn(async move { r.run(move || knative::activator_samples(&a)).await });
//! // when a held request finds no instance (the activator's wake):
//! reporter.wake(namespace, revision, concurrency);
//! ```
pub mod probe;
pub mod stats;

pub use probe::{probe_until_ready, probe_until_ready_with, PodProbe, ProbeConfig, Prober};
pub use stats::{
    activator_samples, ReporterConfig, ReporterCounters, RevisionSample, Stat, StatReporter,
    WireStatMessage, WireStatMessages, DEFAULT_AUTOSCALER_URL,
};
