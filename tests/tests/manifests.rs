//! The Kubernetes manifests under `deploy/`: every YAML document is decoded into the typed
//! k8s-openapi structs with unknown fields rejected (k8s-openapi ignores them silently, so a
//! misspelt or misplaced field is caught through `serde_ignored`), every kustomization's
//! resources exist and decode, and the invariants the agent relies on hold: host network,
//! the capability set instead of privileged, the bpffs mount, NODE_NAME, probes on
//! `/readyz` and `/healthz` at the metrics port, RollingUpdate with maxUnavailable 1,
//! read-only RBAC, a termination grace covering the activator drain, and a node config that
//! redirector's own parser accepts with the node IP the DaemonSet puts in the environment
//! (`$NODE_IP`).
//!
//! `kubectl kustomize` (or `kustomize build`) renders every kustomization when one is on
//! PATH; without it the test checks the same files directly.
//!
//! `args_match_the_cli` runs the built agent binary on the manifests' command lines.
//! `image_build` runs `cargo xtask image --check` when `REDIRECTOR_IMAGE_TEST=1`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        batch::v1::Job,
        core::v1::{ConfigMap, Container, Namespace, PodSpec, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{de::DeserializeOwned, Deserialize};

const NAMESPACE: &str = "redirector-system";
const AGENT: &str = "redirector";
const CONFIG_KEY: &str = "config.toml";
/// YAML files under deploy/ that no kustomization lists, on purpose.
const STANDALONE: &[&str] = &["uninstall/job-one-node.yaml"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .join("deploy")
}

fn version() -> &'static str {
    // redirector-tests takes the workspace version, like redirector itself.
    env!("CARGO_PKG_VERSION")
}

// ---------------------------------------------------------------------------------------
// Strict decoding

/// Decodes `value` into `T`, failing on type errors (with the field path) and on any field
/// `T` does not know.
fn strict<T: DeserializeOwned>(value: &serde_json::Value, what: &str) -> Result<T, String> {
    let mut ignored = Vec::new();
    // serde_ignored writes `?` for each Option level: `spec.?.template` -> `spec.template`.
    let mut track = |path: serde_ignored::Path| {
        let path = path.to_string();
        let parts: Vec<&str> = path.split('.').filter(|p| *p != "?").collect();
        ignored.push(parts.join("."))
    };
    let de = serde_ignored::Deserializer::new(value, &mut track);
    let decoded: T = serde_path_to_error::deserialize(de)
        .map_err(|e| format!("{what}: at `{}`: {}", e.path(), e.inner()))?;
    if !ignored.is_empty() {
        return Err(format!(
            "{what}: unknown fields (misspelt or misplaced?): {}",
            ignored.join(", ")
        ));
    }
    Ok(decoded)
}

/// The YAML documents of `text` as JSON values (empty documents skipped).
fn documents(text: &str, what: &str) -> Result<Vec<serde_json::Value>, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let v = serde_json::Value::deserialize(doc)
            .map_err(|e| format!("{what}: document {i}: not YAML: {e}"))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// One decoded Kubernetes object.
#[derive(Debug, Clone)]
enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    ConfigMap(Box<ConfigMap>),
    DaemonSet(Box<DaemonSet>),
    Job(Box<Job>),
}

