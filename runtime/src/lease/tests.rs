use super::fake::FakeApiserver;
use super::*;

const NS: &str = "leases";

fn at(base: Instant, ms: u64) -> Instant {
    base + Duration::from_millis(ms)
}

/// The Lease `holder` writes at its renewal number `n`, stamped with its own clock.
fn renewal(holder: &str, n: u64, holder_clock: Timestamp, duration_s: i32) -> Lease {
    let mut l = absent("leader", BTreeMap::new());
    l.metadata.resource_version = Some(format!("{}", 100 + n));
    l.spec = Some(LeaseSpec {
        holder_identity: Some(holder.into()),
        lease_duration_seconds: Some(duration_s),
        renew_time: Some(MicroTime(holder_clock)),
        ..Default::default()
    });
    l
}

fn skewed(offset_s: i64, n: u64) -> Timestamp {
    let skew = k8s_openapi::jiff::SignedDuration::from_secs(offset_s + n as i64);
    Timestamp::now()
        .checked_add(skew)
        .expect("timestamp in range")
}

/// The holder's clock 30 s ahead or behind ours: while it renews (each second, lease
/// 10 s), nobody else may take the Lease; once it stops, the Lease is free exactly one
/// duration after its last renewal arrived, not 30 s earlier or later.
#[test]
fn a_skewed_holder_clock_neither_ends_a_live_lease_nor_keeps_a_dead_one() {
    for offset_s in [30, -30] {
        let base = Instant::now();
        let mut seen: Option<Observed> = None;
        for n in 0..20 {
            let lease = renewal("a", n, skewed(offset_s, n), 10);
            // Each renewal arrives 50 ms after it was made; the observer reads in between.
            let o = Observed::new(seen.as_ref(), lease, at(base, n * 1000 + 50));
            for probe in [n * 1000 + 50, n * 1000 + 999] {
                assert!(
                    !o.expired(at(base, probe)),
                    "skew {offset_s}s at {probe} ms"
                );
                assert!(!o.free_for("b", at(base, probe)), "skew {offset_s}s");
            }
            seen = Some(o);
        }
        let last = seen.expect("observed");
        let renewed = 19 * 1000 + 50;
        // Re-reading the unchanged record does not make it look renewed.
        let reread = Observed::new(Some(&last), last.lease.clone(), at(base, renewed + 5000));
        assert_eq!(reread.seen_at, at(base, renewed));
        assert!(
            !reread.free_for("b", at(base, renewed + 9_999)),
            "skew {offset_s}s"
        );
        assert!(
            reread.free_for("b", at(base, renewed + 10_000)),
            "skew {offset_s}s"
        );
        assert!(reread.free_for("a", at(base, renewed + 1)), "its own Lease");
    }
}

#[test]
fn any_change_of_the_record_restarts_the_clock_and_a_free_lease_is_free_at_once() {
    let base = Instant::now();
    let t = Timestamp::from_second(1000).expect("ts");
    let first = Observed::new(None, renewal("a", 1, t, 10), base);
    let changes = [
        renewal("b", 1, t, 10),
        renewal("a", 2, t, 10),
        renewal(
            "a",
            1,
            t.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(1))
                .expect("ts"),
            10,
        ),
        {
            let mut l = renewal("a", 1, t, 10);
            l.spec.as_mut().expect("spec").lease_transitions = Some(4);
            l
        },
    ];
    for lease in changes {
        let o = Observed::new(Some(&first), lease, at(base, 3000));
        assert_eq!(o.seen_at, at(base, 3000), "{:?}", o.record);
    }
    let mut free = renewal("", 1, t, 10);
    free.metadata.resource_version = Some("7".into());
    let o = Observed::new(None, free, base);
    assert_eq!(o.holder(), None, "an empty holder is none");
    assert!(o.free_for("b", base));
    let no_duration = Observed::new(None, absent("x", BTreeMap::new()), base);
    assert_eq!(no_duration.expires_at(), base + DEFAULT_DURATION);
}

