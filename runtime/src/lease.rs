//! Leases (`coordination.k8s.io/v1`): taking, renewing and releasing one, and judging
//! whether its holder is still alive.
//!
//! Expiry is judged as client-go judges it: by how long *this* process has seen the
//! Lease's record unchanged, on its own monotonic clock. The holder's `renewTime` is only
//! compared with the holder's earlier `renewTime`, for change, never with the local wall
//! clock, so a holder whose clock runs ahead neither keeps a dead Lease alive nor, running
//! behind, loses a live one. Every write carries the resourceVersion that was read (or is
//! a create), so two writers never both win; every call has a deadline.
//!
//! The pure part ([`Record`], [`Observed`], [`Observations`], [`held_spec`],
//! [`released_spec`]) decides; [`LeaseClient`] is the thin I/O layer. Neither loops over
//! Leases: callers schedule their attempts, for one leader Lease or one per address.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ObjectMeta, PostParams, Preconditions};
use kube::runtime::watcher::Event;
use kube::{Api, ResourceExt};

/// What a Lease without `leaseDurationSeconds` lasts (client-go's default).
pub const DEFAULT_DURATION: Duration = Duration::from_secs(15);

/// The part of a Lease whose change shows that someone wrote it: a live holder renewing,
/// a new holder, a release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// `None` when the Lease is free (no holder, or an empty one).
    pub holder: Option<String>,
    pub renew_time: Option<Timestamp>,
    pub transitions: i32,
    pub duration: Duration,
    pub resource_version: Option<String>,
}

impl Record {
    pub fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        Self {
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty()),
            renew_time: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
            transitions: spec.and_then(|s| s.lease_transitions).unwrap_or(0),
            duration: spec
                .and_then(|s| s.lease_duration_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .filter(|s| *s > 0)
                .map_or(DEFAULT_DURATION, Duration::from_secs),
            resource_version: lease.metadata.resource_version.clone(),
        }
    }
}

/// A Lease as this process last saw it, with the (monotonic) time its record was first
/// seen in this form.
#[derive(Clone, Debug)]
pub struct Observed {
    pub lease: Lease,
    pub record: Record,
    pub seen_at: Instant,
}

impl Observed {
    /// `lease`, read or delivered at `now`. An unchanged record keeps the time it was
    /// first seen, so re-reading a dead holder's Lease does not keep it alive.
    pub fn new(previous: Option<&Observed>, lease: Lease, now: Instant) -> Self {
        let record = Record::of(&lease);
        let seen_at = match previous {
            Some(p) if p.record == record => p.seen_at,
            _ => now,
        };
        Self {
            lease,
            record,
            seen_at,
        }
    }

    pub fn holder(&self) -> Option<&str> {
        self.record.holder.as_deref()
    }

    pub fn held_by(&self, identity: &str) -> bool {
        self.holder() == Some(identity)
    }

    /// When the holder's claim runs out unless the record changes before.
    pub fn expires_at(&self) -> Instant {
        self.seen_at + self.record.duration
    }

    /// Whether the record has stood still for a whole lease duration.
    pub fn expired(&self, now: Instant) -> bool {
        now >= self.expires_at()
    }

    /// Whether `identity` may write itself in now: free, its own, or expired.
    pub fn free_for(&self, identity: &str, now: Instant) -> bool {
        match self.holder() {
            None => true,
            Some(h) if h == identity => true,
            Some(_) => self.expired(now),
        }
    }
}

/// The observed Leases of one watch, by name, each stamped with the arrival of the event
/// that last changed its record.
#[derive(Debug, Default)]
pub struct Observations {
    by_name: BTreeMap<String, Observed>,
    /// Names delivered since a relist began; the others are gone once it is done.
    relisted: Option<BTreeSet<String>>,
}

impl Observations {
    pub fn get(&self, name: &str) -> Option<&Observed> {
        self.by_name.get(name)
    }

