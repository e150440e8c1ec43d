//! The HTTP side of the test API server: routing of `/api/v1/...` and
//! `/apis/{group}/{version}/...` paths, list / watch / get / create / replace / patch /
//! delete, discovery and `/version`.
use std::{
    collections::HashMap,
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{
    body::{Frame, Incoming},
    Method, Request, Response,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{
    selector::{FieldSelector, LabelSelector, Selectors},
    store::{ApiError, Res},
    watches, RequestRecord, Shared,
};

/// A response body: all at once, or a stream of chunks (a watch).
pub enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }
}

pub(super) fn json_response(code: u16, v: &Value) -> Response<Body> {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::Full(Some(body.into())))
        .expect("response")
}

pub(super) fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

fn query_map(q: Option<&str>) -> HashMap<String, String> {
    q.map(|q| {
        url_decode_pairs(q)
            .into_iter()
            .collect::<HashMap<String, String>>()
    })
    .unwrap_or_default()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// `application/x-www-form-urlencoded` decoding of a query string.
pub fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn url_decode_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

/// What a path names.
#[derive(Debug)]
enum Route {
    Version,
    /// `/api`
    CoreVersions,
    /// `/apis`
    Groups,
    /// `/api/v1`, `/apis/{g}/{v}`
    Resources(String, String),
    /// `/apis/{g}`
    Group(String),
    /// A collection: namespace `None` = all namespaces (or cluster-scoped).
    Collection(Res, Option<String>),
    /// One object, optionally a subresource (`status`).
    Object(Res, Option<String>, String, Option<String>),
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Some(Route::Version),
        ["api"] => return Some(Route::CoreVersions),
        ["apis"] => return Some(Route::Groups),
        ["apis", g] => return Some(Route::Group(g.to_string())),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let r = |name: &str| Res::new(group, version, name);
    Some(match rest {
        [] => Route::Resources(group.into(), version.into()),
        // A namespace's status (namespaces are cluster-scoped objects under /namespaces).
        ["namespaces", ns, "status"] if group.is_empty() => {
            Route::Object(r("namespaces"), None, ns.to_string(), Some("status".into()))
        }
        ["namespaces", ns, res] => Route::Collection(r(res), Some(ns.to_string())),
        ["namespaces", ns, res, name] => {
            Route::Object(r(res), Some(ns.to_string()), name.to_string(), None)
        }
        ["namespaces", ns, res, name, sub] => Route::Object(
            r(res),
            Some(ns.to_string()),
            name.to_string(),
            Some(sub.to_string()),
        ),
        [res] => Route::Collection(r(res), None),
        [res, name] => Route::Object(r(res), None, name.to_string(), None),
        [res, name, sub] => Route::Object(r(res), None, name.to_string(), Some(sub.to_string())),
        _ => return None,
    })
}

/// 404 (`NotFound` with the real server's message) unless the route names a served
/// resource and, for a subresource, one it has (`status`).
fn served(shared: &Shared, r: &Route) -> Result<(), ApiError> {
    let (res, sub) = match r {
        Route::Collection(res, _) => (res, None),
        Route::Object(res, _, _, sub) => (res, sub.as_deref()),
        _ => return Ok(()),
    };
    let ty = shared.store.lock().unwrap().type_of(res)?;
    match sub {
        None => Ok(()),
        Some("status") if ty.status => Ok(()),
        Some(_) => Err(ApiError::not_served()),
    }
}

/// A request for one object (`status`: its status subresource).
#[allow(clippy::too_many_arguments)]
fn object(
    shared: &Arc<Shared>,
    method: &Method,
    res: &Res,
    ns: &str,
    name: &str,
    status: bool,
    content_type: &str,
    parse_body: impl Fn() -> Result<Value, ApiError>,
) -> Result<(u16, Value), ApiError> {
    let current = || {
        shared
            .store
            .lock()
            .unwrap()
            .get(res, ns, name)
            .ok_or_else(|| ApiError::not_found(format!("{} {name:?}", res.resource)))
    };
    match *method {
        Method::GET => current().map(|v| (200, v)),
        Method::PUT => parse_body().and_then(|mut obj| {
            if !obj.is_object() {
                return Err(ApiError::bad_request("object is not a JSON object"));
            }
            obj["metadata"]["name"] = json!(name);
            shared
                .mutate(|st| {
                    if status {
                        // Only the status of the stored object changes.
                        st.update_status(res, ns, obj)
                    } else {
                        st.update(res, ns, obj)
                    }
                })
                .map(|v| (200, v))
        }),
        Method::PATCH => {
            if content_type.contains("json-patch") {
                Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    "JSON patch is not supported by the test API server; use a merge \
                     patch",
                ))
            } else {
                // Merge, strategic merge and apply patches are all applied as JSON
                // merge patches here.
                parse_body().and_then(|mut p| {
                    if status {
                        return shared
                            .mutate(|st| st.patch_status(res, ns, name, &p))
                            .map(|v| (200, v));
                    }
                    let created = current().is_err() && content_type.contains("apply-patch");
                    if created {
                        p["metadata"]["name"] = json!(name);
                        shared.mutate(|st| st.create(res, ns, p)).map(|v| (201, v))
                    } else {
                        shared
                            .mutate(|st| st.patch(res, ns, name, &p))
                            .map(|v| (200, v))
                    }
                })
            }
        }
        Method::DELETE => shared
            .mutate(|st| st.delete(res, ns, name))
            .map(|v| (200, v)),
        _ => Err(ApiError::new(405, "MethodNotAllowed", "method not allowed")),
    }
}

