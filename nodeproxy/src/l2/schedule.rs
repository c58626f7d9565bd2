//! The announcer's Lease writes, run concurrently (at most [`IN_FLIGHT`] at a time) and
//! most urgent first: renewals by their due time, then releases, then takes, then
//! deletions of Leases nobody needs. Writes outlive the step that started them
//! ([`InFlight`]): a slow write holds up neither the other addresses' renewals nor the
//! next step, so a node with hundreds of addresses renews each one on time even when the
//! apiserver answers slowly.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use berth_runtime::lease::{self, LeaseClient, Observed, Write};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;

use crate::l2::announce::{self, LeaseView, Timing};

/// Lease writes in flight at once: enough to renew a few hundred addresses within a
/// fraction of a renewal interval, few enough not to flood the apiserver.
pub const IN_FLIGHT: usize = 32;

/// Takes, releases and deletions started in one step: two rounds of [`IN_FLIGHT`], so a
/// step stays short while hundreds of addresses change at once; renewals are never held
/// back.
pub const OTHERS_PER_STEP: usize = 2 * IN_FLIGHT;

/// One Lease write.
#[derive(Clone, Debug)]
pub enum Job {
    /// Take the Lease as observed, or create it.
    Acquire { seen: Option<Observed> },
    /// Renew the Lease as last written, due at `due`; the claim ends at `claim_end`.
    Renew {
        held: Lease,
        due: Instant,
        claim_end: Instant,
    },
    /// Give the Lease up; delete it when its address is allocated no more.
    Release { held: Lease, delete: bool },
    /// Delete a Lease that has stood still for a whole duration and whose address is
    /// allocated no more (its holder died, or released it without deleting).
    Sweep { lease: Lease },
}

impl Job {
    /// Sort key, most urgent first.
    fn urgency(&self) -> (u8, Reverse<Option<Reverse<Instant>>>) {
        match self {
            Job::Renew { due, .. } => (0, Reverse(Some(Reverse(*due)))),
            Job::Release { .. } => (1, Reverse(None)),
            Job::Acquire { .. } => (2, Reverse(None)),
            Job::Sweep { .. } => (3, Reverse(None)),
        }
    }
}

/// Orders `jobs` most urgent first: renewals by due time, then releases, takes, sweeps.
/// Pure.
pub fn order(jobs: &mut [(IpAddr, Job)]) {
    jobs.sort_by_key(|(_, j)| j.urgency());
}

/// What came of one [`Job`].
#[derive(Clone, Debug)]
pub enum Outcome {
    Acquired {
        lease: Lease,
        started: Instant,
        previous: Option<String>,
    },
    Renewed {
        lease: Lease,
        started: Instant,
        late: Duration,
    },
    /// The renewal conflicted but the Lease still names this node (written by someone
    /// else meanwhile): renew from this copy.
    StillOurs(Lease),
    /// The renewal found another holder.
    Lost,
    Released {
        deleted: bool,
    },
    Swept,
    /// Nothing changed: another node came first, or the call failed (logged).
    Unchanged,
}

/// What the jobs need: the node's Lease client and its timing.
#[derive(Clone)]
pub struct Worker {
    pub leases: LeaseClient,
    pub node: String,
    pub timing: Timing,
}

impl Worker {
    /// Runs `jobs` (ordered by [`order`]) with at most [`IN_FLIGHT`] in flight.
    pub async fn run(&self, mut jobs: Vec<(IpAddr, Job)>) -> Vec<(IpAddr, Outcome)> {
        order(&mut jobs);
        futures::stream::iter(jobs)
            .map(|(addr, job)| async move { (addr, self.one(addr, job).await) })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await
    }

    /// Runs one job; owned, so it can outlive the step that started it.
    async fn owned(self, addr: IpAddr, job: Job) -> (IpAddr, Outcome) {
        let outcome = self.one(addr, job).await;
        (addr, outcome)
    }

