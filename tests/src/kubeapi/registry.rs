//! The resources the test API server serves, as a real kube-apiserver knows them: the
//! built-in types the project uses (kind, scope, served version, the `status` subresource)
//! and Knative's CustomResourceDefinitions read from their real files at start
//! (`KNATIVE_CRD_DIR`, else `<workspace>/../shared/knative`): group, names, scope, the
//! served versions, the status subresource and each version's `openAPIV3Schema`. Anything
//! else is not served (404), as on a real cluster.
use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

/// A resource: API group ("" for core), version and plural name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Res {
    pub group: String,
    pub version: String,
    pub resource: String,
}

impl Res {
    pub fn new(group: &str, version: &str, resource: &str) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            resource: resource.into(),
        }
    }

    /// A core (`/api/v1`) resource.
    pub fn core(resource: &str) -> Self {
        Self::new("", "v1", resource)
    }

    /// `services` (core/v1).
    pub fn services() -> Self {
        Self::core("services")
    }

    /// `endpointslices` (discovery.k8s.io/v1).
    pub fn endpoint_slices() -> Self {
        Self::new("discovery.k8s.io", "v1", "endpointslices")
    }

    /// `serverlessservices` (networking.internal.knative.dev/v1alpha1).
    pub fn sks() -> Self {
        Self::new(
            "networking.internal.knative.dev",
            "v1alpha1",
            "serverlessservices",
        )
    }

    /// `revisions` (serving.knative.dev/v1).
    pub fn revisions() -> Self {
        Self::new("serving.knative.dev", "v1", "revisions")
    }

    /// `apiVersion` of objects of this resource (`v1`, `discovery.k8s.io/v1`).
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

impl fmt::Display for Res {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.group.is_empty() {
            write!(f, "{}/{}", self.version, self.resource)
        } else {
            write!(f, "{}/{}/{}", self.group, self.version, self.resource)
        }
    }
}

/// What the server knows about one served resource version.
#[derive(Debug, Clone)]
pub struct TypeInfo {
    pub kind: String,
    pub list_kind: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    /// The `status` subresource is served: writes to the main resource keep the stored
    /// `.status`, `/status` writes change only `.status`.
    pub status: bool,
    /// A create drops the given `.status` (CRDs with the status subresource, Services,
    /// Pods, Namespaces), as the real server's create strategies do.
    pub reset_status_on_create: bool,
    /// The version's `openAPIV3Schema` (CRDs): unknown fields are pruned, wrong types and
    /// missing required fields answer 422.
    pub schema: Option<Value>,
    /// The version the CRD stores (`storage: true`); built-ins have one version.
    pub storage: bool,
}

impl TypeInfo {
    /// A built-in type: kind, scope, short names, whether `/status` is served.
    pub fn simple(kind: &str, namespaced: bool, short: &[&str], status: bool) -> Self {
        TypeInfo {
            kind: kind.into(),
            list_kind: format!("{kind}List"),
            singular: kind.to_lowercase(),
            namespaced,
            short_names: short.iter().map(|s| s.to_string()).collect(),
            status,
            // Nodes are created with their status (the kubelet registers them so).
            reset_status_on_create: status && kind != "Node",
            schema: None,
            storage: true,
        }
    }
}

/// The built-in resources the agent and the tests use.
pub fn builtins() -> Vec<(Res, TypeInfo)> {
    let b = TypeInfo::simple;
    vec![
        (Res::services(), b("Service", true, &["svc"], true)),
        (Res::core("endpoints"), b("Endpoints", true, &["ep"], false)),
        (Res::core("pods"), b("Pod", true, &["po"], true)),
        (
            Res::core("namespaces"),
            b("Namespace", false, &["ns"], true),
        ),
        (Res::core("nodes"), b("Node", false, &["no"], true)),
        (Res::core("events"), b("Event", true, &["ev"], false)),
        (
            Res::core("configmaps"),
            b("ConfigMap", true, &["cm"], false),
        ),
        (Res::endpoint_slices(), b("EndpointSlice", true, &[], false)),
        (
            Res::new("coordination.k8s.io", "v1", "leases"),
            b("Lease", true, &[], false),
        ),
        (
            Res::new("events.k8s.io", "v1", "events"),
            b("Event", true, &["ev"], false),
        ),
    ]
}

/// The CRD files registered by default (in the Knative CRD directory).
pub const KNATIVE_CRDS: [&str; 2] = ["serverlessservice-crd.yaml", "revision-crd.yaml"];

