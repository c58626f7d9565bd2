//! Leader fencing: a leader may write only while its Lease is known to be held.
//!
//! The Lease helper moves the deadline forward after each successful renewal (the time the
//! attempt *started* plus the lease duration, less a margin), so a process that was frozen,
//! partitioned or slow finds its deadline passed the moment it runs again, before another
//! replica's takeover can be contradicted by one of its writes. Losing is final: the token
//! is cancelled, in-flight work stops, and the process steps down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fenced {
    #[error("not leading: the Lease is not (or no longer known to be) held by this process")]
    NotLeading,
}

#[derive(Debug)]
struct Inner {
    base: Instant,
    /// Nanoseconds after `base` until which writes are allowed; 0 = never held.
    valid_until_ns: AtomicU64,
    /// No Lease: every check passes (leader election off, a single replica).
    unfenced: bool,
    lost: CancellationToken,
}

/// Shared by everything that writes on the leader's behalf. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Fence(Arc<Inner>);

impl Fence {
    /// A fence that allows nothing until [`Fence::hold_until`] is called.
    pub fn new() -> Self {
        Self::with(false)
    }

    /// A fence that always allows writes (leader election disabled).
    pub fn unfenced() -> Self {
        Self::with(true)
    }

    fn with(unfenced: bool) -> Self {
        Self(Arc::new(Inner {
            base: Instant::now(),
            valid_until_ns: AtomicU64::new(0),
            unfenced,
            lost: CancellationToken::new(),
        }))
    }

    /// The Lease is held until `deadline` (monotonic). Never moves the deadline back and
    /// never revives a lost fence.
    pub fn hold_until(&self, deadline: Instant) {
        let ns = self.since_base(deadline);
        self.0.valid_until_ns.fetch_max(ns.max(1), Ordering::SeqCst);
    }

    /// Leadership is lost for good: cancel in-flight work, refuse every later write.
    pub fn lose(&self) {
        self.0.lost.cancel();
    }

    /// Whether a write may be made now.
    pub fn check(&self) -> Result<(), Fenced> {
        if self.0.lost.is_cancelled() {
            return Err(Fenced::NotLeading);
        }
        if self.0.unfenced {
            return Ok(());
        }
        let until = self.0.valid_until_ns.load(Ordering::SeqCst);
        if until == 0 || self.since_base(Instant::now()) >= until {
            return Err(Fenced::NotLeading);
        }
        Ok(())
    }

    /// Time left before the deadline (zero when not leading).
    pub fn remaining(&self) -> Duration {
        if self.check().is_err() {
            return Duration::ZERO;
        }
        if self.0.unfenced {
            return Duration::MAX;
        }
        let until = self.0.valid_until_ns.load(Ordering::SeqCst);
        Duration::from_nanos(until.saturating_sub(self.since_base(Instant::now())))
    }

    fn since_base(&self, t: Instant) -> u64 {
        let ns = t.saturating_duration_since(self.0.base).as_nanos();
        u64::try_from(ns).unwrap_or(u64::MAX - 1)
    }

    /// Cancelled once leadership is lost; hand it to work that must stop then.
    pub fn token(&self) -> CancellationToken {
        self.0.lost.clone()
    }

    pub fn is_lost(&self) -> bool {
        self.0.lost.is_cancelled()
    }

    /// Completes once leadership is lost.
    pub async fn lost(&self) {
        self.0.lost.cancelled().await
    }
}

impl Default for Fence {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_only_before_the_deadline_and_never_after_losing() {
        let f = Fence::new();
        assert_eq!(f.check(), Err(Fenced::NotLeading), "never held");
        f.hold_until(Instant::now() + Duration::from_secs(10));
        assert!(f.check().is_ok());
        assert!(f.remaining() > Duration::from_secs(9));
        // An older deadline does not shorten a newer one.
        f.hold_until(Instant::now() + Duration::from_secs(1));
        assert!(f.remaining() > Duration::from_secs(9));
        f.lose();
        assert_eq!(f.check(), Err(Fenced::NotLeading));
        f.hold_until(Instant::now() + Duration::from_secs(60));
        assert_eq!(f.check(), Err(Fenced::NotLeading), "losing is final");
        assert!(f.token().is_cancelled());
    }

    #[test]
    fn a_passed_deadline_refuses_writes() {
        let f = Fence::new();
        f.hold_until(Instant::now());
        assert_eq!(f.check(), Err(Fenced::NotLeading));
        assert_eq!(f.remaining(), Duration::ZERO);
    }

    #[test]
    fn unfenced_allows_until_lost() {
        let f = Fence::unfenced();
        assert!(f.check().is_ok());
        f.lose();
        assert!(f.check().is_err());
    }
}
