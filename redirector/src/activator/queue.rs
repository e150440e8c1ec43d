//! Per-service admission: a bounded hold (requests and body bytes, per service and overall),
//! the set of ready instances, and containerConcurrency-aware picking of an instance.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::config::{ActivatorConfig, Protocol};

/// A ready instance as the activator sees it.
#[derive(Debug)]
pub struct Instance {
    pub addr: SocketAddr,
    /// Unique per instance (a replacement at the same address gets a new one): upstream
    /// connections are pooled by it, so none made to a gone instance is reused.
    pub(super) id: u64,
    pub in_flight: AtomicUsize,
    /// containerConcurrency slots (None = unlimited).
    pub slots: Option<Arc<Semaphore>>,
    /// The containerConcurrency it was made with (0 = unlimited).
    pub concurrency: u32,
    /// When a connection to it last failed (ms on the process clock, 0 = never): it is
    /// skipped for `FAILED_PAUSE`, so requests arriving right after an instance died wait for
    /// the scaler's next set instead of failing on it too.
    failed_at_ms: AtomicU64,
}

/// How long an instance whose connection failed is skipped.
const FAILED_PAUSE_MS: u64 = 1_000;

fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

impl Instance {
    pub fn new(addr: SocketAddr, container_concurrency: u32) -> Arc<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Arc::new(Self {
            addr,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            in_flight: AtomicUsize::new(0),
            slots: (container_concurrency > 0)
                .then(|| Arc::new(Semaphore::new(container_concurrency as usize))),
            concurrency: container_concurrency,
            failed_at_ms: AtomicU64::new(0),
        })
    }

    /// Records a failed connection (the instance may have died).
    pub fn mark_failed(&self) {
        self.failed_at_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn usable(&self) -> bool {
        let f = self.failed_at_ms.load(Ordering::Relaxed);
        f == 0 || now_ms().saturating_sub(f) >= FAILED_PAUSE_MS
    }
}

pub type Instances = Arc<Vec<Arc<Instance>>>;

/// Limits shared by all services.
#[derive(Debug, Default)]
pub struct Global {
    pub held: AtomicUsize,
    pub held_bytes: AtomicU64,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    Full,
}

/// One service's activator state.
#[derive(Debug)]
pub struct ServiceState {
    pub name: String,
    pub protocol: Protocol,
    /// The whole request, queueing included (ms; a Revision's settings may change it).
    timeout_ms: AtomicU64,
    /// Until the instance's response starts (ms, at most the timeout).
    response_start_ms: AtomicU64,
    /// Longest pause between bytes of the instance's response (ms; 0: none).
    idle_ms: AtomicU64,
    /// Requests in flight per instance; 0 = unlimited.
    container_concurrency: AtomicU32,
    /// The status of a request that waited its whole timeout for an instance: 504, or 503
    /// as Knative's activator answers (`set_knative_queue_timeout`).
    queue_timeout_status: AtomicU32,
    pub held: AtomicUsize,
    pub held_bytes: AtomicU64,
    pub in_flight: AtomicUsize,
    /// Requests answered through the activator (any status).
    pub forwarded: AtomicU64,
    pub rejected_full: AtomicU64,
    pub timed_out: AtomicU64,
    /// Time to first byte of requests that arrived with no instance ready (cold starts).
    pub cold_ttfb: crate::metrics::Histogram,
    /// Set by the scaler; the activator only reads.
    pub instances: watch::Receiver<Instances>,
    /// Rung when a request is held and no instance can take it: wakes the scaler at once.
    pub wake: Arc<Notify>,
    /// Rung when an instance slot frees up.
    capacity: Notify,
    rr: AtomicUsize,
    seed: AtomicU64,
}

