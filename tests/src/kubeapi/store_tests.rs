//! Unit tests of the store: list, watch, 410 Gone, paging, history, status subresource.
use super::*;

fn svc(ns: &str, name: &str, app: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
           "spec": {"ports": [{"port": 80}]}})
}

#[test]
fn list_watch_and_gone() {
    let mut s = Store::new().unwrap();
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
    let mut s = Store::new().unwrap();
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
}

#[test]
fn unknown_resources_are_not_served() {
    let mut s = Store::new().unwrap();
    let sel = Selectors::default();
    for r in [
        Res::core("widgets"),
        Res::new("example.com", "v1", "widgets"),
        Res::new(
            "networking.internal.knative.dev",
            "v1beta1",
            "serverlessservices",
        ),
    ] {
        assert_eq!(s.list(&r, None, &sel, None, None).unwrap_err().code, 404);
        assert_eq!(s.watch_start(&r, None, &sel, None).err().unwrap().code, 404);
        let e = s.create(&r, "a", svc("a", "x", "y")).unwrap_err();
        assert_eq!((e.code, e.reason), (404, "NotFound"));
        assert!(s.get(&r, "a", "x").is_none());
    }
}

#[test]
fn status_subresource() {
    let mut s = Store::new().unwrap();
    let r = Res::sks();
    let sks = |mode: &str, svc: &str| {
        json!({"metadata": {"name": "x", "namespace": "a"},
               "spec": {"mode": mode, "objectRef": {"name": "d"}, "protocolType": "http1"},
               "status": {"serviceName": svc}})
    };
    // Create drops the status, the main resource keeps the stored one.
    let o = s.create(&r, "", sks("Proxy", "one")).unwrap();
    assert!(o.get("status").is_none(), "{o}");
    let o = s.update_status(&r, "", sks("Serve", "two")).unwrap();
    assert_eq!(o["spec"]["mode"], "Proxy");
    assert_eq!(o["status"]["serviceName"], "two");
    let o = s.update(&r, "", sks("Serve", "three")).unwrap();
    assert_eq!(o["spec"]["mode"], "Serve");
    assert_eq!(o["status"]["serviceName"], "two");
    let o = s
        .patch(&r, "a", "x", &json!({"status": {"serviceName": "four"}}))
        .unwrap();
    assert_eq!(o["status"]["serviceName"], "two");
    let o = s
        .patch_status(
            &r,
            "a",
            "x",
            &json!({"spec": {"mode": "Proxy"}, "status": {"serviceName": "five"}}),
        )
        .unwrap();
    assert_eq!(o["spec"]["mode"], "Serve");
    assert_eq!(o["status"]["serviceName"], "five");
    // No status subresource: 404.
    let es = Res::endpoint_slices();
    s.create(&es, "a", json!({"metadata": {"name": "e"}}))
        .unwrap();
    let e = s
        .update_status(&es, "a", json!({"metadata": {"name": "e"}}))
        .unwrap_err();
    assert_eq!(e.code, 404);
}
