//! The test API server answers like a real kube-apiserver (issue 14): 404 with a `NotFound`
//! `Status` for resources, groups and versions it does not serve; discovery of exactly the
//! served resources, Knative's SKS and Revision read from their real CRD files; the status
//! subresource; pruning and type checks by the CRD schema. No root needed.
use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResourceList;
use kube::{
    api::{DynamicObject, Patch, PatchParams, PostParams, WatchParams},
    core::{ApiResource, GroupVersionKind},
    discovery::{Discovery, Scope},
    Api, Client,
};
use redirector_tests::kubeapi::{objects, objects::Mode, ApiServer, Res};
use serde_json::{json, Value};

/// One HTTP/1.1 request (body JSON); the status code and the body as JSON.
fn raw(server: &ApiServer, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, mut rest) = resp.split_once("\r\n\r\n").unwrap();
    let code: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut payload = String::new();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        loop {
            let (size, tail) = rest.split_once("\r\n").unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            payload.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
    } else {
        payload.push_str(rest);
    }
    let v = serde_json::from_str(payload.lines().next().unwrap_or("null")).unwrap_or(Value::Null);
    (code, v)
}

fn assert_not_found(what: &str, (code, body): (u16, Value)) {
    assert_eq!(code, 404, "{what}: {body}");
    assert_eq!(body["kind"], "Status", "{what}: {body}");
    assert_eq!(body["apiVersion"], "v1", "{what}: {body}");
    assert_eq!(body["status"], "Failure", "{what}: {body}");
    assert_eq!(body["reason"], "NotFound", "{what}: {body}");
    assert_eq!(body["code"], 404, "{what}: {body}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn client(server: &ApiServer) -> Client {
    let cfg = kube::Config::new(server.url().parse().unwrap());
    Client::try_from(cfg).unwrap()
}

fn sks_api(client: &Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(
        "networking.internal.knative.dev",
        "v1alpha1",
        "ServerlessService",
    );
    let ar = ApiResource::from_gvk_with_plural(&gvk, "serverlessservices");
    Api::namespaced_with(client.clone(), "ns", &ar)
}

#[test]
fn kubeapi_unknown_resources_groups_and_versions_answer_404() {
    let server = ApiServer::start().unwrap();
    let obj = json!({"metadata": {"name": "x"}, "spec": {}});
    for base in [
        // An unknown core resource, an unknown group, a version the SKS CRD does not serve.
        "/api/v1/namespaces/ns/widgets",
        "/apis/example.com/v1/namespaces/ns/widgets",
        "/apis/networking.internal.knative.dev/v1beta1/namespaces/ns/serverlessservices",
        "/apis/serving.knative.dev/v1alpha1/namespaces/ns/revisions",
    ] {
        assert_not_found(base, raw(&server, "GET", base, None));
        let watch = format!("{base}?watch=true&resourceVersion=0");
        assert_not_found(&watch, raw(&server, "GET", &watch, None));
        assert_not_found(base, raw(&server, "POST", base, Some(&obj)));
        let one = format!("{base}/x");
        assert_not_found(&one, raw(&server, "GET", &one, None));
        assert_not_found(&one, raw(&server, "PUT", &one, Some(&obj)));
        assert_not_found(&one, raw(&server, "PATCH", &one, Some(&obj)));
        assert_not_found(&one, raw(&server, "DELETE", &one, None));
    }
    // Nothing got registered by those requests: discovery does not know them either.
    for path in [
        "/api/v2",
        "/apis/example.com",
        "/apis/example.com/v1",
        "/apis/networking.internal.knative.dev/v1beta1",
    ] {
        assert_not_found(path, raw(&server, "GET", path, None));
    }
    // A namespace's status is the namespaces resource's subresource.
    server
        .create(
            &Res::core("namespaces"),
            json!({"metadata": {"name": "ns"}}),
        )
        .unwrap();
    let (code, got) = raw(&server, "GET", "/api/v1/namespaces/ns/status", None);
    assert_eq!((code, &got["kind"]), (200, &json!("Namespace")), "{got}");
    let (code, v1) = raw(&server, "GET", "/api/v1", None);
    assert_eq!(code, 200);
    assert!(!v1.to_string().contains("widgets"), "{v1}");
    // No status subresource on EndpointSlices, no scale subresource on the SKS.
    server
        .create(
            &Res::endpoint_slices(),
            objects::private_slice("ns", "r", "a", &[]),
        )
        .unwrap();
    let es = "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices/r-private-a/status";
    assert_not_found(es, raw(&server, "GET", es, None));
    assert_not_found(es, raw(&server, "PUT", es, Some(&obj)));
    server
        .create(&Res::sks(), objects::sks("ns", "r", Mode::Proxy, 0))
        .unwrap();
    let scale =
        "/apis/networking.internal.knative.dev/v1alpha1/namespaces/ns/serverlessservices/r/scale";
    assert_not_found(scale, raw(&server, "GET", scale, None));

    // kube's client sees an API error with the Status' code and reason.
    runtime().block_on(async {
        let gvk = GroupVersionKind::gvk(
            "networking.internal.knative.dev",
            "v1beta1",
            "ServerlessService",
        );
        let ar = ApiResource::from_gvk_with_plural(&gvk, "serverlessservices");
        let api: Api<DynamicObject> = Api::namespaced_with(client(&server), "ns", &ar);
        let e = api.list(&Default::default()).await.unwrap_err();
        assert!(
            matches!(&e, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"),
            "{e:?}"
        );
        let e = api.get("r").await.unwrap_err();
        assert!(matches!(&e, kube::Error::Api(s) if s.code == 404), "{e:?}");
        let e = api.watch(&WatchParams::default(), "0").await.err().unwrap();
        assert!(matches!(&e, kube::Error::Api(s) if s.code == 404), "{e:?}");
    });
}

/// `(name, kind, namespaced, verbs)` of an APIResourceList.
fn resources(list: &APIResourceList) -> Vec<(String, String, bool, Vec<String>)> {
    list.resources
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                r.kind.clone(),
                r.namespaced,
                r.verbs.clone(),
            )
        })
        .collect()
}

