//! Kernel drift detection: after each commit the agent records the ruleset generation and
//! its tables' [`Fingerprint`]; a check (every second, and on each `/healthz` request)
//! reads the generation only, and the fingerprint only when the generation moved (some
//! other process committed). A fingerprint that differs from the recorded one means
//! another tool deleted, replaced or edited berth's tables: the check reports it until a
//! full sync has restored them.

use std::io;
use std::sync::Mutex;

use crate::proxy::netlink::{self, Fingerprint};
use crate::proxy::ruleset::TABLE;

/// Where the generation and fingerprint come from (netlink; a fake in unit tests).
pub trait Kernel: Send + Sync {
    fn generation(&self) -> io::Result<u32>;
    fn fingerprint(&self) -> io::Result<Fingerprint>;
}

/// The real kernel of this network namespace.
pub struct Netlink;

impl Kernel for Netlink {
    fn generation(&self) -> io::Result<u32> {
        netlink::generation()
    }
    fn fingerprint(&self) -> io::Result<Fingerprint> {
        netlink::fingerprint(TABLE)
    }
}

#[derive(Default)]
struct State {
    /// The generation and fingerprint right after berth's last commit.
    baseline: Option<(u32, Fingerprint)>,
    /// How the tables differ from the baseline, once seen; cleared by the next commit.
    drifted: Option<String>,
    /// A transaction of berth's is in flight: the kernel is expected to change.
    syncing: bool,
}

pub struct Drift<K: Kernel = Netlink> {
    kernel: K,
    state: Mutex<State>,
}

impl Default for Drift<Netlink> {
    fn default() -> Self {
        Self::new(Netlink)
    }
}

impl<K: Kernel> Drift<K> {
    pub fn new(kernel: K) -> Self {
        Self {
            kernel,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How berth's tables were changed by someone else, or `None` when they are as berth
    /// left them (or nothing is known yet). Costs one netlink round trip when no other
    /// process committed since the last check.
    pub fn check(&self) -> Option<String> {
        let mut st = self.state();
        if st.drifted.is_some() || st.syncing {
            return st.drifted.clone();
        }
        let (seen, print) = st.baseline.clone()?;
        let now = match self.kernel.generation() {
            Ok(g) if g == seen => return None,
            Ok(g) => g,
            Err(e) => {
                tracing::debug!("reading the nftables generation: {e}");
                return None;
            }
        };
        match self.kernel.fingerprint() {
            Ok(f) if f == print => {
                st.baseline = Some((now, print));
                None
            }
            Ok(f) => {
                let why = f.difference(&print);
                st.drifted = Some(if why.is_empty() {
                    "berth's tables changed".into()
                } else {
                    why
                });
                st.drifted.clone()
            }
            Err(e) => {
                tracing::debug!("reading berth's tables: {e}");
                None
            }
        }
    }

    /// A transaction of berth's starts: changes from now on are expected.
    pub fn begin(&self) {
        self.state().syncing = true;
    }

    /// The transaction ended. After a commit the kernel's state is the new baseline; a
    /// full commit also repaired any drift. A failed transaction changed nothing.
    pub fn end(&self, committed: bool, full: bool) {
        let mut st = self.state();
        st.syncing = false;
        if !committed {
            return;
        }
        // Generation first: a commit by someone else after it moves it again, so the next
        // check compares fingerprints.
        let fresh = self
            .kernel
            .generation()
            .and_then(|g| Ok((g, self.kernel.fingerprint()?)));
        match fresh {
            Ok(b) => st.baseline = Some(b),
            Err(e) => {
                tracing::warn!("reading berth's tables after a commit: {e}");
                st.baseline = None;
            }
        }
        if full {
            st.drifted = None;
        }
    }
}

impl<K: Kernel> Drift<K> {
    /// A transaction that changed set elements only ended. Elements are not part of the
    /// fingerprint, so after a commit only the generation is read: the recorded
    /// fingerprint stays the baseline (with none recorded yet, both are read).
    pub fn end_elements(&self, committed: bool) {
        let mut st = self.state();
        let Some((_, print)) = st.baseline.clone().filter(|_| committed) else {
            drop(st);
            return self.end(committed, false);
        };
        st.syncing = false;
        match self.kernel.generation() {
            Ok(g) => st.baseline = Some((g, print)),
            Err(e) => {
                tracing::warn!("reading the nftables generation after a commit: {e}");
                st.baseline = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

    #[derive(Default)]
    struct Fake {
        counter: AtomicU32,
        print: AtomicU64,
        prints_read: AtomicU32,
    }

    impl Kernel for &Fake {
        fn generation(&self) -> io::Result<u32> {
            Ok(self.counter.load(Ordering::SeqCst))
        }
        fn fingerprint(&self) -> io::Result<Fingerprint> {
            self.prints_read.fetch_add(1, Ordering::SeqCst);
            Ok(Fingerprint::test(self.print.load(Ordering::SeqCst)))
        }
    }

    #[test]
    fn unchanged_generation_reads_no_fingerprint() {
        let k = Fake::default();
        let d = Drift::new(&k);
        assert_eq!(d.check(), None, "nothing known before the first commit");
        d.begin();
        d.end(true, true);
        let reads = k.prints_read.load(Ordering::SeqCst);
        for _ in 0..10 {
            assert_eq!(d.check(), None);
        }
        assert_eq!(k.prints_read.load(Ordering::SeqCst), reads);
    }

    #[test]
    fn foreign_commits_elsewhere_are_ignored_and_changes_here_reported_until_a_full_sync() {
        let k = Fake::default();
        let d = Drift::new(&k);
        d.begin();
        d.end(true, true);
        k.counter.store(5, Ordering::SeqCst);
        assert_eq!(d.check(), None, "another table changed, berth's did not");
        k.counter.store(6, Ordering::SeqCst);
        k.print.store(1, Ordering::SeqCst);
        assert!(d.check().is_some());
        d.begin();
        assert!(d.check().is_some(), "still drifted while the repair runs");
        d.end(false, true);
        assert!(d.check().is_some(), "a failed repair repaired nothing");
        d.begin();
        d.end(true, false);
        assert!(d.check().is_some(), "a partial sync repairs nothing");
        d.begin();
        d.end(true, true);
        assert_eq!(d.check(), None);
    }

    #[test]
    fn element_batches_move_the_generation_baseline_only() {
        let k = Fake::default();
        let d = Drift::new(&k);
        d.begin();
        d.end(true, true);
        let reads = k.prints_read.load(Ordering::SeqCst);
        d.begin();
        k.counter.store(1, Ordering::SeqCst);
        d.end_elements(true);
        assert_eq!(
            k.prints_read.load(Ordering::SeqCst),
            reads,
            "no fingerprint read"
        );
        assert_eq!(d.check(), None, "berth's own batch is not drift");
        k.counter.store(2, Ordering::SeqCst);
        k.print.store(3, Ordering::SeqCst);
        assert!(d.check().is_some(), "a foreign change after it still is");
        d.begin();
        d.end_elements(false);
        assert!(d.check().is_some(), "a refused batch repairs nothing");
    }

    #[test]
    fn own_transactions_are_not_drift() {
        let k = Fake::default();
        let d = Drift::new(&k);
        d.begin();
        d.end(true, true);
        d.begin();
        k.counter.store(1, Ordering::SeqCst);
        k.print.store(2, Ordering::SeqCst);
        assert_eq!(d.check(), None, "berth's own transaction in flight");
        d.end(true, false);
        assert_eq!(d.check(), None);
    }
}
