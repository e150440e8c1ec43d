//! The Kubernetes source (`redirector agent --kubernetes`, issue 4) against the test API
//! server (`redirector_tests::kubeapi`).
//!
//! - `kubeapi_*`: the test API server itself, driven by kube-rs's real client and watcher
//!   (no root needed): list + watch, label selectors, bookmarks, a restart with 410 Gone and
//!   the re-list that follows, the raw wire format of watch events.
//! - `agent_*`: the agent in a node namespace reading SKS, Services and EndpointSlices from
//!   the test API server (root; without it they print "skipped: not root" and pass).
use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::{
    runtime::{reflector, watcher, WatchStreamExt},
    Api, Client,
};
use redirector_tests::kubeapi::{
    objects::{self, Ep, Mode},
    ApiServer, Res,
};
use serde_json::{json, Value};

fn svc(ns: &str, name: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.9", "clusterIPs": ["10.96.0.9"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
    })
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A kube client built the way the agent builds one: from a kubeconfig file.
async fn client_from_kubeconfig(server: &ApiServer) -> (Client, tempdir::Dir) {
    let dir = tempdir::Dir::new("kubeapi");
    let path = dir.0.join("kubeconfig");
    server.write_kubeconfig(&path).unwrap();
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    (Client::try_from(cfg).unwrap(), dir)
}

mod tempdir {
    /// A directory under the system temp dir, removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("{tag}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn names(store: &reflector::Store<Service>) -> BTreeSet<String> {
    store
        .state()
        .iter()
        .map(|s| {
            format!(
                "{}/{}",
                s.metadata.namespace.as_deref().unwrap_or(""),
                s.metadata.name.as_deref().unwrap_or("")
            )
        })
        .collect()
}

/// Lists (not watches) of services the server answered.
fn service_lists(server: &ApiServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/services") && !r.is_watch() && r.method == "GET")
        .count()
}

#[test]
fn kubeapi_discovery_and_crud_with_kube_client() {
    let server = ApiServer::start().unwrap();
    let rt = runtime();
    rt.block_on(async {
        let (client, _dir) = client_from_kubeconfig(&server).await;
        let v = client.apiserver_version().await.unwrap();
        assert_eq!(v.major, "1");
        let groups = client.list_api_groups().await.unwrap();
        assert!(
            groups
                .groups
                .iter()
                .any(|g| g.name == "networking.internal.knative.dev"),
            "{groups:?}"
        );
        let core = client.list_core_api_versions().await.unwrap();
        assert_eq!(core.versions, vec!["v1".to_string()]);
        let res = client
            .list_api_group_resources("discovery.k8s.io/v1")
            .await
            .unwrap();
        assert!(res.resources.iter().any(|r| r.name == "endpointslices"));

        // Typed CRUD through kube's Api.
        let api: Api<Service> = Api::namespaced(client.clone(), "ns1");
        let s: Service = serde_json::from_value(svc("ns1", "web", "a")).unwrap();
        let created = api.create(&Default::default(), &s).await.unwrap();
        let rv1 = created.metadata.resource_version.clone().unwrap();
        assert!(created.metadata.uid.is_some());
        let got = api.get("web").await.unwrap();
        assert_eq!(got.metadata.resource_version.as_deref(), Some(rv1.as_str()));
        let patched = api
            .patch(
                "web",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({"metadata": {"labels": {"app": "b"}}})),
            )
            .await
            .unwrap();
        let rv2 = patched.metadata.resource_version.clone().unwrap();
        assert!(rv2.parse::<u64>().unwrap() > rv1.parse::<u64>().unwrap());
        assert_eq!(
            patched.metadata.labels.as_ref().unwrap()["app"],
            "b".to_string()
        );
        let err = api.get("nope").await.unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 404),
            "{err:?}"
        );
        let list = api.list(&Default::default()).await.unwrap();
        assert_eq!(list.items.len(), 1);
        assert_eq!(
            list.metadata.resource_version.as_deref(),
            Some(rv2.as_str())
        );
        api.delete("web", &Default::default()).await.unwrap();
        assert!(api
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty());
    });
    // Objects created by the test are there for the client and vice versa.
    assert!(server.get(&Res::services(), "ns1", "web").is_none());
}