pub(super) fn selectors(q: &HashMap<String, String>) -> Result<Selectors, ApiError> {
    let labels = LabelSelector::parse(q.get("labelSelector").map_or("", |s| s.as_str()))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", |s| s.as_str()))
        .map_err(ApiError::bad_request)?;
    Ok(Selectors { labels, fields })
}

pub(super) fn parse_rv(q: &HashMap<String, String>) -> Result<Option<u64>, ApiError> {
    match q.get("resourceVersion").map(|s| s.as_str()) {
        None | Some("") => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {s:?}"))),
    }
}

fn discovery(shared: &Shared, r: &Route) -> Value {
    let store = shared.store.lock().unwrap();
    match r {
        Route::Version => json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-redirector-test",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc",
            "platform": "linux/amd64",
        }),
        Route::CoreVersions => json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                            "serverAddress": "127.0.0.1"}],
        }),
        Route::Groups | Route::Group(_) => {
            let mut groups: Vec<(String, Vec<String>)> = Vec::new();
            for r in store.types.keys().filter(|r| !r.group.is_empty()) {
                match groups.iter_mut().find(|(g, _)| *g == r.group) {
                    Some((_, vs)) if !vs.contains(&r.version) => vs.push(r.version.clone()),
                    Some(_) => {}
                    None => groups.push((r.group.clone(), vec![r.version.clone()])),
                }
            }
            let group_json = |(g, vs): &(String, Vec<String>)| {
                let versions: Vec<Value> = vs
                    .iter()
                    .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                    .collect();
                json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
            };
            if let Route::Group(g) = r {
                match groups.iter().find(|(n, _)| n == g) {
                    Some(e) => {
                        let mut v = group_json(e);
                        v["kind"] = json!("APIGroup");
                        v["apiVersion"] = json!("v1");
                        v
                    }
                    None => ApiError::not_served().status(),
                }
            } else {
                json!({"kind": "APIGroupList", "apiVersion": "v1",
                       "groups": groups.iter().map(group_json).collect::<Vec<_>>()})
            }
        }
        Route::Resources(g, v) => {
            let served = store.resources_of(g, v);
            if served.is_empty() {
                return ApiError::not_served().status();
            }
            let mut resources: Vec<Value> = Vec::new();
            for (r, t) in served {
                let mut main = json!({
                    "name": r.resource, "singularName": t.singular,
                    "namespaced": t.namespaced, "kind": t.kind,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                });
                if !t.short_names.is_empty() {
                    main["shortNames"] = json!(t.short_names);
                }
                resources.push(main);
                if t.status {
                    resources.push(json!({
                        "name": format!("{}/status", r.resource), "singularName": "",
                        "namespaced": t.namespaced, "kind": t.kind,
                        "verbs": ["get", "patch", "update"],
                    }));
                }
            }
            let gv = if g.is_empty() {
                v.clone()
            } else {
                format!("{g}/{v}")
            };
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                   "resources": resources})
        }
        _ => Value::Null,
    }
}