    async fn one(&self, addr: IpAddr, job: Job) -> Outcome {
        let started = Instant::now();
        match job {
            Job::Acquire { seen } => self.acquire(addr, seen, started).await,
            Job::Renew {
                held,
                due,
                claim_end,
            } => {
                let late = started.saturating_duration_since(due);
                self.renew(addr, held, claim_end, started, late).await
            }
            Job::Release { held, delete } => self.release(addr, held, delete, started).await,
            Job::Sweep { lease } => {
                let deadline = started + self.timing.attempt;
                match self.leases.delete(lease, deadline).await {
                    Ok(Write::Done(_)) => Outcome::Swept,
                    Ok(Write::Conflict) => Outcome::Unchanged,
                    Err(e) => {
                        tracing::debug!(address = %addr, "deleting an unused Lease: {e}");
                        Outcome::Unchanged
                    }
                }
            }
        }
    }

    /// Creates the Lease, or takes the one observed (at the resourceVersion observed).
    async fn acquire(&self, addr: IpAddr, seen: Option<Observed>, started: Instant) -> Outcome {
        let name = announce::lease_name(&addr);
        let previous = seen.as_ref().map(LeaseView::of);
        let previous = previous.and_then(|v| v.holder.or(v.released_by));
        let current = match seen {
            None => lease::absent(
                &name,
                [(announce::LEASE_LABEL.to_string(), "true".to_string())].into(),
            ),
            Some(s) => {
                let mut l = s.lease;
                if let Some(a) = l.metadata.annotations.as_mut() {
                    a.remove(announce::RELEASED_BY);
                }
                l
            }
        };
        let deadline = started + self.timing.attempt;
        match self
            .leases
            .acquire(current, Timestamp::now(), deadline)
            .await
        {
            Ok(Write::Done(l)) => Outcome::Acquired {
                lease: *l,
                started,
                previous,
            },
            Ok(Write::Conflict) => {
                tracing::debug!(address = %addr, "another node took the Lease first");
                Outcome::Unchanged
            }
            Err(e) => {
                tracing::warn!(address = %addr, "taking the Lease: {e}");
                Outcome::Unchanged
            }
        }
    }

    /// A renewal may take until the claim ends: cutting it short at one attempt's length
    /// only wastes a write the apiserver may still make (the next one then conflicts), and
    /// as it no longer holds up the step, nothing waits for it.
    async fn renew(
        &self,
        addr: IpAddr,
        held: Lease,
        claim_end: Instant,
        started: Instant,
        late: Duration,
    ) -> Outcome {
        // Past the claim's end the address is lost anyway.
        match self.leases.renew(held, Timestamp::now(), claim_end).await {
            Ok(Write::Done(lease)) => Outcome::Renewed {
                lease: *lease,
                started,
                late,
            },
            Ok(Write::Conflict) => self.reread(addr).await,
            Err(e) => {
                tracing::warn!(address = %addr, "renewing the Lease: {e}");
                Outcome::Unchanged
            }
        }
    }

    /// A renewal conflicted: the Lease is still this node's (written by someone else
    /// meanwhile), or it is lost.
    async fn reread(&self, addr: IpAddr) -> Outcome {
        let name = announce::lease_name(&addr);
        let deadline = Instant::now() + self.timing.attempt;
        match self.leases.get(&name, deadline).await {
            Ok(Some(fresh)) if lease::Record::of(&fresh).holder.as_deref() == Some(&self.node) => {
                Outcome::StillOurs(fresh)
            }
            Ok(_) => Outcome::Lost,
            Err(e) => {
                tracing::warn!(address = %addr, "reading the Lease: {e}");
                Outcome::Unchanged
            }
        }
    }

    /// Frees the Lease so another node takes it at once, or deletes it when nobody needs
    /// it; the address has left the interface already.
    async fn release(&self, addr: IpAddr, mut l: Lease, delete: bool, started: Instant) -> Outcome {
        let deadline = started + self.timing.attempt;
        let written = if delete {
            self.leases.delete(l, deadline).await
        } else {
            l.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(announce::RELEASED_BY.into(), self.node.clone());
            self.leases.release(l, deadline).await
        };
        match written {
            Ok(Write::Done(_)) => Outcome::Released { deleted: delete },
            // Another node may have taken it already; otherwise it expires (and, when its
            // address is gone, any agent deletes it then).
            Ok(Write::Conflict) => {
                tracing::debug!(address = %addr, "the Lease changed before its release");
                Outcome::Released { deleted: false }
            }
            Err(e) => {
                tracing::debug!(address = %addr, "releasing the Lease: {e}");
                Outcome::Released { deleted: false }
            }
        }
    }
}

