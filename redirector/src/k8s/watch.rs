//! Reflector stores for SKS (all namespaces), Services, EndpointSlices and Knative Revisions,
//! fed by kube-rs watchers, and a coordinator that publishes a [`Snapshot`] of them on every
//! change (debounced by [`DEBOUNCE`]) once the first three have finished their initial list.
//! Revisions only carry per-revision settings: they never hold the first snapshot back (a
//! cluster without the Revision CRD, or RBAC without it, still gets its maps programmed,
//! with Knative's default settings).
//!
//! Failure behaviour: a store changes only on watch events, and a re-list swaps its content
//! in one step when the list is complete (kube's reflector buffers `Init`..`InitDone`). So
//! while the API server is unreachable, or a watch is broken, nothing is published and the
//! agent keeps what it programmed last; nothing is ever published before every store has
//! been listed once. kube's watcher re-lists when a watch reports 410 Gone (an `ERROR`
//! event with code 410); a watch request answered with HTTP 410 would make it retry the same
//! resourceVersion forever, so that case restarts the watcher here (a fresh list).
use std::{fmt::Debug, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    runtime::{
        reflector::{store::Writer, Store},
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::{mapping::Snapshot, revision::Revision, sks::ServerlessService};

/// How long a change waits for more before the snapshot is published.
pub const DEBOUNCE: Duration = Duration::from_millis(20);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The latest published snapshot (`None` until every store has been listed).
pub type SnapshotRx = watch::Receiver<Option<Arc<Snapshot>>>;
pub type SnapshotTx = watch::Sender<Option<Arc<Snapshot>>>;

/// A channel to publish snapshots on: the watcher's, or a test's.
pub fn channel() -> (SnapshotTx, SnapshotRx) {
    watch::channel(None)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sks = 0,
    Services = 1,
    Slices = 2,
    Revisions = 3,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Sks => "serverlessservices",
            Kind::Services => "services",
            Kind::Slices => "endpointslices",
            Kind::Revisions => "revisions",
        }
    }
}

/// A store changed; `listed` when it finished a (re-)list.
#[derive(Debug)]
struct Changed {
    kind: Kind,
    listed: bool,
}

/// The running watches. Dropping it stops them.
pub struct ClusterWatch {
    pub snapshots: SnapshotRx,
    tasks: Vec<JoinHandle<()>>,
}

impl ClusterWatch {
    /// Snapshots from somewhere else (a test's channel); no watches.
    pub fn from_receiver(snapshots: SnapshotRx) -> Self {
        Self {
            snapshots,
            tasks: Vec::new(),
        }
    }
}

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts watching every namespace with `client`.
pub fn start(client: Client) -> ClusterWatch {
    let (tx, rx) = channel();
    let (ch_tx, ch_rx) = mpsc::unbounded_channel();
    let sks = Writer::<ServerlessService>::default();
    let svc = Writer::<Service>::default();
    let eps = Writer::<EndpointSlice>::default();
    let revs = Writer::<Revision>::default();
    let stores = Stores {
        sks: sks.as_reader(),
        services: svc.as_reader(),
        slices: eps.as_reader(),
        revisions: revs.as_reader(),
    };
    let tasks = vec![
        tokio::spawn(run_resource(
            Api::all(client.clone()),
            sks,
            Kind::Sks,
            ch_tx.clone(),
        )),
        tokio::spawn(run_resource(
            Api::all(client.clone()),
            svc,
            Kind::Services,
            ch_tx.clone(),
        )),
        tokio::spawn(run_resource(
            Api::all(client.clone()),
            eps,
            Kind::Slices,
            ch_tx.clone(),
        )),
        tokio::spawn(run_resource(Api::all(client), revs, Kind::Revisions, ch_tx)),
        tokio::spawn(coordinate(ch_rx, stores, tx)),
    ];
    ClusterWatch {
        snapshots: rx,
        tasks,
    }
}

struct Stores {
    sks: Store<ServerlessService>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    revisions: Store<Revision>,
}

impl Stores {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            sks: self.sks.state(),
            services: self.services.state(),
            slices: self.slices.state(),
            revisions: self.revisions.state(),
        }
    }
}

/// Publishes a snapshot at most every [`DEBOUNCE`] while changes come in, and only once
/// every store has been listed.
async fn coordinate(mut rx: mpsc::UnboundedReceiver<Changed>, stores: Stores, tx: SnapshotTx) {
    // Revisions (the last kind) are not waited for.
    let mut listed = [false; 4];
    let mut announced = false;
    while let Some(c) = rx.recv().await {
        listed[c.kind as usize] |= c.listed;
        let deadline = tokio::time::sleep(DEBOUNCE);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                more = rx.recv() => match more {
                    Some(c) => listed[c.kind as usize] |= c.listed,
                    None => return,
                },
                _ = &mut deadline => break,
            }
        }
        if !listed[..Kind::Revisions as usize].iter().all(|l| *l) {
            continue;
        }
        let snap = stores.snapshot();
        if !announced {
            announced = true;
            tracing::info!(
                sks = snap.sks.len(),
                services = snap.services.len(),
                endpointslices = snap.slices.len(),
                "kubernetes: initial list complete"
            );
        }
        if tx.send(Some(Arc::new(snap))).is_err() {
            return;
        }
    }
}

struct Backoff(Duration);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        d
    }
    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
}

/// An HTTP 410 to the watch request itself (kube's watcher would retry the same version).
fn gone_at_start(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 410)
}

