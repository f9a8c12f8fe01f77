//! The decoded volumes of the series whose jobs are running or waiting, so
//! the jobs of one series (one per route: a chest's PMA, SFA and CAC) read
//! and decode its files once.
//!
//! Input: a key (series, generation, number of files) and a loader (the
//! job's own `load_volume`). Output: the volume, shared (`Arc`); a job
//! reads it in place (a volume route's reports too) and builds what it
//! changes (a thin series' 3 mm slabs).
//! Invariants: the volumes kept hold at most `budget` bytes of HU (a volume
//! larger than the budget is returned, not kept; the oldest are dropped to
//! make room); two jobs asking for the same key at once decode it once (the
//! second waits for the first); a failed load is not kept (each job reports
//! its own error). A new generation of a series is a new key.
//! Failure modes: the loader's error, unchanged.

use std::sync::{Arc, Mutex};

use crate::volume::Volume;

/// Which decoded volume: the series, its generation (a series that grew
/// after completion is routed again with a new one) and its file count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeKey {
    pub series: String,
    pub generation: u32,
    pub files: usize,
}

type Slot = Arc<Mutex<Option<Arc<Volume>>>>;

/// A byte-bounded cache of decoded volumes (module doc).
pub struct VolumeCache {
    budget: usize,
    /// Least recently used first, with the bytes of the volume kept in
    /// each (0 while it decodes).
    slots: Mutex<Vec<(VolumeKey, Slot, usize)>>,
}

fn bytes(v: &Volume) -> usize {
    v.hu.len() * std::mem::size_of::<f32>()
}

impl VolumeCache {
    pub fn new(budget_bytes: usize) -> VolumeCache {
        VolumeCache { budget: budget_bytes, slots: Mutex::new(Vec::new()) }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<(VolumeKey, Slot, usize)>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The volume of `key`, decoded by `load` unless kept.
    pub fn get_or_load<E>(&self, key: &VolumeKey, load: impl FnOnce() -> Result<Volume, E>) -> Result<Arc<Volume>, E> {
        if self.budget == 0 {
            return load().map(Arc::new);
        }
        let slot = {
            let mut slots = self.slots();
            let (slot, size) = match slots.iter().position(|(k, _, _)| k == key) {
                Some(i) => {
                    let (_, s, n) = slots.remove(i);
                    (s, n)
                }
                None => (Slot::default(), 0),
            };
            slots.push((key.clone(), slot.clone(), size));
            slot
        };
        // Held while decoding: a second job of the series waits for this one.
        let mut held = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = held.as_ref() {
            return Ok(v.clone());
        }
        let v = match load() {
            Ok(v) => Arc::new(v),
            Err(e) => {
                drop(held);
                self.forget_slot(&slot);
                return Err(e);
            }
        };
        let size = bytes(&v);
        if size > self.budget {
            drop(held);
            self.forget_slot(&slot);
            return Ok(v);
        }
        *held = Some(v.clone());
        drop(held);
        self.make_room(&slot, size);
        Ok(v)
    }

    fn forget_slot(&self, slot: &Slot) {
        self.slots().retain(|(_, s, _)| !Arc::ptr_eq(s, slot));
    }

    /// Records `keep`'s size, then drops the oldest other volumes until the
    /// kept ones fit the budget.
    fn make_room(&self, keep: &Slot, size: usize) {
        let mut slots = self.slots();
        // Dropped meanwhile (its series ended): nothing to keep.
        let Some(e) = slots.iter_mut().find(|(_, s, _)| Arc::ptr_eq(s, keep)) else { return };
        e.2 = size;
        let mut total: usize = slots.iter().map(|e| e.2).sum();
        let mut i = 0;
        while total > self.budget && i < slots.len() {
            if Arc::ptr_eq(&slots[i].1, keep) {
                i += 1;
                continue;
            }
            total -= slots.remove(i).2;
        }
    }

    /// Drops every volume of `series` (its jobs have all ended).
    pub fn forget(&self, series: &str) {
        self.slots().retain(|(k, _, _)| k.series != series);
    }

    /// Bytes of HU kept now.
    pub fn kept_bytes(&self) -> usize {
        self.slots().iter().map(|e| e.2).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(slices: usize) -> Volume {
        Volume::test_stack(ndarray::Array3::zeros((slices, 4, 4)), [1.0, 1.0], 1.0)
    }

    fn key(series: &str) -> VolumeKey {
        VolumeKey { series: series.into(), generation: 1, files: 3 }
    }

    #[test]
    fn a_series_is_decoded_once_and_the_budget_holds() {
        let c = VolumeCache::new(2 * 64 * 4); // two 4-slice 4x4 volumes
        let loads = std::sync::atomic::AtomicUsize::new(0);
        let load = |n| {
            loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, ()>(vol(n))
        };
        let a = c.get_or_load(&key("a"), || load(4)).unwrap();
        let a2 = c.get_or_load(&key("a"), || load(4)).unwrap();
        assert!(Arc::ptr_eq(&a, &a2));
        assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 1);
        c.get_or_load(&key("b"), || load(4)).unwrap();
        c.get_or_load(&key("c"), || load(4)).unwrap();
        // "a" was the oldest: dropped to make room.
        assert!(c.kept_bytes() <= 2 * 64 * 4);
        c.get_or_load(&key("a"), || load(4)).unwrap();
        assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 4);
        // Larger than the budget: returned, not kept.
        c.forget("a");
        c.forget("b");
        c.forget("c");
        assert_eq!(c.kept_bytes(), 0);
        c.get_or_load(&key("big"), || load(9)).unwrap();
        assert_eq!(c.kept_bytes(), 0);
        // A failed load is not kept; a new generation is a new key.
        assert!(c.get_or_load(&key("e"), || Err::<Volume, ()>(())).is_err());
        c.get_or_load(&key("e"), || load(1)).unwrap();
        let g2 = VolumeKey { generation: 2, ..key("e") };
        c.get_or_load(&g2, || load(1)).unwrap();
        assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 7);
    }
}