/// Lease writes started by earlier steps and not finished yet, at most one per address.
#[derive(Default)]
pub struct InFlight {
    /// Tasks, so the writes progress while the announcer is busy elsewhere.
    jobs: tokio::task::JoinSet<(IpAddr, Outcome)>,
    /// The task writing each busy address.
    addrs: BTreeMap<IpAddr, tokio::task::Id>,
}

impl InFlight {
    /// Whether `addr` has a write in flight (its next decision waits for the outcome).
    pub fn busy(&self, addr: &IpAddr) -> bool {
        self.addrs.contains_key(addr)
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Starts the most urgent of `jobs` while fewer than [`IN_FLIGHT`] run, skipping
    /// addresses already busy; returns how many started. The rest are decided afresh at
    /// the next step.
    pub fn start(&mut self, worker: &Worker, mut jobs: Vec<(IpAddr, Job)>) -> usize {
        order(&mut jobs);
        let mut started = 0;
        for (addr, job) in jobs {
            if self.jobs.len() >= IN_FLIGHT {
                break;
            }
            if self.addrs.contains_key(&addr) {
                continue;
            }
            let task = self.jobs.spawn(worker.clone().owned(addr, job));
            self.addrs.insert(addr, task.id());
            started += 1;
        }
        started
    }

    /// The next finished write, then every other one finished by now; pending forever
    /// while nothing is in flight.
    pub async fn finished(&mut self) -> Vec<(IpAddr, Outcome)> {
        let mut done = Vec::new();
        while done.is_empty() {
            let Some(first) = self.jobs.join_next().await else {
                return std::future::pending().await;
            };
            done.extend(self.joined(first));
            while let Some(more) = self.jobs.try_join_next() {
                done.extend(self.joined(more));
            }
        }
        done
    }

    /// A finished task's outcome; a task that panicked frees its address (decided afresh
    /// at the next step) and is logged.
    fn joined(
        &mut self,
        r: Result<(IpAddr, Outcome), tokio::task::JoinError>,
    ) -> Option<(IpAddr, Outcome)> {
        match r {
            Ok((addr, outcome)) => {
                self.addrs.remove(&addr);
                Some((addr, outcome))
            }
            Err(e) => {
                tracing::error!("a Lease write task failed: {e}");
                let id = e.id();
                self.addrs.retain(|_, t| *t != id);
                None
            }
        }
    }

    /// Waits for every write in flight, up to `deadline`; the writes still running then
    /// are dropped (their Leases expire or are taken over).
    pub async fn drain(&mut self, deadline: Instant) -> Vec<(IpAddr, Outcome)> {
        let mut done = Vec::new();
        while !self.jobs.is_empty() {
            match tokio::time::timeout_at(deadline.into(), self.finished()).await {
                Ok(more) => done.extend(more),
                Err(_) => break,
            }
        }
        self.jobs.abort_all();
        self.addrs.clear();
        done
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use berth_runtime::lease::fake::FakeApiserver;
    use kube::Api;

    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(
            u32::from(std::net::Ipv4Addr::new(198, 19, 8, 0)) + n,
        ))
    }

    #[test]
    fn renewals_come_first_by_due_time_then_releases_takes_sweeps() {
        let t = Instant::now();
        let renew = |s: u64| Job::Renew {
            held: Lease::default(),
            due: t + Duration::from_secs(s),
            claim_end: t,
        };
        let mut jobs = vec![
            (
                ip(1),
                Job::Sweep {
                    lease: Lease::default(),
                },
            ),
            (ip(2), Job::Acquire { seen: None }),
            (ip(3), renew(5)),
            (
                ip(4),
                Job::Release {
                    held: Lease::default(),
                    delete: true,
                },
            ),
            (ip(5), renew(1)),
        ];
        order(&mut jobs);
        let got: Vec<IpAddr> = jobs.iter().map(|j| j.0).collect();
        assert_eq!(got, [ip(5), ip(3), ip(4), ip(2), ip(1)]);
    }

