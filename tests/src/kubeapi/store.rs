//! The in-memory object store behind the test API server: objects keyed by resource
//! (group/version/resource), namespace and name; one global, monotonically increasing
//! resourceVersion; a bounded history of watch events; compaction (410 Gone for watches
//! from before it).
use std::{
    collections::{BTreeMap, VecDeque},
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Map, Value};

use super::selector::Selectors;

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

/// What the server knows about a resource type (for list kinds and discovery).
#[derive(Debug, Clone)]
pub struct TypeInfo {
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
}

/// Watch event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

#[derive(Debug, Clone)]
struct HistEvent {
    rv: u64,
    res: Res,
    ns: String,
    ty: EventType,
    object: Value,
    /// The object before a MODIFIED (to turn selector transitions into ADDED/DELETED).
    prev: Option<Value>,
}

/// Why a request failed, as an HTTP status code and a message (turned into a `Status`).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }
    pub fn not_found(what: impl fmt::Display) -> Self {
        Self::new(404, "NotFound", format!("{what} not found"))
    }
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// The `Status` object the API server sends for this error.
    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

/// The store. Everything is behind one mutex in [`super::Shared`].
#[derive(Debug)]
pub struct Store {
    pub types: BTreeMap<Res, TypeInfo>,
    objects: BTreeMap<Res, BTreeMap<(String, String), Value>>,
    rv: u64,
    history: VecDeque<HistEvent>,
    pub history_limit: usize,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    /// The next this-many watches (with a resourceVersion) get 410 Gone regardless.
    pub force_gone: u32,
    uid: u64,
}

/// `kind` guessed from a plural resource name (`widgets` -> `Widget`).
fn guess_kind(resource: &str) -> String {
    let singular = resource
        .strip_suffix("ies")
        .map(|s| format!("{s}y"))
        .or_else(|| resource.strip_suffix("ses").map(|s| format!("{s}s")))
        .or_else(|| resource.strip_suffix('s').map(str::to_owned))
        .unwrap_or_else(|| resource.to_owned());
    let mut c = singular.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// RFC 3339 UTC timestamp of now, whole seconds (as Kubernetes writes them).
pub fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or("")
}

