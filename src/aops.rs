//! `address_space_operations`: what the storage engine supplies.
//!
//! The lock state on entry and on return of each method is the kernel's
//! (Documentation/filesystems/locking.rst); it is restated above each method
//! and summarized here:
//!
//! | method | folio on entry | on return | i_rwsem | invalidate | may block |
//! |---|---|---|---|---|---|
//! | `read_folio` | locked | unlocked by the op (guard consumed); UPTODATE on success, ERROR on failure | — | shared | yes |
//! | `readahead` | each locked | each unlocked as its read ends | — | shared | yes |
//! | `writepage` | locked | unlocked; WRITEBACK set before unlock (or redirtied) | — (truncate's and punch's write-backs: exclusive) | — (truncate, punch: exclusive) | yes |
//! | `write_barrier` (upcache's; WAL ordering) | locked, DIRTY still set | locked | — (truncate's and punch's write-backs: exclusive) | — (truncate, punch: exclusive) | yes |
//! | `writepages` | — | — | — | — | yes |
//! | `dirty_folio` | locked (or WRITEBACK held) | unchanged | — | — | **no** |
//! | `write_begin` | — | returned locked | exclusive | — | yes |
//! | `write_end` | locked | unlocked | exclusive | — | yes |
//! | `invalidate_folio` | locked | locked | — | exclusive | yes |
//! | `release_folio` | locked | locked | — | — | yes |
//! | `free_folio` | locked (being freed) | — | — | — | **no** |
//! | `launder_folio` | locked | locked | — | — | yes |
//! | `is_partially_uptodate` | locked | locked | — | — | yes |
//! | `error_remove_folio` | locked | locked | — | — | yes |
//!
//! "Unlocked by the op" is expressed in types: those methods take the
//! [`FolioGuard`] by value, and dropping it unlocks.
//!
//! Every method runs with the cache waiting on it. It does I/O on the
//! store below, and may call the cache for *other* files (a data file's
//! `write_barrier` syncing its log); a blocking `File` call for the file
//! it serves, or a cache-wide `PageCache::sync_all` or `freeze`, would
//! wait for itself and fails with
//! [`Error::Reentrant`](crate::Error::Reentrant) (`EDEADLK`).
//!
//! Besides the folio operations, the trait carries the three inode-level
//! operations the page cache needs from the file below it (the kernel's
//! `setattr(ATTR_SIZE)`, `fallocate(PUNCH_HOLE)` and `fsync`), and the
//! initial size.

use std::io;

pub use crate::address_space::{AddressSpace, LockState, Writeback};
pub use crate::filemap::{generic_write_begin, generic_write_end};
pub use crate::folio::{flags, Folio, FolioGuard, FolioRef};
pub use crate::page_writeback::write_cache_pages;
pub use crate::types::PgOff;

use crate::sync::Arc;

/// Integrity or cleansing writeback (`enum writeback_sync_modes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Cleansing: write what can be written without waiting; skip folios
    /// locked or under writeback (`WB_SYNC_NONE`).
    None,
    /// Integrity: every folio dirty when the sync started is written and
    /// waited for (`WB_SYNC_ALL`).
    All,
}

/// `struct writeback_control`.
#[derive(Clone, Debug)]
pub struct WritebackControl {
    /// Cleansing or integrity.
    pub sync_mode: SyncMode,
    /// Pages still to write; decremented per page written. Ignored (no
    /// limit) for [`SyncMode::All`].
    pub nr_to_write: i64,
    /// First byte of the range to write.
    pub range_start: u64,
    /// Last byte of the range (inclusive), `u64::MAX` for "to the end".
    pub range_end: u64,
    /// Pages written by this call (output).
    pub pages_written: u64,
    /// Background writeback (the flusher, dirty throttling; the kernel's
    /// `for_background`): a folio that is locked is skipped, never waited
    /// for. Such writeback may run in a thread that holds a page guard
    /// (`PageMut` holds its folio's lock while the engine runs), or for a
    /// thread that waits for one.
    pub for_background: bool,
}

impl WritebackControl {
    /// Integrity writeback of `[start, end]`.
    pub fn all(range_start: u64, range_end: u64) -> Self {
        WritebackControl {
            sync_mode: SyncMode::All,
            nr_to_write: i64::MAX,
            range_start,
            range_end,
            pages_written: 0,
            for_background: false,
        }
    }