impl Object {
    fn decode(v: &serde_json::Value, what: &str) -> Result<Self, String> {
        let api_version = v["apiVersion"].as_str().unwrap_or_default();
        let kind = v["kind"].as_str().unwrap_or_default();
        let what = format!("{what} ({api_version} {kind})");
        Ok(match (api_version, kind) {
            ("v1", "Namespace") => Self::Namespace(strict(v, &what)?),
            ("v1", "ServiceAccount") => Self::ServiceAccount(strict(v, &what)?),
            ("v1", "ConfigMap") => Self::ConfigMap(strict(v, &what)?),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => Self::ClusterRole(strict(v, &what)?),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                Self::ClusterRoleBinding(strict(v, &what)?)
            }
            ("apps/v1", "DaemonSet") => Self::DaemonSet(strict(v, &what)?),
            ("batch/v1", "Job") => Self::Job(strict(v, &what)?),
            _ => {
                return Err(format!(
                    "{what}: a kind this test does not decode yet (add it to `Object`)"
                ))
            }
        })
    }

    fn kind_name(&self) -> (&'static str, String) {
        let name = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            m.name.clone().unwrap_or_default()
        };
        match self {
            Self::Namespace(o) => ("Namespace", name(&o.metadata)),
            Self::ServiceAccount(o) => ("ServiceAccount", name(&o.metadata)),
            Self::ClusterRole(o) => ("ClusterRole", name(&o.metadata)),
            Self::ClusterRoleBinding(o) => ("ClusterRoleBinding", name(&o.metadata)),
            Self::ConfigMap(o) => ("ConfigMap", name(&o.metadata)),
            Self::DaemonSet(o) => ("DaemonSet", name(&o.metadata)),
            Self::Job(o) => ("Job", name(&o.metadata)),
        }
    }

    fn namespace(&self) -> Option<&str> {
        match self {
            Self::Namespace(_) | Self::ClusterRole(_) | Self::ClusterRoleBinding(_) => None,
            Self::ServiceAccount(o) => o.metadata.namespace.as_deref(),
            Self::ConfigMap(o) => o.metadata.namespace.as_deref(),
            Self::DaemonSet(o) => o.metadata.namespace.as_deref(),
            Self::Job(o) => o.metadata.namespace.as_deref(),
        }
    }
}

