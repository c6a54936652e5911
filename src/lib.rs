//! # upcache — a userspace page cache for storage engines
//!
//! upcache gives a program its own page cache: file data is cached in
//! folios indexed per file by an `AddressSpace`, filled and written
//! back through operations the storage engine supplies
//! ([`aops::AddressSpaceOps`], or simply a [`BackingStore`]), with the locking
//! contract the Linux kernel documents for `address_space_operations`.
//!
//! ```no_run
//! let cache = upcache::PageCache::new();
//! let file = cache.open("/var/lib/db/data.bin")?;
//! let mut buf = [0u8; 4096];
//! file.read_at(&mut buf, 0)?;
//! file.write_at(b"hello", 0)?;
//! file.fsync()?;          // integrity: written and durable, errors reported once
//! file.close()?;          // flushes; an error keeps the file open and its data dirty
//! # Ok::<(), upcache::Error>(())
//! ```
//!
//! Module map, named after the kernel code each mirrors:
//!
//! | module | kernel | what |
//! |---|---|---|
//! | `folio` | `include/linux/page-flags.h`, `mm/filemap.c` (folio_lock, wait bits) | flag word, refcount, lock, writeback bit |
//! | `xarray` | `lib/xarray.c` | lockless index with tags |
//! | `address_space` | `struct address_space`, `mm/filemap.c` lookups | per-file index, size, locks, dirty/writeback transitions |
//! | `filemap` | `mm/filemap.c`, `mm/readahead.c` | read path, readahead, buffered write |
//! | `page_ref` | `read_cache_folio` (vmcache's fix/unfix) | pinned zero-copy pages: `PageRef`, `PageMut` |
//! | `truncate` | `mm/truncate.c` | truncate, punch hole |
//! | `page_writeback` | `mm/page-writeback.c` | write_cache_pages, fsync's write-and-wait |
//! | [`aops`] | `Documentation/filesystems/locking.rst` | the engine's operations and their lock states |
//! | `backing` | the filesystem below | `BackingStore`, `FileStore`, `StoreOps` |
//! | `page_store` | shmem | the memfd that holds folio bytes |
//! | `errseq` | `lib/errseq.c` | report each writeback error once per handle |
//! | `cache` | the VFS around it | `PageCache`, `File` |
//! | `mmap` | `struct vm_area_struct`, `mm/mmap.c`, rmap | `Mmap`/`MmapMut`, `i_mmap`, page_mkclean, zap |
//! | `vm_ops` | `vm_operations_struct`, `filemap_fault`, `filemap_map_pages` | fault, map_pages, page_mkwrite |
//! | `fault` | `mm/memory.c` (`handle_mm_fault`) | handler threads, fault dispatch, SIGBUS |
//! | `fs_writeback` | `fs/fs-writeback.c`, `balance_dirty_pages`, `freeze_super` | flusher, throttling, sync_all, freeze/thaw |
//! | `vmscan` | `mm/vmscan.c` | memory limit, S3-FIFO reclaim, eviction by refcount freeze |
//! | `uffd` | `include/uapi/linux/userfaultfd.h` | the userfaultfd ABI and errno meanings |
//! | `rwsem` | `struct rw_semaphore` | `i_rwsem`, `invalidate_lock` with exact holder state |
//! | `sync` | — | the one std/loom switch |
//!
//! The design, lock order and protocols are in `ARCHITECTURE.md`.
#![warn(missing_docs)]

mod address_space;
pub mod aops;
mod backing;
mod cache;
mod error;
mod errseq;
mod fault;
mod filemap;
mod folio;
mod fs_writeback;
mod mmap;
mod page_ref;
mod page_store;
mod page_writeback;
mod rwsem;
mod stats;
#[doc(hidden)]
pub mod sync;
mod truncate;
mod types;
/// The userfaultfd ABI wrapper. Not part of the engine API: public only
/// for the UMap-style reference engine in `benches/fault.rs`.
#[doc(hidden)]
pub mod uffd;
mod vm_ops;
mod vmscan;
mod worker_pool;
mod wp_async;
mod xarray;

