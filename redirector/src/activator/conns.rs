//! Open client connections of a listener, counted against its cap (a connection over it
//! is closed as accepted, as Envoy's listener connection limit does), and freed connection
//! memory given back to the system when many connections close (glibc keeps freed heap
//! otherwise: 1,000 slow clients would leave their buffers' worth of RSS behind).
use std::sync::{
    atomic::{AtomicU64, AtomicUsize, Ordering},
    Arc,
};

/// Connections at once before a drop to half of them trims the heap.
const TRIM_PEAK: usize = 64;

/// A listener's open connections.
#[derive(Debug, Default)]
pub struct Count {
    open: AtomicUsize,
    /// Most open at once since the last trim.
    peak: AtomicUsize,
    overflow: AtomicU64,
}

impl Count {
    /// Counts a new connection, or None when `cap` are open already.
    pub fn open(self: &Arc<Self>, cap: usize) -> Option<Open> {
        let n = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        if n > cap {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.overflow.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.peak.fetch_max(n, Ordering::Relaxed);
        Some(Open(self.clone()))
    }

    /// Connections open now.
    pub fn now(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections closed at once because the cap was reached.
    pub fn overflowed(&self) -> u64 {
        self.overflow.load(Ordering::Relaxed)
    }
}

/// One open connection (uncounted when dropped).
#[derive(Debug)]
pub struct Open(Arc<Count>);

impl Drop for Open {
    fn drop(&mut self) {
        let c = &self.0;
        let n = c.open.fetch_sub(1, Ordering::AcqRel) - 1;
        let peak = c.peak.load(Ordering::Relaxed);
        if peak >= TRIM_PEAK
            && n <= peak / 2
            && c.peak
                .compare_exchange(peak, n, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            trim();
        }
    }
}

/// Returns free heap memory to the system.
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_refuses_and_counts() {
        let c = Arc::new(Count::default());
        let a = c.open(2).unwrap();
        let _b = c.open(2).unwrap();
        assert!(c.open(2).is_none());
        assert_eq!((c.now(), c.overflowed()), (2, 1));
        drop(a);
        let _c = c.open(2).unwrap();
        assert_eq!(c.now(), 2);
    }
}