/// Serves one request.
pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let path = uri.path().to_owned();
    let q = query_map(uri.query());
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let resp = dispatch(&shared, &method, &path, &q, &content_type, &body).await;
    shared.requests.lock().unwrap().push(RequestRecord {
        method: method.to_string(),
        path,
        query: uri.query().unwrap_or("").to_owned(),
        status: resp.status().as_u16(),
    });
    resp
}

async fn dispatch(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    q: &HashMap<String, String>,
    content_type: &str,
    body: &Bytes,
) -> Response<Body> {
    let Some(r) = route(path) else {
        return error_response(&ApiError::not_found(format!("path {path}")));
    };
    if let Route::Collection(res, _) | Route::Object(res, ..) = &r {
        if shared.forbidden.lock().unwrap().contains(&res.resource) {
            return error_response(&ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{} is forbidden: User \"system:serviceaccount:redirector:redirector\" \
                     cannot list resource \"{}\"",
                    res.resource, res.resource
                ),
            ));
        }
    }
    if let Err(e) = served(shared, &r) {
        return error_response(&e);
    }
    let parse_body = || -> Result<Value, ApiError> {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("request body is not JSON: {e}")))
    };
    let result: Result<(u16, Value), ApiError> = match (&r, method) {
        (Route::Collection(res, ns), &Method::GET) => {
            let watch = matches!(q.get("watch").map(|s| s.as_str()), Some("true" | "1"));
            if watch {
                return watches::watch_response(shared, res, ns.as_deref(), q);
            }
            let limit = q.get("limit").and_then(|l| l.parse().ok());
            selectors(q).and_then(|sel| {
                let mut st = shared.store.lock().unwrap();
                st.list(
                    res,
                    ns.as_deref(),
                    &sel,
                    limit,
                    q.get("continue").map(|s| s.as_str()),
                )
                .map(|v| (200, v))
            })
        }
        (Route::Collection(res, ns), &Method::POST) => parse_body().and_then(|obj| {
            shared
                .mutate(|st| st.create(res, ns.as_deref().unwrap_or(""), obj))
                .map(|v| (201, v))
        }),
        (Route::Object(res, ns, name, sub), m) => object(
            shared,
            m,
            res,
            &ns.clone().unwrap_or_default(),
            name,
            sub.is_some(),
            content_type,
            parse_body,
        ),
        (
            Route::Version
            | Route::CoreVersions
            | Route::Groups
            | Route::Group(_)
            | Route::Resources(..),
            &Method::GET,
        ) => {
            let v = discovery(shared, &r);
            if v["code"] == 404 {
                Err(ApiError::not_served())
            } else {
                Ok((200, v))
            }
        }
        _ => Err(ApiError::new(405, "MethodNotAllowed", "method not allowed")),
    };
    match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => error_response(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert!(matches!(route("/version"), Some(Route::Version)));
        assert!(matches!(route("/api"), Some(Route::CoreVersions)));
        assert!(
            matches!(route("/api/v1"), Some(Route::Resources(g, v)) if g.is_empty() && v == "v1")
        );
        match route("/api/v1/services") {
            Some(Route::Collection(r, None)) => assert_eq!(r, Res::services()),
            other => panic!("{other:?}"),
        }
        match route("/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices") {
            Some(Route::Collection(r, Some(ns))) => {
                assert_eq!(r, Res::endpoint_slices());
                assert_eq!(ns, "ns");
            }
            other => panic!("{other:?}"),
        }
        match route("/apis/networking.internal.knative.dev/v1alpha1/namespaces/a/serverlessservices/b/status") {
            Some(Route::Object(r, Some(ns), name, Some(sub))) => {
                assert_eq!(r, Res::sks());
                assert_eq!((ns.as_str(), name.as_str(), sub.as_str()), ("a", "b", "status"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn query_decoding() {
        let q = query_map(Some(
            "watch=true&labelSelector=app%3Dweb%2Ctier+in+%28a%29&resourceVersion=5",
        ));
        assert_eq!(q["labelSelector"], "app=web,tier in (a)");
        assert_eq!(q["resourceVersion"], "5");
        assert_eq!(url_decode("a%2"), "a%2");
    }
}