/// The part of a kustomization.yaml these manifests use; anything else is rejected so that a
/// new field gets a look (and a check) here.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    labels: Vec<serde_json::Value>,
    #[serde(default)]
    images: Vec<KustomizeImage>,
    #[serde(default)]
    patches: Vec<KustomizePatch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KustomizeImage {
    name: String,
    #[serde(default)]
    new_name: Option<String>,
    #[serde(default)]
    new_tag: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KustomizePatch {
    target: serde_json::Value,
    patch: String,
}

/// A decoded file: its path relative to deploy/ and its objects.
struct File {
    rel: String,
    objects: Vec<Object>,
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
}

fn rel(p: &Path) -> String {
    p.strip_prefix(deploy_dir())
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

fn is_kustomization(p: &Path) -> bool {
    matches!(
        p.file_name().and_then(|n| n.to_str()),
        Some("kustomization.yaml" | "kustomization.yml" | "Kustomization")
    )
}

fn read_kustomization(p: &Path) -> Kustomization {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let docs = documents(&text, &rel(p)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(docs.len(), 1, "{}: one document", rel(p));
    let k: Kustomization = strict(&docs[0], &rel(p)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        k.api_version,
        "kustomize.config.k8s.io/v1beta1",
        "{}",
        rel(p)
    );
    assert_eq!(k.kind, "Kustomization", "{}", rel(p));
    k
}

/// Decodes every manifest (not kustomization) file under deploy/.
fn decode_all() -> Vec<File> {
    let mut paths = Vec::new();
    yaml_files(&deploy_dir(), &mut paths);
    assert!(
        !paths.is_empty(),
        "no YAML under {}",
        deploy_dir().display()
    );
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for p in paths.iter().filter(|p| !is_kustomization(p)) {
        let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let rel = rel(p);
        let mut objects = Vec::new();
        match documents(&text, &rel) {
            Ok(docs) => {
                for (i, d) in docs.iter().enumerate() {
                    match Object::decode(d, &format!("{rel} document {i}")) {
                        Ok(o) => objects.push(o),
                        Err(e) => errors.push(e),
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        files.push(File { rel, objects });
    }
    assert!(errors.is_empty(), "manifests:\n  {}", errors.join("\n  "));
    files
}

fn objects_of<'a>(files: &'a [File], prefix: &str) -> Vec<&'a Object> {
    files
        .iter()
        .filter(|f| f.rel.starts_with(prefix))
        .flat_map(|f| &f.objects)
        .collect()
}

fn daemonset<'a>(objects: &[&'a Object], name: &str) -> &'a DaemonSet {
    objects
        .iter()
        .find_map(|o| match o {
            Object::DaemonSet(d) if d.metadata.name.as_deref() == Some(name) => Some(&**d),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no DaemonSet {name}"))
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("DaemonSet has a pod spec")
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env_field_ref<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str())
}

// ---------------------------------------------------------------------------------------
// The node config

/// The ConfigMap's node config as the agent parses it on a node whose `NODE_IP` (the
/// downward API's `status.hostIP`) is `node_ip`.
fn parse_node_config(text: &str, node_ip: &str) -> redirector::config::Config {
    let ip = node_ip.to_owned();
    redirector::config::Config::parse_with_env(text, Path::new("configmap.yaml"), None, &|k| {
        (k == redirector::config::NODE_IP_VAR).then(|| ip.clone())
    })
    .unwrap_or_else(|e| panic!("the ConfigMap's config for {node_ip}: {e}\n{text}"))
}

fn config_template(objects: &[&Object]) -> String {
    objects
        .iter()
        .find_map(|o| match o {
            Object::ConfigMap(c) if c.metadata.name.as_deref() == Some("redirector-config") => {
                c.data.as_ref().and_then(|d| d.get(CONFIG_KEY)).cloned()
            }
            _ => None,
        })
        .expect("ConfigMap redirector-config with config.toml")
}

// ---------------------------------------------------------------------------------------
// Tests

/// Every YAML document under deploy/ decodes into its typed struct with no unknown field.
#[test]
fn every_document_decodes_strictly() {
    let files = decode_all();
    let mut seen = BTreeSet::new();
    for f in &files {
        assert!(!f.objects.is_empty(), "{}: no documents", f.rel);
        for o in &f.objects {
            let (kind, name) = o.kind_name();
            assert!(!name.is_empty(), "{}: a {kind} without a name", f.rel);
            assert!(
                seen.insert((
                    f.rel.split('/').next().unwrap_or("").to_owned(),
                    kind,
                    name.clone()
                )),
                "{}: {kind} {name} twice",
                f.rel
            );
            if let Some(ns) = o.namespace() {
                assert_eq!(ns, NAMESPACE, "{}: {kind} {name}", f.rel);
            }
        }
    }
}

/// The strict decoder really rejects unknown and misplaced fields.
#[test]
fn strict_decoding_rejects_unknown_fields() {
    let base = deploy_dir().join("base/daemonset.yaml");
    let text = std::fs::read_to_string(&base).expect("base/daemonset.yaml");
    let mut v = documents(&text, "daemonset").expect("yaml").remove(0);
    strict::<DaemonSet>(&v, "as is").expect("the DaemonSet decodes");

    let mut typo = v.clone();
    typo["spec"]["template"]["spec"]["hostNetwrok"] = true.into();
    let e = strict::<DaemonSet>(&typo, "typo").unwrap_err();
    assert!(e.contains("hostNetwrok"), "{e}");

    // A valid field at the wrong level (the pod's field on the container).
    let c = &mut v["spec"]["template"]["spec"]["containers"][0];
    c["hostNetwork"] = true.into();
    let e = strict::<DaemonSet>(&v, "misplaced").unwrap_err();
    assert!(e.contains("containers.0.hostNetwork"), "{e}");

    let bad_type =
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": 3}});
    let e = strict::<Namespace>(&bad_type, "type").unwrap_err();
    assert!(e.contains("metadata.name"), "{e}");
}

/// Every kustomization lists files that exist and decode, and every manifest is listed by one
/// (or is a documented standalone file). Renders with kubectl/kustomize when available.
#[test]
fn kustomizations_are_complete() {
    let mut paths = Vec::new();
    yaml_files(&deploy_dir(), &mut paths);
    let kustomizations: Vec<&PathBuf> = paths.iter().filter(|p| is_kustomization(p)).collect();
    assert!(
        kustomizations
            .iter()
            .any(|p| rel(p) == "base/kustomization.yaml"),
        "deploy/base/kustomization.yaml"
    );
    let files = decode_all();
    let mut listed = BTreeSet::new();
    for kp in &kustomizations {
        let k = read_kustomization(kp);
        let dir = kp.parent().expect("kustomization dir");
        assert!(!k.resources.is_empty(), "{}: no resources", rel(kp));
        for r in &k.resources {
            let p = dir.join(r);
            if p.is_dir() {
                assert!(
                    p.join("kustomization.yaml").is_file(),
                    "{}: resource {r} is a directory without kustomization.yaml",
                    rel(kp)
                );
            } else {
                assert!(p.is_file(), "{}: resource {r} does not exist", rel(kp));
                let p = p.canonicalize().expect("canonical path");
                let file = files
                    .iter()
                    .find(|f| deploy_dir().join(&f.rel).canonicalize().ok() == Some(p.clone()))
                    .unwrap_or_else(|| panic!("{}: resource {r} is not a manifest", rel(kp)));
                assert!(!file.objects.is_empty(), "{}: {r} is empty", rel(kp));
                listed.insert(file.rel.clone());
            }
        }
        if let Some(ns) = &k.namespace {
            assert_eq!(ns, NAMESPACE, "{}", rel(kp));
        }
        for img in &k.images {
            if img.name == AGENT {
                assert_eq!(
                    img.new_tag.as_deref(),
                    Some(version()),
                    "{}: the image tag follows the crate version",
                    rel(kp)
                );
                assert!(img.new_name.is_some(), "{}", rel(kp));
            }
        }
        for p in &k.patches {
            assert!(p.target.is_object() && !p.patch.is_empty(), "{}", rel(kp));
        }
        let _ = &k.labels;
    }
    for f in &files {
        assert!(
            listed.contains(&f.rel) || STANDALONE.contains(&f.rel.as_str()),
            "{} is in no kustomization's resources (nor in STANDALONE)",
            f.rel
        );
    }
    render_with_kustomize(&kustomizations);
}

/// `kubectl kustomize DIR` or `kustomize build DIR`, when either is installed: the rendered
/// output decodes strictly too, and images carry the crate version.
fn render_with_kustomize(kustomizations: &[&PathBuf]) {
    let tool: Option<Vec<&str>> = if Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        Some(vec!["kubectl", "kustomize"])
    } else if Command::new("kustomize")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        Some(vec!["kustomize", "build"])
    } else {
        None
    };
    let Some(tool) = tool else {
        println!("kustomize rendering: skipped (neither kubectl nor kustomize on PATH)");
        return;
    };
    for kp in kustomizations {
        let dir = kp.parent().expect("dir");
        let out = Command::new(tool[0])
            .args(&tool[1..])
            .arg(dir)
            .output()
            .expect("kustomize runs");
        assert!(
            out.status.success(),
            "{} {}: {}",
            tool.join(" "),
            rel(dir),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("utf-8");
        let docs = documents(&text, &rel(dir)).unwrap_or_else(|e| panic!("{e}"));
        for (i, d) in docs.iter().enumerate() {
            let o = Object::decode(d, &format!("rendered {} document {i}", rel(dir)))
                .unwrap_or_else(|e| panic!("{e}"));
            let spec = match &o {
                Object::DaemonSet(ds) => ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
                Object::Job(j) => j.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
                _ => None,
            };
            for c in spec.into_iter().flat_map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
            }) {
                let image = c.image.as_deref().unwrap_or_default();
                if image.contains("redirector") {
                    assert!(
                        image.ends_with(&format!("redirector:{}", version())),
                        "rendered {}: {} uses {image}",
                        rel(dir),
                        c.name
                    );
                }
            }
            if let Object::DaemonSet(ds) = &o {
                let spec = pod_spec(ds);
                for c in &spec.containers {
                    check_propagation(c);
                }
            }
        }
        println!("{} {}: {} documents", tool.join(" "), rel(dir), docs.len());
    }
}