/// The result of starting a watch: events to send first and the cursor to continue from.
pub struct WatchStart {
    pub initial: Vec<Value>,
    pub cursor: u64,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        let mut s = Store {
            types: BTreeMap::new(),
            objects: BTreeMap::new(),
            rv: 1,
            history: VecDeque::new(),
            history_limit: 1000,
            compacted: 0,
            force_gone: 0,
            uid: 0,
        };
        let builtin: [(Res, &str, bool, &[&str]); 9] = [
            (Res::services(), "Service", true, &["svc"]),
            (Res::core("endpoints"), "Endpoints", true, &["ep"]),
            (Res::core("pods"), "Pod", true, &["po"]),
            (Res::core("namespaces"), "Namespace", false, &["ns"]),
            (Res::core("nodes"), "Node", false, &["no"]),
            (Res::core("events"), "Event", true, &["ev"]),
            (Res::core("configmaps"), "ConfigMap", true, &["cm"]),
            (Res::endpoint_slices(), "EndpointSlice", true, &[]),
            (Res::sks(), "ServerlessService", true, &["sks"]),
        ];
        for (res, kind, namespaced, short) in builtin {
            s.register(res, kind, namespaced, short);
        }
        s.register(
            Res::new("events.k8s.io", "v1", "events"),
            "Event",
            true,
            &["ev"],
        );
        s
    }

    /// Declares a resource type (kind for lists, scope, discovery).
    pub fn register(&mut self, res: Res, kind: &str, namespaced: bool, short_names: &[&str]) {
        self.types.insert(
            res,
            TypeInfo {
                kind: kind.into(),
                namespaced,
                short_names: short_names.iter().map(|s| s.to_string()).collect(),
            },
        );
    }

    /// The type of `res`; unknown resources are registered on first use (namespaced, kind
    /// guessed from the plural) so any resource path works.
    pub fn type_of(&mut self, res: &Res) -> TypeInfo {
        self.types
            .entry(res.clone())
            .or_insert_with(|| TypeInfo {
                kind: guess_kind(&res.resource),
                namespaced: true,
                short_names: Vec::new(),
            })
            .clone()
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn record(&mut self, ev: HistEvent) {
        self.history.push_back(ev);
        while self.history.len() > self.history_limit.max(1) {
            if let Some(old) = self.history.pop_front() {
                self.compacted = self.compacted.max(old.rv);
            }
        }
    }

    /// Compacts the history at the current resourceVersion: watches from an older one get
    /// 410 Gone (a watch from the current one still works). The version is bumped first, so
    /// every resourceVersion handed out so far is too old.
    pub fn expire_history(&mut self) {
        self.rv += 1;
        self.history.clear();
        self.compacted = self.rv;
    }

    fn normalize(&mut self, res: &Res, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        let ty = self.type_of(res);
        if !obj.is_object() {
            return Err(ApiError::bad_request("object is not a JSON object"));
        }
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        if obj["metadata"]["name"].as_str().unwrap_or("").is_empty() {
            match obj["metadata"]["generateName"].as_str() {
                Some(prefix) => {
                    self.uid += 1;
                    obj["metadata"]["name"] = json!(format!("{prefix}{:05x}", self.uid));
                }
                None => return Err(ApiError::bad_request("metadata.name is required")),
            }
        }
        if ty.namespaced {
            let ns = if ns.is_empty() {
                meta_str(&obj, "namespace").to_owned()
            } else {
                ns.to_owned()
            };
            let ns = if ns.is_empty() { "default".into() } else { ns };
            obj["metadata"]["namespace"] = json!(ns);
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        obj["apiVersion"] = json!(res.api_version());
        if obj["kind"].as_str().unwrap_or("").is_empty() {
            obj["kind"] = json!(ty.kind);
        }
        Ok(obj)
    }

    fn key(obj: &Value) -> (String, String) {
        (
            meta_str(obj, "namespace").to_owned(),
            meta_str(obj, "name").to_owned(),
        )
    }

    /// Creates an object (namespace from `ns` or the object; "default" if neither).
    pub fn create(&mut self, res: &Res, ns: &str, obj: Value) -> Result<Value, ApiError> {
        let mut obj = self.normalize(res, ns, obj)?;
        let key = Self::key(&obj);
        if self.objects.get(res).is_some_and(|m| m.contains_key(&key)) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} {:?} already exists", res.resource, key.1),
            ));
        }
        self.rv += 1;
        self.uid += 1;
        let m = &mut obj["metadata"];
        m["resourceVersion"] = json!(self.rv.to_string());
        m["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.uid));
        m["creationTimestamp"] = json!(rfc3339_now());
        m["generation"] = json!(1);
        self.objects
            .entry(res.clone())
            .or_default()
            .insert(key.clone(), obj.clone());
        self.record(HistEvent {
            rv: self.rv,
            res: res.clone(),
            ns: key.0,
            ty: EventType::Added,
            object: obj.clone(),
            prev: None,
        });
        Ok(obj)
    }

    /// Replaces an existing object. A non-empty `metadata.resourceVersion` in `obj` must
    /// match the stored one (optimistic concurrency), as on the real server.
    pub fn update(&mut self, res: &Res, ns: &str, obj: Value) -> Result<Value, ApiError> {
        let mut obj = self.normalize(res, ns, obj)?;
        let key = Self::key(&obj);
        let Some(old) = self.objects.get(res).and_then(|m| m.get(&key)).cloned() else {
            return Err(ApiError::not_found(format!("{} {:?}", res.resource, key.1)));
        };
        let want = meta_str(&obj, "resourceVersion");
        if !want.is_empty() && want != meta_str(&old, "resourceVersion") {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "the object has been modified (resourceVersion {want} != {})",
                    meta_str(&old, "resourceVersion")
                ),
            ));
        }
        self.rv += 1;
        let mut generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        if obj.get("spec") != old.get("spec") {
            generation += 1;
        }
        for f in ["uid", "creationTimestamp"] {
            obj["metadata"][f] = old["metadata"][f].clone();
        }
        obj["metadata"]["generation"] = json!(generation);
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects
            .entry(res.clone())
            .or_default()
            .insert(key.clone(), obj.clone());
        self.record(HistEvent {
            rv: self.rv,
            res: res.clone(),
            ns: key.0,
            ty: EventType::Modified,
            object: obj.clone(),
            prev: Some(old),
        });
        Ok(obj)
    }

    /// Creates or replaces (ignoring any resourceVersion in `obj`).
    pub fn apply(&mut self, res: &Res, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        let probe = self.normalize(res, ns, obj.clone())?;
        let key = Self::key(&probe);
        if self.get(res, &key.0, &key.1).is_some() {
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            self.update(res, ns, obj)
        } else {
            self.create(res, ns, obj)
        }
    }

    /// Applies a JSON merge patch to an existing object.
    pub fn patch(
        &mut self,
        res: &Res,
        ns: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Value, ApiError> {
        let mut obj = self
            .get(res, ns, name)
            .ok_or_else(|| ApiError::not_found(format!("{} {name:?}", res.resource)))?;
        merge_patch(&mut obj, patch);
        obj["metadata"]["name"] = json!(name);
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        self.update(res, ns, obj)
    }

    pub fn delete(&mut self, res: &Res, ns: &str, name: &str) -> Result<Value, ApiError> {
        let ns = if self.type_of(res).namespaced { ns } else { "" };
        let key = (ns.to_owned(), name.to_owned());
        let Some(mut obj) = self.objects.get_mut(res).and_then(|m| m.remove(&key)) else {
            return Err(ApiError::not_found(format!("{} {name:?}", res.resource)));
        };
        self.rv += 1;
        // The deleted object carries the deletion's resourceVersion, as on the real server.
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(HistEvent {
            rv: self.rv,
            res: res.clone(),
            ns: key.0,
            ty: EventType::Deleted,
            object: obj.clone(),
            prev: None,
        });
        Ok(obj)
    }

    pub fn get(&self, res: &Res, ns: &str, name: &str) -> Option<Value> {
        let namespaced = self.types.get(res).is_none_or(|t| t.namespaced);
        let ns = if namespaced { ns } else { "" };
        self.objects
            .get(res)?
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Objects of `res` (in namespace `ns`, or all) matching `sel`, ordered by
    /// namespace/name, starting after `after` (a continue position).
    pub fn select(
        &self,
        res: &Res,
        ns: Option<&str>,
        sel: &Selectors,
        after: Option<&(String, String)>,
    ) -> Vec<(&(String, String), &Value)> {
        let Some(m) = self.objects.get(res) else {
            return Vec::new();
        };
        m.iter()
            .filter(|(k, _)| after.is_none_or(|a| *k > a))
            .filter(|(k, _)| ns.is_none_or(|ns| k.0 == ns))
            .filter(|(_, v)| sel.matches(v))
            .collect()
    }

    /// A `List` response. `limit` pages it with a continue token (`rv|ns|name`).
    pub fn list(
        &mut self,
        res: &Res,
        ns: Option<&str>,
        sel: &Selectors,
        limit: Option<usize>,
        cont: Option<&str>,
    ) -> Result<Value, ApiError> {
        let ty = self.type_of(res);
        let (list_rv, after) = match cont.filter(|c| !c.is_empty()) {
            Some(c) => {
                let mut parts = c.splitn(3, '|');
                let rv: u64 = parts
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| ApiError::bad_request(format!("bad continue token {c:?}")))?;
                if rv < self.compacted {
                    return Err(ApiError::gone(
                        "The provided continue parameter is too old to display a consistent \
                         list result. You can start a new list without the continue parameter.",
                    ));
                }
                let ns = parts.next().unwrap_or("").to_owned();
                let name = parts.next().unwrap_or("").to_owned();
                (rv, Some((ns, name)))
            }
            None => (self.rv, None),
        };
        let all = self.select(res, ns, sel, after.as_ref());
        let n = limit.filter(|&l| l > 0).unwrap_or(usize::MAX);
        let more = all.len() > n;
        let page: Vec<_> = all.into_iter().take(n).collect();
        let mut meta = json!({"resourceVersion": list_rv.to_string()});
        if more {
            let (k, _) = page.last().expect("non-empty page");
            meta["continue"] = json!(format!("{list_rv}|{}|{}", k.0, k.1));
            meta["remainingItemCount"] = json!(self.select(res, ns, sel, Some(k)).len() as u64);
        }
        Ok(json!({
            "kind": format!("{}List", ty.kind),
            "apiVersion": res.api_version(),
            "metadata": meta,
            "items": page.into_iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
        }))
    }

    /// Starts a watch from `rv` (None or 0: the current state as synthetic ADDED events).
    /// 410 Gone when `rv` is older than the history (or the force knob is set).
    pub fn watch_start(
        &mut self,
        res: &Res,
        ns: Option<&str>,
        sel: &Selectors,
        rv: Option<u64>,
    ) -> Result<WatchStart, ApiError> {
        self.type_of(res);
        match rv.filter(|&v| v != 0) {
            None => {
                let initial = self
                    .select(res, ns, sel, None)
                    .into_iter()
                    .map(|(_, o)| json!({"type": "ADDED", "object": o}))
                    .collect();
                Ok(WatchStart {
                    initial,
                    cursor: self.rv,
                })
            }
            Some(v) => {
                if self.force_gone > 0 {
                    self.force_gone -= 1;
                    return Err(ApiError::gone(format!(
                        "too old resource version: {v} ({})",
                        self.compacted.max(v + 1)
                    )));
                }
                if v < self.compacted {
                    return Err(ApiError::gone(format!(
                        "too old resource version: {v} ({})",
                        self.compacted
                    )));
                }
                let (initial, cursor) = self.events_since(res, ns, sel, v)?;
                Ok(WatchStart { initial, cursor })
            }
        }
    }

    /// Watch events of `res`/`ns` after `cursor` that match `sel`, with selector
    /// transitions turned into ADDED/DELETED; and the new cursor.
    pub fn events_since(
        &self,
        res: &Res,
        ns: Option<&str>,
        sel: &Selectors,
        cursor: u64,
    ) -> Result<(Vec<Value>, u64), ApiError> {
        if cursor < self.compacted {
            return Err(ApiError::gone(format!(
                "too old resource version: {cursor} ({})",
                self.compacted
            )));
        }
        let mut out = Vec::new();
        for e in self.history.iter().filter(|e| e.rv > cursor) {
            if &e.res != res || ns.is_some_and(|ns| ns != e.ns) {
                continue;
            }
            let now = sel.matches(&e.object);
            let ty = match (e.ty, e.prev.as_ref().map(|p| sel.matches(p))) {
                (EventType::Modified, Some(true)) if now => "MODIFIED",
                (EventType::Modified, Some(false)) if now => "ADDED",
                (EventType::Modified, Some(true)) => "DELETED",
                _ if now => e.ty.as_str(),
                _ => continue,
            };
            out.push(json!({"type": ty, "object": e.object}));
        }
        Ok((out, self.rv.max(cursor)))
    }

    /// Every resource that has a registered type, for discovery.
    pub fn resources_of(&self, group: &str, version: &str) -> Vec<(Res, TypeInfo)> {
        self.types
            .iter()
            .filter(|(r, _)| r.group == group && r.version == version)
            .map(|(r, t)| (r.clone(), t.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, app: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
               "spec": {"ports": [{"port": 80}]}})
    }

    #[test]
    fn list_watch_and_gone() {
        let mut s = Store::new();
        let r = Res::services();
        let sel = Selectors::default();
        let a = s.create(&r, "", svc("a", "one", "x")).unwrap();
        assert_eq!(a["kind"], "Service");
        assert_eq!(a["apiVersion"], "v1");
        s.create(&r, "b", svc("b", "two", "y")).unwrap();
        let l = s.list(&r, None, &sel, None, None).unwrap();
        assert_eq!(l["kind"], "ServiceList");
        assert_eq!(l["items"].as_array().unwrap().len(), 2);
        let rv: u64 = l["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let l = s.list(&r, Some("a"), &sel, None, None).unwrap();
        assert_eq!(l["items"].as_array().unwrap().len(), 1);
        // Pages.
        let p1 = s.list(&r, None, &sel, Some(1), None).unwrap();
        assert_eq!(p1["items"].as_array().unwrap().len(), 1);
        let c = p1["metadata"]["continue"].as_str().unwrap().to_owned();
        let p2 = s.list(&r, None, &sel, Some(1), Some(&c)).unwrap();
        assert_eq!(p2["items"][0]["metadata"]["name"], "two");
        assert!(p2["metadata"]["continue"].is_null());

        s.patch(
            &r,
            "a",
            "one",
            &json!({"metadata": {"labels": {"app": "y"}}}),
        )
        .unwrap();
        s.delete(&r, "b", "two").unwrap();
        let w = s.watch_start(&r, None, &sel, Some(rv)).unwrap();
        let types: Vec<_> = w.initial.iter().map(|e| e["type"].clone()).collect();
        assert_eq!(types, vec!["MODIFIED", "DELETED"]);
        // Label selector app=x: the relabel is a DELETED for that watch.
        let selx = Selectors {
            labels: super::super::selector::LabelSelector::parse("app=x").unwrap(),
            ..Default::default()
        };
        let w = s.watch_start(&r, None, &selx, Some(rv)).unwrap();
        assert_eq!(w.initial.len(), 1);
        assert_eq!(w.initial[0]["type"], "DELETED");

        s.expire_history();
        assert_eq!(
            s.watch_start(&r, None, &sel, Some(rv)).err().unwrap().code,
            410
        );
        let cur = s.resource_version();
        assert!(s.watch_start(&r, None, &sel, Some(cur)).is_ok());
        s.force_gone = 1;
        assert!(s.watch_start(&r, None, &sel, Some(cur)).is_err());
        assert!(s.watch_start(&r, None, &sel, Some(cur)).is_ok());
    }

    #[test]
    fn bounded_history() {
        let mut s = Store::new();
        s.history_limit = 3;
        let r = Res::services();
        let first = s.resource_version();
        for i in 0..5 {
            s.create(&r, "a", svc("a", &format!("s{i}"), "x")).unwrap();
        }
        let sel = Selectors::default();
        assert!(s.watch_start(&r, None, &sel, Some(first)).is_err());
        let w = s
            .watch_start(&r, None, &sel, Some(s.resource_version() - 3))
            .unwrap();
        assert_eq!(w.initial.len(), 3);
    }

    #[test]
    fn timestamps_and_kinds() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20"), "{t}");
        assert_eq!(guess_kind("widgets"), "Widget");
        assert_eq!(guess_kind("policies"), "Policy");
    }
}