    /// Writes outlive the step: a renewal slower than one attempt's length still lands
    /// (the apiserver answers late, not never), an address with a write in flight gets
    /// no second one, and another address's write starts and ends meanwhile.
    #[tokio::test]
    async fn a_slow_renewal_lands_and_does_not_block_other_writes() {
        let fake = FakeApiserver::new("ns");
        let api: Api<Lease> = Api::namespaced(fake.client(), "ns");
        let timing = Timing::new(Duration::from_secs(3));
        let w = Worker {
            leases: LeaseClient::new(api, "node-a", timing.duration),
            node: "node-a".into(),
            timing,
        };
        let taken = w.run(vec![(ip(1), Job::Acquire { seen: None })]).await;
        let Some((_, Outcome::Acquired { lease, .. })) = taken.into_iter().next() else {
            panic!("not taken");
        };
        let now = Instant::now();
        let renew = Job::Renew {
            held: lease,
            due: now,
            claim_end: now + timing.duration,
        };
        let mut flight = InFlight::default();
        fake.stall(true);
        assert_eq!(flight.start(&w, vec![(ip(1), renew.clone())]), 1);
        assert_eq!(
            flight.start(&w, vec![(ip(1), renew)]),
            0,
            "one write per address"
        );
        assert!(flight.busy(&ip(1)));
        let other = vec![(ip(2), Job::Acquire { seen: None })];
        assert_eq!(
            flight.start(&w, other),
            1,
            "another address starts meanwhile"
        );
        // The take gives up after one attempt; the renewal, still in flight, does not.
        let gave_up = tokio::time::timeout(timing.attempt * 3, flight.finished())
            .await
            .expect("the take gives up after one attempt");
        assert!(
            matches!(gave_up.as_slice(), [(a, Outcome::Unchanged)] if *a == ip(2)),
            "{gave_up:?}"
        );
        assert!(flight.busy(&ip(1)) && !flight.busy(&ip(2)));
        fake.stall(false);
        let done = flight.drain(Instant::now() + Duration::from_secs(5)).await;
        let renewed = done
            .iter()
            .any(|(a, o)| *a == ip(1) && matches!(o, Outcome::Renewed { .. }));
        assert!(renewed, "the slow renewal landed: {done:?}");
        assert!(flight.is_empty() && !flight.busy(&ip(1)));
    }

    /// Hundreds of takes and renewals through the bounded pool all land, each renewal
    /// reports how late it started, and a release of an address gone deletes its Lease.
    #[tokio::test]
    async fn many_renewals_report_their_lateness_and_a_release_deletes() {
        let fake = FakeApiserver::new("ns");
        let api: Api<Lease> = Api::namespaced(fake.client(), "ns");
        let timing = Timing::new(Duration::from_secs(15));
        let w = Worker {
            leases: LeaseClient::new(api, "node-a", timing.duration),
            node: "node-a".into(),
            timing,
        };
        let n = 300;
        let takes = (0..n)
            .map(|i| (ip(i), Job::Acquire { seen: None }))
            .collect();
        let taken = w.run(takes).await;
        let now = Instant::now();
        let late_by = Duration::from_millis(250);
        let renewals: Vec<(IpAddr, Job)> = taken
            .iter()
            .map(|(a, o)| match o {
                Outcome::Acquired { lease, .. } => (
                    *a,
                    Job::Renew {
                        held: lease.clone(),
                        due: now - late_by,
                        claim_end: now + timing.duration,
                    },
                ),
                other => panic!("{a}: {other:?}"),
            })
            .collect();
        let out = w.run(renewals).await;
        let renewed: BTreeSet<IpAddr> = out
            .iter()
            .filter_map(|(a, o)| match o {
                Outcome::Renewed { late, .. } if *late >= late_by => Some(*a),
                _ => None,
            })
            .collect();
        assert_eq!(renewed.len(), n as usize);
        // Releasing with `delete` removes the Lease at the version this node wrote.
        let held: BTreeMap<IpAddr, Lease> = out
            .into_iter()
            .filter_map(|(a, o)| match o {
                Outcome::Renewed { lease, .. } => Some((a, lease)),
                _ => None,
            })
            .collect();
        let (a0, l0) = held
            .iter()
            .next()
            .map(|(a, l)| (*a, l.clone()))
            .expect("one");
        let r = w
            .run(vec![(
                a0,
                Job::Release {
                    held: l0,
                    delete: true,
                },
            )])
            .await;
        assert!(matches!(r[0].1, Outcome::Released { deleted: true }));
        assert!(fake.get(&announce::lease_name(&a0)).is_none());
    }
}
