//! The in-memory object store behind the test API server: objects keyed by resource
//! (group/version/resource), namespace and name; one global, monotonically increasing
//! resourceVersion; a bounded history of watch events; compaction (410 Gone for watches
//! from before it). Only registered resources (see [`super::registry`]) are served; their
//! status subresource and CRD schema apply to every write.
use std::{
    collections::{BTreeMap, VecDeque},
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Map, Value};

pub use super::{
    error::ApiError,
    registry::{Res, TypeInfo},
};
use super::{registry::default_types, schema::prune_and_check, selector::Selectors};

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

impl Store {
    /// A store serving the built-in resources and Knative's CRDs (read from their files;
    /// an error names the missing file).
    pub fn new() -> anyhow::Result<Self> {
        Ok(Store {
            types: default_types()?,
            objects: BTreeMap::new(),
            rv: 1,
            history: VecDeque::new(),
            history_limit: 1000,
            compacted: 0,
            force_gone: 0,
            uid: 0,
        })
    }

    /// Serves a resource type (kind, scope, subresources, schema; discovery lists it).
    pub fn register(&mut self, res: Res, ty: TypeInfo) {
        self.types.insert(res, ty);
    }

    /// The type of `res`: 404 (as the real server answers) when it is not served.
    pub fn type_of(&self, res: &Res) -> Result<TypeInfo, ApiError> {
        self.types
            .get(res)
            .cloned()
            .ok_or_else(ApiError::not_served)
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
        let ty = self.type_of(res)?;
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

    /// The CRD schema applied to the object to be stored: unknown fields pruned, 422 for
    /// a wrong type or a missing required field.
    fn check_schema(&self, res: &Res, obj: &mut Value) -> Result<(), ApiError> {
        let ty = self.type_of(res)?;
        let Some(schema) = &ty.schema else {
            return Ok(());
        };
        let causes = prune_and_check(schema, obj);
        if causes.is_empty() {
            Ok(())
        } else {
            let name = meta_str(obj, "name").to_owned();
            Err(ApiError::invalid(res, &ty.kind, &name, &causes))
        }
    }

    fn key(obj: &Value) -> (String, String) {
        (
            meta_str(obj, "namespace").to_owned(),
            meta_str(obj, "name").to_owned(),
        )
    }

    /// Creates an object (namespace from `ns` or the object; "default" if neither).
    /// With the status subresource the given `.status` is dropped, as on the real server
    /// (write it with [`Self::update_status`]).
    pub fn create(&mut self, res: &Res, ns: &str, obj: Value) -> Result<Value, ApiError> {
        let mut obj = self.normalize(res, ns, obj)?;
        if self.type_of(res)?.reset_status_on_create {
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        self.check_schema(res, &mut obj)?;
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
    /// match the stored one (optimistic concurrency), as on the real server. With the
    /// status subresource the stored `.status` is kept.
    pub fn update(&mut self, res: &Res, ns: &str, obj: Value) -> Result<Value, ApiError> {
        self.write(res, ns, obj, false)
    }

    /// Replaces the `.status` of an existing object (the `/status` subresource): everything
    /// else is kept. 404 when `res` has no status subresource.
    pub fn update_status(&mut self, res: &Res, ns: &str, obj: Value) -> Result<Value, ApiError> {
        if !self.type_of(res)?.status {
            return Err(ApiError::not_served());
        }
        self.write(res, ns, obj, true)
    }

    /// A JSON merge patch of the `.status` of an existing object (the `/status`
    /// subresource); other fields in `patch` are ignored.
    pub fn patch_status(
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
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        self.update_status(res, ns, obj)
    }

    /// An update of the main resource (`status_only` false) or of its status subresource.
    fn write(
        &mut self,
        res: &Res,
        ns: &str,
        obj: Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let ty = self.type_of(res)?;
        let mut obj = self.normalize(res, ns, obj)?;
        let key = Self::key(&obj);
        let Some(old) = self.objects.get(res).and_then(|m| m.get(&key)).cloned() else {
            return Err(ApiError::not_found(format!("{} {:?}", res.resource, key.1)));
        };
        if status_only {
            let mut merged = old.clone();
            merged["metadata"]["resourceVersion"] = obj["metadata"]["resourceVersion"].clone();
            match obj.get("status") {
                Some(st) => merged["status"] = st.clone(),
                None => {
                    if let Some(m) = merged.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            obj = merged;
        } else if ty.status {
            match old.get("status") {
                Some(st) => obj["status"] = st.clone(),
                None => {
                    if let Some(m) = obj.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        self.check_schema(res, &mut obj)?;
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
        let ns = if self.type_of(res)?.namespaced {
            ns
        } else {
            ""
        };
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
        let ty = self.type_of(res)?;
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
        self.type_of(res)?;
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
#[path = "store_tests.rs"]
mod tests;