#[test]
fn observations_keep_the_time_of_unchanged_leases_across_a_relist() {
    let base = Instant::now();
    let t = Timestamp::from_second(1000).expect("ts");
    let named = |name: &str, n: u64| {
        let mut l = renewal("a", n, t, 10);
        l.metadata.name = Some(name.into());
        l
    };
    let mut obs = Observations::default();
    obs.apply(Event::Apply(named("one", 1)), base);
    obs.apply(Event::Apply(named("two", 1)), base);
    obs.apply(Event::Init, at(base, 4000));
    obs.apply(Event::InitApply(named("one", 1)), at(base, 4000));
    obs.apply(Event::InitDone, at(base, 4000));
    assert_eq!(obs.get("one").map(|o| o.seen_at), Some(base));
    assert!(obs.get("two").is_none(), "gone during the relist");
    obs.apply(Event::Apply(named("one", 2)), at(base, 5000));
    assert_eq!(obs.get("one").map(|o| o.seen_at), Some(at(base, 5000)));
    obs.apply(Event::Delete(named("one", 2)), at(base, 6000));
    assert!(obs.get("one").is_none());
}

#[test]
fn specs_count_transitions_and_keep_the_acquire_time_on_renewal() {
    let t0 = Timestamp::from_second(1000).expect("ts");
    let t1 = Timestamp::from_second(1001).expect("ts");
    let d = Duration::from_secs(3);
    let first = held_spec("n1", d, None, t0);
    assert_eq!(first.holder_identity.as_deref(), Some("n1"));
    assert_eq!(first.lease_duration_seconds, Some(3));
    assert_eq!(first.lease_transitions, Some(0));
    let renewed = held_spec("n1", d, Some(&first), t1);
    assert_eq!(renewed.acquire_time, first.acquire_time);
    assert_eq!(renewed.renew_time, Some(MicroTime(t1)));
    assert_eq!(renewed.lease_transitions, Some(0));
    let taken = held_spec("n2", d, Some(&renewed), t1);
    assert_eq!(taken.lease_transitions, Some(1));
    assert_eq!(taken.acquire_time, Some(MicroTime(t1)));
    let released = released_spec(&taken);
    assert_eq!(released.holder_identity, None);
    assert_eq!(released.renew_time, None);
    assert_eq!(released.lease_transitions, Some(1));
    let retaken = held_spec("n3", d, Some(&released), t1);
    assert_eq!(retaken.lease_transitions, Some(2), "released, then taken");
    assert_eq!(
        held_spec("n1", Duration::from_millis(1500), None, t0).lease_duration_seconds,
        Some(2),
        "rounded up, never letting others in early"
    );
}

// ---------- the I/O layer against a fake apiserver ----------

