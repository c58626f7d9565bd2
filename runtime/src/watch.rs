//! Watch → store feeding, written once for every kind a binary indexes: a watch (with
//! backoff) feeds a reflector store, and each event reaches a callback after the store
//! took it in. [`Fingerprints`] tells the changes that matter (per kind, a fingerprint
//! function) from noise such as heartbeats or status written by berth itself.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;

use futures::StreamExt;
use kube::runtime::reflector::store::Writer;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

/// One watch event, after the store took it in.
#[derive(Debug)]
pub enum Change<'a, K> {
    Applied(&'a K),
    Deleted(&'a K),
    /// A (re)list begins: every object is applied again, then [`Change::Relisted`].
    Relisting,
    /// The (re)list is complete; objects it did not list are gone.
    Relisted,
}

/// Feeds `writer` from a watch of `api` and calls `on_change` for every event. Runs until
/// the task is dropped; watch errors are retried with backoff.
pub async fn feed<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    mut on_change: impl FnMut(Change<'_, K>),
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    let stream = watcher(api, config).default_backoff().reflect(writer);
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(ev) => on_change(change_of(&ev)),
            Err(e) => tracing::debug!(error = %e, "watch failed; retrying"),
        }
    }
}

/// The [`Change`] a watcher event is, for streams wired by hand (a controller's own).
pub fn change_of<K>(event: &watcher::Event<K>) -> Change<'_, K> {
    match event {
        watcher::Event::Apply(o) | watcher::Event::InitApply(o) => Change::Applied(o),
        watcher::Event::Delete(o) => Change::Deleted(o),
        watcher::Event::Init => Change::Relisting,
        watcher::Event::InitDone => Change::Relisted,
    }
}

/// What a [`Change`] did to the fingerprints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta {
    /// An object not seen before (key `namespace/name`).
    Added(String),
    /// An object whose fingerprint changed.
    Changed(String),
    /// Objects that are gone.
    Removed(Vec<String>),
}

/// The last fingerprint of every object of one kind.
#[derive(Debug)]
pub struct Fingerprints<V> {
    seen: HashMap<String, V>,
    /// Keys listed since the current relist began.
    relisted: Option<HashSet<String>>,
}

impl<V> Default for Fingerprints<V> {
    fn default() -> Self {
        Self {
            seen: HashMap::new(),
            relisted: None,
        }
    }
}

fn key_of<K: Resource>(o: &K) -> String {
    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())
}

impl<V: PartialEq> Fingerprints<V> {
    /// Records `change` with `print` as the fingerprint; `None` when nothing that matters
    /// changed.
    pub fn observe<K: Resource>(
        &mut self,
        change: &Change<'_, K>,
        print: impl Fn(&K) -> V,
    ) -> Option<Delta> {
        match change {
            Change::Applied(o) => {
                let key = key_of(*o);
                if let Some(listed) = self.relisted.as_mut() {
                    listed.insert(key.clone());
                }
                let now = print(o);
                let changed = self.seen.get(&key).map(|old| *old != now);
                self.seen.insert(key.clone(), now);
                match changed {
                    None => Some(Delta::Added(key)),
                    Some(true) => Some(Delta::Changed(key)),
                    Some(false) => None,
                }
            }
            Change::Deleted(o) => {
                let key = key_of(*o);
                self.seen.remove(&key).map(|_| Delta::Removed(vec![key]))
            }
            Change::Relisting => {
                self.relisted = Some(HashSet::new());
                None
            }
            Change::Relisted => {
                let listed = self.relisted.take()?;
                let gone: Vec<String> = self
                    .seen
                    .keys()
                    .filter(|k| !listed.contains(*k))
                    .cloned()
                    .collect();
                for k in &gone {
                    self.seen.remove(k);
                }
                (!gone.is_empty()).then_some(Delta::Removed(gone))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn cm(name: &str, value: &str) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(name.into());
        c.metadata.namespace = Some("ns".into());
        c.data = Some([("k".to_string(), value.to_string())].into());
        c
    }

    fn print(c: &ConfigMap) -> Option<String> {
        c.data.as_ref()?.get("k").cloned()
    }

    #[test]
    fn only_fingerprint_changes_count() {
        let mut f = Fingerprints::default();
        let a = cm("a", "1");
        assert_eq!(
            f.observe(&Change::Applied(&a), print),
            Some(Delta::Added("ns/a".into()))
        );
        assert_eq!(f.observe(&Change::Applied(&a), print), None, "same print");
        let a2 = cm("a", "2");
        assert_eq!(
            f.observe(&Change::Applied(&a2), print),
            Some(Delta::Changed("ns/a".into()))
        );
        assert_eq!(
            f.observe(&Change::Deleted(&a2), print),
            Some(Delta::Removed(vec!["ns/a".into()]))
        );
        assert_eq!(f.observe(&Change::Deleted(&a2), print), None, "unknown");
    }

    #[test]
    fn a_relist_reports_what_it_no_longer_lists() {
        let mut f = Fingerprints::default();
        let (a, b) = (cm("a", "1"), cm("b", "1"));
        f.observe(&Change::Applied(&a), print);
        f.observe(&Change::Applied(&b), print);
        assert_eq!(f.observe::<ConfigMap>(&Change::Relisting, print), None);
        assert_eq!(f.observe(&Change::Applied(&a), print), None);
        assert_eq!(
            f.observe::<ConfigMap>(&Change::Relisted, print),
            Some(Delta::Removed(vec!["ns/b".into()]))
        );
        assert_eq!(f.observe::<ConfigMap>(&Change::Relisted, print), None);
    }
}