    /// Every observed Lease, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Observed)> {
        self.by_name.iter()
    }

    pub fn observe(&mut self, lease: Lease, now: Instant) {
        let name = lease.name_any();
        let observed = Observed::new(self.by_name.get(&name), lease, now);
        self.by_name.insert(name, observed);
    }

    pub fn forget(&mut self, name: &str) {
        self.by_name.remove(name);
    }

    /// Feeds one watch event that arrived at `now`. A relist keeps the observation time of
    /// every Lease whose record did not change meanwhile.
    pub fn apply(&mut self, event: Event<Lease>, now: Instant) {
        match event {
            Event::Apply(lease) => self.observe(lease, now),
            Event::Delete(lease) => self.forget(&lease.name_any()),
            Event::Init => self.relisted = Some(BTreeSet::new()),
            Event::InitApply(lease) => {
                if let Some(seen) = self.relisted.as_mut() {
                    seen.insert(lease.name_any());
                }
                self.observe(lease, now);
            }
            Event::InitDone => {
                if let Some(seen) = self.relisted.take() {
                    self.by_name.retain(|name, _| seen.contains(name));
                }
            }
        }
    }
}

/// `leaseDurationSeconds` for `duration`, rounded up: rounding down would let others
/// take over before the holder stops.
fn duration_seconds(duration: Duration) -> i32 {
    let secs = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    i32::try_from(secs.max(1)).unwrap_or(i32::MAX)
}

/// The spec `identity` writes to take or renew a Lease. A renewal keeps the acquire time;
/// taking over an existing Lease from anyone else (or from nobody, after a release)
/// counts a transition, as client-go does. Pure.
pub fn held_spec(
    identity: &str,
    duration: Duration,
    previous: Option<&LeaseSpec>,
    now: Timestamp,
) -> LeaseSpec {
    let ours = previous.and_then(|p| p.holder_identity.as_deref()) == Some(identity);
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(duration_seconds(duration)),
        acquire_time: if ours {
            previous.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if ours || previous.is_none() {
            transitions
        } else {
            transitions.saturating_add(1)
        }),
        ..previous.cloned().unwrap_or_default()
    }
}

/// The spec of a released Lease: no holder, so anyone may take it at once. Pure.
pub fn released_spec(previous: &LeaseSpec) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        renew_time: None,
        ..previous.clone()
    }
}

/// A Lease not stored yet, named `name` with `labels`: [`LeaseClient::acquire`] creates it.
pub fn absent(name: &str, labels: BTreeMap<String, String>) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: (!labels.is_empty()).then_some(labels),
            ..Default::default()
        },
        spec: None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("Lease {name}: {source}")]
    Api {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Lease {name}: no answer before the attempt's deadline")]
    Deadline { name: String },
    #[error("Lease {name}: not replaced without the resourceVersion it was read at")]
    Unguarded { name: String },
}

/// The outcome of a guarded write.
#[derive(Clone, Debug)]
pub enum Write {
    /// Written; the Lease as stored now.
    Done(Box<Lease>),
    /// Not written: the Lease changed since it was read (another writer came first, or it
    /// was deleted), or it names another holder than the one renewing or releasing it.
    Conflict,
}

/// One holder's access to the Leases of one namespace.
#[derive(Clone)]
pub struct LeaseClient {
    api: Api<Lease>,
    identity: String,
    duration: Duration,
}