impl ServiceState {
    pub fn new(
        name: String,
        protocol: Protocol,
        timeout: Duration,
        container_concurrency: u32,
        instances: watch::Receiver<Instances>,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            name,
            protocol,
            timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
            response_start_ms: AtomicU64::new(timeout.as_millis() as u64),
            idle_ms: AtomicU64::new(0),
            container_concurrency: AtomicU32::new(container_concurrency),
            queue_timeout_status: AtomicU32::new(504),
            held: AtomicUsize::new(0),
            held_bytes: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            forwarded: AtomicU64::new(0),
            rejected_full: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            cold_ttfb: crate::metrics::Histogram::default(),
            instances,
            wake,
            capacity: Notify::new(),
            rr: AtomicUsize::new(0),
            seed: AtomicU64::new(0x2545_f491_4f6c_dd1d),
        }
    }

    /// The whole request's deadline, queueing included.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// How long the instance may take to start its response.
    pub fn response_start_timeout(&self) -> Duration {
        Duration::from_millis(self.response_start_ms.load(Ordering::Relaxed))
    }

    /// The longest pause allowed between bytes of a response (`None`: no limit).
    pub fn idle_timeout(&self) -> Option<Duration> {
        match self.idle_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    pub fn container_concurrency(&self) -> u32 {
        self.container_concurrency.load(Ordering::Relaxed)
    }

    /// New limits (a Revision's settings arrived or changed). Instances made for another
    /// containerConcurrency must be replaced by the caller (see [`Instance::concurrency`]).
    /// `idle`: the longest pause between bytes of a response.
    pub fn set_limits(
        &self,
        container_concurrency: u32,
        timeout: Duration,
        response_start: Duration,
        idle: Option<Duration>,
    ) {
        self.container_concurrency
            .store(container_concurrency, Ordering::Relaxed);
        self.timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
        self.response_start_ms.store(
            response_start.min(timeout).as_millis() as u64,
            Ordering::Relaxed,
        );
        self.idle_ms.store(
            idle.map_or(0, |d| d.as_millis().max(1) as u64),
            Ordering::Relaxed,
        );
    }

    /// Answer a request that waited its whole timeout for an instance as Knative's activator
    /// does: 503 (its throttler's deadline), not 504.
    pub fn set_knative_queue_timeout(&self) {
        self.queue_timeout_status.store(503, Ordering::Relaxed);
    }

    /// 504, or 503 after `set_knative_queue_timeout`.
    pub fn queue_timeout_status(&self) -> u16 {
        self.queue_timeout_status.load(Ordering::Relaxed) as u16
    }

    /// Observed concurrency (held + in flight), what the scaler reads.
    pub fn concurrency(&self) -> usize {
        self.held.load(Ordering::Relaxed) + self.in_flight.load(Ordering::Relaxed)
    }

    /// Admits a request into the hold, or rejects it when a cap would be exceeded.
    pub fn admit(
        self: &Arc<Self>,
        global: &Arc<Global>,
        limits: &ActivatorConfig,
        bytes: u64,
    ) -> Result<Held, Rejected> {
        let held = Held {
            svc: self.clone(),
            global: global.clone(),
            bytes,
        };
        // Count first, then check: concurrent admits never overshoot a cap.
        self.held.fetch_add(1, Ordering::AcqRel);
        self.held_bytes.fetch_add(bytes, Ordering::AcqRel);
        global.held.fetch_add(1, Ordering::AcqRel);
        global.held_bytes.fetch_add(bytes, Ordering::AcqRel);
        let over = self.held.load(Ordering::Acquire) > limits.max_held_per_service
            || self.held_bytes.load(Ordering::Acquire) > limits.max_held_bytes_per_service
            || global.held.load(Ordering::Acquire) > limits.max_held_total
            || global.held_bytes.load(Ordering::Acquire) > limits.max_held_bytes_total;
        if over {
            self.rejected_full.fetch_add(1, Ordering::Relaxed);
            return Err(Rejected::Full); // `held` drops here and uncounts
        }
        Ok(held)
    }

    fn rand(&self) -> u64 {
        // xorshift64*, racy updates are fine for load spreading.
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.seed.store(x, Ordering::Relaxed);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Picks an instance with a free slot: first-available for small limits (≤ 3),
    /// round-robin for larger ones, least-loaded of two random picks when unlimited.
    fn try_pick(self: &Arc<Self>, set: &[Arc<Instance>]) -> Option<Slot> {
        if set.iter().any(|i| !i.usable()) {
            let usable: Vec<Arc<Instance>> = set.iter().filter(|i| i.usable()).cloned().collect();
            return self.pick_from(&usable);
        }
        self.pick_from(set)
    }

    fn pick_from(self: &Arc<Self>, set: &[Arc<Instance>]) -> Option<Slot> {
        if set.is_empty() {
            return None;
        }
        let n = set.len();
        let cc = self.container_concurrency();
        if cc == 0 {
            if n == 1 {
                return Some(Slot::new(self.clone(), set[0].clone(), None));
            }
            let a = &set[(self.rand() % n as u64) as usize];
            let b = &set[(self.rand() % n as u64) as usize];
            let pick = if b.in_flight.load(Ordering::Relaxed) < a.in_flight.load(Ordering::Relaxed)
            {
                b
            } else {
                a
            };
            return Some(Slot::new(self.clone(), pick.clone(), None));
        }
        let start = if cc <= 3 {
            0
        } else {
            self.rr.fetch_add(1, Ordering::Relaxed) % n
        };
        for i in 0..n {
            let inst = &set[(start + i) % n];
            match &inst.slots {
                Some(sem) => {
                    if let Ok(p) = sem.clone().try_acquire_owned() {
                        return Some(Slot::new(self.clone(), inst.clone(), Some(p)));
                    }
                }
                // Made before the limit was known; replaced by one with slots shortly.
                None => return Some(Slot::new(self.clone(), inst.clone(), None)),
            }
        }
        None
    }

    /// True when no instance is ready (a request now is a cold start).
    pub fn cold(&self) -> bool {
        self.instances.borrow().is_empty()
    }

    /// An instance with a free slot right now, if there is one (the warm path: no waiting,
    /// no registration for wakeups).
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        self.try_pick(&self.instances.borrow())
    }

    /// Waits for an instance with a free slot. Wakes the scaler when none is ready.
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        let mut rx = self.instances.clone();
        loop {
            let capacity = self.capacity.notified();
            tokio::pin!(capacity);
            capacity.as_mut().enable();
            let set = rx.borrow_and_update().clone();
            if let Some(slot) = self.try_pick(&set) {
                return slot;
            }
            self.wake.notify_one();
            // Instances skipped after a failure become usable again without any notification.
            let cooling = set.iter().any(|i| !i.usable());
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(50)), if cooling => {}
                r = rx.changed() => {
                    if r.is_err() {
                        // The scaler is gone; nothing will ever be ready.
                        std::future::pending::<()>().await;
                    }
                }
                _ = &mut capacity => {}
            }
        }
    }
}

