//! Dense id allocation for services and backends, with a grace period before a released id
//! is given out again (packets in flight may still hold it).
use std::{collections::BTreeSet, time::Instant};

use super::{ControlError, ID_GRACE};

/// Dense id allocator with a grace period before reuse.
#[derive(Debug)]
pub(super) struct Ids {
    next: u32,
    max: u32,
    free: Vec<u32>,
    cooling: Vec<(Instant, u32)>,
}

impl Ids {
    /// `used`: ids below `max` (`adopt` checks them).
    pub(super) fn new(max: u32, used: &BTreeSet<u32>) -> Self {
        let next = used
            .iter()
            .next_back()
            .map(|m| m.saturating_add(1).min(max))
            .unwrap_or(0);
        let free = (0..next).filter(|i| !used.contains(i)).collect();
        Self {
            next,
            max,
            free,
            cooling: Vec::new(),
        }
    }
    pub(super) fn alloc(&mut self, what: &'static str) -> Result<u32, ControlError> {
        let now = Instant::now();
        let (ready, cooling): (Vec<_>, Vec<_>) = self
            .cooling
            .drain(..)
            .partition(|(t, _)| now.duration_since(*t) >= ID_GRACE);
        self.cooling = cooling;
        self.free.extend(ready.into_iter().map(|(_, i)| i));
        if let Some(i) = self.free.pop() {
            return Ok(i);
        }
        if self.next >= self.max {
            return Err(ControlError::Exhausted(what));
        }
        self.next += 1;
        Ok(self.next - 1)
    }
    pub(super) fn release(&mut self, id: u32) {
        self.cooling.push((Instant::now(), id));
    }
    /// Ids that are free or will be once their grace period ends.
    pub(super) fn left(&self) -> usize {
        self.free.len() + self.cooling.len() + (self.max - self.next) as usize
    }
    /// Whether some released id is still in its grace period.
    pub(super) fn cooling(&self) -> bool {
        !self.cooling.is_empty()
    }
}