/// Bidirectional mount propagation is only admitted for privileged containers.
fn check_propagation(c: &Container) {
    let privileged = c
        .security_context
        .as_ref()
        .and_then(|s| s.privileged)
        .unwrap_or(false);
    for m in c.volume_mounts.iter().flatten() {
        if m.mount_propagation.as_deref() == Some("Bidirectional") {
            assert!(
                privileged,
                "{}: Bidirectional propagation of {} needs privileged",
                c.name, m.mount_path
            );
        }
    }
}

/// The agent DaemonSet: everything the agent and the node rely on.
#[test]
fn agent_daemonset() {
    let files = decode_all();
    let base = objects_of(&files, "base/");
    let ds = daemonset(&base, AGENT);
    let ds_spec = ds.spec.as_ref().expect("spec");
    let spec = pod_spec(ds);

    // Host network, cluster DNS, the ServiceAccount.
    assert_eq!(spec.host_network, Some(true), "hostNetwork");
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    let sa = spec
        .service_account_name
        .as_deref()
        .expect("serviceAccountName");
    assert!(
        base.iter().any(
            |o| matches!(o, Object::ServiceAccount(s) if s.metadata.name.as_deref() == Some(sa))
        ),
        "ServiceAccount {sa} is in the base"
    );
    assert_ne!(
        spec.automount_service_account_token,
        Some(false),
        "the agent talks to the API"
    );

    // Rolling update, one node at a time.
    let strategy = ds_spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let ru = strategy.rolling_update.as_ref().expect("rollingUpdate");
    assert_eq!(ru.max_unavailable, Some(IntOrString::Int(1)));
    assert!(
        matches!(ru.max_surge, None | Some(IntOrString::Int(0))),
        "no surge: two agents would share a node's pins"
    );
    // The selector matches the template.
    let sel = ds_spec.selector.match_labels.as_ref().expect("matchLabels");
    let labels = ds_spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref())
        .expect("labels");
    for (k, v) in sel {
        assert_eq!(labels.get(k), Some(v), "selector {k}");
    }

    // The agent container.
    let agent = &spec.containers[0];
    assert_eq!(agent.name, "agent");
    assert_eq!(spec.containers.len(), 1, "one container");
    let args = agent.args.as_ref().expect("args");
    assert_eq!(args[0], "agent", "{args:?}");
    assert!(args.iter().any(|a| a == "--kubernetes"), "{args:?}");
    let config_path = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .expect("--config FILE");
    assert!(
        agent.command.is_none(),
        "the image's entrypoint is /redirector"
    );
    assert_eq!(
        agent.image.as_deref(),
        Some(format!("{AGENT}:{}", version()).as_str())
    );

    // Capabilities instead of privileged.
    let sc = agent.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true), "not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    let add: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(
        add,
        BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"]),
        "added capabilities"
    );
    assert_eq!(
        caps.drop.as_deref(),
        Some(&["ALL".to_owned()][..]),
        "drop ALL"
    );
    check_propagation(agent);

    // NODE_NAME from the downward API; NODE_IP for the config.
    assert_eq!(env_field_ref(agent, "NODE_NAME"), Some("spec.nodeName"));
    // NODE_IP from the downward API wherever the config is read; no init container renders it.
    assert_eq!(env_field_ref(agent, "POD_NAME"), Some("metadata.name"));
    let check = container(spec, "check-config");
    for c in [agent, check] {
        assert_eq!(
            env_field_ref(c, "NODE_IP"),
            Some("status.hostIP"),
            "{}",
            c.name
        );
    }
    assert!(
        spec.init_containers
            .iter()
            .flatten()
            .all(|c| c.name != "render-config"),
        "no render-config init container"
    );

    // Readiness on /readyz, liveness on /healthz, both at the metrics port.
    let ports: BTreeMap<&str, i32> = agent
        .ports
        .iter()
        .flatten()
        .filter_map(|p| Some((p.name.as_deref()?, p.container_port)))
        .collect();
    let metrics_port = *ports.get("metrics").expect("a port named metrics");
    for (which, probe, path) in [
        ("readiness", agent.readiness_probe.as_ref(), "/readyz"),
        ("liveness", agent.liveness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{which} probe with httpGet"));
        assert_eq!(get.path.as_deref(), Some(path), "{which}");
        let port = match &get.port {
            IntOrString::Int(p) => *p,
            IntOrString::String(name) => *ports
                .get(name.as_str())
                .unwrap_or_else(|| panic!("{which}: no port {name}")),
        };
        assert_eq!(port, metrics_port, "{which} probes the metrics port");
    }
    let annotations = ds_spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .expect("annotations");
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        annotations.get("prometheus.io/port"),
        Some(&metrics_port.to_string())
    );
    assert_eq!(
        annotations.get("prometheus.io/path").map(String::as_str),
        Some("/metrics")
    );

    // Resources.
    let res = agent.resources.as_ref().expect("resources");
    let requests = res.requests.as_ref().expect("requests");
    assert!(
        requests.contains_key("cpu") && requests.contains_key("memory"),
        "{requests:?}"
    );
    assert!(
        res.limits
            .as_ref()
            .is_some_and(|l| l.contains_key("memory")),
        "a memory limit"
    );
    for c in spec.init_containers.iter().flatten() {
        assert!(
            c.resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .is_some(),
            "{}",
            c.name
        );
    }

    // Volumes: bpffs from the host, every mount backed by a volume.
    let volumes: BTreeMap<&str, &k8s_openapi::api::core::v1::Volume> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                volumes.contains_key(m.name.as_str()),
                "{}: volume {}",
                c.name,
                m.name
            );
        }
    }
    let bpffs = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("/sys/fs/bpf mounted");
    let hp = volumes[bpffs.name.as_str()]
        .host_path
        .as_ref()
        .expect("bpffs is a hostPath");
    assert_eq!(hp.path, "/sys/fs/bpf");
    assert_eq!(
        hp.type_.as_deref(),
        Some("Directory"),
        "never create a plain directory there"
    );
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_ne!(bpffs.read_only, Some(true), "the agent pins there");
    if sc.read_only_root_filesystem == Some(true) {
        assert!(
            agent
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.mount_path == "/run/redirector"),
            "the live status file needs a writable /run/redirector"
        );
    }
    for v in volumes.values() {
        if let Some(cm) = &v.config_map {
            assert!(
                base.iter().any(|o| matches!(o, Object::ConfigMap(c) if c.metadata.name == Some(cm.name.clone()))),
                "ConfigMap {} is in the base",
                cm.name
            );
        }
    }
    let config_mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(config_path).starts_with(&m.mount_path))
        .expect("the config file is on a mount");
    assert!(
        volumes[config_mount.name.as_str()].config_map.is_some(),
        "the ConfigMap is mounted as it is (live reload)"
    );
    assert_eq!(
        check.args.as_deref(),
        Some(
            &[
                "check".to_owned(),
                "--config".to_owned(),
                config_path.clone()
            ][..]
        )
    );

    // The node config: the template rendered by the init container's own script, for an
    // IPv4 and an IPv6 node, parsed by redirector.
    let template = config_template(&base);
    let grace = spec
        .termination_grace_period_seconds
        .expect("terminationGracePeriodSeconds");
    for (node_ip, activator) in [
        ("192.0.2.10", "192.0.2.10:8012"),
        ("2001:db8::10", "[2001:db8::10]:8012"),
    ] {
        let cfg = parse_node_config(&template, node_ip);
        assert!(cfg.services.is_empty(), "services come from Kubernetes");
        assert_eq!(
            cfg.node.activator,
            vec![activator.parse::<SocketAddr>().unwrap()]
        );
        let metrics = cfg.node.metrics.expect("node.metrics");
        assert_eq!(metrics.ip().to_string(), node_ip, "metrics on the node IP");
        assert_eq!(i32::from(metrics.port()), metrics_port, "metrics port");
        assert_eq!(
            ports.get("activator").copied(),
            Some(i32::from(cfg.node.activator[0].port())),
            "activator port"
        );
        assert!(
            cfg.node.pin_path.starts_with(&bpffs.mount_path),
            "pin_path {} on the bpffs mount",
            cfg.node.pin_path.display()
        );
        assert_eq!(cfg.node.pin_path, Path::new("/sys/fs/bpf/redirector"));
        assert!(!cfg.node.uplink.is_empty() && !cfg.node.pod_interfaces.is_empty());
        assert!(cfg.activator.listen);
        let drain = cfg.activator.drain_timeout.as_secs() as i64;
        assert!(
            grace >= drain + 10,
            "terminationGracePeriodSeconds {grace} covers the activator drain ({drain} s) and the rest"
        );
    }
}

