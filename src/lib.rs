//! # upcache — a userspace page cache for storage engines
//!
//! upcache gives a program its own page cache: file data is cached in
//! [`Folio`]s indexed per file by an [`AddressSpace`], filled and written
//! back through operations the storage engine supplies
//! ([`AddressSpaceOps`], or simply a [`BackingStore`]), with the locking
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
//! | [`folio`] | `include/linux/page-flags.h`, `mm/filemap.c` (folio_lock, wait bits) | flag word, refcount, lock, writeback bit |
//! | `xarray` | `lib/xarray.c` | lockless index with tags |
//! | [`address_space`] | `struct address_space`, `mm/filemap.c` lookups | per-file index, size, locks, dirty/writeback transitions |
//! | [`filemap`] | `mm/filemap.c`, `mm/readahead.c` | read path, readahead, buffered write |
//! | `truncate` | `mm/truncate.c` | truncate, punch hole |
//! | [`page_writeback`] | `mm/page-writeback.c` | write_cache_pages, fsync's write-and-wait |
//! | [`aops`] | `Documentation/filesystems/locking.rst` | the engine's operations and their lock states |
//! | [`backing`] | the filesystem below | `BackingStore`, `FileStore`, `StoreOps` |
//! | `page_store` | shmem | the memfd that holds folio bytes |
//! | `errseq` | `lib/errseq.c` | report each writeback error once per handle |
//! | [`cache`] | the VFS around it | `PageCache`, `File` |
//! | `sync` | — | the one std/loom switch |
//!
//! The design, lock order and protocols are in `ARCHITECTURE.md`.
#![warn(missing_docs)]

pub mod address_space;
pub mod aops;
pub mod backing;
pub mod cache;
mod error;
mod errseq;
pub mod filemap;
pub mod folio;
mod page_store;
pub mod page_writeback;
mod stats;
#[doc(hidden)]
pub mod sync;
mod truncate;
pub mod types;
mod xarray;

pub use address_space::{AddressSpace, LockState, Writeback};
pub use aops::{AddressSpaceOps, ReadaheadControl, SyncMode, WritebackControl};
pub use backing::{BackingStore, FileStore, StoreOps};
pub use cache::{File, PageCache, PageCacheBuilder};
pub use error::{Error, Result};
pub use folio::{Folio, FolioGuard, FolioRef};
pub use stats::Stats;
pub use types::{PgOff, MAX_FILE_SIZE, PAGE_SIZE};

/// Internals exposed to the loom models in `loom-tests/` (only under
/// `--cfg loom`).
#[cfg(loom)]
pub mod loom_support {
    pub use crate::folio::flags;
    pub use crate::xarray::{Tag, XArray};

    use crate::folio::{Folio, FolioGuard};
    use crate::types::PgOff;

    /// A folio with no page store behind it (the models never touch data).
    pub fn alloc_folio(mapping: u64, index: u64) -> FolioGuard {
        Folio::alloc_locked(mapping, PgOff(index), 0, std::ptr::null_mut())
    }
}