fn clients(fake: &FakeApiserver) -> (LeaseClient, LeaseClient) {
    let api: Api<Lease> = Api::namespaced(fake.client(), NS);
    let d = Duration::from_secs(10);
    (
        LeaseClient::new(api.clone(), "a", d),
        LeaseClient::new(api, "b", d),
    )
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

fn done(w: Write) -> Lease {
    match w {
        Write::Done(l) => *l,
        Write::Conflict => panic!("conflict where a write was expected"),
    }
}

#[tokio::test]
async fn creating_an_absent_lease_is_a_race_that_one_writer_wins() {
    let fake = FakeApiserver::new(NS);
    let (a, b) = clients(&fake);
    let labels = BTreeMap::from([("k".to_string(), "v".to_string())]);
    let now = Timestamp::now();
    let won = done(
        a.acquire(absent("l", labels.clone()), now, soon())
            .await
            .expect("create"),
    );
    assert_eq!(Record::of(&won).holder.as_deref(), Some("a"));
    assert_eq!(won.metadata.labels, Some(labels.clone()));
    let lost = b
        .acquire(absent("l", labels), now, soon())
        .await
        .expect("409");
    assert!(matches!(lost, Write::Conflict), "{lost:?}");
    let stored = a.get("l", soon()).await.expect("get").expect("stored");
    assert_eq!(Record::of(&stored).holder.as_deref(), Some("a"));
}

#[tokio::test]
async fn writes_are_guarded_by_the_resource_version_read() {
    let fake = FakeApiserver::new(NS);
    let (a, b) = clients(&fake);
    let now = Timestamp::now();
    let held = done(
        a.acquire(absent("l", BTreeMap::new()), now, soon())
            .await
            .expect("a"),
    );
    done(a.release(held.clone(), soon()).await.expect("release"));
    // Both read the released Lease and race to take it: one wins, the other conflicts.
    let read = b.get("l", soon()).await.expect("get").expect("stored");
    let b_won = done(b.acquire(read.clone(), now, soon()).await.expect("b"));
    assert!(matches!(
        a.acquire(read, now, soon()).await.expect("a"),
        Write::Conflict
    ));
    assert_eq!(Record::of(&b_won).holder.as_deref(), Some("b"));
    assert_eq!(Record::of(&b_won).transitions, 1);
    // A renewal or release from a stale copy is refused, and so is one of a Lease that
    // names another holder (without asking the server).
    assert!(matches!(
        a.renew(held.clone(), now, soon()).await.expect("a"),
        Write::Conflict
    ));
    let asked = fake.requests();
    assert!(matches!(
        a.renew(b_won.clone(), now, soon()).await.expect("a"),
        Write::Conflict
    ));
    assert!(matches!(
        a.release(b_won.clone(), soon()).await.expect("a"),
        Write::Conflict
    ));
    assert_eq!(fake.requests(), asked, "no write for another's Lease");
    let renewed = done(b.renew(b_won.clone(), now, soon()).await.expect("renew"));
    assert_eq!(
        renewed.spec.as_ref().and_then(|s| s.acquire_time.clone()),
        b_won.spec.as_ref().and_then(|s| s.acquire_time.clone())
    );
    let stale = b.release(b_won, soon()).await.expect("b");
    assert!(
        matches!(stale, Write::Conflict),
        "released from a stale copy: {stale:?}"
    );
    let mut unguarded = renewed.clone();
    unguarded.metadata.resource_version = None;
    assert!(matches!(
        b.renew(unguarded, now, soon()).await,
        Err(LeaseError::Unguarded { .. })
    ));
}

#[tokio::test]
async fn a_released_lease_has_no_holder_and_keeps_its_count() {
    let fake = FakeApiserver::new(NS);
    let (a, _) = clients(&fake);
    let held = done(
        a.acquire(absent("l", BTreeMap::new()), Timestamp::now(), soon())
            .await
            .expect("a"),
    );
    let released = done(a.release(held, soon()).await.expect("release"));
    let stored = a.get("l", soon()).await.expect("get").expect("stored");
    assert_eq!(
        stored.metadata.resource_version,
        released.metadata.resource_version
    );
    let r = Record::of(&stored);
    assert_eq!((r.holder, r.renew_time, r.transitions), (None, None, 0));
}

#[tokio::test]
async fn an_attempt_gives_up_at_its_deadline() {
    let fake = FakeApiserver::new(NS);
    fake.stall(true);
    let (a, _) = clients(&fake);
    let deadline = Instant::now() + Duration::from_millis(100);
    let got = a.get("l", deadline).await;
    assert!(matches!(got, Err(LeaseError::Deadline { .. })), "{got:?}");
    assert!(Instant::now() >= deadline);
    let write = a
        .acquire(
            absent("l", BTreeMap::new()),
            Timestamp::now(),
            Instant::now() + Duration::from_millis(100),
        )
        .await;
    assert!(
        matches!(write, Err(LeaseError::Deadline { .. })),
        "{write:?}"
    );
}

/// A delete carries the resourceVersion read: a Lease a new holder wrote since stays, a
/// Lease still at that version goes, and a Lease already gone is no error.
#[tokio::test]
async fn a_delete_never_removes_a_lease_written_since_it_was_read() {
    let fake = FakeApiserver::new(NS);
    let (a, b) = clients(&fake);
    let now = Timestamp::now();
    let held = done(
        a.acquire(absent("l", BTreeMap::new()), now, soon())
            .await
            .expect("a"),
    );
    let released = done(a.release(held.clone(), soon()).await.expect("release"));
    let taken = done(b.acquire(released.clone(), now, soon()).await.expect("b"));
    // a deletes the copy it released: b's Lease is newer and stays.
    assert!(matches!(
        a.delete(released, soon()).await.expect("delete"),
        Write::Conflict
    ));
    assert_eq!(
        fake.get("l").map(|l| Record::of(&l).holder),
        Some(Some("b".to_string()))
    );
    // Anyone may delete the Lease at its current version.
    done(a.delete(taken.clone(), soon()).await.expect("delete"));
    assert!(fake.get("l").is_none());
    assert!(matches!(
        b.delete(taken, soon()).await.expect("gone"),
        Write::Conflict
    ));
    let unguarded = absent("l", BTreeMap::new());
    assert!(matches!(
        a.delete(unguarded, soon()).await,
        Err(LeaseError::Unguarded { .. })
    ));
}