#[test]
fn kubeapi_watcher_lists_watches_and_relists_after_gone() {
    let server = ApiServer::start().unwrap();
    server.set_bookmark_interval(Duration::from_millis(300));
    let r = Res::services();
    server.create(&r, svc("a", "one", "x")).unwrap();
    server.create(&r, svc("b", "two", "x")).unwrap();
    let rt = runtime();
    let (reader, writer) = reflector::store::<Service>();
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let ev2 = events.clone();
    let (client, _dir) = rt.block_on(client_from_kubeconfig(&server));
    let api: Api<Service> = Api::all(client);
    let task = rt.spawn(async move {
        let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
        futures_util::pin_mut!(stream);
        while let Some(e) = stream.next().await {
            let what = match e {
                Ok(watcher::Event::Init) => "init".to_string(),
                Ok(watcher::Event::InitApply(s)) => {
                    format!("init-apply {}", s.metadata.name.unwrap_or_default())
                }
                Ok(watcher::Event::InitDone) => "init-done".to_string(),
                Ok(watcher::Event::Apply(s)) => {
                    format!("apply {}", s.metadata.name.unwrap_or_default())
                }
                Ok(watcher::Event::Delete(s)) => {
                    format!("delete {}", s.metadata.name.unwrap_or_default())
                }
                Err(e) => format!("error {e}"),
            };
            ev2.lock().unwrap().push(what);
        }
    });
    let want = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    wait("initial list", Duration::from_secs(10), || {
        names(&reader) == want(&["a/one", "b/two"])
    });
    assert_eq!(service_lists(&server), 1, "{:?}", server.requests());
    wait("the watch", Duration::from_secs(5), || {
        server.active_watches() == 1
    });

    // Live events.
    server.create(&r, svc("a", "three", "y")).unwrap();
    server.delete(&r, "b", "two").unwrap();
    wait("watch events", Duration::from_secs(10), || {
        names(&reader) == want(&["a/one", "a/three"])
    });
    server
        .patch(
            &r,
            "a",
            "one",
            json!({"metadata": {"labels": {"app": "z"}}}),
        )
        .unwrap();
    wait("modified", Duration::from_secs(10), || {
        reader
            .state()
            .iter()
            .any(|s| s.metadata.labels.as_ref().is_some_and(|l| l["app"] == "z"))
    });
    // Bookmarks reach the client (it resumes from them; they are not events).
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        events
            .lock()
            .unwrap()
            .iter()
            .all(|e| !e.starts_with("error")),
        "{:?}",
        events.lock().unwrap()
    );
    assert_eq!(service_lists(&server), 1);

    // API server restart with its history gone: the open watch is cut, the resumed watch
    // gets 410 Gone, the watcher re-lists, and sees what changed while the server was down.
    server.stop();
    server.delete(&r, "a", "three").unwrap();
    server.create(&r, svc("c", "four", "x")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        names(&reader),
        want(&["a/one", "a/three"]),
        "the store keeps the last state while the server is down"
    );
    server.expire_history();
    server.start_again().unwrap();
    wait("re-list after 410", Duration::from_secs(30), || {
        names(&reader) == want(&["a/one", "c/four"])
    });
    let reqs = server.requests();
    assert!(service_lists(&server) >= 2, "{reqs:?}");
    let ev = events.lock().unwrap().clone();
    assert!(
        ev.iter()
            .any(|e| e.starts_with("error") && e.contains("too old resource version")),
        "the watcher saw the 410: {ev:?}"
    );
    assert!(
        reqs.iter().any(|r| r.is_watch() && r.status == 200),
        "{reqs:?}"
    );

    // force_gone: the next resumed watch is refused with 410, the watcher re-lists.
    let lists = service_lists(&server);
    server.force_gone(1);
    server.stop();
    server.start_again().unwrap();
    wait("re-list after forced 410", Duration::from_secs(30), || {
        service_lists(&server) > lists
    });
    server.create(&r, svc("d", "five", "x")).unwrap();
    wait("events after the re-list", Duration::from_secs(10), || {
        names(&reader).contains("d/five")
    });
    task.abort();
}

#[test]
fn kubeapi_label_selector_watch() {
    let server = ApiServer::start().unwrap();
    let r = Res::services();
    server.create(&r, svc("a", "in", "x")).unwrap();
    server.create(&r, svc("a", "out", "y")).unwrap();
    let rt = runtime();
    let (reader, writer) = reflector::store::<Service>();
    let (client, _dir) = rt.block_on(client_from_kubeconfig(&server));
    let api: Api<Service> = Api::namespaced(client, "a");
    let task = rt.spawn(async move {
        let cfg = watcher::Config::default().labels("app=x");
        let stream = reflector(writer, watcher(api, cfg)).default_backoff();
        futures_util::pin_mut!(stream);
        while stream.next().await.is_some() {}
    });
    let want = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    wait("selected list", Duration::from_secs(10), || {
        names(&reader) == want(&["a/in"])
    });
    // Relabelling moves objects in and out of the selection (ADDED / DELETED).
    server
        .patch(
            &r,
            "a",
            "out",
            json!({"metadata": {"labels": {"app": "x"}}}),
        )
        .unwrap();
    server
        .patch(&r, "a", "in", json!({"metadata": {"labels": {"app": "y"}}}))
        .unwrap();
    wait("selection follows labels", Duration::from_secs(10), || {
        names(&reader) == want(&["a/out"])
    });
    let q: Vec<String> = server
        .requests()
        .iter()
        .filter(|r| r.path == "/api/v1/namespaces/a/services")
        .map(|r| r.query.clone())
        .collect();
    assert!(
        q.iter().all(|q| q.contains("labelSelector=app%3Dx")),
        "{q:?}"
    );
    task.abort();
}

