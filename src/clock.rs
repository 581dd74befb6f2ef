//! Wall-clock time, in one place. Every record berth keeps (when a tag was fetched, when
//! a blob was last read, when a list was kept, how old an upload is) is stamped in unix
//! seconds from here; what a TTL is measured against (when a tag or a kept list was last
//! validated) also in milliseconds, so that a TTL of a second or two means what it says.
//! Time that is only measured (timeouts, token buckets, the negative cache) uses tokio's
//! monotonic clock, which unit tests pause and advance.
//!
//! The proxy holds a [`Clock`] instead of asking the system, so a test can move it past a
//! TTL (`Clock::manual`, `Clock::advance`) instead of sleeping through it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The system's clock, or a manual one (unix milliseconds) that only moves when told.
#[derive(Clone, Debug, Default)]
pub struct Clock(Option<Arc<AtomicU64>>);

impl Clock {
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock standing at `unix_secs` until advanced.
    pub fn manual(unix_secs: u64) -> Clock {
        Clock(Some(Arc::new(AtomicU64::new(
            unix_secs.saturating_mul(1000),
        ))))
    }

    /// Moves a manual clock forward (and every copy of it); the system clock moves by
    /// itself and ignores this.
    pub fn advance(&self, secs: u64) {
        self.advance_millis(secs.saturating_mul(1000));
    }

    /// [`Self::advance`] by milliseconds.
    pub fn advance_millis(&self, millis: u64) {
        if let Some(t) = &self.0 {
            t.fetch_add(millis, Ordering::Relaxed);
        }
    }

    /// Unix seconds now.
    pub fn now_secs(&self) -> u64 {
        self.now_millis() / 1000
    }

    /// Unix milliseconds now.
    pub fn now_millis(&self) -> u64 {
        match &self.0 {
            Some(t) => t.load(Ordering::Relaxed),
            None => now_millis(),
        }
    }
}

/// Unix seconds now, by the system clock (0 before 1970).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Unix milliseconds now, by the system clock (0 before 1970).
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_copies_move_together() {
        let c = Clock::manual(1_000);
        let copy = c.clone();
        assert_eq!(c.now_secs(), 1_000);
        c.advance(601);
        assert_eq!(copy.now_secs(), 1_601);
        c.advance_millis(1_500);
        assert_eq!((copy.now_secs(), copy.now_millis()), (1_602, 1_602_500));
        let system = Clock::system();
        system.advance(1_000_000);
        assert!(system.now_secs().abs_diff(now_secs()) <= 1);
    }
}