#[test]
fn kubeapi_discovery_serves_knatives_crds_from_their_files() {
    let server = ApiServer::start().unwrap();
    runtime().block_on(async {
        let c = client(&server);
        let groups = c.list_api_groups().await.unwrap();
        let knative: Vec<_> = groups
            .groups
            .iter()
            .filter(|g| g.name.contains("knative"))
            .map(|g| {
                let versions: Vec<_> = g.versions.iter().map(|v| v.version.clone()).collect();
                let preferred = g.preferred_version.as_ref().unwrap().version.clone();
                (g.name.clone(), versions, preferred)
            })
            .collect();
        let v = |s: &str| s.to_string();
        assert_eq!(
            knative,
            vec![
                (
                    v("networking.internal.knative.dev"),
                    vec![v("v1alpha1")],
                    v("v1alpha1")
                ),
                (v("serving.knative.dev"), vec![v("v1")], v("v1")),
            ]
        );
        let all = vec![
            v("create"),
            v("delete"),
            v("get"),
            v("list"),
            v("patch"),
            v("update"),
            v("watch"),
        ];
        let status = vec![v("get"), v("patch"), v("update")];
        let sks = c
            .list_api_group_resources("networking.internal.knative.dev/v1alpha1")
            .await
            .unwrap();
        assert_eq!(
            resources(&sks),
            vec![
                (
                    v("serverlessservices"),
                    v("ServerlessService"),
                    true,
                    all.clone()
                ),
                (
                    v("serverlessservices/status"),
                    v("ServerlessService"),
                    true,
                    status.clone()
                ),
            ]
        );
        assert_eq!(sks.resources[0].short_names, Some(vec![v("sks")]));
        let rev = c
            .list_api_group_resources("serving.knative.dev/v1")
            .await
            .unwrap();
        assert_eq!(
            resources(&rev),
            vec![
                (v("revisions"), v("Revision"), true, all.clone()),
                (v("revisions/status"), v("Revision"), true, status),
            ]
        );
        // Core v1 lists exactly the built-ins (and their status subresources).
        let core = c.list_core_api_resources("v1").await.unwrap();
        let names: Vec<_> = core.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "configmaps",
                "endpoints",
                "events",
                "namespaces",
                "namespaces/status",
                "nodes",
                "nodes/status",
                "pods",
                "pods/status",
                "services",
                "services/status",
            ]
        );
        // kube's full discovery resolves the Revision with its scope and status.
        let d = Discovery::new(c.clone()).run().await.unwrap();
        let (ar, caps) = d
            .resolve_gvk(&GroupVersionKind::gvk(
                "serving.knative.dev",
                "v1",
                "Revision",
            ))
            .unwrap();
        assert_eq!(ar.plural, "revisions");
        assert_eq!(caps.scope, Scope::Namespaced);
        assert!(caps.supports_operation("watch"));
        assert_eq!(caps.subresources.len(), 1, "{caps:?}");
        assert_eq!(caps.subresources[0].0.plural, "status");
        assert!(d.get("coordination.k8s.io").is_some());
    });
}