    /// Cleansing writeback of up to `nr_to_write` pages of the whole file.
    pub fn none(nr_to_write: i64) -> Self {
        WritebackControl {
            sync_mode: SyncMode::None,
            nr_to_write,
            range_start: 0,
            range_end: u64::MAX,
            pages_written: 0,
            for_background: false,
        }
    }
}

/// A batch of locked, not-uptodate folios to read (`struct readahead_control`).
pub struct ReadaheadControl {
    pub(crate) folios: Vec<FolioGuard>,
}

impl ReadaheadControl {
    /// Take the next folio to read (`readahead_folio`); the op must unlock
    /// it (by dropping the guard) once its read has ended.
    pub fn next_folio(&mut self) -> Option<FolioGuard> {
        if self.folios.is_empty() {
            None
        } else {
            Some(self.folios.remove(0))
        }
    }

    /// Folios not yet taken.
    pub fn remaining(&self) -> usize {
        self.folios.len()
    }
}

/// What the storage engine implements for one cached file.
///
/// Only [`read_folio`](Self::read_folio), [`writepage`](Self::writepage)
/// and the inode-level operations are required; everything else has the
/// kernel's generic behaviour. Most engines implement
/// [`BackingStore`](crate::BackingStore) instead and let
/// [`StoreOps`](crate::StoreOps) turn it into these operations.
///
/// Operations that wrap `StoreOps` and count dirtied folios:
///
/// ```
/// use std::io;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use upcache::{FileStore, StoreOps};
/// use upcache::aops::{AddressSpace, AddressSpaceOps, Folio, FolioGuard, WritebackControl};
///
/// struct Counting {
///     inner: StoreOps<FileStore>,
///     dirtied: AtomicU64,
/// }
///
/// impl AddressSpaceOps for Counting {
///     fn read_folio(&self, m: &AddressSpace, f: FolioGuard) -> io::Result<()> {
///         self.inner.read_folio(m, f)
///     }
///     fn readahead(&self, m: &AddressSpace, rac: &mut upcache::aops::ReadaheadControl) {
///         self.inner.readahead(m, rac) // keep the batched reads
///     }
///     fn writepage(&self, m: &AddressSpace, f: FolioGuard, wbc: &mut WritebackControl) -> io::Result<()> {
///         self.inner.writepage(m, f, wbc)
///     }
///     fn dirty_folio(&self, _m: &AddressSpace, _f: &Folio) {
///         self.dirtied.fetch_add(1, Ordering::Relaxed); // folio locked: must not sleep
///     }
///     fn initial_size(&self) -> io::Result<u64> { self.inner.initial_size() }
///     fn max_file_size(&self) -> u64 { self.inner.max_file_size() }
///     fn set_size(&self, size: u64) -> io::Result<()> { self.inner.set_size(size) }
///     fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> { self.inner.punch_hole(off, len) }
///     fn fsync(&self) -> io::Result<()> { self.inner.fsync() }
/// }
///
/// # fn main() -> upcache::Result<()> {
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("f");
/// # std::fs::write(&path, vec![0u8; 4096])?;
/// let cache = upcache::PageCache::new();
/// let ops = Counting { inner: StoreOps::new(FileStore::open(&path)?), dirtied: AtomicU64::new(0) };
/// let file = cache.open_with_ops("counted", ops)?;
/// file.write_at(b"x", 0)?;
/// let ops = file.address_space()?.ops_as::<Counting>().unwrap();
/// assert_eq!(ops.dirtied.load(Ordering::Relaxed), 1);
/// # Ok(()) }
/// ```
pub trait AddressSpaceOps: Send + Sync + 'static {
    /// Fill a folio from the store.
    ///
    /// # Locking
    /// Folio locked on entry; the op unlocks it (drops the guard) once the
    /// read has ended, after `mark_uptodate` on success or `set_error` on
    /// failure. `invalidate_lock` held shared. May block.
    ///
    /// # Errors
    /// The store's error; the folio must then be left not uptodate.
    fn read_folio(&self, mapping: &AddressSpace, folio: FolioGuard) -> io::Result<()>;

    /// Start reading a batch of new folios.
    ///
    /// # Locking
    /// Each folio locked; each is unlocked by the op as its read ends.
    /// `invalidate_lock` held shared. May block. Folios left in `rac` are
    /// unlocked, not uptodate, by the caller.
    ///
    /// The default reads each folio with `read_folio`; errors leave the
    /// folio not uptodate, and the reader that needs it retries with
    /// `read_folio` and reports the error.
    fn readahead(&self, mapping: &AddressSpace, rac: &mut ReadaheadControl) {
        while let Some(folio) = rac.next_folio() {
            let _ = self.read_folio(mapping, folio);
        }
    }

    /// Write one dirty folio.
    ///
    /// # Locking
    /// Folio locked on entry, its DIRTY bit already cleared for I/O. The op
    /// either starts writeback ([`AddressSpace::folio_start_writeback`],
    /// which sets WRITEBACK and unlocks) and later ends it, or redirties it
    /// ([`AddressSpace::redirty_for_writepage`]). For [`SyncMode::All`] it
    /// must start the write. May block.
    ///
    /// # Errors
    /// A write error must also be recorded by ending writeback with
    /// [`Writeback::end_with_error`](crate::aops::Writeback::end_with_error), which
    /// keeps the data dirty and reports the error at the next fsync. A
    /// [`Writeback`] dropped without being ended
    /// (an early `?`, a panic) counts as such a failure (`EIO`). An `Err`
    /// returned with the folio left clean and not under writeback (dropped
    /// with nothing submitted) gets the folio dirtied again by the caller:
    /// no path loses the data.
    fn writepage(&self, mapping: &AddressSpace, folio: FolioGuard, wbc: &mut WritebackControl) -> io::Result<()>;

    /// May the folio be written to the store now? Called before every
    /// write-back of a dirty folio (`write_cache_pages`, truncate's write of
    /// a straddling folio, punch's write of a folio written during it,
    /// background reclaim), before its DIRTY bit is
    /// cleared, with [`Folio::private`] (e.g. the LSN of its newest change,
    /// see [`FolioGuard::set_private_max`]). A WAL engine makes its log
    /// durable up to that value here and returns `Ok(true)`, or returns
    /// `Ok(false)` to skip the folio for now (it stays dirty).
    ///
    /// With [`SyncMode::All`] (fsync, sync_range, truncate) the folio must
    /// be written: `Ok(false)` then fails the sync with `EAGAIN`, as an
    /// error does with its own errno; the data stays dirty either way.
    ///
    /// # Locking
    /// Folio locked. May block (a log fsync).
    ///
    /// # Errors
    /// The engine's error (its log could not be made durable): the folio
    /// stays dirty and the writeback reports the error.
    fn write_barrier(&self, _mapping: &AddressSpace, _folio: &FolioGuard, _mode: SyncMode) -> io::Result<bool> {
        Ok(true)
    }

    /// Write dirty folios of the file as `wbc` asks.
    ///
    /// # Locking
    /// Nothing held. May block. The default is `write_cache_pages` over
    /// `writepage`.
    fn writepages(&self, mapping: &AddressSpace, wbc: &mut WritebackControl) -> io::Result<()> {
        write_cache_pages(mapping, wbc, |folio, wbc| self.writepage(mapping, folio, wbc))
    }

    /// Notification that a folio became dirty (the flag and tag are already
    /// set by the core).
    ///
    /// # Locking
    /// Folio locked (or under writeback). Must not sleep.
    fn dirty_folio(&self, _mapping: &AddressSpace, _folio: &Folio) {}

    /// Prepare the folio for a buffered write of `len` bytes at `pos`
    /// (which lie in one folio).
    ///
    /// # Locking
    /// `i_rwsem` held exclusive. Returns the folio locked. May block.
    ///
    /// # Errors
    /// Read errors of a partial-folio read-modify-write.
    fn write_begin(&self, mapping: &AddressSpace, pos: u64, len: usize) -> io::Result<FolioGuard> {
        crate::filemap::generic_write_begin(mapping, pos, len)
    }

    /// Finish a buffered write: `copied` bytes at `pos` were copied in.
    ///
    /// # Locking
    /// `i_rwsem` exclusive; folio locked on entry, unlocked on return.
    fn write_end(&self, mapping: &AddressSpace, pos: u64, copied: usize, folio: FolioGuard) -> usize {
        crate::filemap::generic_write_end(mapping, pos, copied, folio)
    }

    /// `offset..offset+len` of the folio is being truncated or punched.
    ///
    /// # Locking
    /// Folio locked; `invalidate_lock` held exclusive. May block.
    fn invalidate_folio(&self, _mapping: &AddressSpace, _folio: &FolioGuard, _offset: usize, _len: usize) {}

    /// May the folio's private state go (so the folio can be dropped)?
    ///
    /// # Locking
    /// Folio locked. Called by reclaim: kswapd, or any thread whose folio
    /// allocation passes the memory limit (direct reclaim) — including a
    /// thread inside one of this engine's own callbacks (`write_begin`
    /// allocates, `read_folio` may). So it must not wait for a lock the
    /// engine's callbacks hold: the holder may be this very thread, or a
    /// thread waiting for this folio's lock (a `write_begin` holding the
    /// engine's lock locks folios). Try-lock instead and return `false`
    /// to keep the folio; reclaim moves on. (The kernel passes the same
    /// constraint as a `gfp` mask without `__GFP_FS`.)
    fn release_folio(&self, _mapping: &AddressSpace, _folio: &FolioGuard) -> bool {
        true
    }

    /// The folio has left the page cache.
    ///
    /// # Locking
    /// Folio locked, being freed. Must not sleep.
    fn free_folio(&self, _mapping: &AddressSpace, _folio: &Folio) {}

    /// Write a dirty folio synchronously before it is invalidated.
    ///
    /// Not called by the cache: its invalidations write dirty folios back
    /// through [`writepage`](Self::writepage). Kept from the kernel's table
    /// for engines that call it themselves ([`StoreOps`](crate::StoreOps)
    /// implements it, write barrier first).
    ///
    /// # Locking
    /// Folio locked on entry and on return. May block.
    ///
    /// # Errors
    /// The write error; the folio then stays dirty.
    fn launder_folio(&self, _mapping: &AddressSpace, _folio: &mut FolioGuard) -> io::Result<()> {
        Ok(())
    }

    /// Are `count` bytes at `from` in the (not uptodate) folio valid?
    ///
    /// Not called by the cache: its reads fill whole folios.
    ///
    /// # Locking
    /// Folio locked. May block.
    fn is_partially_uptodate(&self, _mapping: &AddressSpace, _folio: &FolioGuard, _from: usize, _count: usize) -> bool {
        false
    }

    /// Memory failure hit the folio: drop it if possible.
    ///
    /// Not called by the cache: no memory-failure report reaches it.
    ///
    /// # Locking
    /// Folio locked. May block.
    ///
    /// # Errors
    /// `Unsupported` by default (the folio is kept).
    fn error_remove_folio(&self, _mapping: &AddressSpace, _folio: &FolioGuard) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    // ----- inode level --------------------------------------------------

    /// Size of the file when the cache opens it.
    ///
    /// # Locking
    /// Nothing held: it may open other files of the cache (its log). An
    /// open of this same file from here fails with
    /// [`Error::Reentrant`](crate::Error::Reentrant); other opens of it
    /// wait until this open ends, so it must not wait for another thread
    /// that opens this file (nor for a file whose `initial_size` opens
    /// this one): no cycles.
    ///
    /// # Errors
    /// The store's error.
    fn initial_size(&self) -> io::Result<u64>;

    /// The largest file the store can hold, in bytes (the file system's
    /// `sb->s_maxbytes`), read once when the file is opened. The cache
    /// refuses a write starting at or past it, a truncate or a punch past
    /// it with `EFBIG`, and cuts short a write crossing it, as the
    /// kernel's `generic_write_checks` does — so that nothing is cached
    /// that the store would refuse at write-back. The default and the
    /// most the cache uses is [`MAX_FILE_SIZE`](crate::MAX_FILE_SIZE).
    fn max_file_size(&self) -> u64 {
        crate::types::MAX_FILE_SIZE
    }

    /// Set the store's size (truncate / extend), `setattr(ATTR_SIZE)`.
    ///
    /// # Locking
    /// `i_rwsem` and `invalidate_lock` exclusive; the page cache beyond the
    /// new size is already gone.
    ///
    /// # Errors
    /// The store's error.
    fn set_size(&self, size: u64) -> io::Result<()>;

    /// Deallocate `[off, off + len)` in the store; it must read back as
    /// zeros (`fallocate(PUNCH_HOLE | KEEP_SIZE)`).
    ///
    /// # Locking
    /// `i_rwsem` and `invalidate_lock` exclusive.
    ///
    /// # Errors
    /// The store's error.
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()>;

    /// Make written data durable (`fdatasync`).
    ///
    /// # Locking
    /// The file's store-sync lock: one store sync of the file runs at a
    /// time, and its error is recorded before the next starts (a store
    /// reports a failed sync to one caller only, and every handle of the
    /// file shares the store). So concurrent `fsync`s of one file run their
    /// store syncs one after the other — a WAL's group commit should sync
    /// once for the group — and this method must not sync the same file
    /// through the cache (it would wait for itself). May block.
    ///
    /// # Errors
    /// The store's error.
    fn fsync(&self) -> io::Result<()>;

    /// Must folios under writeback stay unmodified (stable pages)?
    fn stable_writes(&self) -> bool {
        false
    }
}

