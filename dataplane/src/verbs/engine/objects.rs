//! The engine's tables of CQs, QPs and SRQs: slabs (stable indices, reused after removal)
//! whose keys are typed, so that the index of a CQ never looks up a QP.

use crate::verbs::ids::ObjectKey;
use std::marker::PhantomData;

/// A slab of `T` keyed by `K`.
#[derive(Debug)]
pub(in crate::verbs) struct Objects<K, T> {
    slab: slab::Slab<T>,
    _key: PhantomData<fn() -> K>,
}

impl<K, T> Default for Objects<K, T> {
    fn default() -> Self {
        Objects {
            slab: slab::Slab::new(),
            _key: PhantomData,
        }
    }
}

impl<K: ObjectKey, T> Objects<K, T> {
    pub(super) fn insert(&mut self, item: T) -> K {
        K::from_index(self.slab.insert(item))
    }

    pub(super) fn remove(&mut self, key: K) -> Option<T> {
        self.slab.try_remove(key.index())
    }

    pub(in crate::verbs) fn get(&self, key: K) -> Option<&T> {
        self.slab.get(key.index())
    }

    pub(in crate::verbs) fn get_mut(&mut self, key: K) -> Option<&mut T> {
        self.slab.get_mut(key.index())
    }

    /// Every key that may be in use, in index order (vacant ones among them look up nothing):
    /// for a pass that changes the engine as it goes, and so cannot hold an iterator.
    pub(super) fn keys(&self) -> impl Iterator<Item = K> {
        // The last entry in use bounds the indices; finding it skips only vacant entries at
        // the end.
        let end = self.slab.iter().next_back().map_or(0, |(i, _)| i + 1);
        (0..end).map(K::from_index)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &T> {
        self.slab.iter().map(|(_, item)| item)
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.slab.iter_mut().map(|(_, item)| item)
    }
}
