//! berth's resources in AWS by Service UID: refreshed by the orphan sweep from the tags,
//! and updated by deploy as it creates and deletes, so a Service's earlier resources are
//! found even when their names no longer follow from its spec.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

/// berth's resources in AWS by Service UID, from the last tag sweep plus what this process
/// created since.
#[derive(Default)]
pub struct Inventory {
    inner: Mutex<InventoryData>,
}

#[derive(Default, Clone, Debug)]
pub struct InventoryData {
    /// uid → load balancer ARNs.
    pub load_balancers: HashMap<String, BTreeSet<String>>,
    /// uid → target group ARNs.
    pub target_groups: HashMap<String, BTreeSet<String>>,
}

impl Inventory {
    pub fn replace(&self, data: InventoryData) {
        if let Ok(mut g) = self.inner.lock() {
            *g = data;
        }
    }

    pub fn add_lb(&self, uid: &str, arn: &str) {
        if let Ok(mut g) = self.inner.lock() {
            g.load_balancers
                .entry(uid.into())
                .or_default()
                .insert(arn.into());
        }
    }

    pub fn add_tg(&self, uid: &str, arn: &str) {
        if let Ok(mut g) = self.inner.lock() {
            g.target_groups
                .entry(uid.into())
                .or_default()
                .insert(arn.into());
        }
    }

    pub fn remove(&self, arn: &str) {
        if let Ok(mut g) = self.inner.lock() {
            let InventoryData {
                load_balancers,
                target_groups,
            } = &mut *g;
            for set in load_balancers
                .values_mut()
                .chain(target_groups.values_mut())
            {
                set.remove(arn);
            }
        }
    }

    pub fn of(&self, uid: &str) -> (BTreeSet<String>, BTreeSet<String>) {
        self.inner
            .lock()
            .map(|g| {
                (
                    g.load_balancers.get(uid).cloned().unwrap_or_default(),
                    g.target_groups.get(uid).cloned().unwrap_or_default(),
                )
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_tracks_and_forgets_resources() {
        let inv = Inventory::default();
        inv.add_lb("u1", "lb-1");
        inv.add_tg("u1", "tg-1");
        assert_eq!(inv.of("u1").0.len(), 1);
        inv.remove("tg-1");
        assert!(inv.of("u1").1.is_empty());
        assert!(inv.of("u2").0.is_empty());
    }
}