/// Where the machines this project runs on keep Knative's CRD files, for a checkout that is
/// not beside them (a CI clone elsewhere).
const MACHINE_CRD_DIR: &str = "/work/shared/knative";

/// The directory of Knative's CRD files: `KNATIVE_CRD_DIR`, else
/// `<workspace root>/../shared/knative`, else the machine's [`MACHINE_CRD_DIR`].
pub fn knative_crd_dir() -> PathBuf {
    match std::env::var_os("KNATIVE_CRD_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/knative");
            if !beside.exists() && Path::new(MACHINE_CRD_DIR).exists() {
                PathBuf::from(MACHINE_CRD_DIR)
            } else {
                beside
            }
        }
    }
}

/// The resource versions one CRD serves (its `served: true` versions).
pub fn crd_types(crd: &Value) -> Result<Vec<(Res, TypeInfo)>> {
    if crd["kind"] != "CustomResourceDefinition" {
        bail!("not a CustomResourceDefinition (kind {})", crd["kind"]);
    }
    let spec = &crd["spec"];
    let s = |v: &Value, what: &str| -> Result<String> {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("the CRD has no {what}"))
    };
    let group = s(&spec["group"], "spec.group")?;
    let names = &spec["names"];
    let kind = s(&names["kind"], "spec.names.kind")?;
    let plural = s(&names["plural"], "spec.names.plural")?;
    let list_kind = names["listKind"]
        .as_str()
        .map_or_else(|| format!("{kind}List"), str::to_owned);
    let singular = names["singular"]
        .as_str()
        .map_or_else(|| kind.to_lowercase(), str::to_owned);
    let short_names: Vec<String> = names["shortNames"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let namespaced = match spec["scope"].as_str() {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        other => bail!("the CRD's spec.scope is {other:?}"),
    };
    let versions = spec["versions"]
        .as_array()
        .ok_or_else(|| anyhow!("the CRD has no spec.versions"))?;
    let mut out = Vec::new();
    for v in versions.iter().filter(|v| v["served"] == true) {
        let name = s(&v["name"], "version name")?;
        let status = v["subresources"]["status"].is_object();
        out.push((
            Res::new(&group, &name, &plural),
            TypeInfo {
                kind: kind.clone(),
                list_kind: list_kind.clone(),
                singular: singular.clone(),
                namespaced,
                short_names: short_names.clone(),
                status,
                reset_status_on_create: status,
                schema: v["schema"]["openAPIV3Schema"]
                    .is_object()
                    .then(|| v["schema"]["openAPIV3Schema"].clone()),
                storage: v["storage"] == true,
            },
        ));
    }
    Ok(out)
}

/// Reads a CRD file (YAML) and returns its served resource versions.
pub fn load_crd(path: &Path) -> Result<Vec<(Res, TypeInfo)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the CRD file {}", path.display()))?;
    let crd: Value = serde_norway::from_str(&text)
        .with_context(|| format!("parsing the CRD file {}", path.display()))?;
    crd_types(&crd).with_context(|| format!("in {}", path.display()))
}

/// Knative's CRDs ([`KNATIVE_CRDS`] in `dir`), read once per process and directory. A
/// missing file is an error naming it and `KNATIVE_CRD_DIR`.
pub fn knative_types_in(dir: &Path) -> Result<Vec<(Res, TypeInfo)>> {
    type Loaded = Result<Vec<(Res, TypeInfo)>, String>;
    static CACHE: Mutex<BTreeMap<PathBuf, Loaded>> = Mutex::new(BTreeMap::new());
    let load = || -> Loaded {
        let mut out = Vec::new();
        for f in KNATIVE_CRDS {
            let path = dir.join(f);
            if !path.is_file() {
                return Err(format!(
                    "Knative's CRD file {} is missing: the test API server serves Knative's \
                     resources from their real CRDs; set KNATIVE_CRD_DIR to the directory \
                     holding {KNATIVE_CRDS:?} (default <workspace>/../shared/knative)",
                    path.display()
                ));
            }
            out.extend(load_crd(&path).map_err(|e| format!("{e:#}"))?);
        }
        Ok(out)
    };
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .entry(dir.to_owned())
        .or_insert_with(load)
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The registered resources: the built-ins plus Knative's CRDs.
pub fn default_types() -> Result<BTreeMap<Res, TypeInfo>> {
    let mut m: BTreeMap<Res, TypeInfo> = builtins().into_iter().collect();
    m.extend(knative_types_in(&knative_crd_dir())?);
    Ok(m)
}
