//! Knative's Revision (`serving.knative.dev/v1`), read for the settings Knative's activator
//! takes from it: containerConcurrency, timeoutSeconds, responseStartTimeoutSeconds,
//! idleTimeoutSeconds, and whether a startup or exec readiness probe gates the pods (then a
//! successful network probe is not enough to forward). A hand-written [`Resource`] that
//! decodes only those fields and tolerates any of them missing; Knative's defaults
//! ([`RevisionSettings::default`]) fill the gaps.
use std::{borrow::Cow, time::Duration};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::ObjectMeta, NamespaceResourceScope};
use kube::Resource;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "serving.knative.dev";
pub const VERSION: &str = "v1";
pub const KIND: &str = "Revision";
pub const PLURAL: &str = "revisions";

/// Knative's default `timeoutSeconds` (config-defaults `revision-timeout-seconds`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RevisionSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_concurrency: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_start_timeout_seconds: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<i64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<Container>,
}

/// The parts of a container that decide how readiness is known.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Container {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_probe: Option<Probe>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Probe {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Revision {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: RevisionSpec,
}

impl Resource for Revision {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        PLURAL.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What the node-local activator applies per revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevisionSettings {
    /// Requests in flight per pod; 0 = unlimited. Also picks the throttler's policy, as
    /// Knative's does: first-available up to 3, round-robin above, random choice of two
    /// (least loaded) when unlimited.
    pub container_concurrency: u32,
    /// The whole request, queueing included (`timeoutSeconds`).
    pub timeout: Duration,
    /// Until the pod's response starts (`responseStartTimeoutSeconds`; defaults to the
    /// timeout).
    pub response_start_timeout: Duration,
    /// Longest pause between bytes of the response (`idleTimeoutSeconds`; `None`: none).
    pub idle_timeout: Option<Duration>,
    /// A startup or exec readiness probe gates readiness: only endpoints Kubernetes
    /// reports ready take requests (no forwarding on a successful network probe).
    pub readiness_gated: bool,
}

impl Default for RevisionSettings {
    fn default() -> Self {
        Self {
            container_concurrency: 0,
            timeout: DEFAULT_TIMEOUT,
            response_start_timeout: DEFAULT_TIMEOUT,
            idle_timeout: None,
            readiness_gated: false,
        }
    }
}

fn secs(v: Option<i64>) -> Option<Duration> {
    v.filter(|s| *s > 0).map(|s| Duration::from_secs(s as u64))
}

impl Revision {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    /// The settings, Knative's defaults for what the spec leaves out.
    pub fn settings(&self) -> RevisionSettings {
        let s = &self.spec;
        let timeout = secs(s.timeout_seconds).unwrap_or(DEFAULT_TIMEOUT);
        RevisionSettings {
            container_concurrency: s
                .container_concurrency
                .filter(|c| *c > 0)
                .map(|c| c.min(i64::from(u32::MAX)) as u32)
                .unwrap_or(0),
            timeout,
            response_start_timeout: secs(s.response_start_timeout_seconds)
                .map(|d| d.min(timeout))
                .unwrap_or(timeout),
            idle_timeout: secs(s.idle_timeout_seconds),
            readiness_gated: s.containers.iter().any(|c| {
                c.startup_probe.is_some()
                    || c.readiness_probe.as_ref().is_some_and(|p| p.exec.is_some())
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(spec: serde_json::Value) -> Revision {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "r-00001", "namespace": "ns"},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn settings_with_knatives_defaults() {
        assert_eq!(
            rev(serde_json::json!({})).settings(),
            RevisionSettings::default()
        );
        let s = rev(serde_json::json!({
            "containerConcurrency": 1, "timeoutSeconds": 30,
            "responseStartTimeoutSeconds": 5, "idleTimeoutSeconds": 7,
            "containers": [{"image": "x", "readinessProbe": {"httpGet": {"port": 8080}}}],
        }))
        .settings();
        assert_eq!(s.container_concurrency, 1);
        assert_eq!(s.timeout, Duration::from_secs(30));
        assert_eq!(s.response_start_timeout, Duration::from_secs(5));
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(7)));
        assert!(!s.readiness_gated, "an HTTP readiness probe does not gate");
        // responseStart beyond the timeout is capped; exec and startup probes gate.
        let s = rev(serde_json::json!({
            "timeoutSeconds": 10, "responseStartTimeoutSeconds": 60,
            "containers": [{"readinessProbe": {"exec": {"command": ["true"]}}}],
        }))
        .settings();
        assert_eq!(s.response_start_timeout, Duration::from_secs(10));
        assert!(s.readiness_gated);
        let s =
            rev(serde_json::json!({"containers": [{"startupProbe": {"tcpSocket": {"port": 1}}}]}))
                .settings();
        assert!(s.readiness_gated);
    }
}