#[test]
fn kubeapi_status_subresource_of_the_sks() {
    let server = ApiServer::start().unwrap();
    runtime().block_on(async {
        let api = sks_api(&client(&server));
        let full = objects::sks("ns", "r", Mode::Proxy, 2);
        let obj: DynamicObject = serde_json::from_value(full.clone()).unwrap();
        // A create drops the status (Knative writes it through /status).
        let created = api.create(&PostParams::default(), &obj).await.unwrap();
        assert!(created.data.get("status").is_none(), "{created:?}");
        // PUT /status changes only the status.
        let mut body = full.clone();
        body["spec"]["mode"] = json!("Serve");
        let body: DynamicObject = serde_json::from_value(body).unwrap();
        let got = api
            .replace_status("r", &PostParams::default(), &body)
            .await
            .unwrap();
        assert_eq!(got.data["spec"]["mode"], "Proxy");
        assert_eq!(got.data["status"]["privateServiceName"], "r-private");
        // A merge patch of the main resource ignores the status.
        let got = api
            .patch(
                "r",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"mode": "Serve"},
                                     "status": {"serviceName": "other"}})),
            )
            .await
            .unwrap();
        assert_eq!(got.data["spec"]["mode"], "Serve");
        assert_eq!(got.data["status"]["serviceName"], "r");
        // PATCH /status changes only the status.
        let got = api
            .patch_status(
                "r",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"mode": "Proxy"},
                                     "status": {"serviceName": "other"}})),
            )
            .await
            .unwrap();
        assert_eq!(got.data["spec"]["mode"], "Serve");
        assert_eq!(got.data["status"]["serviceName"], "other");
        // PUT of the main resource keeps the stored status.
        let mut body = serde_json::to_value(&got).unwrap();
        body["status"] = json!({"serviceName": "third"});
        body["spec"]["numActivators"] = json!(3);
        let body: DynamicObject = serde_json::from_value(body).unwrap();
        let got = api
            .replace("r", &PostParams::default(), &body)
            .await
            .unwrap();
        assert_eq!(got.data["spec"]["numActivators"], 3);
        assert_eq!(got.data["status"]["serviceName"], "other");
    });
    let stored = server.get(&Res::sks(), "ns", "r").unwrap();
    assert_eq!(stored["status"]["serviceName"], "other");
    // The test's own controller path: create, then the status through /status.
    let got = server
        .create_with_status(&Res::sks(), objects::sks("ns", "q", Mode::Serve, 1))
        .unwrap();
    assert_eq!(got["status"]["privateServiceName"], "q-private");
    assert_eq!(got["spec"]["mode"], "Serve");
    assert_eq!(got["metadata"]["generation"], 1);
}

