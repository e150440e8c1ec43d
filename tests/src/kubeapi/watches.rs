//! Watches of the test API server: the events after a resourceVersion from the store's
//! history (or the current state), then live ones as writes wake the watch; BOOKMARKs at
//! the configured interval; an `ERROR` event (or HTTP 410) for a too-old resourceVersion;
//! `sendInitialEvents` streaming lists; `timeoutSeconds`.
use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{
    http::{error_response, parse_rv, selectors, Body},
    store::Res,
    Shared,
};

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    b.into()
}

pub(super) fn watch_response(
    shared: &Arc<Shared>,
    res: &Res,
    ns: Option<&str>,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let sel = match selectors(q) {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let rv = match parse_rv(q) {
        Ok(rv) => rv,
        Err(e) => return error_response(&e),
    };
    let bookmarks = q.get("allowWatchBookmarks").map(|s| s.as_str()) == Some("true");
    let initial_events = q.get("sendInitialEvents").map(|s| s.as_str()) == Some("true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut changed = shared.changed.subscribe();
    changed.borrow_and_update();
    let (kind, start) = {
        let mut st = shared.store.lock().unwrap();
        let kind = match st.type_of(res) {
            Ok(t) => t.kind,
            Err(e) => return error_response(&e),
        };
        // sendInitialEvents: the current state first, then a bookmark marking its end.
        let start = if initial_events {
            st.watch_start(res, ns, &sel, None)
        } else {
            st.watch_start(res, ns, &sel, rv)
        };
        (kind, start)
    };
    let gone_as_http = *shared.gone_as_http.lock().unwrap();
    if matches!(&start, Err(e) if e.code == 410) {
        shared
            .gone
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let start = match start {
        Ok(s) => s,
        Err(e) if e.code == 410 && gone_as_http => return error_response(&e),
        Err(e) => {
            // The real API server answers 200 and sends one ERROR event with the Status.
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(line(&json!({"type": "ERROR", "object": e.status()})));
            return Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(Body::Stream(rx))
                .expect("response");
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let shared = shared.clone();
    let res = res.clone();
    let ns = ns.map(str::to_owned);
    let api_version = res.api_version();
    let bookmark = move |rv: u64, initial_end: bool| {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(&json!({"type": "BOOKMARK",
                     "object": {"kind": kind, "apiVersion": api_version, "metadata": meta}}))
    };
    shared
        .active_watches
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let guard = WatchGuard(shared.clone());
    tokio::spawn(async move {
        let _guard = guard;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        for e in start.initial {
            if tx.send(line(&e)).await.is_err() {
                return;
            }
        }
        let mut cursor = start.cursor;
        if initial_events && tx.send(bookmark(cursor, true)).await.is_err() {
            return;
        }
        let interval = *shared.bookmark_interval.lock().unwrap();
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let end = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(end);
        loop {
            tokio::select! {
                r = changed.changed() => {
                    if r.is_err() {
                        return;
                    }
                    changed.borrow_and_update();
                    let got = shared
                        .store
                        .lock()
                        .unwrap()
                        .events_since(&res, ns.as_deref(), &sel, cursor);
                    match got {
                        Ok((evs, c)) => {
                            cursor = c;
                            for e in evs {
                                if tx.send(line(&e)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let err = json!({"type": "ERROR", "object": e.status()});
                            let _ = tx.send(line(&err)).await;
                            return;
                        }
                    }
                }
                _ = ticks.tick(), if bookmarks => {
                    // Everything of this watch up to the store's version is sent first, so
                    // the bookmark may carry that version.
                    let got = shared
                        .store
                        .lock()
                        .unwrap()
                        .events_since(&res, ns.as_deref(), &sel, cursor);
                    if let Ok((evs, c)) = got {
                        for e in evs {
                            if tx.send(line(&e)).await.is_err() {
                                return;
                            }
                        }
                        cursor = c;
                        if tx.send(bookmark(cursor, false)).await.is_err() {
                            return;
                        }
                    }
                }
                _ = &mut end => return,
                _ = tx.closed() => return,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::Stream(rx))
        .expect("response")
}

struct WatchGuard(Arc<Shared>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0
            .active_watches
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