/// Keeps one store in sync with the API server, forever.
async fn run_resource<K>(
    api: Api<K>,
    mut writer: Writer<K>,
    kind: Kind,
    tx: mpsc::UnboundedSender<Changed>,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut backoff = Backoff(BACKOFF_MIN);
    let mut failing = false;
    loop {
        let stream = watcher(api.clone(), watcher::Config::default()).modify(|o| {
            o.meta_mut().managed_fields = None;
        });
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    if failing {
                        tracing::debug!(resource = kind.name(), error = %e, "kubernetes watch still failing");
                    } else {
                        failing = true;
                        tracing::warn!(resource = kind.name(), error = %e, "kubernetes watch failed; keeping the programmed state, retrying");
                    }
                    tokio::time::sleep(backoff.next()).await;
                    if gone_at_start(&e) {
                        break; // a fresh watcher lists again
                    }
                    continue;
                }
            };
            // `Init` comes before every list attempt, a failing one included: only what
            // the server answered proves it works again.
            if !matches!(ev, Event::Init) {
                backoff.reset();
            }
            if failing && !matches!(ev, Event::Init | Event::InitApply(_)) {
                failing = false;
                tracing::info!(resource = kind.name(), "kubernetes watch resumed");
            }
            writer.apply_watcher_event(&ev);
            let listed = match ev {
                Event::Init => {
                    tracing::debug!(resource = kind.name(), "kubernetes: listing");
                    continue;
                }
                Event::InitApply(_) => continue,
                Event::InitDone => true,
                Event::Apply(_) | Event::Delete(_) => false,
            };
            if tx.send(Changed { kind, listed }).is_err() {
                return;
            }
        }
    }
}

fn watcher<K>(
    api: Api<K>,
    cfg: watcher::Config,
) -> impl futures::Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    watcher::watcher(api, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sks(name: &str) -> ServerlessService {
        let mut s = ServerlessService::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("ns".into());
        s
    }

    /// Nothing is published until SKS, Services and EndpointSlices have been listed (the
    /// Revisions are not waited for); then every change is, and a broken watch (no events)
    /// publishes nothing.
    #[tokio::test]
    async fn publishes_only_after_every_initial_list() {
        let mut sks_w = Writer::<ServerlessService>::default();
        let mut svc_w = Writer::<Service>::default();
        let mut eps_w = Writer::<EndpointSlice>::default();
        // Revisions are never listed here: they must not hold the snapshot back.
        let rev_w = Writer::<Revision>::default();
        let stores = Stores {
            sks: sks_w.as_reader(),
            services: svc_w.as_reader(),
            slices: eps_w.as_reader(),
            revisions: rev_w.as_reader(),
        };
        let (tx, mut rx) = channel();
        let (ch_tx, ch_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(coordinate(ch_rx, stores, tx));
        let listed = |kind| Changed { kind, listed: true };

        for ev in [Event::Init, Event::InitApply(sks("a")), Event::InitDone] {
            sks_w.apply_watcher_event(&ev);
        }
        ch_tx.send(listed(Kind::Sks)).unwrap();
        for ev in [Event::Init, Event::InitDone] {
            svc_w.apply_watcher_event(&ev);
        }
        ch_tx.send(listed(Kind::Services)).unwrap();
        tokio::time::sleep(DEBOUNCE * 3).await;
        assert!(
            rx.borrow().is_none(),
            "published before the slices were listed"
        );

        for ev in [Event::Init, Event::InitDone] {
            eps_w.apply_watcher_event(&ev);
        }
        ch_tx.send(listed(Kind::Slices)).unwrap();
        tokio::time::timeout(Duration::from_secs(2), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().sks.len(), 1);

        // A burst of changes within the debounce window: one snapshot with all of them.
        for n in ["b", "c", "d"] {
            sks_w.apply_watcher_event(&Event::Apply(sks(n)));
            ch_tx
                .send(Changed {
                    kind: Kind::Sks,
                    listed: false,
                })
                .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(2), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().sks.len(), 4);
        tokio::time::sleep(DEBOUNCE * 3).await;
        assert!(!rx.has_changed().unwrap());

        // A re-list (after 410 Gone) replaces the content in one step at InitDone.
        sks_w.apply_watcher_event(&Event::Init);
        sks_w.apply_watcher_event(&Event::InitApply(sks("z")));
        ch_tx.send(listed(Kind::Sks)).unwrap();
        tokio::time::timeout(Duration::from_secs(2), rx.changed())
            .await
            .unwrap()
            .unwrap();
        // InitDone not applied yet: the store still holds the old objects.
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().sks.len(), 4);
        sks_w.apply_watcher_event(&Event::InitDone);
        ch_tx.send(listed(Kind::Sks)).unwrap();
        tokio::time::timeout(Duration::from_secs(2), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let snap = rx.borrow_and_update().clone().unwrap();
        assert_eq!(snap.sks.len(), 1);
        assert_eq!(snap.sks[0].name(), "z");
        task.abort();
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff(BACKOFF_MIN);
        let seq: Vec<Duration> = (0..8).map(|_| b.next()).collect();
        assert_eq!(seq[0], BACKOFF_MIN);
        assert_eq!(seq[1], BACKOFF_MIN * 2);
        assert_eq!(*seq.last().unwrap(), BACKOFF_MAX);
        b.reset();
        assert_eq!(b.next(), BACKOFF_MIN);
    }
}