/// Read-only RBAC on exactly the three resources the Kubernetes source watches.
#[test]
fn rbac_is_read_only() {
    let files = decode_all();
    let base = objects_of(&files, "base/");
    let role = base
        .iter()
        .find_map(|o| match o {
            Object::ClusterRole(r) if r.metadata.name.as_deref() == Some(AGENT) => Some(r),
            _ => None,
        })
        .expect("ClusterRole redirector");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]), "{rule:?}");
        assert!(
            rule.non_resource_urls.is_none() && rule.resource_names.is_none(),
            "{rule:?}"
        );
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                assert!(g != "*" && r != "*", "no wildcards: {rule:?}");
                granted.insert((g.as_str(), r.as_str()));
            }
        }
    }
    assert_eq!(
        granted,
        BTreeSet::from([
            ("networking.internal.knative.dev", "serverlessservices"),
            ("", "services"),
            ("discovery.k8s.io", "endpointslices"),
            ("serving.knative.dev", "revisions"),
        ])
    );
    // No other role anywhere.
    let roles = files
        .iter()
        .flat_map(|f| &f.objects)
        .filter(|o| matches!(o, Object::ClusterRole(_)))
        .count();
    assert_eq!(roles, 1, "one ClusterRole");

    let binding = base
        .iter()
        .find_map(|o| match o {
            Object::ClusterRoleBinding(b) => Some(b),
            _ => None,
        })
        .expect("ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, AGENT);
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, AGENT);
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    assert!(
        base.iter().any(
            |o| matches!(o, Object::Namespace(n) if n.metadata.name.as_deref() == Some(NAMESPACE))
        ),
        "Namespace {NAMESPACE}"
    );
}