#[test]
fn kubeapi_prunes_unknown_fields_and_rejects_wrong_types() {
    let server = ApiServer::start().unwrap();
    let base = "/apis/networking.internal.knative.dev/v1alpha1/namespaces/ns/serverlessservices";
    let mut sks = objects::sks("ns", "p", Mode::Proxy, 1);
    sks["spec"]["bogus"] = json!("dropped");
    sks["spec"]["objectRef"]["alsoBogus"] = json!(1);
    sks["topLevel"] = json!(true);
    let (code, got) = raw(&server, "POST", base, Some(&sks));
    assert_eq!(code, 201, "{got}");
    assert!(got["spec"].get("bogus").is_none(), "{got}");
    assert!(got["spec"]["objectRef"].get("alsoBogus").is_none(), "{got}");
    assert!(got.get("topLevel").is_none(), "{got}");
    assert_eq!(got["spec"]["numActivators"], 1);
    let stored = server.get(&Res::sks(), "ns", "p").unwrap();
    assert!(stored["spec"].get("bogus").is_none(), "{stored}");
    // A spec of the wrong type, a field of the wrong type, a missing required field: 422.
    for (name, spec, field) in [
        ("w1", json!("Proxy"), "spec"),
        (
            "w2",
            json!({"objectRef": {}, "protocolType": "http1", "numActivators": "two"}),
            "spec.numActivators",
        ),
        ("w3", json!({"protocolType": "http1"}), "spec.objectRef"),
    ] {
        let obj = json!({"metadata": {"name": name}, "spec": spec});
        let (code, st) = raw(&server, "POST", base, Some(&obj));
        assert_eq!(code, 422, "{st}");
        assert_eq!(st["kind"], "Status");
        assert_eq!(st["reason"], "Invalid");
        assert_eq!(st["details"]["causes"][0]["field"], field, "{st}");
        assert!(server.get(&Res::sks(), "ns", name).is_none());
    }
    // The Revision's schema keeps fields under x-kubernetes-preserve-unknown-fields.
    let rev = json!({"metadata": {"name": "rev", "namespace": "ns"},
        "spec": {"containers": [{"image": "x", "madeUp": 1}],
                 "affinity": {"anything": {"goes": true}}}});
    let got = server.create(&Res::revisions(), rev).unwrap();
    assert_eq!(got["spec"]["affinity"]["anything"]["goes"], true, "{got}");
    assert!(
        got["spec"]["containers"][0].get("madeUp").is_none(),
        "{got}"
    );
    assert_eq!(got["spec"]["containers"][0]["image"], "x");
    // A /status write is checked on what is stored: the spec in its body does not count.
    let body = json!({"metadata": {"name": "p"}, "spec": "ignored",
                      "status": {"serviceName": "p", "bogus": 1}});
    let (code, got) = raw(&server, "PUT", &format!("{base}/p/status"), Some(&body));
    assert_eq!(code, 200, "{got}");
    assert_eq!(got["status"]["serviceName"], "p");
    assert!(got["status"].get("bogus").is_none(), "{got}");
    assert_eq!(got["spec"]["numActivators"], 1);
    let body = json!({"metadata": {"name": "p"}, "status": {"observedGeneration": "x"}});
    let (code, st) = raw(&server, "PUT", &format!("{base}/p/status"), Some(&body));
    assert_eq!(code, 422, "{st}");
    assert_eq!(
        st["details"]["causes"][0]["field"],
        "status.observedGeneration"
    );
}

#[test]
fn kubeapi_fails_without_the_crd_files() {
    const DIR: &str = "/nonexistent/knative-crds";
    if std::env::var("KNATIVE_CRD_DIR").as_deref() == Ok(DIR) {
        // The child: KNATIVE_CRD_DIR names a directory without the files.
        let err = ApiServer::start().err().expect("the server must not start");
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!("{DIR}/serverlessservice-crd.yaml"))
                && msg.contains("KNATIVE_CRD_DIR"),
            "{msg}"
        );
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "kubeapi_fails_without_the_crd_files"])
        .env("KNATIVE_CRD_DIR", DIR)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("1 passed"), "{stdout}");
    // And the default (or the given) directory has them.
    ApiServer::start().unwrap();
}
