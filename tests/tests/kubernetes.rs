//! The Kubernetes source (`redirector agent --kubernetes`, issue 4) against the test API
//! server (`redirector_tests::kubeapi`).
//!
//! - `kubeapi_*`: the test API server itself, driven by kube-rs's real client and watcher
//!   (no root needed): list + watch, label selectors, bookmarks, a restart with 410 Gone and
//!   the re-list that follows, the raw wire format of watch events.
//! - `agent_*`: the agent in a node namespace reading SKS, Services and EndpointSlices from
//!   the test API server (root; without it they fail with "needs root: ...").
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
    assert_eq!(server.gone_count(), 1, "{reqs:?}");
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

// ---------------------------------------------------------------------------------------
// The agent with `--kubernetes` (root).
// ---------------------------------------------------------------------------------------

mod agent_k8s {
    use std::{
        collections::BTreeSet,
        net::{IpAddr, SocketAddr},
        thread::JoinHandle,
        time::{Duration, Instant},
    };

    use redirector_tests::{
        coldstart::Resp,
        kubeapi::{
            autoscaler::Autoscaler,
            node::{AgentOpts, KubeNode, ACTIVATOR_PORT, NODE_IP},
            objects::{self, Ep, Mode, QUEUE_H2C_PORT, QUEUE_HTTPS_PORT, QUEUE_PORT},
            Res,
        },
        require_root,
    };
    use serde_json::{json, Value};

    /// Kubernetes namespace of the revisions.
    const NS: &str = "rt";
    const LONG: Duration = Duration::from_secs(30);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn strings(v: &Value) -> BTreeSet<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn set(items: &[String]) -> BTreeSet<String> {
        items.iter().cloned().collect()
    }

    /// `ip:port` as the status prints it.
    fn ep(ip: IpAddr, port: u16) -> String {
        SocketAddr::new(ip, port).to_string()
    }

    /// The status entry of `ns/name` at `vip:80`.
    fn entry(st: &Value, name: &str, vip: IpAddr) -> Option<Value> {
        let full = format!("{NS}/{name}");
        st["services"].as_array()?.iter().find_map(|s| {
            (s["name"] == full.as_str() && s["vip"] == vip.to_string().as_str() && s["port"] == 80)
                .then(|| s.clone())
        })
    }

    /// True when `name` at `vip` is in `mode` with exactly `backends` (Serve set).
    fn is(st: &Value, name: &str, vip: IpAddr, mode: &str, backends: &BTreeSet<String>) -> bool {
        entry(st, name, vip)
            .is_some_and(|e| e["mode"] == mode && strings(&e["backends"]) == *backends)
    }

    /// A revision: public Service (`vips`), private Service, SKS, private EndpointSlice "a".
    fn create_revision(k: &KubeNode, name: &str, vips: &[IpAddr], mode: Mode, eps: &[Ep]) {
        let api = &k.api;
        api.create(&Res::services(), objects::public_service(NS, name, vips))
            .unwrap();
        api.create(
            &Res::services(),
            objects::private_service(NS, name, &[ip("10.96.200.1")]),
        )
        .unwrap();
        api.create(
            &Res::endpoint_slices(),
            objects::private_slice(NS, name, "a", eps),
        )
        .unwrap();
        // As Knative does: the SKS, then its status through the status subresource.
        api.create_with_status(&Res::sks(), objects::sks(NS, name, mode, 0))
            .unwrap();
    }

    /// Knative's activator Service and one EndpointSlice of `eps`.
    fn create_knative_activator(k: &KubeNode, eps: &[Ep]) {
        k.api
            .create(
                &Res::services(),
                objects::activator_service(ip("10.96.100.1")),
            )
            .unwrap();
        k.api
            .create(&Res::endpoint_slices(), objects::activator_slice("x1", eps))
            .unwrap();
    }

    fn set_mode(k: &KubeNode, name: &str, mode: Mode) {
        k.api
            .patch(
                &Res::sks(),
                NS,
                name,
                json!({"spec": {"mode": mode.as_str()}}),
            )
            .unwrap();
    }

    fn set_endpoints(k: &KubeNode, name: &str, slice: &str, eps: &[Ep]) {
        k.api
            .apply(
                &Res::endpoint_slices(),
                objects::private_slice(NS, name, slice, eps),
            )
            .unwrap();
    }

    /// A request from the client pod on its own thread.
    fn request_in_background(k: &KubeNode, vip: SocketAddr) -> JoinHandle<anyhow::Result<Resp>> {
        let client = k.client.name.clone();
        std::thread::spawn(move || {
            redirector_tests::coldstart::net::get(&client, vip, "/", Duration::from_secs(60))
        })
    }

    /// Until the agent's `--autoscaler-url` lands (being wired as this is written), the cold
    /// start scenario prints why it did not run. Remove once it is on main.
    macro_rules! require_agent_option {
        ($flag:literal) => {
            let help = std::process::Command::new(redirector_tests::agent::redirector_bin())
                .args(["agent", "--help"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if !help.contains($flag) {
                eprintln!("skipped: the agent has no {} yet", $flag);
                return;
            }
        };
    }

    fn no_agent_errors(k: &KubeNode) {
        let log = k.log();
        assert!(
            !log.contains("panicked"),
            "the agent panicked:\n{}",
            redirector_tests::kubeapi::node::tail(&log, 60)
        );
    }

    #[test]
    fn agent_sks_proxy_then_serve_when_endpoints_ready() {
        require_root!();
        let mut k = KubeNode::new("ps").unwrap();
        let vip = ip("10.96.0.30");
        let rev = "hello-00001";
        create_revision(&k, rev, &[vip], Mode::Proxy, &[]);
        k.start_agent(&AgentOpts::default()).unwrap();
        let none = BTreeSet::new();
        let st = k
            .wait_status("the SKS in proxy", LONG, |s| {
                is(s, rev, vip, "proxy", &none)
            })
            .unwrap();
        let e = entry(&st, rev, vip).unwrap();
        // On the service's own port of the activator's address (`service_ports`, 20000 +
        // the service id), which sk_lookup hands to the listener on ACTIVATOR_PORT.
        let own_port = 20000 + e["id"].as_u64().unwrap() as u16;
        assert_eq!(
            e["activator"],
            ep(NODE_IP.into(), own_port).as_str(),
            "Proxy leads to the node-local activator (listening on {ACTIVATOR_PORT}): {e}"
        );

        // A request while no pod is ready: the node-local activator holds it.
        let held = request_in_background(&k, SocketAddr::new(vip, 80));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            !held.is_finished(),
            "the request must be held while no pod is ready"
        );

        // The pod comes up on the queue-proxy port, its endpoint turns ready, the SKS flips.
        let p = k.add_pod(20).unwrap();
        k.start_hello(p, QUEUE_PORT, &[]).unwrap();
        let pod_ip = k.pods[p].v4();
        set_endpoints(&k, rev, "a", &[Ep::ready(pod_ip)]);
        set_mode(&k, rev, Mode::Serve);
        let want = set(&[ep(pod_ip, QUEUE_PORT)]);
        k.wait_status("the SKS in serve with the pod", LONG, |s| {
            is(s, rev, vip, "serve", &want)
        })
        .unwrap();
        let r = held.join().unwrap().unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.body.contains(&pod_ip.to_string()), "{r:?}");

        // New requests go to the pod directly through the VIP.
        let before = entry(&k.status().unwrap(), rev, vip).unwrap()["proxied_flows"].clone();
        for _ in 0..5 {
            let r = k.get(SocketAddr::new(vip, 80), "/", LONG).unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            assert!(r.body.contains(&pod_ip.to_string()), "{r:?}");
        }
        let e = entry(&k.status().unwrap(), rev, vip).unwrap();
        assert_eq!(
            e["proxied_flows"], before,
            "warm requests are not proxied: {e}"
        );
        no_agent_errors(&k);
    }