pub use backing::{BackingStore, DirectFileStore, FileStore, StoreOps};
pub use cache::{File, OpenOptions, PageCache, PageCacheBuilder};
pub use error::{Error, Result};
pub use filemap::Advice;
pub use mmap::{DirtyTracking, Mmap, MmapMut, MmapRaw, Share, UffdMode};
pub use page_ref::{PageMut, PageRef};
pub use stats::Stats;
pub use types::{MAX_FILE_SIZE, PAGE_SIZE};
pub use vmscan::ReplacementPolicy;

/// Internals exposed to the loom models in `loom-tests/` (only under
/// `--cfg loom`): the real protocol functions, without a page store.
#[cfg(loom)]
pub mod loom_support {
    pub use crate::folio::flags;

    use crate::address_space::{folio_lookup, index_add_folio, index_delete_folio, index_put_ref};
    use crate::folio::{Folio, FolioGuard, FolioRef};
    use crate::sync::epoch;
    use crate::types::PgOff;
    use crate::xarray::XArray;

    /// A folio with no page store behind it (the models never touch data),
    /// locked, with the index's reference and the returned one.
    pub fn alloc_folio(mapping: u64, index: u64) -> FolioGuard {
        Folio::alloc_locked(mapping, PgOff(index), 0, std::ptr::null_mut(), None)
    }

    /// The page-cache index.
    pub struct Index(XArray);

    impl Default for Index {
        fn default() -> Self {
            Index(XArray::new())
        }
    }

    impl Index {
        /// `filemap_add_folio` without the page store.
        pub fn add(&self, folio: &FolioGuard) -> bool {
            index_add_folio(&self.0, folio)
        }
        /// `filemap_get_folio`: the lockless lookup.
        pub fn lookup(&self, index: u64) -> Option<FolioRef> {
            let guard = epoch::pin();
            folio_lookup(&self.0, index, &guard)
        }
        /// `filemap_remove_folio`: unindex, detach, drop the index's ref.
        pub fn remove(&self, folio: &FolioGuard) {
            index_delete_folio(&self.0, folio);
            index_put_ref(folio);
        }
        /// Reclaim's removal of a folio whose count was frozen: unindex and
        /// detach (the index's reference went with the freeze), then free.
        pub fn remove_frozen(&self, folio: FolioGuard) {
            index_delete_folio(&self.0, &folio);
            folio.free_frozen();
        }
    }

    /// `folio_ref_freeze`. Folio locked.
    pub fn freeze_refs(g: &FolioGuard, expected: u32) -> bool {
        g.freeze_refs(expected)
    }

    /// Owning mapping id (0 once removed).
    pub fn mapping_id(f: &Folio) -> u64 {
        f.mapping_id()
    }
    /// Sleep until the caller's is the only reference.
    pub fn wait_refs_drained(f: &Folio) {
        f.wait_refs_drained()
    }
    /// `folio_start_writeback`'s flag part. Folio locked.
    pub fn set_writeback(g: &FolioGuard) {
        g.set_writeback_bit()
    }
    /// `folio_end_writeback`'s flag part.
    pub fn end_writeback(f: &Folio) {
        f.clear_writeback_bit()
    }
    /// Set DIRTY; true if it was clean.
    pub fn test_set_dirty(f: &Folio) -> bool {
        f.test_set_dirty()
    }
    /// Clear DIRTY; true if it was dirty.
    pub fn test_clear_dirty(f: &Folio) -> bool {
        f.test_clear_dirty()
    }

    // ---- A real address space: the models below drive the crate's own
    // fault, map_pages, page_mkwrite, read, truncate and writeback code;
    // only the user page table is modelled (by the callbacks). ----

    use std::cell::Cell;
    use std::io;
    use std::ops::Range;

    use crate::address_space::{AddressSpace, RaConfig};
    use crate::backing::{BackingStore, StoreOps};
    use crate::stats::CacheStats;
    use crate::sync::Arc;
    use crate::vm_ops::VmFaultResult;

    /// A file in memory: the backing store of the models' address spaces.
    pub struct MemStore(
        crate::sync::Mutex<Vec<u8>>,
        crate::sync::AtomicBool,
        crate::sync::AtomicBool,
        crate::sync::AtomicBool,
    );