/// The uninstall manifests run `redirector uninstall` on the agent's pin path, on the host's
/// bpffs, and need no privileges.
#[test]
fn uninstall_manifests() {
    let files = decode_all();
    let base = objects_of(&files, "base/");
    let uninstall = objects_of(&files, "uninstall/");
    let cfg = parse_node_config(&config_template(&base), "192.0.2.10");
    let pin = cfg.node.pin_path.to_string_lossy().into_owned();

    let mut specs: Vec<(&str, &PodSpec)> = Vec::new();
    for o in &uninstall {
        match o {
            Object::DaemonSet(d) => specs.push(("DaemonSet", pod_spec(d))),
            Object::Job(j) => specs.push((
                "Job",
                j.spec
                    .as_ref()
                    .and_then(|s| s.template.spec.as_ref())
                    .expect("Job pod spec"),
            )),
            _ => {}
        }
    }
    assert!(
        specs.iter().any(|(k, _)| *k == "DaemonSet"),
        "an uninstall DaemonSet"
    );
    assert!(specs.iter().any(|(k, _)| *k == "Job"), "an uninstall Job");
    for (kind, spec) in specs {
        let c = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| {
                c.args
                    .as_ref()
                    .is_some_and(|a| a.first().map(String::as_str) == Some("uninstall"))
            })
            .unwrap_or_else(|| panic!("{kind}: a container running `redirector uninstall`"));
        assert_eq!(
            c.args.as_deref(),
            Some(&["uninstall".to_owned(), "--pin-path".to_owned(), pin.clone()][..]),
            "{kind}"
        );
        assert_eq!(
            c.image.as_deref(),
            Some(format!("{AGENT}:{}", version()).as_str())
        );
        let sc = c.security_context.as_ref().expect("securityContext");
        assert_ne!(sc.privileged, Some(true), "{kind}");
        // NET_ADMIN only: clsact filters (kernels without tcx) are removed over netlink.
        assert_eq!(
            sc.capabilities
                .as_ref()
                .and_then(|c| c.add.clone())
                .unwrap_or_default(),
            vec!["NET_ADMIN".to_owned()],
            "{kind}: the one added capability"
        );
        let m = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == "/sys/fs/bpf")
            .unwrap_or_else(|| panic!("{kind}: bpffs mounted"));
        let v = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .and_then(|v| v.host_path.as_ref())
            .unwrap_or_else(|| panic!("{kind}: bpffs hostPath"));
        assert_eq!(v.path, "/sys/fs/bpf");
        check_propagation(c);
    }
}