    /// Like Knative's activator, the node-local one probes pods Kubernetes doesn't report
    /// ready yet (`K-Network-Probe: queue`) and forwards held requests as soon as one answers,
    /// before the endpoint turns ready or the SKS flips.
    #[test]
    fn agent_activator_probes_pending_pods_and_forwards_before_ready() {
        require_root!();
        let mut k = KubeNode::new("pp").unwrap();
        let vip = ip("10.96.0.34");
        let rev = "probe-00001";
        create_revision(&k, rev, &[vip], Mode::Proxy, &[]);
        k.start_agent(&AgentOpts::default()).unwrap();
        let none = BTreeSet::new();
        k.wait_status("the SKS in proxy", LONG, |s| {
            is(s, rev, vip, "proxy", &none)
        })
        .unwrap();
        let held = request_in_background(&k, SocketAddr::new(vip, 80));
        std::thread::sleep(Duration::from_millis(1000));
        assert!(!held.is_finished(), "held while no pod exists");

        // The pod runs and answers the queue probe, but Kubernetes still says not ready.
        let p = k.add_pod(24).unwrap();
        k.start_hello(p, QUEUE_PORT, &[]).unwrap();
        let pod_ip = k.pods[p].v4();
        set_endpoints(&k, rev, "a", &[Ep::not_ready(pod_ip)]);
        let r = held.join().unwrap().unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.body.contains(&pod_ip.to_string()), "{r:?}");
        // The maps never left Proxy: the activator found the pod by probing it.
        let st = k.status().unwrap();
        assert!(is(&st, rev, vip, "proxy", &none), "{st}");
        no_agent_errors(&k);
    }

    #[test]
    fn agent_num_activators_subset_with_knative_activator() {
        require_root!();
        let mut k = KubeNode::new("na").unwrap();
        let acts: Vec<IpAddr> = (1..=6).map(|i| ip(&format!("10.244.3.{i}"))).collect();
        let api = &k.api;
        let act_eps: Vec<Ep> = acts.iter().map(|a| Ep::ready(*a)).collect();
        create_knative_activator(&k, &act_eps);
        let vip = ip("10.96.0.31");
        let (r1, r2) = ("first-00001", "second-00001");
        create_revision(&k, r1, &[vip], Mode::Proxy, &[]);
        let vip2 = ip("10.96.0.32");
        create_revision(&k, r2, &[vip2], Mode::Proxy, &[]);
        api.patch(&Res::sks(), NS, r1, json!({"spec": {"numActivators": 2}}))
            .unwrap();
        api.patch(&Res::sks(), NS, r2, json!({"spec": {"numActivators": 3}}))
            .unwrap();
        k.start_agent(&AgentOpts {
            args: vec!["--activator".into(), "knative".into()],
            ..Default::default()
        })
        .unwrap();

        let names: Vec<String> = acts.iter().map(|a| a.to_string()).collect();
        let expect = |n: usize, target: &str| -> BTreeSet<String> {
            objects::choose_subset(&names, n, target)
                .into_iter()
                .map(|a| ep(ip(&a), QUEUE_PORT))
                .collect()
        };
        let pool = |s: &Value, name: &str, vip: IpAddr| {
            entry(s, name, vip).map(|e| strings(&e["proxy_pool"]))
        };
        let (w1, w2) = (expect(2, r1), expect(3, r2));
        assert_eq!((w1.len(), w2.len()), (2, 3));
        k.wait_status("the numActivators subsets", LONG, |s| {
            pool(s, r1, vip).as_ref() == Some(&w1) && pool(s, r2, vip2).as_ref() == Some(&w2)
        })
        .unwrap();

        // numActivators changes; 0 means all.
        k.api
            .patch(&Res::sks(), NS, r1, json!({"spec": {"numActivators": 4}}))
            .unwrap();
        k.api
            .patch(&Res::sks(), NS, r2, json!({"spec": {"numActivators": 0}}))
            .unwrap();
        let (w1, all) = (expect(4, r1), expect(0, r2));
        assert_eq!(all.len(), 6);
        k.wait_status("the new subsets", LONG, |s| {
            pool(s, r1, vip).as_ref() == Some(&w1) && pool(s, r2, vip2).as_ref() == Some(&all)
        })
        .unwrap();

        // An activator leaves (not ready) and a new one joins: the subset is recomputed over
        // the ready activators.
        let mut eps = act_eps.clone();
        eps[0] = Ep::not_ready(acts[0]);
        eps.push(Ep::ready(ip("10.244.3.7")));
        k.api
            .apply(
                &Res::endpoint_slices(),
                objects::activator_slice("x1", &eps),
            )
            .unwrap();
        let ready: Vec<String> = eps
            .iter()
            .filter(|e| e.ready)
            .map(|e| e.ip.to_string())
            .collect();
        let w1: BTreeSet<String> = objects::choose_subset(&ready, 4, r1)
            .into_iter()
            .map(|a| ep(ip(&a), QUEUE_PORT))
            .collect();
        k.wait_status("the subset over the ready activators", LONG, |s| {
            pool(s, r1, vip).as_ref() == Some(&w1)
        })
        .unwrap();
        no_agent_errors(&k);
    }

    /// SIGTERM: before its listener closes, the agent hands Proxy to Knative's activators
    /// (`knative-serving/activator-service`); while no agent runs, new Proxy connections reach
    /// Knative's activator instead of a closed port, and the next agent takes Proxy back.
    #[test]
    fn sigterm_hands_proxy_over_to_knatives_activator() {
        require_root!();
        let mut k = KubeNode::new("ho").unwrap();
        // Knative's activator stand-in: a pod answering on the activator's port.
        let p = k.add_pod(31).unwrap();
        k.start_hello(p, QUEUE_PORT, &[]).unwrap();
        let act = k.pods[p].v4();
        create_knative_activator(&k, &[Ep::ready(act)]);
        let vip = ip("10.96.0.37");
        let rev = "handover-00001";
        create_revision(&k, rev, &[vip], Mode::Proxy, &[]);
        k.start_agent(&AgentOpts::default()).unwrap();
        let node_act = |s: &Value| {
            entry(s, rev, vip).is_some_and(|e| {
                e["mode"] == "proxy"
                    && strings(&e["proxy_pool"]).is_empty()
                    && e["activator"]
                        .as_str()
                        .is_some_and(|a| a.starts_with(&NODE_IP.to_string()))
            })
        };
        k.wait_status("Proxy to the node-local activator", LONG, node_act)
            .unwrap();

        assert!(k.stop_agent(), "the agent exits on SIGTERM");
        assert!(
            k.log()
                .contains("Proxy handed over to Knative's activators"),
            "{}",
            redirector_tests::kubeapi::node::tail(&k.log(), 30)
        );
        let pool = strings(&entry(&k.status().unwrap(), rev, vip).unwrap()["proxy_pool"]);
        assert_eq!(pool, set(&[ep(act, QUEUE_PORT)]), "the pool is Knative's");
        // No agent: a new connection through the VIP reaches Knative's activator.
        for _ in 0..3 {
            let r = k.get(SocketAddr::new(vip, 80), "/", LONG).unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            assert!(r.body.contains(&act.to_string()), "{r:?}");
        }
        // The next agent takes Proxy back once it listens.
        k.start_agent(&AgentOpts::default()).unwrap();
        k.wait_status("Proxy back at the node-local activator", LONG, node_act)
            .unwrap();
        no_agent_errors(&k);
    }

    #[test]
    fn agent_dual_stack_public_service() {
        require_root!();
        let mut k = KubeNode::new("ds").unwrap();
        let (v4, v6) = (ip("10.96.0.33"), ip("fd00:96::33"));
        let rev = "dual-00001";
        let p = k.add_pod(21).unwrap();
        k.start_hello(p, QUEUE_PORT, &[]).unwrap();
        let (p4, p6) = (k.pods[p].v4(), k.pods[p].v6());
        create_revision(&k, rev, &[v4, v6], Mode::Serve, &[Ep::ready(p4)]);
        set_endpoints(&k, rev, "b", &[Ep::ready(p6)]);
        k.start_agent(&AgentOpts::default()).unwrap();
        let (w4, w6) = (set(&[ep(p4, QUEUE_PORT)]), set(&[ep(p6, QUEUE_PORT)]));
        k.wait_status("both VIPs in serve", LONG, |s| {
            is(s, rev, v4, "serve", &w4) && is(s, rev, v6, "serve", &w6)
        })
        .unwrap();
        for vip in [v4, v6] {
            let r = k.get(SocketAddr::new(vip, 80), "/", LONG).unwrap();
            assert_eq!(r.status, 200, "via {vip}: {r:?}");
        }
        // Proxy: both VIPs lead to the node-local activator of their family.
        set_mode(&k, rev, Mode::Proxy);
        let st = k
            .wait_status("both VIPs in proxy", LONG, |s| {
                [v4, v6]
                    .iter()
                    .all(|v| entry(s, rev, *v).is_some_and(|e| e["mode"] == "proxy"))
            })
            .unwrap();
        let a6 = entry(&st, rev, v6).unwrap()["activator"].clone();
        assert!(
            a6.as_str().is_some_and(|a| a.starts_with('[')),
            "the v6 VIP's activator is the node's v6 activator: {a6}"
        );
        no_agent_errors(&k);
    }

    #[test]
    fn agent_endpoint_churn_leaves_no_stale_entries() {
        require_root!();
        let mut k = KubeNode::new("ch").unwrap();
        let vip = ip("10.96.0.34");
        let rev = "churn-00001";
        let pods: Vec<IpAddr> = (1..=6).map(|i| ip(&format!("10.244.4.{i}"))).collect();
        create_revision(
            &k,
            rev,
            &[vip],
            Mode::Serve,
            &[Ep::ready(pods[0]), Ep::ready(pods[1])],
        );
        // A second revision that must stay untouched.
        let other_vip = ip("10.96.0.35");
        create_revision(
            &k,
            "other-00001",
            &[other_vip],
            Mode::Serve,
            &[Ep::ready(pods[5])],
        );
        k.start_agent(&AgentOpts::default()).unwrap();
        let eps = |ids: &[usize]| -> BTreeSet<String> {
            ids.iter().map(|&i| ep(pods[i], QUEUE_PORT)).collect()
        };
        let other = eps(&[5]);
        let check = |k: &KubeNode, what: &str, want: BTreeSet<String>| {
            k.wait_status(what, LONG, |s| {
                is(s, rev, vip, "serve", &want) && is(s, "other-00001", other_vip, "serve", &other)
            })
            .unwrap();
        };
        check(&k, "initial endpoints", eps(&[0, 1]));
        set_endpoints(
            &k,
            rev,
            "a",
            &[Ep::ready(pods[0]), Ep::ready(pods[1]), Ep::ready(pods[2])],
        );
        check(&k, "one added", eps(&[0, 1, 2]));
        set_endpoints(&k, rev, "a", &[Ep::ready(pods[1]), Ep::ready(pods[2])]);
        check(&k, "one removed", eps(&[1, 2]));
        set_endpoints(&k, rev, "a", &[Ep::not_ready(pods[1]), Ep::ready(pods[2])]);
        check(&k, "one not ready", eps(&[2]));
        set_endpoints(
            &k,
            rev,
            "a",
            &[Ep::terminating(pods[1]), Ep::ready(pods[2])],
        );
        check(&k, "terminating is not a backend", eps(&[2]));
        set_endpoints(&k, rev, "b", &[Ep::ready(pods[3]), Ep::ready(pods[4])]);
        check(&k, "a second slice", eps(&[2, 3, 4]));
        k.api
            .delete(
                &Res::endpoint_slices(),
                NS,
                &format!("{}-a", objects::private_name(rev)),
            )
            .unwrap();
        check(&k, "first slice deleted", eps(&[3, 4]));
        // Rapid churn: the final state wins.
        for i in 0..20 {
            let n = i % 3;
            let set: Vec<Ep> = (0..=n).map(|j| Ep::ready(pods[j])).collect();
            set_endpoints(&k, rev, "b", &set);
        }
        check(&k, "after rapid churn", eps(&[0, 1]));
        // No ready endpoints in Serve: the service stays programmed (falls back to the
        // activator in the datapath), no backends.
        set_endpoints(&k, rev, "b", &[]);
        k.wait_status("no backends", LONG, |s| {
            entry(s, rev, vip).is_some_and(|e| strings(&e["backends"]).is_empty())
        })
        .unwrap();
        // Deleting the revision's objects removes its entries; the other stays.
        k.api.delete(&Res::sks(), NS, rev).unwrap();
        k.api.delete(&Res::services(), NS, rev).unwrap();
        k.wait_status("entries removed", LONG, |s| {
            entry(s, rev, vip).is_none() && is(s, "other-00001", other_vip, "serve", &other)
        })
        .unwrap();
        let st = k.status().unwrap();
        let stale: Vec<&Value> = st["services"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["name"] != "rt/other-00001")
            .collect();
        assert!(stale.is_empty(), "stale entries: {stale:?}");
        no_agent_errors(&k);
    }

    /// A list that keeps failing (403: RBAC without the grant) is retried with a backoff
    /// that grows to seconds, not every ~200 ms forever, and the log says so once per outage.
    #[test]
    fn forbidden_list_backs_off_to_seconds_and_logs_once() {
        require_root!();
        let mut k = KubeNode::new("bo").unwrap();
        k.api.set_forbidden("endpointslices", true);
        k.start_agent_unready(&AgentOpts::default()).unwrap();
        let t0 = std::time::Instant::now();
        std::thread::sleep(Duration::from_secs(8));
        let tries = k
            .api
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/endpointslices") && r.status == 403)
            .count();
        let secs = t0.elapsed().as_secs_f64();
        // 0.2 + 0.4 + 0.8 + 1.6 + 3.2 + 5 s …: about 6 tries in 8 s (the bug: ~40).
        assert!(
            (2..=10).contains(&tries),
            "{tries} list attempts in {secs:.1} s: {:?}",
            k.api.requests()
        );
        let log = k.log();
        let warned = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("endpointslices"))
            .count();
        assert_eq!(warned, 1, "one warning per outage:\n{log}");
        // Not ready before the first full sync; alive all along.
        assert_eq!(
            (
                k.agent_probe("/readyz").unwrap(),
                k.agent_probe("/healthz").unwrap()
            ),
            (503, 200),
            "readiness waits for the first full sync, liveness does not"
        );
        // Granted again: the agent lists and resumes, and is ready.
        k.api.set_forbidden("endpointslices", false);
        redirector_tests::netns::wait_for("the list succeeds", LONG, || {
            k.log().contains("kubernetes watch resumed").then_some(())
        })
        .unwrap();
        redirector_tests::netns::wait_for("ready after the first sync", LONG, || {
            (k.agent_probe("/readyz").ok() == Some(200)).then_some(())
        })
        .unwrap();
        no_agent_errors(&k);
    }

    #[test]
    fn agent_api_server_restart_keeps_maps_then_relists_after_gone() {
        require_root!();
        let mut k = KubeNode::new("rs").unwrap();
        let vip = ip("10.96.0.36");
        let rev = "restart-00001";
        let pods: Vec<IpAddr> = (1..=3).map(|i| ip(&format!("10.244.5.{i}"))).collect();
        create_revision(
            &k,
            rev,
            &[vip],
            Mode::Serve,
            &[Ep::ready(pods[0]), Ep::ready(pods[1])],
        );
        k.start_agent(&AgentOpts::default()).unwrap();
        let want = set(&[ep(pods[0], QUEUE_PORT), ep(pods[1], QUEUE_PORT)]);
        let before = k
            .wait_status("programmed", LONG, |s| is(s, rev, vip, "serve", &want))
            .unwrap();
        redirector_tests::netns::wait_for(
            "the agent's watches of SKS, Services and EndpointSlices",
            LONG,
            || (k.api.active_watches() >= 3).then_some(()),
        )
        .unwrap();
        let lists_before = list_count(&k);

        // The API server goes away mid-watch: nothing is flushed.
        k.api.stop();
        std::thread::sleep(Duration::from_secs(4));
        let during = k.status().unwrap();
        assert_eq!(
            entry(&during, rev, vip),
            entry(&before, rev, vip).map(|mut e| {
                // Counters may move; the programmed state may not.
                for c in [
                    "packets",
                    "bytes",
                    "reply_packets",
                    "reply_bytes",
                    "new_flows",
                    "proxied_flows",
                ] {
                    e[c] = entry(&during, rev, vip).unwrap()[c].clone();
                }
                e
            }),
            "the maps must stay as they were while the API server is down"
        );
        assert!(
            k.agent_alive(),
            "the agent survives the API server going away"
        );

        // Meanwhile the cluster changed; the server comes back with its history compacted
        // (410 Gone for every old resourceVersion): the agent re-lists and converges.
        k.api
            .apply(
                &Res::endpoint_slices(),
                objects::private_slice(NS, rev, "a", &[Ep::ready(pods[2])]),
            )
            .unwrap();
        let vip2 = ip("10.96.0.37");
        create_revision(&k, "late-00001", &[vip2], Mode::Proxy, &[]);
        k.api.restart_with_gone().unwrap();
        let want = set(&[ep(pods[2], QUEUE_PORT)]);
        k.wait_status(
            "converged after the restart",
            Duration::from_secs(60),
            |s| {
                is(s, rev, vip, "serve", &want)
                    && is(s, "late-00001", vip2, "proxy", &BTreeSet::new())
            },
        )
        .unwrap();
        assert!(list_count(&k) > lists_before, "the agent re-listed");
        assert!(
            k.api.gone_count() >= 1,
            "the agent's resumed watches got 410 Gone: {:?}",
            k.api.requests()
        );

        // And it keeps following.
        set_mode(&k, rev, Mode::Proxy);
        k.wait_status("events after the re-list", LONG, |s| {
            entry(s, rev, vip).is_some_and(|e| e["mode"] == "proxy")
        })
        .unwrap();
        no_agent_errors(&k);
    }

    fn list_count(k: &KubeNode) -> usize {
        k.api
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && !r.is_watch() && r.status == 200)
            .filter(|r| {
                ["/serverlessservices", "/services", "/endpointslices"]
                    .iter()
                    .any(|p| r.path.ends_with(p))
            })
            .count()
    }

    /// Extra agent options that point the stat reporter at the test autoscaler.
    fn autoscaler_opts(url: &str) -> AgentOpts {
        AgentOpts {
            args: vec!["--autoscaler-url".into(), url.into()],
            ..Default::default()
        }
    }

    #[test]
    fn agent_cold_start_in_the_cluster_path() {
        require_root!();
        require_agent_option!("--autoscaler-url");
        let mut k = KubeNode::new("cs").unwrap();
        let autoscaler = Autoscaler::start_in(Some(&k.node.name)).unwrap();
        let vip = ip("10.96.0.38");
        let rev = "cold-00001";
        create_revision(&k, rev, &[vip], Mode::Proxy, &[]);
        let p = k.add_pod(22).unwrap();
        k.start_agent(&autoscaler_opts(&autoscaler.url())).unwrap();
        k.wait_status("proxy at zero", LONG, |s| {
            is(s, rev, vip, "proxy", &BTreeSet::new())
        })
        .unwrap();

        let t0 = Instant::now();
        let held = request_in_background(&k, SocketAddr::new(vip, 80));
        // Knative's activator tells the autoscaler at once: a stat for the revision.
        let m = autoscaler
            .wait_for(Duration::from_secs(15), |m| {
                m.namespace == NS && m.name == rev && m.has_stat
            })
            .unwrap();
        assert!(
            m.average_concurrent_requests >= 1.0 || m.request_count >= 1.0,
            "the wake stat carries the held request: {m:?}"
        );
        let woke = t0.elapsed();
        assert!(!held.is_finished(), "held until a pod is ready");

        // The test plays Knative's controllers: the pod starts, its endpoint turns ready,
        // the SKS flips to Serve.
        k.start_hello(p, QUEUE_PORT, &[]).unwrap();
        let pod_ip = k.pods[p].v4();
        set_endpoints(&k, rev, "a", &[Ep::ready(pod_ip)]);
        set_mode(&k, rev, Mode::Serve);
        let r = held.join().unwrap().unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            r.body.contains(&pod_ip.to_string()),
            "answered by the pod: {r:?}"
        );
        eprintln!(
            "cold start: stat after {woke:?}, answered after {:?}; {} stat messages on {} \
             connections",
            t0.elapsed(),
            autoscaler.messages().len(),
            autoscaler.connections()
        );
        assert!(autoscaler.errors().is_empty(), "{:?}", autoscaler.errors());
        let want = set(&[ep(pod_ip, QUEUE_PORT)]);
        k.wait_status("serve", LONG, |s| is(s, rev, vip, "serve", &want))
            .unwrap();
        no_agent_errors(&k);
    }

    /// A Knative Revision object for revision `name` in [`NS`].
    fn create_revision_object(k: &KubeNode, name: &str, spec: Value) {
        k.api
            .create(
                &Res::new("serving.knative.dev", "v1", "revisions"),
                objects::revision(NS, name, spec),
            )
            .unwrap();
    }

    /// `GET path` from the client pod on its own thread.
    fn get_in_background(
        k: &KubeNode,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> JoinHandle<anyhow::Result<Resp>> {
        let (client, path) = (k.client.name.clone(), path.to_owned());
        std::thread::spawn(move || {
            redirector_tests::coldstart::net::get(&client, addr, &path, timeout)
        })
    }

    /// Waits until the agent applied the Revision's settings (they may trail the SKS).
    fn wait_settings(k: &KubeNode, rev: &str) {
        let want = format!("revision={NS}/{rev}");
        redirector_tests::netns::wait_for("the Revision's settings applied", LONG, || {
            k.log()
                .lines()
                .any(|l| l.contains("the Revision's settings applied") && l.contains(&want))
                .then_some(())
        })
        .unwrap();
    }

    /// containerConcurrency 1 from the Revision: a cold burst of 50 is held, then reaches the
    /// one pod one request at a time, as Knative's throttler does: 50 × 200, never two in
    /// flight on the pod (queue-proxy would answer 503 beyond 10 × containerConcurrency).
    #[test]
    fn revision_container_concurrency_one_cold_burst() {
        require_root!();
        let mut k = KubeNode::new("cc").unwrap();
        let vip = ip("10.96.0.38");
        let rev = "cc-00001";
        create_revision_object(&k, rev, json!({"containerConcurrency": 1}));
        create_revision(&k, rev, &[vip], Mode::Proxy, &[]);
        k.start_agent(&AgentOpts::default()).unwrap();
        k.wait_status("the SKS in proxy", LONG, |s| {
            is(s, rev, vip, "proxy", &BTreeSet::new())
        })
        .unwrap();
        wait_settings(&k, rev);
        let burst: Vec<_> = (0..50)
            .map(|_| {
                get_in_background(
                    &k,
                    SocketAddr::new(vip, 80),
                    "/sleep?ms=20",
                    Duration::from_secs(60),
                )
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1000));
        assert!(burst.iter().all(|h| !h.is_finished()), "held while no pod");
        let p = k.add_pod(33).unwrap();
        k.start_hello(p, QUEUE_PORT, &[]).unwrap();
        let pod_ip = k.pods[p].v4();
        set_endpoints(&k, rev, "a", &[Ep::ready(pod_ip)]);
        let statuses: Vec<u16> = burst
            .into_iter()
            .map(|h| h.join().unwrap().map(|r| r.status).unwrap_or(0))
            .collect();
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        let r = k
            .get(SocketAddr::new(pod_ip, QUEUE_PORT), "/max-in-flight", LONG)
            .unwrap();
        assert_eq!(r.body.trim(), "1", "requests in flight at once on the pod");
        no_agent_errors(&k);
    }

    /// A startup probe gates the revision's readiness: no request is forwarded on a
    /// successful network probe, only once Kubernetes reports the endpoint ready.
    #[test]
    fn revision_startup_probe_waits_for_the_ready_endpoint() {
        require_root!();
        let mut k = KubeNode::new("sp").unwrap();
        let vip = ip("10.96.0.39");
        let rev = "sp-00001";
        create_revision_object(
            &k,
            rev,
            json!({"containers": [{"name": "user-container", "image": "example.com/hello",
                                   "startupProbe": {"tcpSocket": {"port": 8080}}}]}),
        );
        create_revision(&k, rev, &[vip], Mode::Proxy, &[]);
        k.start_agent(&AgentOpts::default()).unwrap();
        k.wait_status("the SKS in proxy", LONG, |s| {
            is(s, rev, vip, "proxy", &BTreeSet::new())
        })
        .unwrap();
        wait_settings(&k, rev);
        // The pod answers the queue probe, but Kubernetes does not report it ready yet.
        let p = k.add_pod(34).unwrap();
        k.start_hello(p, QUEUE_PORT, &[]).unwrap();
        let pod_ip = k.pods[p].v4();
        set_endpoints(&k, rev, "a", &[Ep::not_ready(pod_ip)]);
        let held = request_in_background(&k, SocketAddr::new(vip, 80));
        std::thread::sleep(Duration::from_millis(2500));
        assert!(
            !held.is_finished(),
            "forwarded before the endpoint was ready: {:?}",
            held.join()
        );
        set_endpoints(&k, rev, "a", &[Ep::ready(pod_ip)]);
        let r = held.join().unwrap().unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.body.contains(&pod_ip.to_string()), "{r:?}");
        no_agent_errors(&k);
    }

    /// timeoutSeconds bounds the wait for a pod (answered 503, as Knative's activator does)
    /// and responseStartTimeoutSeconds the wait for the pod's response to start (504).
    #[test]
    fn revision_timeouts_are_applied() {
        require_root!();
        let mut k = KubeNode::new("to").unwrap();
        let vip = ip("10.96.0.40");
        let rev = "to-00001";
        create_revision_object(
            &k,
            rev,
            json!({"timeoutSeconds": 3, "responseStartTimeoutSeconds": 1}),
        );
        create_revision(&k, rev, &[vip], Mode::Proxy, &[]);
        k.start_agent(&AgentOpts::default()).unwrap();
        k.wait_status("the SKS in proxy", LONG, |s| {
            is(s, rev, vip, "proxy", &BTreeSet::new())
        })
        .unwrap();
        wait_settings(&k, rev);
        // No pod: the queue times out after timeoutSeconds (the default would hold 300 s,
        // past this client's 20 s).
        let svc = SocketAddr::new(vip, 80);
        let r = k.get(svc, "/", Duration::from_secs(20)).unwrap();
        assert_eq!(r.status, 503, "{r:?}");
        // A pod whose response starts after 2 s: past responseStartTimeoutSeconds.
        let p = k.add_pod(35).unwrap();
        k.start_hello(p, QUEUE_PORT, &[]).unwrap();
        set_endpoints(&k, rev, "a", &[Ep::ready(k.pods[p].v4())]);
        let r = k
            .get(svc, "/sleep?ms=2000", Duration::from_secs(20))
            .unwrap();
        assert_eq!(r.status, 504, "{r:?}");
        let r = k
            .get(svc, "/sleep?ms=100", Duration::from_secs(20))
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        no_agent_errors(&k);
    }

    /// The status entry of `name` keyed by `addr` (a pod's or an activator's address).
    fn entry_at(st: &Value, name: &str, addr: SocketAddr) -> Option<Value> {
        st["services"].as_array()?.iter().find_map(|s| {
            (s["name"] == name
                && s["vip"] == addr.ip().to_string().as_str()
                && s["port"] == addr.port())
            .then(|| s.clone())
        })
    }

    /// One request on a kept-alive connection; the response read by its Content-Length.
    fn keepalive_get(s: &mut std::net::TcpStream, headers: &[(&str, &str)]) -> Resp {
        use std::io::{Read, Write};
        let mut req = "GET / HTTP/1.1\r\nHost: x\r\n".to_owned();
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.set_read_timeout(Some(LONG)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).expect("reading the response");
            assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&raw).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if raw.len() >= end + 4 + len {
                    return redirector_tests::coldstart::net::parse(&raw).unwrap();
                }
            }
        }
    }

    /// Knative's ingress sends to the pods (Serve) or to Knative's activators (Proxy), never
    /// to the VIP: redirector switches those destinations with the same map write. While
    /// the revision is proxied, a new connection to its pod's address goes to the node-local
    /// activator, while one made before the flip keeps going to the pod; a connection to
    /// Knative's activator is served by the node-local activator, which finds the revision
    /// by the ingress's headers, and Knative's activator gets nothing.
    #[test]
    fn ingress_destinations_follow_the_map() {
        require_root!();
        let mut k = KubeNode::new("ig").unwrap();
        let a = k.add_pod(36).unwrap();
        k.start_hello(a, QUEUE_PORT, &[]).unwrap();
        let act = SocketAddr::new(k.pods[a].v4(), QUEUE_PORT);
        create_knative_activator(&k, &[Ep::ready(act.ip())]);
        let vip = ip("10.96.0.41");
        let rev = "ig-00001";
        let p = k.add_pod(37).unwrap();
        k.start_hello(p, QUEUE_PORT, &[]).unwrap();
        let pod = SocketAddr::new(k.pods[p].v4(), QUEUE_PORT);
        create_revision(&k, rev, &[vip], Mode::Serve, &[Ep::ready(pod.ip())]);
        k.start_agent(&AgentOpts::default()).unwrap();
        let name = format!("{NS}/{rev}");
        k.wait_status("serve", LONG, |s| {
            is(s, rev, vip, "serve", &set(&[ep(pod.ip(), QUEUE_PORT)]))
        })
        .unwrap();
        let client = k.client.name.clone();
        let headers = [
            ("Knative-Serving-Revision", rev),
            ("Knative-Serving-Namespace", NS),
        ];
        let get = |to: SocketAddr| {
            redirector_tests::coldstart::net::http(&client, to, "GET", "/", &headers, LONG).unwrap()
        };
        let from_pod = |r: &Resp| r.status == 200 && r.body.contains(&pod.ip().to_string());

        // Serve: the pod's address is the pod's.
        assert!(from_pod(&get(pod)));
        assert!(entry_at(&k.status().unwrap(), &name, pod).is_none());
        let mut kept = redirector_tests::coldstart::net::connect(&client, pod, LONG).unwrap();
        assert!(from_pod(&keepalive_get(&mut kept, &headers)));

        // Proxy in redirector's view (Knative's public endpoints would still say the pod).
        set_mode(&k, rev, Mode::Proxy);
        let st = k
            .wait_status("the pod's address proxied", LONG, |s| {
                entry_at(s, &name, pod).is_some_and(|e| e["mode"] == "proxy")
            })
            .unwrap();
        let before = entry_at(&st, &name, pod).unwrap()["proxied_flows"]
            .as_u64()
            .unwrap_or(0);
        // The connection made before the flip keeps its target.
        assert!(from_pod(&keepalive_get(&mut kept, &headers)));
        drop(kept);
        // New ones go through the node-local activator (which forwards to the ready pod).
        for _ in 0..3 {
            assert!(from_pod(&get(pod)));
        }
        let after = entry_at(&k.status().unwrap(), &name, pod).unwrap()["proxied_flows"]
            .as_u64()
            .unwrap_or(0);
        assert!(after >= before + 3, "proxied flows {before} → {after}");
        // Knative's activator's address: the node-local activator answers, by the headers.
        for _ in 0..3 {
            let r = get(act);
            assert!(from_pod(&r), "{r:?}");
        }
        // Serve again: the pod's address is left alone.
        set_mode(&k, rev, Mode::Serve);
        k.wait_status("the pod's address not proxied", LONG, |s| {
            entry_at(s, &name, pod).is_none()
        })
        .unwrap();
        assert!(from_pod(&get(pod)));
        no_agent_errors(&k);
    }

    /// Rolling restarts of the agent under Proxy and Serve load: zero failed requests. On
    /// SIGTERM the agent hands Proxy to Knative's activators before its listener closes
    /// (its held and in-flight requests drain), and the next agent takes it back.
    #[test]
    fn rolling_restart_under_proxy_and_serve_load_fails_nothing() {
        use std::sync::{
            atomic::{AtomicBool, Ordering},
            Arc, Mutex,
        };
        require_root!();
        let mut k = KubeNode::new("rr").unwrap();
        let a = k.add_pod(38).unwrap();
        k.start_hello(a, QUEUE_PORT, &[]).unwrap();
        let act = k.pods[a].v4();
        create_knative_activator(&k, &[Ep::ready(act)]);
        let p = k.add_pod(39).unwrap();
        k.start_hello(p, QUEUE_PORT, &[]).unwrap();
        let pod = k.pods[p].v4();
        let (proxied, served) = (ip("10.96.0.42"), ip("10.96.0.43"));
        create_revision(&k, "rrp-00001", &[proxied], Mode::Proxy, &[Ep::ready(pod)]);
        create_revision(&k, "rrs-00001", &[served], Mode::Serve, &[Ep::ready(pod)]);
        k.start_agent(&AgentOpts::default()).unwrap();
        let want = set(&[ep(pod, QUEUE_PORT)]);
        k.wait_status("both revisions", LONG, |s| {
            is(s, "rrp-00001", proxied, "proxy", &want)
                && is(s, "rrs-00001", served, "serve", &want)
        })
        .unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::<String>::new()));
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let loops: Vec<_> = [proxied, served, proxied]
            .into_iter()
            .map(|vip| {
                let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
                let client = k.client.name.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let to = SocketAddr::new(vip, 80);
                        match redirector_tests::coldstart::net::get(&client, to, "/", LONG) {
                            Ok(r) if r.status == 200 => {}
                            Ok(r) => failures.lock().unwrap().push(format!("{vip}: {r:?}")),
                            Err(e) => failures.lock().unwrap().push(format!("{vip}: {e:#}")),
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            })
            .collect();
        for round in 0..3 {
            std::thread::sleep(Duration::from_millis(700));
            assert!(k.stop_agent(), "round {round}: the agent exits on SIGTERM");
            std::thread::sleep(Duration::from_millis(700));
            k.start_agent(&AgentOpts::default()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(700));
        stop.store(true, Ordering::Relaxed);
        for l in loops {
            l.join().unwrap();
        }
        let failures = failures.lock().unwrap();
        let n = done.load(Ordering::Relaxed);
        assert!(n > 100, "only {n} requests");
        assert!(
            failures.is_empty(),
            "{} of {n} failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(10)]
        );
        let log = k.log();
        assert_eq!(
            log.matches("Proxy handed over to Knative's activators")
                .count(),
            3,
            "every stop hands over"
        );
        no_agent_errors(&k);
    }

    /// The public `https` port (443 → 8112) is never sent to the node-local activator's
    /// plaintext listener: in Serve it reaches the pods' 8112, in Proxy it passes through to
    /// Knative's activators' 8112 (which terminate TLS); `http` keeps going to the node-local
    /// activator. (Plain HTTP stands in for TLS on 8112: what is tested is where it goes.)
    #[test]
    fn https_public_port_in_serve_and_proxy() {
        require_root!();
        let mut k = KubeNode::new("tl").unwrap();
        let a = k.add_pod(40).unwrap();
        k.start_hello(a, QUEUE_HTTPS_PORT, &[]).unwrap();
        let act = k.pods[a].v4();
        create_knative_activator(&k, &[Ep::ready(act)]);
        let p = k.add_pod(41).unwrap();
        k.start_hello(p, QUEUE_PORT, &[]).unwrap();
        let pod = k.pods[p].v4();
        // The pod's TLS port, a second listener in the pod.
        let mut tls = k.pods[p]
            .ns
            .command(
                redirector_tests::kubeapi::node::hello_bin()
                    .to_str()
                    .unwrap(),
            )
            .env("PORT", QUEUE_HTTPS_PORT.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let vip = ip("10.96.0.44");
        let rev = "tls-00001";
        create_revision(&k, rev, &[vip], Mode::Serve, &[Ep::ready(pod)]);
        k.start_agent(&AgentOpts::default()).unwrap();
        let at = |port: u16| SocketAddr::new(vip, port);
        let https = |s: &Value| {
            s["services"].as_array().and_then(|a| {
                a.iter()
                    .find(|e| e["vip"] == vip.to_string().as_str() && e["port"] == 443)
                    .cloned()
            })
        };
        k.wait_status("443 to the pod's 8112", LONG, |s| {
            https(s).is_some_and(|e| strings(&e["backends"]) == set(&[ep(pod, QUEUE_HTTPS_PORT)]))
        })
        .unwrap();
        let from = |r: &Resp, who: IpAddr| r.status == 200 && r.body.contains(&who.to_string());
        redirector_tests::netns::wait_for("443 answered by the pod", LONG, || {
            k.get(at(443), "/", LONG).ok().filter(|r| from(r, pod))
        })
        .unwrap();

        set_mode(&k, rev, Mode::Proxy);
        k.wait_status("443 to Knative's activator", LONG, |s| {
            https(s).is_some_and(|e| {
                e["mode"] == "proxy"
                    && strings(&e["proxy_pool"]) == set(&[ep(act, QUEUE_HTTPS_PORT)])
            })
        })
        .unwrap();
        for _ in 0..3 {
            let r = k.get(at(443), "/", LONG).unwrap();
            assert!(from(&r, act), "https in Proxy: {r:?}");
            // http still goes to the node-local activator, which forwards to the ready pod.
            let r = k.get(at(80), "/", LONG).unwrap();
            assert!(from(&r, pod), "http in Proxy: {r:?}");
        }
        let _ = tls.kill();
        let _ = tls.wait();
        no_agent_errors(&k);
    }

    /// An h2c revision (SKS `protocolType: h2c`, public `http2` 81 → 8013): gRPC over h2c
    /// through the VIP in Serve (to the pod) and in Proxy (the node-local activator speaks
    /// h2c to the pod), trailers included.
    #[test]
    fn h2c_public_port_in_serve_and_proxy() {
        require_root!();
        let mut k = KubeNode::new("hc").unwrap();
        let p = k.add_pod(42).unwrap();
        let pod = k.pods[p].v4();
        let mut server = k.pods[p]
            .ns
            .command(env!("CARGO_BIN_EXE_rt-h2"))
            .env("PORT", QUEUE_H2C_PORT.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let vip = ip("10.96.0.45");
        let rev = "grpc-00001";
        let h2c_ports = |mut svc: Value, target: bool| {
            svc["spec"]["ports"] = if target {
                json!([{"name": "http2", "protocol": "TCP", "port": 81, "targetPort": QUEUE_H2C_PORT}])
            } else {
                json!([{"name": "http2", "protocol": "TCP", "port": 80, "targetPort": QUEUE_H2C_PORT}])
            };
            svc
        };
        let api = &k.api;
        api.create(
            &Res::services(),
            h2c_ports(objects::public_service(NS, rev, &[vip]), true),
        )
        .unwrap();
        api.create(
            &Res::services(),
            h2c_ports(
                objects::private_service(NS, rev, &[ip("10.96.200.2")]),
                false,
            ),
        )
        .unwrap();
        api.create(
            &Res::endpoint_slices(),
            objects::endpoint_slice(
                NS,
                &format!("{rev}-private"),
                &format!("{rev}-private-a"),
                &[Ep::ready(pod)],
                &[("http2", QUEUE_H2C_PORT)],
            ),
        )
        .unwrap();
        let mut sks = objects::sks(NS, rev, Mode::Serve, 0);
        sks["spec"]["protocolType"] = json!("h2c");
        api.create_with_status(&Res::sks(), sks).unwrap();
        k.start_agent(&AgentOpts::default()).unwrap();
        let at81 = |s: &Value| {
            s["services"].as_array().and_then(|a| {
                a.iter()
                    .find(|e| e["vip"] == vip.to_string().as_str() && e["port"] == 81)
                    .cloned()
            })
        };
        k.wait_status("81 to the pod's 8013", LONG, |s| {
            at81(s).is_some_and(|e| strings(&e["backends"]) == set(&[ep(pod, QUEUE_H2C_PORT)]))
        })
        .unwrap();
        let call = || {
            let r = redirector_tests::coldstart::net::grpc_call(
                &k.client.name,
                SocketAddr::new(vip, 81),
                "/echo.Echo/Say",
                b"ping",
                LONG,
            )
            .unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.body, b"ping", "{r:?}");
            let grpc = r.trailers.as_ref().and_then(|t| t.get("grpc-status"));
            assert_eq!(grpc.map(|v| v.as_bytes()), Some(&b"0"[..]), "{r:?}");
        };
        call();
        set_mode(&k, rev, Mode::Proxy);
        let st = k
            .wait_status("81 proxied", LONG, |s| {
                at81(s).is_some_and(|e| e["mode"] == "proxy")
            })
            .unwrap();
        let before = at81(&st).unwrap()["proxied_flows"].as_u64().unwrap_or(0);
        for _ in 0..3 {
            call();
        }
        let after = at81(&k.status().unwrap()).unwrap()["proxied_flows"]
            .as_u64()
            .unwrap_or(0);
        assert!(after >= before + 3, "proxied flows {before} → {after}");
        let _ = server.kill();
        let _ = server.wait();
        no_agent_errors(&k);
    }

    /// Knative's activator's h2c port (`http2`, 8013): what Knative's ingress sends an h2c or
    /// gRPC revision's requests to in Proxy, with `Knative-Serving-Revision` / `-Namespace`.
    /// Without the agent the call reaches Knative's activator (a stand-in speaking h2c that
    /// counts what it gets); with it, new connections to that address are served by the
    /// node-local activator, which finds the revision by the headers and forwards h2c to
    /// the pod (the gRPC echo answers), and nothing more reaches Knative's activator.
    #[test]
    fn h2c_to_knatives_activator_is_served_by_the_node_local_activator() {
        use redirector_tests::{coldstart::net::grpc_call_with, ingress::backend::Backend};
        require_root!();
        let mut k = KubeNode::new("hk").unwrap();
        let a = k.add_pod(44).unwrap();
        let act_ip = k.pods[a].v4();
        let knative = Backend::start_h2c(&k.pods[a].ns.name, act_ip, QUEUE_H2C_PORT).unwrap();
        let act = SocketAddr::new(act_ip, QUEUE_H2C_PORT);
        create_knative_activator(&k, &[Ep::ready(act_ip)]);
        let p = k.add_pod(45).unwrap();
        let pod = k.pods[p].v4();
        let mut server = k.pods[p]
            .ns
            .command(env!("CARGO_BIN_EXE_rt-h2"))
            .env("PORT", QUEUE_H2C_PORT.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let vip = ip("10.96.0.47");
        let rev = "grpc-00002";
        let h2c_ports = |mut svc: Value, port: u16| {
            svc["spec"]["ports"] = json!([
                {"name": "http2", "protocol": "TCP", "port": port, "targetPort": QUEUE_H2C_PORT}
            ]);
            svc
        };
        let api = &k.api;
        api.create(
            &Res::services(),
            h2c_ports(objects::public_service(NS, rev, &[vip]), 81),
        )
        .unwrap();
        api.create(
            &Res::services(),
            h2c_ports(objects::private_service(NS, rev, &[ip("10.96.200.3")]), 80),
        )
        .unwrap();
        api.create(
            &Res::endpoint_slices(),
            objects::endpoint_slice(
                NS,
                &format!("{rev}-private"),
                &format!("{rev}-private-a"),
                &[Ep::ready(pod)],
                &[("http2", QUEUE_H2C_PORT)],
            ),
        )
        .unwrap();
        let mut sks = objects::sks(NS, rev, Mode::Proxy, 0);
        sks["spec"]["protocolType"] = json!("h2c");
        api.create_with_status(&Res::sks(), sks).unwrap();
        let headers = [
            ("Knative-Serving-Revision", rev),
            ("Knative-Serving-Namespace", NS),
        ];
        let client = k.client.name.clone();
        let call = || grpc_call_with(&client, act, "/echo.Echo/Say", b"ping", &headers, LONG);

        // No agent: Knative's activator (the stand-in) answers, and counts it.
        let r = call().unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            format!("hello from {act_ip}\n"),
            "{r:?}"
        );
        assert_eq!(knative.requests(), 1);
        let hit = knative.hits().pop().unwrap();
        assert_eq!(
            (hit.revision.as_deref(), hit.namespace.as_deref()),
            (Some(rev), Some(NS))
        );

        k.start_agent(&AgentOpts::default()).unwrap();
        let name = format!("{}/{}", objects::KNATIVE_NS, objects::ACTIVATOR_SERVICE);
        let st = k
            .wait_status("Knative's activator's 8013 shared", LONG, |s| {
                entry_at(s, &name, act).is_some_and(|e| e["mode"] == "proxy")
                    && s["services"].as_array().is_some_and(|a| {
                        a.iter().any(|e| {
                            e["vip"] == vip.to_string().as_str()
                                && e["port"] == 81
                                && e["mode"] == "proxy"
                        })
                    })
            })
            .unwrap();
        let flows = |st: &Value| {
            entry_at(st, &name, act).map_or(0, |e| e["proxied_flows"].as_u64().unwrap_or(0))
        };
        let before = flows(&st);
        for _ in 0..3 {
            let r = call().unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.body, b"ping", "the pod's gRPC echo: {r:?}");
            let grpc = r.trailers.as_ref().and_then(|t| t.get("grpc-status"));
            assert_eq!(grpc.map(|v| v.as_bytes()), Some(&b"0"[..]), "{r:?}");
        }
        let after = flows(&k.status().unwrap());
        assert!(after >= before + 3, "proxied flows {before} → {after}");
        assert_eq!(
            knative.requests(),
            1,
            "Knative's activator got h2c requests with the agent running"
        );
        let _ = server.kill();
        let _ = server.wait();
        no_agent_errors(&k);
    }

    /// idleTimeoutSeconds: a response that pauses longer between bytes is cut, on the hold
    /// path (a cold request) and on the warm path alike; one that pauses less arrives whole.
    #[test]
    fn revision_idle_timeout_cuts_a_stalled_response() {
        require_root!();
        let mut k = KubeNode::new("it").unwrap();
        let vip = ip("10.96.0.46");
        let rev = "idle-00001";
        create_revision_object(&k, rev, json!({"idleTimeoutSeconds": 1}));
        create_revision(&k, rev, &[vip], Mode::Proxy, &[]);
        k.start_agent(&AgentOpts::default()).unwrap();
        k.wait_status("the SKS in proxy", LONG, |s| {
            is(s, rev, vip, "proxy", &BTreeSet::new())
        })
        .unwrap();
        wait_settings(&k, rev);
        let svc = SocketAddr::new(vip, 80);
        let whole = "drip-one drip-two\n";
        // Cold: held, then forwarded by the hold path.
        let held = get_in_background(&k, svc, "/drip?ms=2500", LONG);
        let p = k.add_pod(43).unwrap();
        k.start_hello(p, QUEUE_PORT, &[]).unwrap();
        set_endpoints(&k, rev, "a", &[Ep::ready(k.pods[p].v4())]);
        let cut = |r: anyhow::Result<Resp>| r.map_or(true, |r| !r.body.contains("drip-two"));
        assert!(
            cut(held.join().unwrap()),
            "a stalled cold response was not cut"
        );
        // Warm.
        let r = k.get(svc, "/drip?ms=2500", LONG);
        assert!(cut(r), "a stalled warm response was not cut");
        let r = k.get(svc, "/drip?ms=100", LONG).unwrap();
        assert_eq!(r.body, whole, "{r:?}");
        no_agent_errors(&k);
    }
}