    impl MemStore {
        /// A store of `len` bytes of `byte`.
        pub fn filled(len: usize, byte: u8) -> MemStore {
            MemStore(
                crate::sync::Mutex::new(vec![byte; len]),
                crate::sync::AtomicBool::new(false),
                crate::sync::AtomicBool::new(false),
                crate::sync::AtomicBool::new(false),
            )
        }
        /// The next write fails with `EIO`.
        pub fn fail_next_write(&self) {
            self.1.store(true, crate::sync::Ordering::Relaxed);
        }
        /// The next read fails with `EIO`.
        pub fn fail_next_read(&self) {
            self.2.store(true, crate::sync::Ordering::Relaxed);
        }
        /// Every punch fails with `EOPNOTSUPP` from now on.
        pub fn refuse_punches(&self) {
            self.3.store(true, crate::sync::Ordering::Relaxed);
        }
        /// A copy of the bytes.
        pub fn contents(&self) -> Vec<u8> {
            self.0.lock().clone()
        }
    }

    impl BackingStore for MemStore {
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            if self.2.swap(false, crate::sync::Ordering::Relaxed) {
                return Err(io::Error::from_raw_os_error(5));
            }
            let d = self.0.lock();
            let off = (off as usize).min(d.len());
            let n = buf.len().min(d.len() - off);
            buf[..n].copy_from_slice(&d[off..off + n]);
            Ok(n)
        }
        fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            if self.1.swap(false, crate::sync::Ordering::Relaxed) {
                return Err(io::Error::from_raw_os_error(5));
            }
            let mut d = self.0.lock();
            let end = off as usize + buf.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[off as usize..end].copy_from_slice(buf);
            Ok(())
        }
        fn sync_data(&self) -> io::Result<()> {
            Ok(())
        }
        fn len(&self) -> io::Result<u64> {
            Ok(self.0.lock().len() as u64)
        }
        fn set_len(&self, size: u64) -> io::Result<()> {
            self.0.lock().resize(size as usize, 0);
            Ok(())
        }
        fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
            if self.3.load(crate::sync::Ordering::Relaxed) {
                return Err(io::Error::from_raw_os_error(95));
            }
            crate::backing::write_zeros(self, off, len)
        }
    }

    /// A real `AddressSpace` (id 1, no reclaim, no flusher, 1-page
    /// readahead, order-0 folios) over `store`, its folios in a real memfd.
    pub fn address_space(store: std::sync::Arc<MemStore>) -> Arc<AddressSpace> {
        address_space_min_order(store, 0)
    }

    /// [`address_space`] whose folios all have order `min_order` (the
    /// models' large folios: `PageCacheBuilder::large_folios` with a
    /// smaller order, so that models stay small).
    pub fn address_space_min_order(store: std::sync::Arc<MemStore>, min_order: u8) -> Arc<AddressSpace> {
        let ra = RaConfig {
            window_pages: 1 << min_order,
            max_pages: 1 << min_order,
            max_order: min_order,
            min_order,
        };
        let ops = Box::new(StoreOps::new(store));
        Arc::new(
            AddressSpace::new(
                1,
                "loom".into(),
                ops,
                Arc::new(CacheStats::default()),
                ra,
                None,
                None,
                &crate::page_store::PageMemfd::new(false).expect("memfd for the loom address space"),
            )
            .expect("region for the loom address space"),
        )
    }

    /// Tell `f(pos, len)` of every punch of `m`'s page store (which, for
    /// real, zaps the range from every user mapping).
    pub fn on_punch(m: &AddressSpace, f: impl Fn(u64, u64) + Send + Sync + 'static) {
        assert!(m.store.on_punch.set(std::sync::Arc::new(f)).is_ok(), "one punch hook");
    }

    /// Outcome of [`filemap_fault`] in a model.
    pub enum Fault {
        /// `Locked`: the folio, still locked, for the model to "map".
        Locked(FolioGuard),
        /// `Retry`.
        Retry,
        /// `SigBus`.
        SigBus,
    }

    fn fault_of(r: VmFaultResult) -> Fault {
        match r {
            VmFaultResult::Locked(g) => Fault::Locked(g),
            VmFaultResult::Retry => Fault::Retry,
            VmFaultResult::SigBus => Fault::SigBus,
        }
    }

    /// The crate's `filemap_fault` for file page `index`.
    pub fn filemap_fault(m: &AddressSpace, index: u64) -> Fault {
        fault_of(m.filemap_fault_folio(PgOff(index), &Cell::new(None)))
    }

    /// The crate's `filemap_page_mkwrite` for file page `index`.
    pub fn filemap_page_mkwrite(m: &AddressSpace, index: u64) -> Fault {
        fault_of(m.filemap_page_mkwrite_folio(PgOff(index)))
    }

    /// The model's page-table side of `map_pages`: maps one run of pages,
    /// write-protected or not, its folios held locked.
    pub type MapRun<'a> = dyn FnMut(Range<u64>, bool, &[FolioGuard]) + 'a;

    /// The crate's `filemap_map_pages` over file pages `range`: `map(run,
    /// wp, folios)` is called for each run with its folios locked.
    pub fn filemap_map_pages(m: &AddressSpace, range: Range<u64>, tracks_writes: bool, map: &mut MapRun<'_>) {
        m.map_pages_range(range, tracks_writes, map)
    }

    /// Tell `f(pos, len)` of every `page_mkclean` of `m` (which, for real,
    /// write-protects the folio in every shared-writable mapping).
    pub fn on_mkclean(m: &AddressSpace, f: impl Fn(u64, u64) + Send + Sync + 'static) {
        assert!(
            m.store.on_mkclean.set(std::sync::Arc::new(f)).is_ok(),
            "one mkclean hook"
        );
    }

    /// A user store of `byte` at file offset `pos` through a writable PTE:
    /// writes the folio memory (the memfd page) directly.
    pub fn user_store(m: &AddressSpace, pos: u64, byte: u8) {
        let p = m.store.view_ptr(pos).expect("page store view");
        // SAFETY: `pos` is below the memfd's size, so `p` points into the
        // live engine view; a volatile byte store, as a CPU store through a
        // user mapping of the same page would be.
        unsafe { p.write_volatile(byte) };
    }

    /// Reclaim's eviction of the folio at `index` (trylock, clean and idle
    /// check, refcount freeze, punch while indexed, unindex, free), the
    /// same code `shrink` and `DontNeed` run. True if it was evicted.
    pub fn evict_folio(m: &AddressSpace, index: u64) -> bool {
        match m.filemap_get_folio(PgOff(index)) {
            Some(f) => matches!(m.evict_folio(f), Ok(Some(_))),
            None => false,
        }
    }

    /// Give `m` one async-tracked mapping (`DirtyTracking::Async`) whose
    /// page table the model keeps: `scan(pages)` is `PAGEMAP_SCAN` (return
    /// the written runs of file pages and protect them again), `zap(pos,
    /// len)` is `MADV_DONTNEED` of file bytes. The crate's harvest
    /// (before every writeback) and eviction check then run on them.
    pub fn set_async_mapping(
        m: &AddressSpace,
        scan: impl Fn(Range<u64>) -> Vec<Range<u64>> + Send + Sync + 'static,
        zap: impl Fn(u64, u64) + Send + Sync + 'static,
    ) {
        assert!(m.store.on_scan.set(std::sync::Arc::new(scan)).is_ok(), "one scan hook");
        assert!(m.store.on_zap.set(std::sync::Arc::new(zap)).is_ok(), "one zap hook");
        m.nr_wp_async.fetch_add(1, crate::sync::Ordering::Release);
    }

    /// Give `m` one `Missing`-mode mapping whose page table the model
    /// keeps: `poison(pos, len)` installs SIGBUS poison on file bytes
    /// (pages past end of file in a large folio), `unpoison(pos, len)`
    /// clears it (the file grew). Both run under the real `i_mmap` lock,
    /// as the real mapping's poison and zap do.
    pub fn set_poison_table(
        m: &AddressSpace,
        poison: impl Fn(u64, u64) + Send + Sync + 'static,
        unpoison: impl Fn(u64, u64) + Send + Sync + 'static,
    ) {
        assert!(
            m.store.on_poison.set(std::sync::Arc::new(poison)).is_ok(),
            "one poison hook"
        );
        assert!(
            m.store.on_unpoison.set(std::sync::Arc::new(unpoison)).is_ok(),
            "one unpoison hook"
        );
    }

    /// Tell `f(pos, len)` of every zap of a file range from every mapping
    /// (`unmap_mapping_range`: truncate's zap of the pages past the new
    /// end, for real `MADV_DONTNEED` in each mapping).
    pub fn on_unmap(m: &AddressSpace, f: impl Fn(u64, u64) + Send + Sync + 'static) {
        assert!(m.store.on_unmap.set(std::sync::Arc::new(f)).is_ok(), "one unmap hook");
    }

    /// The flusher's harvest of every async-tracked write of `m`
    /// (background: a folio locked by another thread stays pending).
    pub fn harvest(m: &AddressSpace) {
        let _ = m.harvest_mapped_writes(PgOff(0), PgOff(u64::MAX), crate::wp_async::HarvestMode::Background);
    }

    /// What creating a `Missing`-mode mapping does before the mapping
    /// exists (`set_atomic_fill`): from now on fills are page-atomic, and
    /// none through the folios' memory is still running.
    pub fn set_atomic_fill(m: &AddressSpace) {
        m.set_atomic_fill();
    }

    /// The real address-space lookup (`filemap_get_folio`).
    pub fn get_folio(m: &AddressSpace, index: u64) -> Option<FolioRef> {
        m.filemap_get_folio(PgOff(index))
    }

    /// A cache's file table (what `PageCache::open_with_ops` looks names
    /// up in), for the eviction models.
    #[derive(Default)]
    pub struct Files(crate::sync::Mutex<crate::cache::FileTable>);

    impl Files {
        /// The real `open_in_table` of `open_with_ops(name, ..)`: the live
        /// address space of `name`, after waiting for a dying one's drop,
        /// or `new()` entered in the table.
        pub fn open(&self, name: &str, new: impl FnOnce() -> Arc<AddressSpace>) -> Arc<AddressSpace> {
            let key = crate::cache::FileKey::Name(name.to_string());
            crate::cache::open_in_table(&self.0, key, true, || Ok(new()))
                .expect("the model's constructor does not fail")
                .0
        }
    }

    /// A cache's list of address spaces (the flusher's, `sync_all`'s).
    #[derive(Default)]
    pub struct Spaces(crate::fs_writeback::Spaces);

    impl Spaces {
        /// Enter `m` (as every open does).
        pub fn register(&self, m: &Arc<AddressSpace>) {
            self.0.register(m)
        }
        /// The real `PageCache::sync_all` over these address spaces.
        ///
        /// # Errors
        /// As `PageCache::sync_all`.
        pub fn sync_all(&self) -> io::Result<()> {
            self.0.sync_all()
        }
    }

    /// The fault engine's handler-pool accounting (`src/worker_pool.rs`).
    pub struct WorkerPool(crate::worker_pool::WorkerPool);

    impl WorkerPool {
        /// A pool of `base` handlers.
        pub fn new(base: usize) -> WorkerPool {
            WorkerPool(crate::worker_pool::WorkerPool::new(base))
        }
        /// A handler starts serving a fault.
        pub fn begin_work(&self) {
            self.0.begin_work()
        }
        /// The handler is done with it.
        pub fn end_work(&self) {
            self.0.end_work()
        }
        /// A throttled fault starts a pause that is due at once; returns
        /// its id.
        pub fn begin_pause(&self) -> u64 {
            self.0.begin_pause(0, 0, std::time::Instant::now())
        }
        /// The flusher ends pause `id`: true if the caller is the one to
        /// release its fault.
        pub fn end_pause(&self, id: u64) -> bool {
            self.0.end_pause(id).is_some()
        }
        /// The monitor ends the pauses due: how many faults it releases.
        pub fn due_pauses(&self) -> usize {
            self.0.due_pauses(std::time::Instant::now()).len()
        }
        /// Is any handler busy or any fault paused?
        pub fn any_work(&self) -> bool {
            self.0.any_work()
        }
        /// The monitor sleeps until a handler is busy (or `stop`).
        pub fn monitor_sleep(&self, stop: &crate::sync::AtomicBool) {
            self.0.monitor_sleep(stop)
        }
        /// Wake the monitor (`stop` set).
        pub fn wake_monitor(&self) {
            self.0.wake_monitor()
        }
    }
}

/// The README's examples, compiled by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