/// Reads watch event lines from a raw HTTP/1.1 response (chunked) until `n` lines or EOF.
fn raw_watch(port: u16, path_and_query: &str, n: usize, timeout: Duration) -> Vec<Value> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    write!(
        s,
        "GET {path_and_query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut out = Vec::new();
    let mut line = String::new();
    while out.len() < n {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let t = line.trim();
        if t.starts_with('{') {
            out.push(serde_json::from_str(t).unwrap());
        }
    }
    out
}

#[test]
fn kubeapi_raw_watch_wire_format() {
    let server = ApiServer::start().unwrap();
    server.set_bookmark_interval(Duration::from_millis(200));
    let r = Res::sks();
    let a = server
        .create(&r, objects::sks("ns", "hello-00001", Mode::Proxy, 2))
        .unwrap();
    let rv: u64 = a["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    server
        .patch(&r, "ns", "hello-00001", json!({"spec": {"mode": "Serve"}}))
        .unwrap();
    let base = "/apis/networking.internal.knative.dev/v1alpha1";
    // From before the create: ADDED then MODIFIED, then bookmarks.
    let ev = raw_watch(
        server.port(),
        &format!(
            "{base}/serverlessservices?watch=true&resourceVersion={}&allowWatchBookmarks=true&timeoutSeconds=2",
            rv - 1
        ),
        3,
        Duration::from_secs(5),
    );
    assert_eq!(ev[0]["type"], "ADDED", "{ev:?}");
    assert_eq!(ev[0]["object"]["kind"], "ServerlessService");
    assert_eq!(ev[1]["type"], "MODIFIED");
    assert_eq!(ev[1]["object"]["spec"]["mode"], "Serve");
    assert_eq!(ev[2]["type"], "BOOKMARK");
    assert_eq!(
        ev[2]["object"]["metadata"]["resourceVersion"],
        server.resource_version().to_string()
    );
    // timeoutSeconds ends the stream.
    let t0 = Instant::now();
    let ev = raw_watch(
        server.port(),
        &format!(
            "{base}/namespaces/ns/serverlessservices?watch=1&resourceVersion={}&timeoutSeconds=1",
            server.resource_version()
        ),
        100,
        Duration::from_secs(5),
    );
    assert!(ev.is_empty(), "{ev:?}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    // Too old: one ERROR event with a 410 Status.
    server.expire_history();
    let ev = raw_watch(
        server.port(),
        &format!("{base}/serverlessservices?watch=true&resourceVersion={rv}"),
        2,
        Duration::from_secs(5),
    );
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["type"], "ERROR");
    assert_eq!(ev[0]["object"]["kind"], "Status");
    assert_eq!(ev[0]["object"]["code"], 410);
    assert_eq!(ev[0]["object"]["reason"], "Expired");
    // List of a namespaced custom resource: kind, apiVersion, metadata.resourceVersion.
    let mut s = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
    write!(
        s,
        "GET {base}/namespaces/ns/serverlessservices HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body).unwrap();
    let json_start = body.find('{').unwrap();
    let json_end = body.rfind('}').unwrap();
    let list: Value = serde_json::from_str(&body[json_start..=json_end]).unwrap();
    assert_eq!(list["kind"], "ServerlessServiceList");
    assert_eq!(
        list["apiVersion"],
        "networking.internal.knative.dev/v1alpha1"
    );
    assert_eq!(
        list["metadata"]["resourceVersion"],
        server.resource_version().to_string()
    );
    assert_eq!(list["items"][0]["spec"]["numActivators"], 2);
    // The EndpointSlice builder round-trips through the typed struct.
    let es = objects::private_slice("ns", "hello-00001", "a", &[Ep::ready([10, 1, 0, 5].into())]);
    let es = server.create(&Res::endpoint_slices(), es).unwrap();
    let typed: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(es).unwrap();
    assert_eq!(typed.endpoints[0].addresses, vec!["10.1.0.5".to_string()]);
}
