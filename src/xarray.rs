//! The page-cache index: page index → folio, with lockless readers.
//!
//! A fixed-height radix tree (`INDEX_BITS` bits of page index, `SHIFT` bits
//! per level). Readers walk it with Acquire loads and no lock; writers are
//! serialized by [`XArray::lock`] (the kernel's `xa_lock`), which also guards
//! the tag sets. A folio of order `k` occupies all `2^k` slots it covers
//! (like the kernel's multi-index entries), so a lookup of any page finds it.
//!
//! Interior nodes are created on demand and freed only when the tree is
//! dropped: readers therefore never need protection for nodes, only for the
//! folios they point to (that is the epoch guard's job, see `folio`). An
//! empty subtree costs its nodes' memory until the file is closed; for the
//! files a storage engine keeps open that is a bounded, small overhead
//! (2 KiB per 1 MiB of file ever cached).
//!
//! Tags (DIRTY, WRITEBACK, TOWRITE) are ordered sets of folio start indices
//! under the writer lock, which is what the writeback scans need: "the next
//! folios tagged X at or after index i".

use std::collections::BTreeSet;
use std::ptr;

use crate::folio::Folio;
use crate::sync::{AtomicPtr, Mutex, MutexGuard, Ordering};
use crate::types::INDEX_BITS;

#[cfg(not(loom))]
const SHIFT: u32 = 8;
#[cfg(loom)]
const SHIFT: u32 = 2;
const FANOUT: usize = 1 << SHIFT;
const LEVELS: u32 = INDEX_BITS / SHIFT;
const _: () = assert!(LEVELS * SHIFT == INDEX_BITS);

/// Writeback tags on index entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    /// Folio is dirty (`PAGECACHE_TAG_DIRTY`).
    Dirty = 0,
    /// Folio is under writeback (`PAGECACHE_TAG_WRITEBACK`).
    Writeback = 1,
    /// Folio must be written by the current integrity sync
    /// (`PAGECACHE_TAG_TOWRITE`).
    ToWrite = 2,
}

struct Node {
    slots: [AtomicPtr<()>; FANOUT],
}

impl Node {
    fn new() -> Box<Node> {
        Box::new(Node {
            slots: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
        })
    }
}

/// State guarded by the index lock.
#[derive(Default)]
pub(crate) struct XaLocked {
    tags: [BTreeSet<u64>; 3],
}

impl XaLocked {
    /// Set `tag` on the folio starting at `index`.
    pub(crate) fn set_tag(&mut self, index: u64, tag: Tag) {
        self.tags[tag as usize].insert(index);
    }
    /// Clear `tag`; returns whether it was set.
    pub(crate) fn clear_tag(&mut self, index: u64, tag: Tag) -> bool {
        self.tags[tag as usize].remove(&index)
    }
    /// Is the folio starting at `index` tagged `tag`?
    pub(crate) fn has_tag(&self, index: u64, tag: Tag) -> bool {
        self.tags[tag as usize].contains(&index)
    }
    /// Up to `max` folio indices tagged `tag` in `[from, to)`.
    pub(crate) fn tagged(&self, tag: Tag, from: u64, to: u64, max: usize) -> Vec<u64> {
        if from >= to {
            return Vec::new();
        }
        self.tags[tag as usize].range(from..to).take(max).copied().collect()
    }
    /// Number of entries tagged `tag`.
    pub(crate) fn count(&self, tag: Tag) -> usize {
        self.tags[tag as usize].len()
    }
}

/// The radix tree.
pub(crate) struct XArray {
    root: Box<Node>,
    lock: Mutex<XaLocked>,
}

impl XArray {
    pub(crate) fn new() -> Self {
        XArray {
            root: Node::new(),
            lock: Mutex::new(XaLocked::default()),
        }
    }