/// The manifests' `redirector` command lines are ones the binary accepts: every `--flag` is
/// in the subcommand's `--help`, and `redirector check` accepts the rendered node config.
/// Uses `$REDIRECTOR_BIN` (else target/debug/redirector); skipped when it isn't built.
#[test]
fn args_match_the_cli() {
    let src = redirector_tests::agent::redirector_bin();
    if !src.is_file() {
        println!(
            "args_match_the_cli: skipped (no agent binary at {})",
            src.display()
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("redirector-manifests-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bin = redirector_tests::agent::AgentBin::new(&dir, "manifests").expect("the agent binary");
    let files = decode_all();
    let mut checked = 0;
    for o in files.iter().flat_map(|f| &f.objects) {
        let spec = match o {
            Object::DaemonSet(d) => pod_spec(d),
            Object::Job(j) => j
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .expect("Job pod spec"),
            _ => continue,
        };
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            if !c
                .image
                .as_deref()
                .unwrap_or_default()
                .starts_with(&format!("{AGENT}:"))
            {
                continue;
            }
            let args = c.args.as_deref().unwrap_or_default();
            let sub = args
                .first()
                .unwrap_or_else(|| panic!("{}: no subcommand", c.name));
            let out = Command::new(&bin.0)
                .args([sub.as_str(), "--help"])
                .output()
                .expect("redirector runs");
            let help = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "redirector {sub} --help: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            for flag in args.iter().filter(|a| a.starts_with("--")) {
                let flag = flag.split('=').next().unwrap_or_default();
                assert!(
                    help.contains(flag),
                    "{}: `redirector {sub}` has no {flag}:\n{help}",
                    c.name
                );
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "agent, check-config, uninstall DaemonSet and Job: {checked}"
    );

    let base = objects_of(&files, "base/");
    let config = dir.join("config.toml");
    std::fs::write(&config, config_template(&base)).expect("write config");
    let out = Command::new(&bin.0)
        .arg("check")
        .arg("--config")
        .arg(&config)
        .env("NODE_IP", "192.0.2.10")
        .output()
        .expect("redirector check runs");
    assert!(
        out.status.success(),
        "redirector check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(bin);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `cargo xtask image --check` (static musl binary, image FROM scratch with buildah) when
/// REDIRECTOR_IMAGE_TEST=1; otherwise skipped (it takes minutes and installs buildah).
#[test]
fn image_build() {
    if std::env::var("REDIRECTOR_IMAGE_TEST").as_deref() != Ok("1") {
        println!("image_build: skipped (set REDIRECTOR_IMAGE_TEST=1 to build the image)");
        return;
    }
    let root = deploy_dir().parent().expect("workspace").to_path_buf();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args(["xtask", "image", "--check"])
        .status()
        .expect("cargo xtask image runs");
    assert!(status.success(), "cargo xtask image --check: {status}");
}
