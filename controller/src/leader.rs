//! Leader election on a `coordination.k8s.io/v1` Lease: only the holder calls AWS or
//! writes. Updates carry the resourceVersion, so two replicas can never both win. Every
//! successful renewal moves the [`Fence`] deadline forward; losing the Lease (or failing
//! to renew it in time) loses the fence, which stops every writer.

use std::time::{Duration, Instant};

use berth_runtime::Fence;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    fence: Fence,
}

/// Whether `spec` lets `identity` take the lease at `now_ms`: free, ours, or expired. Pure.
pub fn can_take(spec: &LeaseSpec, identity: &str, now_ms: i64) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == identity {
        return true;
    }
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0.as_millisecond())
        .unwrap_or(0);
    let duration_ms = i64::from(spec.lease_duration_seconds.unwrap_or(15)) * 1000;
    now_ms > renewed + duration_ms
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
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            fence,
        }
    }

    /// Writes are allowed until the lease could have expired as seen by another replica:
    /// counted from when this attempt started, less a tenth for clock-rate differences.
    fn held_since(&self, started: Instant) {
        self.fence
            .hold_until(started + self.duration - self.duration / 10);
    }

    fn spec(&self, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let ours =
            previous.and_then(|p| p.holder_identity.as_deref()) == Some(self.identity.as_str());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: if ours {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(
                previous.and_then(|p| p.lease_transitions).unwrap_or(0)
                    + i32::from(!ours && previous.is_some()),
            ),
            ..Default::default()
        }
    }

    /// One attempt to take or renew the lease; true when this replica holds it afterwards.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let started = Instant::now();
        let held = self.try_acquire_at(Timestamp::now()).await;
        if matches!(held, Ok(true)) {
            self.held_since(started);
        }
        held
    }

    async fn try_acquire_at(&self, now: Timestamp) -> Result<bool, kube::Error> {
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(None, now)),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let spec = lease.spec.clone().unwrap_or_default();
                if !can_take(&spec, &self.identity, now.as_millisecond()) {
                    return Ok(false);
                }
                lease.spec = Some(self.spec(Some(&spec), now));
                // replace() sends the resourceVersion we read: a concurrent writer wins, we lose.
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Waits until this replica holds the lease.
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

    pub fn retry_period(&self) -> Duration {
        (self.duration / 4).max(Duration::from_millis(250))
    }

    /// Renews until renewing fails for longer than the lease lasts; returns when
    /// leadership is lost, with the fence lost first.
    pub async fn hold(&self) {
        self.renew_until_lost().await;
        self.fence.lose();
    }

    async fn renew_until_lost(&self) {
        let period = self.retry_period();
        let mut last_ok = std::time::Instant::now();
        loop {
            tokio::time::sleep(period).await;
            match self.try_acquire().await {
                Ok(true) => last_ok = std::time::Instant::now(),
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the lease");
                    // Stop before another replica may take over.
                    if last_ok.elapsed() + period >= self.duration {
                        return;
                    }
                }
            }
        }
    }

    /// Gives the lease up (on shutdown) so another replica takes over at once.
    pub async fn release(&self) {
        // No write of ours may follow the release.
        self.fence.lose();
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            let mut spec = lease.spec.clone().unwrap_or_default();
            if spec.holder_identity.as_deref() == Some(self.identity.as_str()) {
                spec.holder_identity = None;
                spec.renew_time = None;
                lease.spec = Some(spec);
                let _ = self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renew_s: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            renew_time: Some(MicroTime(
                Timestamp::from_second(renew_s).unwrap_or(Timestamp::UNIX_EPOCH),
            )),
            lease_duration_seconds: Some(duration),
            ..Default::default()
        }
    }

    #[test]
    fn leases_are_taken_when_free_ours_or_expired() {
        assert!(can_take(&spec(None, 100, 15), "a", 101_000));
        assert!(can_take(&spec(Some(""), 100, 15), "a", 101_000));
        assert!(can_take(&spec(Some("a"), 100, 15), "a", 101_000));
        assert!(!can_take(&spec(Some("b"), 100, 15), "a", 114_000));
        assert!(can_take(&spec(Some("b"), 100, 15), "a", 116_000));
    }
}