    /// Take the writer lock (`xa_lock`).
    pub(crate) fn lock(&self) -> MutexGuard<'_, XaLocked> {
        self.lock.lock()
    }

    #[inline]
    fn slot_of(index: u64, level: u32) -> usize {
        ((index >> (SHIFT * (LEVELS - 1 - level))) as usize) & (FANOUT - 1)
    }

    /// Lockless load of the entry for `index` (null if none). The caller
    /// must hold an epoch guard for as long as it dereferences the result.
    #[inline]
    pub(crate) fn load(&self, index: u64) -> *const Folio {
        // Past the largest file nothing is cached (the slot arithmetic
        // below would wrap onto a low index).
        if index >= 1u64 << INDEX_BITS {
            return ptr::null();
        }
        let mut node: &Node = &self.root;
        for level in 0..LEVELS - 1 {
            // Acquire: pairs with the Release that published the child node
            // in `leaf_slot`, so its slots are initialized when we read them.
            let child = node.slots[Self::slot_of(index, level)].load(Ordering::Acquire) as *const Node;
            if child.is_null() {
                return ptr::null();
            }
            // SAFETY: nodes are never freed before the tree (see module docs).
            node = unsafe { &*child };
        }
        // Acquire: pairs with the Release in `store_range`, so the folio's
        // fields are initialized when the reader looks at them.
        node.slots[Self::slot_of(index, LEVELS - 1)].load(Ordering::Acquire) as *const Folio
    }

    /// The leaf slot for `index`, creating nodes. Writer lock held.
    fn leaf_slot(&self, _locked: &XaLocked, index: u64) -> &AtomicPtr<()> {
        let mut node: &Node = &self.root;
        for level in 0..LEVELS - 1 {
            let slot = &node.slots[Self::slot_of(index, level)];
            let mut child = slot.load(Ordering::Acquire) as *const Node;
            if child.is_null() {
                let new = Box::into_raw(Node::new());
                // Release: pairs with the Acquire in `load`.
                slot.store(new as *mut (), Ordering::Release);
                child = new;
            }
            // SAFETY: nodes live as long as the tree.
            node = unsafe { &*child };
        }
        &node.slots[Self::slot_of(index, LEVELS - 1)]
    }

    /// Are all slots in `[index, index + n)` empty? Writer lock held.
    pub(crate) fn range_empty(&self, _locked: &XaLocked, index: u64, n: u64) -> bool {
        (index..index + n).all(|i| self.load(i).is_null())
    }

    /// Store `folio` (or null) in every slot of `[index, index + n)`.
    /// Writer lock held.
    pub(crate) fn store_range(&self, locked: &XaLocked, index: u64, n: u64, folio: *const Folio) {
        for i in index..index + n {
            // Release: pairs with the Acquire in `load`.
            self.leaf_slot(locked, i).store(folio as *mut (), Ordering::Release);
        }
    }

    /// First non-empty slot at or after `from` and before `to`, lockless
    /// (epoch guard held by the caller if it dereferences the result).
    pub(crate) fn find_from(&self, from: u64, to: u64) -> Option<(u64, *const Folio)> {
        let to = to.min(1u64 << INDEX_BITS);
        let mut index = from;
        'outer: while index < to {
            let mut node: &Node = &self.root;
            for level in 0..LEVELS - 1 {
                let child = node.slots[Self::slot_of(index, level)].load(Ordering::Acquire) as *const Node;
                if child.is_null() {
                    // Skip the whole missing subtree.
                    let span_shift = SHIFT * (LEVELS - 1 - level);
                    index = ((index >> span_shift) + 1) << span_shift;
                    continue 'outer;
                }
                // SAFETY: nodes live as long as the tree.
                node = unsafe { &*child };
            }
            let p = node.slots[Self::slot_of(index, LEVELS - 1)].load(Ordering::Acquire) as *const Folio;
            if !p.is_null() {
                return Some((index, p));
            }
            index += 1;
        }
        None
    }
}

impl Drop for XArray {
    fn drop(&mut self) {
        fn free(node: &Node, level: u32) {
            if level == LEVELS - 1 {
                return;
            }
            for s in &node.slots {
                let child = s.load(Ordering::Relaxed) as *mut Node;
                if !child.is_null() {
                    // SAFETY: `&mut self` on the tree: no reader is left, and
                    // each interior node was allocated by `Box::into_raw` and
                    // is referenced from exactly one slot.
                    let b = unsafe { Box::from_raw(child) };
                    free(&b, level + 1);
                }
            }
        }
        free(&self.root, 0);
    }
}