/// A request in the hold; uncounts itself when dropped (served, timed out, or the client
/// went away).
#[derive(Debug)]
pub struct Held {
    svc: Arc<ServiceState>,
    global: Arc<Global>,
    bytes: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.svc.held.fetch_sub(1, Ordering::AcqRel);
        self.svc.held_bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        self.global.held.fetch_sub(1, Ordering::AcqRel);
        self.global
            .held_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A request in flight on an instance (holds its containerConcurrency slot).
#[derive(Debug)]
pub struct Slot {
    svc: Arc<ServiceState>,
    pub instance: Arc<Instance>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Slot {
    fn new(
        svc: Arc<ServiceState>,
        instance: Arc<Instance>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        instance.in_flight.fetch_add(1, Ordering::AcqRel);
        svc.in_flight.fetch_add(1, Ordering::AcqRel);
        Self {
            svc,
            instance,
            permit,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.instance.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.svc.in_flight.fetch_sub(1, Ordering::AcqRel);
        if self.permit.take().is_some() {
            self.svc.capacity.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(cc: u32, n: usize) -> (Arc<ServiceState>, watch::Sender<Instances>) {
        let set: Vec<_> = (0..n)
            .map(|i| Instance::new(format!("10.0.0.{}:80", i + 1).parse().unwrap(), cc))
            .collect();
        let (tx, rx) = watch::channel(Arc::new(set));
        let s = ServiceState::new(
            "s".into(),
            Protocol::Http,
            Duration::from_secs(1),
            cc,
            rx,
            Arc::new(Notify::new()),
        );
        (Arc::new(s), tx)
    }

    #[test]
    fn caps_requests_and_bytes() {
        let (s, _tx) = svc(0, 0);
        let g = Arc::new(Global::default());
        let limits = ActivatorConfig {
            max_held_per_service: 2,
            max_held_bytes_per_service: 100,
            ..Default::default()
        };
        let a = s.admit(&g, &limits, 10).unwrap();
        let _b = s.admit(&g, &limits, 10).unwrap();
        assert_eq!(s.admit(&g, &limits, 0).unwrap_err(), Rejected::Full);
        drop(a);
        assert_eq!(s.admit(&g, &limits, 200).unwrap_err(), Rejected::Full);
        let _c = s.admit(&g, &limits, 50).unwrap();
        assert_eq!(s.held.load(Ordering::SeqCst), 2);
        assert_eq!(g.held_bytes.load(Ordering::SeqCst), 60);
    }

    #[tokio::test]
    async fn container_concurrency_one_waits_for_the_slot() {
        let (s, _tx) = svc(1, 1);
        let first = s.acquire().await;
        let s2 = s.clone();
        let waiter = tokio::spawn(async move { s2.acquire().await.instance.addr });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "second request must wait for the only slot"
        );
        drop(first);
        let addr = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(addr, "10.0.0.1:80".parse().unwrap());
    }

    #[tokio::test]
    async fn held_until_an_instance_appears() {
        let (s, tx) = svc(0, 0);
        let s2 = s.clone();
        let waiter = tokio::spawn(async move { s2.acquire().await.instance.addr });
        // The scaler is woken immediately.
        tokio::time::timeout(Duration::from_secs(1), s.wake.notified())
            .await
            .unwrap();
        tx.send(Arc::new(vec![Instance::new(
            "10.0.0.9:80".parse().unwrap(),
            0,
        )]))
        .unwrap();
        let addr = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(addr.port(), 80);
    }

    #[test]
    fn round_robin_for_large_limits() {
        let (s, _tx) = svc(10, 3);
        let picks: Vec<_> = (0..6)
            .map(|_| s.try_pick(&s.instances.borrow()).unwrap().instance.addr)
            .collect();
        assert_ne!(picks[0], picks[1]);
        assert_eq!(picks[0], picks[3]);
    }
}
