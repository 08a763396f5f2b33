//! The engine's tables of CQs, QPs and SRQs: slabs (stable indices, reused after removal)
//! whose keys are typed, so that the index of a CQ never looks up a QP.
//!
//! An index the engine holds names an object by the engine's own bookkeeping, so a lookup that
//! finds nothing is a bug of the engine, never a container's doing. It is still an error, a
//! [`Fault`], not a panic: it ends the attachment being served (see `Engine::fault_qp` and
//! `Engine::serve`), not the shard and every container on it.

use crate::verbs::ids::ObjectKey;
use crate::verbs::memory::ViewError;
use std::marker::PhantomData;

/// The engine's bookkeeping did not hold: an object its tables name is not there, or a copy
/// computed a range outside its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("no {what} {index} in the engine's tables")]
    Missing { what: &'static str, index: usize },
    #[error("a copy left its memory: {0}")]
    View(#[from] ViewError),
}

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

    /// The object at `key`, which the engine's tables say is there.
    pub(in crate::verbs) fn entry(&self, key: K) -> Result<&T, Fault> {
        self.slab.get(key.index()).ok_or(Self::missing(key))
    }

    /// [`Objects::entry`], to change it.
    pub(in crate::verbs) fn entry_mut(&mut self, key: K) -> Result<&mut T, Fault> {
        self.slab.get_mut(key.index()).ok_or(Self::missing(key))
    }

    /// Removes the object at `key`, which the engine's tables say is there.
    pub(super) fn take(&mut self, key: K) -> Result<T, Fault> {
        self.slab.try_remove(key.index()).ok_or(Self::missing(key))
    }

    fn missing(key: K) -> Fault {
        Fault::Missing {
            what: K::WHAT,
            index: key.index(),
        }
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
