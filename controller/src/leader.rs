//! Leader election on a `coordination.k8s.io/v1` Lease, through [`berth_runtime::lease`]:
//! only the holder calls AWS or writes. Another replica's Lease counts as expired once this
//! process has seen it unchanged for a whole lease duration on its own clock, so skewed
//! clocks between nodes cannot move leadership; writes carry the resourceVersion read, so
//! two replicas never both win. Each successful renewal moves the [`Fence`] deadline to the
//! attempt's start plus the duration, less a margin; losing the Lease, or not confirming a
//! renewal before that deadline, loses the fence, which stops every writer.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use berth_runtime::Fence;
use berth_runtime::lease::{self, LeaseClient, LeaseError, Observed, Record, Write};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, Client};

pub struct LeaderElector {
    leases: LeaseClient,
    name: String,
    duration: Duration,
    fence: Fence,
    /// Written into the Lease: deleting the owner (`helm uninstall` deletes the
    /// controller's ServiceAccount) lets the garbage collector delete the Lease too, also
    /// when the leader could not delete it on its way out (its RBAC went first).
    owner: Option<OwnerReference>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The Lease as last read or written, with when its record last changed.
    observed: Option<Observed>,
    /// The fence's deadline while this replica holds the Lease.
    held_until: Option<Instant>,
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
        fence: Fence,
    ) -> Self {
        Self {
            leases: LeaseClient::new(Api::namespaced(client, namespace), identity, duration),
            name: name.into(),
            duration,
            fence,
            owner: None,
            state: Mutex::default(),
        }
    }

    /// Makes `owner` an owner of the Lease from the next write on.
    pub fn with_owner(mut self, owner: OwnerReference) -> Self {
        self.owner = Some(owner);
        self
    }

    /// `lease` with this elector's owner among its owners.
    fn owned(&self, mut lease: Lease) -> Lease {
        if let Some(owner) = &self.owner {
            let refs = lease.metadata.owner_references.get_or_insert_default();
            if !refs.iter().any(|r| r.uid == owner.uid) {
                refs.push(owner.clone());
            }
        }
        lease
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Until when a write made in an attempt started at `started` is safe. Another replica
    /// sees the write no earlier than it is made, so it cannot take over before `started`
    /// plus the duration; a tenth less covers clocks running at different rates.
    fn valid_until(&self, started: Instant) -> Instant {
        started + self.duration - self.duration / 10
    }

    pub fn retry_period(&self) -> Duration {
        (self.duration / 4).max(Duration::from_millis(250))
    }

    /// One attempt to take or renew the Lease; true when this replica holds it afterwards.
    /// A renewal gives up at the deadline it would extend: past it, leadership is lost.
    pub async fn try_acquire(&self) -> Result<bool, LeaseError> {
        let started = Instant::now();
        let holding = self.state().held_until;
        if holding.is_some_and(|until| started >= until) {
            self.lost();
            return Ok(false);
        }
        let deadline = holding.unwrap_or_else(|| self.valid_until(started));
        let result = self.attempt(deadline).await;
        match &result {
            Ok(true) => {
                let until = self.valid_until(started);
                self.fence.hold_until(until);
                self.state().held_until = Some(until);
            }
            Ok(false) if holding.is_some() => self.lost(),
            Err(_) if holding.is_some_and(|until| Instant::now() >= until) => self.lost(),
            _ => {}
        }
        result
    }

    fn lost(&self) {
        self.state().held_until = None;
        self.fence.lose();
    }

    /// Records `lease` as seen now; an unchanged record keeps its earlier time.
    fn observe(&self, lease: Lease) -> Observed {
        let mut state = self.state();
        let seen = Observed::new(state.observed.as_ref(), lease, Instant::now());
        state.observed = Some(seen.clone());
        seen
    }

    async fn attempt(&self, deadline: Instant) -> Result<bool, LeaseError> {
        let identity = self.leases.identity();
        let current = match self.leases.get(&self.name, deadline).await? {
            None => lease::absent(&self.name, BTreeMap::new()),
            Some(read) => {
                let seen = self.observe(read);
                if !seen.free_for(identity, Instant::now()) {
                    tracing::debug!(
                        holder = seen.holder().unwrap_or_default(),
                        "the leader Lease is held by another replica"
                    );
                    return Ok(false);
                }
                seen.lease
            }
        };
        match self
            .leases
            .acquire(self.owned(current), Timestamp::now(), deadline)
            .await?
        {
            Write::Done(written) => {
                self.observe(*written);
                Ok(true)
            }
            Write::Conflict => Ok(false),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) {
        let period = self.retry_period();
        loop {
            match self.try_acquire().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(period).await;
        }
    }

    /// Renews until leadership is lost: another replica holds the Lease, or no renewal was
    /// confirmed before the fence's deadline. Returns then, with the fence lost.
    pub async fn hold(&self) {
        let period = self.retry_period();
        loop {
            let next = Instant::now() + period;
            // Wake at the deadline at the latest, so losing is noticed when it happens.
            let wake = self.state().held_until.map_or(next, |u| next.min(u));
            tokio::time::sleep_until(wake.into()).await;
            match self.try_acquire().await {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => tracing::warn!(error = %e, "renewing the leader Lease"),
            }
            if self.fence.is_lost() {
                break;
            }
        }
        self.fence.lose();
        tracing::warn!(
            "leadership lost: the Lease is held by another replica or was not renewed in time"
        );
    }

    /// Gives the Lease up on shutdown by deleting it while this replica holds it (guarded
    /// by the resourceVersion read, so a successor's Lease stays): another replica creates
    /// it anew at once, and after `helm uninstall` no Lease is left behind. Also called by
    /// a replica that never led, in case its last attempt won after all.
    pub async fn release(&self) {
        // No write of ours may follow the release.
        self.lost();
        let deadline = Instant::now() + self.retry_period();
        let deleted = match self.leases.get(&self.name, deadline).await {
            Ok(Some(held))
                if Record::of(&held).holder.as_deref() == Some(self.leases.identity()) =>
            {
                self.leases.delete(held, deadline).await
            }
            Ok(_) => Ok(Write::Conflict),
            Err(e) => Err(e),
        };
        match deleted {
            Ok(Write::Done(_)) => tracing::info!("deleted the leader Lease"),
            Ok(Write::Conflict) => {}
            Err(e) => tracing::warn!(error = %e, "deleting the leader Lease"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_runtime::lease::fake::FakeApiserver;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::SignedDuration;

    const NS: &str = "kube-system";
    const LEASE: &str = "berth-controller";
    const SECOND: Duration = Duration::from_secs(1);

    fn elector(fake: &FakeApiserver, identity: &str) -> (LeaderElector, Fence) {
        let fence = Fence::new();
        let e = LeaderElector::new(fake.client(), NS, LEASE, identity, SECOND, fence.clone());
        (e, fence)
    }

    fn holder(fake: &FakeApiserver) -> Option<String> {
        fake.get(LEASE)
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
    }

    /// Another replica's Lease, renewed by a clock `skew_s` off ours.
    fn held_by_skewed(fake: &FakeApiserver, skew_s: i64) {
        let mut l = lease::absent(LEASE, BTreeMap::new());
        l.spec = Some(LeaseSpec {
            holder_identity: Some("skewed".into()),
            lease_duration_seconds: Some(1),
            renew_time: Some(MicroTime(
                Timestamp::now()
                    .checked_add(SignedDuration::from_secs(skew_s))
                    .expect("timestamp"),
            )),
            ..Default::default()
        });
        fake.put(l);
    }

    #[tokio::test]
    async fn one_replica_leads_and_the_other_takes_over_after_a_lease_unchanged() {
        let fake = FakeApiserver::new(NS);
        let (a, a_fence) = elector(&fake, "a");
        let (b, b_fence) = elector(&fake, "b");
        assert!(a.try_acquire().await.expect("a"));
        assert!(a_fence.check().is_ok());
        assert!(!b.try_acquire().await.expect("b"), "a live Lease");
        assert!(b_fence.check().is_err());
        assert!(a.try_acquire().await.expect("a renews"));
        assert!(!b.try_acquire().await.expect("b"), "a renewed Lease");
        // a stops renewing; b has seen a's last renewal for a whole duration.
        tokio::time::sleep(SECOND).await;
        assert!(b.try_acquire().await.expect("b"));
        assert_eq!(holder(&fake).as_deref(), Some("b"));
        assert_eq!(
            fake.get(LEASE).and_then(|l| l.spec?.lease_transitions),
            Some(1)
        );
        assert!(!a.try_acquire().await.expect("a"), "a finds b holding");
        assert!(a_fence.is_lost(), "losing the Lease loses the fence");
    }

    /// Whether the holder's clock runs 30 s ahead or behind, its Lease is taken after one
    /// duration unchanged: not at once (behind), not 30 s later (ahead).
    #[tokio::test]
    async fn a_skewed_holder_is_judged_by_the_time_its_lease_stood_still() {
        for skew_s in [-30, 30] {
            let fake = FakeApiserver::new(NS);
            held_by_skewed(&fake, skew_s);
            let (b, _) = elector(&fake, "b");
            assert!(!b.try_acquire().await.expect("b"), "skew {skew_s}s");
            tokio::time::sleep(SECOND).await;
            assert!(b.try_acquire().await.expect("b"), "skew {skew_s}s");
        }
    }

    #[tokio::test]
    async fn hold_returns_with_the_fence_lost_when_renewals_go_unanswered() {
        let fake = FakeApiserver::new(NS);
        let (a, fence) = elector(&fake, "a");
        a.acquire().await;
        fake.stall(true);
        tokio::time::timeout(SECOND * 5, a.hold())
            .await
            .expect("hold returns once renewal cannot be confirmed in time");
        assert!(fence.is_lost());
    }

    #[tokio::test]
    async fn hold_returns_when_another_replica_took_the_lease() {
        let fake = FakeApiserver::new(NS);
        let (a, fence) = elector(&fake, "a");
        a.acquire().await;
        let mut taken = fake.get(LEASE).expect("lease");
        taken.spec = taken.spec.map(|s| LeaseSpec {
            holder_identity: Some("b".into()),
            ..s
        });
        fake.put(taken);
        tokio::time::timeout(SECOND * 5, a.hold())
            .await
            .expect("hold returns");
        assert!(fence.is_lost());
        assert_eq!(holder(&fake).as_deref(), Some("b"), "a wrote nothing");
    }

    #[tokio::test]
    async fn the_lease_names_its_owner_from_the_first_write() {
        let fake = FakeApiserver::new(NS);
        let owner = OwnerReference {
            api_version: "v1".into(),
            kind: "ServiceAccount".into(),
            name: "berth-controller".into(),
            uid: "sa-uid".into(),
            ..OwnerReference::default()
        };
        let (a, _) = elector(&fake, "a");
        let a = a.with_owner(owner.clone());
        assert!(a.try_acquire().await.expect("create"));
        assert!(a.try_acquire().await.expect("renew"));
        let stored = fake.get(LEASE).expect("lease");
        assert_eq!(stored.metadata.owner_references, Some(vec![owner]));
    }

    #[tokio::test]
    async fn a_released_lease_is_deleted_and_taken_at_once() {
        let fake = FakeApiserver::new(NS);
        let (a, a_fence) = elector(&fake, "a");
        let (b, _) = elector(&fake, "b");
        assert!(a.try_acquire().await.expect("a"));
        a.release().await;
        assert!(a_fence.is_lost());
        assert!(fake.get(LEASE).is_none(), "the released Lease is gone");
        assert!(b.try_acquire().await.expect("b"));
        // A replica that does not hold the Lease leaves it alone on shutdown.
        a.release().await;
        assert_eq!(holder(&fake).as_deref(), Some("b"));
    }
}