/// An engine keeps its operations behind an `Arc` (to reach its own store,
/// steer it) and gives the cache a clone, or hands over a `Box`. Every
/// method delegates, defaults included, so nothing the inner operations
/// override (batched `readahead`, `release_folio`, ...) is lost.
macro_rules! delegate_address_space_ops {
    ($ptr:ident) => {
        impl<T: AddressSpaceOps + ?Sized> AddressSpaceOps for $ptr<T> {
            fn read_folio(&self, mapping: &AddressSpace, folio: FolioGuard) -> io::Result<()> {
                (**self).read_folio(mapping, folio)
            }
            fn write_barrier(&self, mapping: &AddressSpace, folio: &FolioGuard, mode: SyncMode) -> io::Result<bool> {
                (**self).write_barrier(mapping, folio, mode)
            }
            fn readahead(&self, mapping: &AddressSpace, rac: &mut ReadaheadControl) {
                (**self).readahead(mapping, rac)
            }
            fn writepage(
                &self,
                mapping: &AddressSpace,
                folio: FolioGuard,
                wbc: &mut WritebackControl,
            ) -> io::Result<()> {
                (**self).writepage(mapping, folio, wbc)
            }
            fn writepages(&self, mapping: &AddressSpace, wbc: &mut WritebackControl) -> io::Result<()> {
                (**self).writepages(mapping, wbc)
            }
            fn dirty_folio(&self, mapping: &AddressSpace, folio: &Folio) {
                (**self).dirty_folio(mapping, folio)
            }
            fn write_begin(&self, mapping: &AddressSpace, pos: u64, len: usize) -> io::Result<FolioGuard> {
                (**self).write_begin(mapping, pos, len)
            }
            fn write_end(&self, mapping: &AddressSpace, pos: u64, copied: usize, folio: FolioGuard) -> usize {
                (**self).write_end(mapping, pos, copied, folio)
            }
            fn invalidate_folio(&self, mapping: &AddressSpace, folio: &FolioGuard, offset: usize, len: usize) {
                (**self).invalidate_folio(mapping, folio, offset, len)
            }
            fn release_folio(&self, mapping: &AddressSpace, folio: &FolioGuard) -> bool {
                (**self).release_folio(mapping, folio)
            }
            fn free_folio(&self, mapping: &AddressSpace, folio: &Folio) {
                (**self).free_folio(mapping, folio)
            }
            fn launder_folio(&self, mapping: &AddressSpace, folio: &mut FolioGuard) -> io::Result<()> {
                (**self).launder_folio(mapping, folio)
            }
            fn is_partially_uptodate(
                &self,
                mapping: &AddressSpace,
                folio: &FolioGuard,
                from: usize,
                count: usize,
            ) -> bool {
                (**self).is_partially_uptodate(mapping, folio, from, count)
            }
            fn error_remove_folio(&self, mapping: &AddressSpace, folio: &FolioGuard) -> io::Result<()> {
                (**self).error_remove_folio(mapping, folio)
            }
            fn initial_size(&self) -> io::Result<u64> {
                (**self).initial_size()
            }
            fn max_file_size(&self) -> u64 {
                (**self).max_file_size()
            }
            fn set_size(&self, size: u64) -> io::Result<()> {
                (**self).set_size(size)
            }
            fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
                (**self).punch_hole(off, len)
            }
            fn fsync(&self) -> io::Result<()> {
                (**self).fsync()
            }
            fn stable_writes(&self) -> bool {
                (**self).stable_writes()
            }
        }
    };
}

delegate_address_space_ops!(Arc);
delegate_address_space_ops!(Box);

/// The operations as the address space keeps them: the trait object plus
/// what [`AddressSpace::ops_as`] needs to hand an engine its own type back.
/// Implemented for every [`AddressSpaceOps`].
pub(crate) trait OpsAny: AddressSpaceOps {
    fn as_any(&self) -> &dyn std::any::Any;
    fn as_ops(&self) -> &dyn AddressSpaceOps;
}

impl<T: AddressSpaceOps> OpsAny for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_ops(&self) -> &dyn AddressSpaceOps {
        self
    }
}