impl LeaseClient {
    pub fn new(api: Api<Lease>, identity: &str, duration: Duration) -> Self {
        Self {
            api,
            identity: identity.into(),
            duration,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn duration(&self) -> Duration {
        self.duration
    }

    pub async fn get(&self, name: &str, deadline: Instant) -> Result<Option<Lease>, LeaseError> {
        by(name, deadline, self.api.get_opt(name)).await
    }

    /// Writes this holder into `current`: the Lease as read, whose resourceVersion guards
    /// the replace, or one never stored (see [`absent`]), which is created. Either way a
    /// concurrent writer makes it a [`Write::Conflict`].
    pub async fn acquire(
        &self,
        mut current: Lease,
        now: Timestamp,
        deadline: Instant,
    ) -> Result<Write, LeaseError> {
        let stored = current.metadata.resource_version.is_some();
        current.spec = Some(held_spec(
            &self.identity,
            self.duration,
            current.spec.as_ref(),
            now,
        ));
        if stored {
            self.replace(&current, deadline).await
        } else {
            let name = current.name_any();
            match by(
                &name,
                deadline,
                self.api.create(&PostParams::default(), &current),
            )
            .await
            {
                Ok(l) => Ok(Write::Done(Box::new(l))),
                Err(e) if is_conflict(&e) => Ok(Write::Conflict),
                Err(e) => Err(e),
            }
        }
    }

    /// Renews `held`, the Lease as this holder last wrote or read it (its resourceVersion
    /// guards the replace).
    pub async fn renew(
        &self,
        mut held: Lease,
        now: Timestamp,
        deadline: Instant,
    ) -> Result<Write, LeaseError> {
        if !self.holds(&held) {
            return Ok(Write::Conflict);
        }
        held.spec = Some(held_spec(
            &self.identity,
            self.duration,
            held.spec.as_ref(),
            now,
        ));
        self.replace(&held, deadline).await
    }

    /// Gives `held` up, so anyone may take it at once.
    pub async fn release(&self, mut held: Lease, deadline: Instant) -> Result<Write, LeaseError> {
        if !self.holds(&held) {
            return Ok(Write::Conflict);
        }
        held.spec = held.spec.as_ref().map(released_spec);
        self.replace(&held, deadline).await
    }

    /// Deletes `lease` only if it is still at the resourceVersion it carries, so a Lease
    /// written since (by a new holder, say) is never deleted: that, or a Lease already
    /// gone, is a [`Write::Conflict`]. Anyone may delete, holder or not: the caller
    /// judges that nobody needs the Lease any more.
    pub async fn delete(&self, lease: Lease, deadline: Instant) -> Result<Write, LeaseError> {
        let name = lease.name_any();
        let Some(rv) = lease.metadata.resource_version.clone() else {
            return Err(LeaseError::Unguarded { name });
        };
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(rv),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        match by(&name, deadline, self.api.delete(&name, &params)).await {
            Ok(_) => Ok(Write::Done(Box::new(lease))),
            Err(e) if is_conflict(&e) => Ok(Write::Conflict),
            Err(e) => Err(e),
        }
    }

    fn holds(&self, lease: &Lease) -> bool {
        Record::of(lease).holder.as_deref() == Some(self.identity.as_str())
    }

    /// Replaces `lease` only if it still is at the resourceVersion it carries.
    async fn replace(&self, lease: &Lease, deadline: Instant) -> Result<Write, LeaseError> {
        let name = lease.name_any();
        if lease.metadata.resource_version.is_none() {
            return Err(LeaseError::Unguarded { name });
        }
        let params = PostParams::default();
        match by(&name, deadline, self.api.replace(&name, &params, lease)).await {
            Ok(l) => Ok(Write::Done(Box::new(l))),
            Err(e) if is_conflict(&e) => Ok(Write::Conflict),
            Err(e) => Err(e),
        }
    }
}

/// A conflict (409: changed or created meanwhile) or a Lease deleted since it was read.
fn is_conflict(e: &LeaseError) -> bool {
    matches!(e, LeaseError::Api { source: kube::Error::Api(s), .. } if s.code == 409 || s.code == 404)
}

/// Runs one API call, giving up at `deadline`.
async fn by<T>(
    name: &str,
    deadline: Instant,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, LeaseError> {
    match tokio::time::timeout_at(deadline.into(), call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(LeaseError::Api {
            name: name.into(),
            source,
        }),
        Err(_) => Err(LeaseError::Deadline { name: name.into() }),
    }
}

#[cfg(any(test, feature = "fake"))]
pub mod fake;
#[cfg(test)]
mod tests;
