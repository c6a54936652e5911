//! [`PageCache`] (the set of cached files, its configuration and counters)
//! and [`File`] (an open handle, like `struct file`: it carries its own
//! writeback-error cursor and closes with a flush).

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use crate::address_space::{AddressSpace, RaConfig};
use crate::aops::{AddressSpaceOps, WritebackControl};
use crate::backing::{FileStore, StoreOps};
use crate::error::{Error, Result};
use crate::fault::{FaultConfig, FaultEngine};
use crate::filemap::Advice;
use crate::fs_writeback::{DirtyConfig, Spaces, Writeback as CacheWriteback};
use crate::mmap::{do_mmap, DirtyTracking, Mmap, MmapMut, MmapRaw, Share, UffdMode};
use crate::page_ref::{PageMut, PageRef};
use crate::page_store::PageMemfd;
use crate::stats::{CacheStats, Stats};
use crate::sync::{Arc, AtomicBool, AtomicU64, Mutex, Ordering, Weak};
use crate::types::{MAX_ORDER, PAGE_SIZE};
use crate::vmscan::{Reclaimer, ReplacementPolicy};

/// Builder for [`PageCache`], with documented defaults.
#[derive(Clone, Debug)]
pub struct PageCacheBuilder {
    memory_limit: Option<u64>,
    policy: ReplacementPolicy,
    dirty_expire: Duration,
    dirty_background_bytes: Option<u64>,
    dirty_limit_bytes: Option<u64>,
    readahead_bytes: u64,
    readahead_max_bytes: u64,
    max_folio_order: u8,
    large_folios: bool,
    hugetlb: bool,
    /// `mmap_mode` was called (else the default may follow the system).
    mode_explicit: bool,
    fault: FaultConfig,
}

impl Default for PageCacheBuilder {
    fn default() -> Self {
        PageCacheBuilder {
            memory_limit: None,
            policy: ReplacementPolicy::S3Fifo,
            dirty_expire: Self::DEFAULT_DIRTY_EXPIRE,
            dirty_background_bytes: None,
            dirty_limit_bytes: None,
            readahead_bytes: Self::DEFAULT_READAHEAD,
            readahead_max_bytes: Self::DEFAULT_READAHEAD_MAX,
            max_folio_order: Self::DEFAULT_MAX_FOLIO_ORDER,
            large_folios: false,
            hugetlb: false,
            mode_explicit: false,
            fault: FaultConfig {
                threads: Self::DEFAULT_FAULT_THREADS,
                spin: Self::DEFAULT_FAULT_SPIN,
                fault_around_pages: Self::DEFAULT_FAULT_AROUND / PAGE_SIZE as u64,
                mode: Self::DEFAULT_MMAP_MODE,
                map_ahead: true,
                wp_async: false,
            },
        }
    }
}

impl PageCacheBuilder {
    /// Default readahead window: 128 KiB, the kernel's `VM_READAHEAD_PAGES`.
    pub const DEFAULT_READAHEAD: u64 = 128 * 1024;
    /// Default largest window a sequential stream ramps up to: 2 MiB.
    pub const DEFAULT_READAHEAD_MAX: u64 = 2 << 20;
    /// Default largest folio readahead allocates: order 4 (64 KiB), which
    /// makes a 128 KiB window two folios and keeps 4 KiB random reads cheap.
    pub const DEFAULT_MAX_FOLIO_ORDER: u8 = 4;

    /// Default number of fault handler threads.
    pub const DEFAULT_FAULT_THREADS: usize = 2;
    /// Default time a handler polls the userfaultfd before sleeping.
    pub const DEFAULT_FAULT_SPIN: Duration = Duration::from_micros(50);
    /// Default fault-around window of `map_pages` (the kernel's
    /// `fault_around_bytes`).
    pub const DEFAULT_FAULT_AROUND: u64 = 64 * 1024;
    /// Default registration mode of new mappings: `Missing`, chosen by the
    /// numbers in BENCHMARKS.md (mapped hits 8x cheaper than `Minor`, the
    /// same miss cost). Where the system gives shmem large folios (shmem
    /// THP on), a cache built without [`mmap_mode`](Self::mmap_mode) uses
    /// `Minor` instead, and `Missing` mappings are refused (see README).
    pub const DEFAULT_MMAP_MODE: UffdMode = UffdMode::Missing;

    /// Keep the bytes cached (over every file) under `bytes` (at least
    /// 256 KiB). Past 98 % a background thread reclaims down to 95 %; an
    /// allocation that would pass the limit reclaims directly first.
    /// Default: no limit.
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Replacement policy under a memory limit (default S3-FIFO; CLOCK is
    /// the LRU-approximation baseline).
    pub fn replacement_policy(mut self, p: ReplacementPolicy) -> Self {
        self.policy = p;
        self
    }

    /// Default age after which the flusher writes a dirty file back: 30 s
    /// (the kernel's `dirty_expire_centisecs`).
    pub const DEFAULT_DIRTY_EXPIRE: Duration = Duration::from_secs(30);

    /// Write dirty files back once their oldest dirtying is this old.
    pub fn dirty_expire(mut self, d: Duration) -> Self {
        self.dirty_expire = d;
        self
    }

    /// Dirty bytes (over every file) past which the flusher writes back at
    /// once. Default: 10 % of the memory limit, or 64 MiB without one.
    pub fn dirty_background_bytes(mut self, bytes: u64) -> Self {
        self.dirty_background_bytes = Some(bytes);
        self
    }

    /// Dirty bytes past which writers are throttled (they write back part
    /// of their file before dirtying more). Bytes under write-back count
    /// as dirty here, as in the kernel's `balance_dirty_pages` (not for
    /// the background level). Default: 20 % of the memory limit, or
    /// 256 MiB without one.
    pub fn dirty_limit_bytes(mut self, bytes: u64) -> Self {
        self.dirty_limit_bytes = Some(bytes);
        self
    }

    /// Number of fault handler threads (at least 1).
    pub fn fault_threads(mut self, n: usize) -> Self {
        self.fault.threads = n.max(1);
        self
    }

    /// How long an idle handler keeps polling before it sleeps (0: sleep
    /// at once). Polling answers faults ~3x sooner than a wake-up here, at
    /// the price of CPU time.
    pub fn fault_spin(mut self, d: Duration) -> Self {
        self.fault.spin = d;
        self
    }

    /// Fault-around window of `map_pages`, in bytes (rounded to a power of
    /// two number of pages, at least one page).
    pub fn fault_around_bytes(mut self, bytes: u64) -> Self {
        self.fault.fault_around_pages = bytes.div_ceil(PAGE_SIZE as u64).max(1).next_power_of_two();
        self
    }

    /// How new mappings are registered ([`UffdMode`]).
    pub fn mmap_mode(mut self, mode: UffdMode) -> Self {
        self.fault.mode = mode;
        self.mode_explicit = true;
        self
    }

    /// How first writes through shared-writable mappings are noticed
    /// ([`DirtyTracking`]; default [`DirtyTracking::WriteFault`]).
    /// `Async` makes mapped writes to clean pages cost what the kernel's
    /// do, at the price the table on [`DirtyTracking`] lists; it implies
    /// [`UffdMode::Minor`] unless `mmap_mode` asked otherwise, in which
    /// case shared-writable `Missing`-mode mappings are refused.
    pub fn dirty_tracking(mut self, t: DirtyTracking) -> Self {
        self.fault.wp_async = t == DirtyTracking::Async;
        self
    }

    /// After a fault that read a readahead window, map the whole window
    /// (Minor mode), so sequential scans fault once per window.
    pub fn map_ahead(mut self, on: bool) -> Self {
        self.fault.map_ahead = on;
        self
    }

    /// Readahead window read on a miss, in bytes (rounded up to pages; at
    /// least one page).
    pub fn readahead_bytes(mut self, bytes: u64) -> Self {
        self.readahead_bytes = bytes;
        self
    }

    /// Largest readahead window of a sequential stream, in bytes (the
    /// window doubles from `readahead_bytes` up to this).
    pub fn readahead_max_bytes(mut self, bytes: u64) -> Self {
        self.readahead_max_bytes = bytes;
        self
    }

    /// Largest folio order readahead may allocate (`0..=9`; clamped).
    pub fn max_folio_order(mut self, order: u8) -> Self {
        self.max_folio_order = order.min(MAX_ORDER);
        self
    }

    /// Smallest memory limit of a cache with [large folios](Self::large_folios):
    /// 16 MiB, eight folios.
    pub const LARGE_FOLIOS_MIN_MEMORY_LIMIT: u64 = 16 << 20;

    /// Cache every file in 2 MiB folios, naturally aligned (default: off;
    /// folios of 4 KiB to `max_folio_order`, sized by readahead).
    ///
    /// Where the system gives shared memory transparent huge pages
    /// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` set to
    /// `always` or `within_size`), each folio is then one 2 MiB huge page
    /// of the page store: `Missing`-mode mappings of it get PMD mappings,
    /// one TLB entry and one fault per 2 MiB as an ext4 mapping of large
    /// folios gets (`mapped_hit_random` in BENCHMARKS.md), and fills
    /// allocate one page instead of 512. Without shmem THP the folios are
    /// still 2 MiB, made of 4 KiB pages.
    ///
    /// The price is granularity: every miss reads at least the whole
    /// 2 MiB folio (random 4 KiB reads of a large file read 512 times
    /// the bytes), reclaim evicts 2 MiB at a time, and a memory limit
    /// below [`LARGE_FOLIOS_MIN_MEMORY_LIMIT`](Self::LARGE_FOLIOS_MIN_MEMORY_LIMIT)
    /// is raised to it. Truncate and hole punches inside a folio zero the
    /// range and keep the folio (a truncate drops a folio that reaches
    /// past the new end whole, after writing it back), as the kernel does
    /// for a large folio it cannot split; pages of the last folio past end
    /// of file raise SIGBUS in every mapping, as without large folios.
    ///
    /// A thread holding a page guard ([`File::get_page`]) of such a file
    /// gets [`Error::PageHeld`](crate::Error::PageHeld) from a `write_at`
    /// or `truncate` that grows it past a folio it holds, and from a
    /// `Missing`-mode `mmap` of the file (both take locks that rank above
    /// the folio lock), instead of a deadlock.
    ///
    /// With shmem THP on, caches without large folios use `Minor`-mode
    /// mappings only (their folios would be smaller than the page store's,
    /// see README); with large folios `Missing` (the default mode) stays
    /// available. [`DirtyTracking::Async`](crate::DirtyTracking::Async)
    /// still needs shmem THP off.
    pub fn large_folios(mut self, on: bool) -> Self {
        self.large_folios = on;
        self
    }

    /// Keep folios in the kernel's hugetlbfs pool of 2 MiB pages (a
    /// memfd made with `MFD_HUGETLB`) instead of shmem (default: off).
    /// Implies [`large_folios`](Self::large_folios): every folio is one
    /// 2 MiB huge page.
    ///
    /// What it buys: a user mapping maps and write-protects a whole folio
    /// with one page-table entry, so a first write after a write-back
    /// costs one fault per 2 MiB, as on an ext4 mapping of large folios
    /// (with shmem, write-protecting a huge page splits its mapping into
    /// 4 KiB entries: one fault per 4 KiB page, `mapped_update_random` in
    /// BENCHMARKS.md); fills go through the engine's view without the
    /// shmem write path's inode lock.
    ///
    /// What it needs and changes:
    /// - Free huge pages: the system's pool (`/proc/sys/vm/nr_hugepages`,
    ///   root) must hold the cache's memory, and its memory limit should
    ///   not exceed what the pool gives it. A folio that gets no huge page
    ///   fails the operation that needed it with
    ///   [`io::ErrorKind::OutOfMemory`](std::io::ErrorKind::OutOfMemory)
    ///   (`read_at`, `write_at`, `get_page`) or SIGBUS (a mapped access),
    ///   as the kernel's own hugetlbfs faults do.
    /// - Mappings are [`UffdMode::Minor`] (the default here; `Missing` is
    ///   refused: the kernel would map a huge page before its fill ends),
    ///   at file offsets that are multiples of 2 MiB, each covering whole
    ///   2 MiB pages (the length is rounded up).
    /// - SIGBUS past end of file is per 2 MiB page, as on hugetlbfs: the
    ///   bytes past the end inside the last folio read as zeros through a
    ///   mapping, and writes there are not part of the file (write-back
    ///   stops at the end; a growth of the file zeroes them first).
    pub fn hugetlb(mut self, on: bool) -> Self {
        self.hugetlb = on;
        self
    }

    /// Build the cache.
    pub fn build(mut self) -> PageCache {
        if self.hugetlb {
            self.large_folios = true;
            if !self.mode_explicit {
                self.fault.mode = UffdMode::Minor;
            }
        }
        if !self.mode_explicit
            && (self.fault.wp_async || (!self.large_folios && crate::page_store::shmem_thp_possible()))
        {
            self.fault.mode = UffdMode::Minor;
        }
        let (min_order, max_order) = if self.large_folios {
            (MAX_ORDER, MAX_ORDER)
        } else {
            (0, self.max_folio_order)
        };
        if self.large_folios {
            self.memory_limit = self.memory_limit.map(|l| l.max(Self::LARGE_FOLIOS_MIN_MEMORY_LIMIT));
        }
        let min_pages = 1u64 << min_order;
        let stats = Arc::new(CacheStats::default());
        let spaces = Arc::new(Spaces::default());
        let reclaim = self
            .memory_limit
            .map(|l| Reclaimer::new(l, self.policy, stats.clone(), spaces.clone()));
        let dirty = DirtyConfig {
            expire: self.dirty_expire,
            background_bytes: self
                .dirty_background_bytes
                .unwrap_or(self.memory_limit.map_or(64 << 20, |l| l / 10)),
            limit_bytes: self
                .dirty_limit_bytes
                .unwrap_or(self.memory_limit.map_or(256 << 20, |l| l / 5)),
        };
        let wb = CacheWriteback::new(spaces.clone(), stats.clone(), dirty);
        let inner = Arc::new(CacheInner {
            reclaim,
            spaces,
            wb,
            ra: RaConfig {
                window_pages: self
                    .readahead_bytes
                    .div_ceil(PAGE_SIZE as u64)
                    .max(1)
                    .next_multiple_of(min_pages),
                // With large folios the marker hole of an async
                // window is its first folio: a window of one folio
                // would read nothing ahead, so allow four.
                max_pages: self
                    .readahead_max_bytes
                    .div_ceil(PAGE_SIZE as u64)
                    .max(1)
                    .next_multiple_of(min_pages)
                    .max(if min_pages > 1 { 4 * min_pages } else { 1 }),
                max_order,
                min_order,
            },
            stats,
            files: Mutex::new(HashMap::new()),
            fault_cfg: self.fault,
            engine: Mutex::new(None),
            memfd: Mutex::new(None),
            hugetlb: self.hugetlb,
        });
        PageCache {
            _handles: Arc::new(LastHandle(Arc::downgrade(&inner))),
            inner,
        }
    }
}

/// Cached files by (device, inode). Weak: an address space lives while a
/// handle or a mapping holds it, and its last holder writes it back.
/// What identifies a file to the cache: its inode for `open`, the
/// engine's name for `open_with_ops`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum FileKey {
    Inode(u64, u64),
    Name(String),
}

/// Each file's address space, whether its store can write (a store
/// opened read-only serves only read-only handles), and its eviction
/// signal: an entry stays while its address space's drop is writing back,
/// and an open waits for that drop to end.
pub(crate) type FileTable = HashMap<FileKey, FileEntry>;

pub(crate) struct FileEntry {
    space: Weak<AddressSpace>,
    writable: bool,
    eviction: Arc<crate::address_space::Eviction>,
}

/// What an open finds in the file table.
enum Found {
    Live(Arc<AddressSpace>, bool),
    /// The last user is gone and its drop is still writing back, or
    /// another open is building the address space: wait for it, then look
    /// again.
    Dying(Arc<crate::address_space::Eviction>),
    Absent,
}

fn lookup_file(files: &FileTable, key: &FileKey) -> Found {
    match files.get(key) {
        None => Found::Absent,
        Some(e) => match e.space.upgrade() {
            Some(m) => Found::Live(m, e.writable),
            None if !e.eviction.is_done() => Found::Dying(e.eviction.clone()),
            None => Found::Absent,
        },
    }
}

crate::sync::thread_local! {
    /// The file-table reservations this thread is building (their
    /// eviction signal's address): an open of the same key from inside the
    /// build (an engine's `initial_size`) would wait for itself.
    /// (Not a `const` initializer: loom's `thread_local!` takes none.)
    #[allow(clippy::missing_const_for_thread_local)]
    static BUILDING: std::cell::RefCell<Vec<usize>> = std::cell::RefCell::new(Vec::new());
}

fn building(ev: &Arc<crate::address_space::Eviction>) -> bool {
    let addr = Arc::as_ptr(ev) as usize;
    BUILDING.try_with(|b| b.borrow().contains(&addr)).unwrap_or(false)
}

/// A key reserved in the file table while its address space is built
/// outside the table's lock (the kernel's `I_NEW` inode): opens of the
/// key wait for it as for a dying one. Dropped on every exit, failure and
/// unwind included: the placeholder leaves the table if the build did not
/// replace it, then the waiters wake and look again.
struct Reservation<'a> {
    files: &'a Mutex<FileTable>,
    key: &'a FileKey,
    ev: Arc<crate::address_space::Eviction>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut table = self.files.lock();
        if table.get(self.key).is_some_and(|e| Arc::ptr_eq(&e.eviction, &self.ev)) {
            table.remove(self.key);
        }
        drop(table);
        let addr = Arc::as_ptr(&self.ev) as usize;
        let _ = BUILDING.try_with(|b| b.borrow_mut().retain(|a| *a != addr));
        self.ev.finish();
    }
}

/// The file-table half of every open (`iget5_locked`): share the live
/// address space of `key`, wait for a dying one's drop (or another open's
/// build) to end and look again (`__wait_on_freeing_inode`), or reserve
/// the key, build one with `new` and enter it.
/// Returns the address space and whether its store can write.
///
/// # Errors
/// `new`'s error; [`Error::Reentrant`] when `new` itself (the engine's
/// `initial_size`) opens `key`.
///
/// # Locking
/// Takes the file table's lock; never sleeps holding it, and `new` (which
/// runs the engine's `initial_size`, free to open other files of the
/// cache) runs without it. The dying address space's drop does not take
/// it, but a drop of another of the table's files may run under it:
/// `insert_file` drops dead entries.
pub(crate) fn open_in_table(
    files: &Mutex<FileTable>,
    key: FileKey,
    store_writable: bool,
    new: impl FnOnce() -> Result<Arc<AddressSpace>>,
) -> Result<(Arc<AddressSpace>, bool)> {
    let mut new = Some(new);
    loop {
        let mut table = files.lock();
        match lookup_file(&table, &key) {
            Found::Live(m, w) => return Ok((m, w)),
            Found::Dying(ev) => {
                drop(table);
                if building(&ev) {
                    return Err(Error::Reentrant {
                        op: "open",
                        callback: "initial_size",
                    });
                }
                ev.wait();
                continue;
            }
            Found::Absent => {}
        }
        let ev = Arc::new(crate::address_space::Eviction::default());
        table.insert(
            key.clone(),
            FileEntry {
                space: Weak::new(),
                writable: store_writable,
                eviction: ev.clone(),
            },
        );
        drop(table);
        let _ = BUILDING.try_with(|b| b.borrow_mut().push(Arc::as_ptr(&ev) as usize));
        let reservation = Reservation { files, key: &key, ev };
        let new = new.take().expect("an open builds at most one address space");
        let m = new()?;
        insert_file(&mut files.lock(), key.clone(), &m, store_writable);
        drop(reservation);
        return Ok((m, store_writable));
    }
}

fn insert_file(files: &mut FileTable, key: FileKey, m: &Arc<AddressSpace>, writable: bool) {
    files.retain(|_, e| e.space.strong_count() > 0 || !e.eviction.is_done());
    files.insert(
        key,
        FileEntry {
            space: Arc::downgrade(m),
            writable,
            eviction: m.eviction.clone(),
        },
    );
}

struct CacheInner {
    /// Present with a memory limit.
    reclaim: Option<Arc<Reclaimer>>,
    /// Every address space, by id.
    spaces: Arc<Spaces>,
    /// Flusher, throttling, freeze.
    wb: Arc<CacheWriteback>,
    ra: RaConfig,
    stats: Arc<CacheStats>,
    /// Two opens of one file share one address space (one copy,
    /// coherent), as in the kernel.
    files: Mutex<FileTable>,
    fault_cfg: FaultConfig,
    /// Started on the first mmap.
    engine: Mutex<Option<Arc<FaultEngine>>>,
    /// The page store every file's folios live in (one descriptor per
    /// cache), created on the first open.
    memfd: Mutex<Option<Arc<PageMemfd>>>,
    /// The page store is a hugetlbfs memfd
    /// ([`PageCacheBuilder::hugetlb`]).
    hugetlb: bool,
}

impl Drop for CacheInner {
    fn drop(&mut self) {
        if let Some(r) = &self.reclaim {
            r.shutdown();
        }
        self.wb.shutdown();
    }
}

impl CacheInner {
    fn engine(&self) -> Result<Arc<FaultEngine>> {
        let mut e = self.engine.lock();
        if let Some(e) = &*e {
            return Ok(e.clone());
        }
        let new = FaultEngine::start(self.fault_cfg)?;
        *e = Some(new.clone());
        Ok(new)
    }
}

/// A page cache: the address spaces of the files it caches, their
/// configuration and counters. Cheap to clone (shared).
///
/// ```
/// # fn main() -> upcache::Result<()> {
/// # let dir = tempfile::tempdir()?;
/// let path = dir.path().join("data");
/// let cache = upcache::PageCache::builder()
///     .memory_limit(64 << 20) // evict beyond 64 MiB
///     .build();
/// let file = cache.options().create(true).open(&path)?;
/// file.write_at(b"hello", 0)?;
/// let mut buf = [0u8; 5];
/// file.read_exact_at(&mut buf, 0)?;
/// assert_eq!(&buf, b"hello");
/// file.fsync()?; // written and durable, errors reported once per handle
/// assert_eq!(std::fs::read(&path)?, b"hello");
/// println!("{}", cache.stats());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PageCache {
    inner: Arc<CacheInner>,
    /// Shared by every clone of this handle: its drop (the last
    /// `PageCache` gone) thaws a frozen cache, since only a `PageCache`
    /// can call [`thaw`](PageCache::thaw) and `File`s and mappings may
    /// outlive it.
    _handles: Arc<LastHandle>,
}

/// Thaws the cache when the last [`PageCache`] handle is dropped.
struct LastHandle(std::sync::Weak<CacheInner>);

impl Drop for LastHandle {
    fn drop(&mut self) {
        // Only a frozen cache: `thaw` takes the freeze gate exclusive,
        // which would wait for writers inside it (one may be waiting for
        // this thread's page pin); while frozen, nobody is inside.
        if let Some(inner) = self.0.upgrade() {
            if inner.wb.is_frozen() {
                inner.wb.thaw();
            }
        }
    }
}

impl std::fmt::Debug for PageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCache").field("stats", &self.stats()).finish()
    }
}

impl Default for PageCache {
    fn default() -> Self {
        PageCache::builder().build()
    }
}

impl PageCache {
    /// A builder with the defaults.
    pub fn builder() -> PageCacheBuilder {
        PageCacheBuilder::default()
    }

    /// A cache with the defaults.
    pub fn new() -> PageCache {
        Self::default()
    }

    /// Counters, summed over every file.
    pub fn stats(&self) -> Stats {
        self.inner.stats.snapshot()
    }

    /// Open the existing file at `path` read-write through the cache. Two
    /// opens of the same file (by path or by descriptor) share one address
    /// space. For create, truncate and read-only opens use
    /// [`options`](Self::options).
    ///
    /// # Errors
    /// [`Error::Open`] naming the path (`open(2)`'s error); `EFBIG` if the
    /// file is larger than the largest cacheable file.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<File> {
        self.options().open(path)
    }

    /// Options for opening a file, like [`std::fs::OpenOptions`]: read-write
    /// by default; `create`, `truncate` and `read_only` as there.
    pub fn options(&self) -> OpenOptions<'_> {
        OpenOptions {
            cache: self,
            write: true,
            create: false,
            truncate: false,
        }
    }

    /// Cache a file the engine already opened. It shares the address space
    /// of every other open of the same file (same device and inode), by
    /// path or descriptor. A descriptor open `O_RDWR` gives a read-write
    /// handle, `O_RDONLY` a read-only one ([`Error::ReadOnly`] on writes).
    /// When the file is already cached, `file` is closed and the cached
    /// store serves it.
    ///
    /// # Errors
    /// `EINVAL` for a write-only descriptor (the cache must read) or one
    /// opened `O_APPEND` or `O_DIRECT`; `EACCES`
    /// for a read-write descriptor of a file cached from a read-only one;
    /// `fstat`'s error.
    pub fn open_file(&self, file: std::fs::File) -> Result<File> {
        let flags = rustix::fs::fcntl_getfl(&file).map_err(|e| Error::Io(e.into()))?;
        let mode = flags & rustix::fs::OFlags::RWMODE;
        let writable = if mode == rustix::fs::OFlags::RDWR {
            true
        } else if mode == rustix::fs::OFlags::RDONLY {
            false
        } else {
            return Err(Error::InvalidArgument {
                what: "open_file needs a descriptor open for reading (O_RDONLY or O_RDWR)",
            });
        };
        if flags.intersects(rustix::fs::OFlags::APPEND | rustix::fs::OFlags::DIRECT) {
            // pwrite(2) on an O_APPEND descriptor appends whatever the
            // offset; the buffered store's buffers are not O_DIRECT-aligned.
            return Err(Error::InvalidArgument {
                what: "open_file needs a descriptor without O_APPEND (writes would append) or O_DIRECT (use DirectFileStore)",
            });
        }
        let name = format!("fd:{}", std::os::fd::AsRawFd::as_raw_fd(&file));
        self.attach(file, &name, writable, writable)
    }

    /// Share or create the address space of an open file.
    fn attach(&self, file: std::fs::File, name: &str, store_writable: bool, handle_writable: bool) -> Result<File> {
        let open_err = |source| Error::Open {
            path: name.into(),
            source,
        };
        let md = file.metadata().map_err(open_err)?;
        let key = FileKey::Inode(md.dev(), md.ino());
        // One address space per file while anything (a handle or a
        // mapping) still uses it, or its last user's drop still writes it
        // back.
        let (m, w) = open_in_table(&self.inner.files, key, store_writable, || {
            self.new_mapping(
                name.to_string(),
                Box::new(StoreOps::new(FileStore::from_file(file))),
                store_writable,
            )
        })?;
        if handle_writable && !w {
            return Err(open_err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the file is cached from a read-only open; a read-write handle cannot write it back (EACCES)",
            )));
        }
        Ok(File::new(m, self.inner.clone(), handle_writable))
    }

    /// Start the fault engine now (it starts on the first mmap otherwise),
    /// to learn early whether userfaultfd is usable.
    ///
    /// # Errors
    /// [`Error::Userfaultfd`] naming the missing permission or feature.
    pub fn start_fault_engine(&self) -> Result<()> {
        self.inner.engine().map(|_| ())
    }

    /// Cache a file whose operations the engine supplies (its own store,
    /// its own I/O). `name` identifies the file: while anything (a handle
    /// or a mapping) still uses the address space of `name`, opening `name`
    /// again returns a handle to that same address space and drops `ops`
    /// unused (the first open's operations stay, as an inode keeps its
    /// `a_ops`). So close-then-reopen under a live mapping stays coherent;
    /// two independent caches of one file would not be.
    ///
    /// # Errors
    /// The operations' `initial_size` error; memfd creation failure.
    pub fn open_with_ops(&self, name: &str, ops: impl AddressSpaceOps) -> Result<File> {
        let key = FileKey::Name(name.to_string());
        let (m, _) = open_in_table(&self.inner.files, key, true, || {
            self.new_mapping(name.to_string(), Box::new(ops), true)
        })?;
        Ok(File::new(m, self.inner.clone(), true))
    }

    fn new_mapping(
        &self,
        name: String,
        ops: Box<dyn crate::aops::OpsAny>,
        store_writable: bool,
    ) -> Result<Arc<AddressSpace>> {
        let id = next_mapping_id();
        let memfd = {
            let mut slot = self.inner.memfd.lock();
            match &*slot {
                Some(m) => m.clone(),
                None => slot
                    .insert(PageMemfd::new(self.inner.hugetlb).map_err(Error::Io)?)
                    .clone(),
            }
        };
        let m = AddressSpace::new(
            id,
            name,
            ops,
            self.inner.stats.clone(),
            self.inner.ra,
            self.inner.reclaim.clone(),
            Some(self.inner.wb.clone()),
            &memfd,
        )
        .map_err(Error::Io)?;
        let mut m = m;
        m.bounce_writeback = self.inner.fault_cfg.wp_async;
        m.store_writable = store_writable;
        let m = Arc::new(m);
        self.inner.spaces.register(&m);
        Ok(m)
    }

    /// `syncfs`: integrity writeback and store sync of every file of the
    /// cache.
    ///
    /// # Errors
    /// The first write or sync error (failed folios stay dirty); else,
    /// once, any write-back or store-sync error recorded for a file of the
    /// cache since the last `sync_all` (the kernel's `sb->s_wb_err`): one
    /// a handle's `fsync` reported first, or the failed final write-back
    /// of a file whose last user is gone;
    /// [`Error::Reentrant`] from inside an engine callback for one of the
    /// cache's files (the sync would wait for that callback).
    pub fn sync_all(&self) -> Result<()> {
        self.check_reentry("sync_all")?;
        self.inner.wb.syncfs().map_err(Error::Writeback)
    }

    /// `Err(Reentrant)` if this thread is inside an engine callback for a
    /// file of this cache, a dying one included (its drop's write-back):
    /// a cache-wide `op` would wait for that callback.
    fn check_reentry(&self, op: &'static str) -> Result<()> {
        match crate::address_space::engine_callback_for(|id| self.inner.spaces.contains(id)) {
            Some(callback) => Err(Error::Reentrant { op, callback }),
            None => Ok(()),
        }
    }

    /// `FIFREEZE`: block new dirtying (write_at, truncate, punch_hole, and
    /// first writes through mappings) until [`thaw`](Self::thaw), wait for
    /// the dirtying operations in flight, and write and sync every file. On
    /// return the files on disk are a consistent snapshot point. Reads and
    /// read faults go on.
    ///
    /// # Errors
    /// `EBUSY` if already frozen; `EDEADLK` if this thread holds a
    /// [`PageMut`](crate::PageMut) of the cache (the freeze would wait for
    /// it); the sync's error (the cache is then thawed);
    /// [`Error::Unsupported`] in a cache built with
    /// [`DirtyTracking::Async`]; [`Error::Reentrant`] from inside an engine
    /// callback for one of the cache's files.
    pub fn freeze(&self) -> Result<()> {
        self.check_reentry("freeze")?;
        if self.inner.fault_cfg.wp_async {
            return Err(Error::Unsupported {
                what: "freeze cannot hold back mapped writes with DirtyTracking::Async; \
                       build the cache with DirtyTracking::WriteFault",
            });
        }
        self.inner.wb.freeze().map_err(Error::Writeback)
    }

    /// `FITHAW`: let dirtying resume (parked write faults are released:
    /// their threads fault again and are served). Returns whether the
    /// cache was frozen.
    pub fn thaw(&self) -> bool {
        self.inner.wb.thaw()
    }

    /// Is the cache frozen?
    pub fn is_frozen(&self) -> bool {
        self.inner.wb.is_frozen()
    }

    /// Bytes of memory the cache's page store holds for every file (the
    /// memfd's allocated blocks, as the kernel counts them). Per file:
    /// [`File::memory_bytes`].
    pub fn memory_bytes(&self) -> u64 {
        self.inner.memfd.lock().as_ref().map_or(0, |m| m.allocated_bytes())
    }

    /// The memory limit, if any.
    pub fn memory_limit(&self) -> Option<u64> {
        self.inner.reclaim.as_ref().map(|r| r.limit_bytes())
    }

    /// Entries in the reclaim queues (0 without a memory limit). A test
    /// aid: the queues must stay proportional to what is cached.
    #[doc(hidden)]
    pub fn reclaim_queue_len(&self) -> usize {
        self.inner.reclaim.as_ref().map_or(0, |r| r.queue_len())
    }
}

/// An open file of a [`PageCache`] (`struct file`).
///
/// Reads and writes go through the shared address space; `fsync` reports
/// each writeback error once per handle. `close` flushes and returns the
/// error if any; dropping an unclosed handle flushes too and, since `drop`
/// cannot return an error, reports a failure on stderr.
///
/// Pinned pages, for engines that work on pages in place:
///
/// ```
/// # fn main() -> upcache::Result<()> {
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("db");
/// # std::fs::write(&path, vec![0u8; 3 * 4096])?;
/// let cache = upcache::PageCache::new();
/// let file = cache.open(&path)?;
/// // SAFETY: nothing maps this file while the guards live.
/// {
///     let mut page = unsafe { file.get_page_mut(2) }?; // locked, in place
///     page[..4].copy_from_slice(b"node");
///     page.set_lsn(7); // written back only after the log is durable to 7
/// }
/// let page = unsafe { file.get_page(2) }?; // pinned, shared, no copy
/// assert_eq!(&page[..4], b"node");
/// drop(page);
/// file.close()?;
/// # Ok(()) }
/// ```
pub struct File {
    mapping: Arc<AddressSpace>,
    /// Opened for writing (else the writing methods fail with `EBADF`).
    writable: bool,
    /// `f_wb_err`: the errseq value this handle last reported.
    wb_err: AtomicU64,
    closed: AtomicBool,
    cache: Arc<CacheInner>,
}

impl std::fmt::Debug for File {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("File")
            .field("mapping", &self.mapping)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl File {
    fn new(mapping: Arc<AddressSpace>, cache: Arc<CacheInner>, writable: bool) -> File {
        File {
            writable,
            wb_err: AtomicU64::new(mapping.wb_err.sample()),
            mapping,
            closed: AtomicBool::new(false),
            cache,
        }
    }

    /// Map `len` bytes of the file at `offset` (page-aligned) read-only,
    /// faults served by the cache's fault engine. Pages past end of file
    /// raise SIGBUS when touched, as with a kernel mapping.
    ///
    /// # Errors
    /// `Closed`; `EINVAL` for a zero length or unaligned offset; `EFBIG`
    /// past the largest file; [`Error::Userfaultfd`] if userfaultfd is not
    /// usable here; [`Error::PageHeld`](crate::Error::PageHeld) for a
    /// `Missing`-mode mapping made while this thread holds a page guard of
    /// the file (making one takes `i_rwsem`, which a writer waiting for
    /// the guard may hold); `mmap(2)`'s error.
    ///
    /// # Locking
    /// Must not be called holding a folio lock of the file (from inside an
    /// engine callback such as `read_folio`): the file's first
    /// `Missing`-mode mapping waits for every fill in flight, which locks
    /// each folio being filled.
    ///
    /// # Safety
    ///
    /// As with `memmap2::Mmap`, the returned handle derefs to a slice of
    /// memory that others may change: `write_at`, `truncate`, `punch_hole`,
    /// a [`PageMut`] of the same page, other mappings of the file (in this or any thread), and other
    /// processes writing the file through upcache. The caller must ensure
    /// that no such change happens to the bytes of a slice obtained from
    /// the mapping while that slice is alive, and that no slice is used
    /// for bytes past end of file (SIGBUS). For memory shared with
    /// concurrent writers, use the safe [`mmap_raw`](Self::mmap_raw).
    pub unsafe fn mmap(&self, offset: u64, len: usize, share: Share) -> Result<Mmap> {
        // SAFETY: the caller upholds this function's contract, which is
        // the same.
        unsafe { self.mmap_with_mode(offset, len, share, self.cache.fault_cfg.mode) }
    }

    /// Map `len` bytes at `offset` read-write: `Share::Shared` writes go to
    /// the page cache (dirtying folios through page_mkwrite, written back
    /// by fsync / `MmapMut::flush`); `Share::Private` writes stay private.
    ///
    /// # Errors
    /// As [`mmap`](Self::mmap).
    ///
    /// # Safety
    ///
    /// As [`mmap`](Self::mmap); in addition `&mut [u8]` from this handle
    /// must not alias bytes that another mapping, `write_at`, a
    /// [`PageRef`]/[`PageMut`] or another thread reads or writes while it
    /// is alive (two `MmapMut`s of one page are two `&mut` to the same
    /// memory; a write through the mapping is not held back by pins).
    pub unsafe fn mmap_mut(&self, offset: u64, len: usize, share: Share) -> Result<MmapMut> {
        // SAFETY: the caller upholds this function's contract, which is
        // the same.
        unsafe { self.mmap_mut_with_mode(offset, len, share, self.cache.fault_cfg.mode) }
    }

    /// [`mmap`](Self::mmap) with an explicit registration mode.
    ///
    /// # Errors
    /// As [`mmap`](Self::mmap).
    ///
    /// # Safety
    /// As [`mmap`](Self::mmap).
    pub unsafe fn mmap_with_mode(&self, offset: u64, len: usize, share: Share, mode: UffdMode) -> Result<Mmap> {
        self.mapping_for("mmap")?;
        let engine = self.cache.engine()?;
        let vma = do_mmap(&engine, &self.mapping, offset, len, false, share, mode)?;
        Ok(Mmap::new(vma, engine))
    }

    /// [`mmap_mut`](Self::mmap_mut) with an explicit registration mode.
    ///
    /// # Errors
    /// As [`mmap`](Self::mmap).
    ///
    /// # Safety
    /// As [`mmap_mut`](Self::mmap_mut).
    pub unsafe fn mmap_mut_with_mode(&self, offset: u64, len: usize, share: Share, mode: UffdMode) -> Result<MmapMut> {
        // A private mapping's writes are copies that never reach the file:
        // a read-only handle may make one, as mmap(2) allows MAP_PRIVATE
        // with PROT_WRITE on an O_RDONLY descriptor.
        match share {
            Share::Shared => self.mapping_for_shared_write()?,
            Share::Private => self.mapping_for("mmap")?,
        };
        let engine = self.cache.engine()?;
        let vma = do_mmap(&engine, &self.mapping, offset, len, true, share, mode)?;
        Ok(MmapMut::new(vma, engine))
    }

    /// A shared, writable mapping handed out as a raw pointer and length
    /// (like `memmap2::MmapRaw`): safe to create, `Send + Sync`, and
    /// accessed through [`MmapRaw::read`] / [`MmapRaw::write`] copies or
    /// through the raw pointer, so several threads (and `write_at`) may
    /// share its pages without any `&[u8]` to them existing.
    ///
    /// # Errors
    /// As [`mmap`](Self::mmap).
    pub fn mmap_raw(&self, offset: u64, len: usize) -> Result<MmapRaw> {
        self.mapping_for_shared_write()?;
        let engine = self.cache.engine()?;
        let vma = do_mmap(
            &engine,
            &self.mapping,
            offset,
            len,
            true,
            Share::Shared,
            self.cache.fault_cfg.mode,
        )?;
        Ok(MmapRaw::new(vma, engine))
    }

    fn mapping(&self) -> Result<&AddressSpace> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::Closed)
        } else {
            Ok(&self.mapping)
        }
    }

    /// The address space, for an operation that writes.
    fn mapping_w(&self) -> Result<&AddressSpace> {
        let m = self.mapping()?;
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        Ok(m)
    }

    /// The address space, for `op`, an operation that may wait for folios
    /// or locks: refused (`Reentrant`, `EDEADLK`) inside an engine
    /// callback for this file, which it would wait for.
    fn mapping_for(&self, op: &'static str) -> Result<&AddressSpace> {
        let m = self.mapping()?;
        m.check_reentry(op)?;
        Ok(m)
    }

    /// The address space for a shared writable mapping (as
    /// [`mapping_for`](Self::mapping_for)): a read-only handle gets `EACCES`, as `mmap(2)` answers
    /// `MAP_SHARED` with `PROT_WRITE` on an `O_RDONLY` descriptor.
    fn mapping_for_shared_write(&self) -> Result<&AddressSpace> {
        let m = self.mapping_for("mmap")?;
        if !self.writable {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "a shared writable mapping of a read-only handle (EACCES, as mmap(2))",
            )));
        }
        Ok(m)
    }

    /// Was the handle opened for writing?
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The file's address space.
    ///
    /// # Errors
    /// `Closed` after [`close`](Self::close).
    pub fn address_space(&self) -> Result<&AddressSpace> {
        self.mapping()
    }

    /// File size.
    ///
    /// # Errors
    /// `Closed` after close.
    pub fn len(&self) -> Result<u64> {
        Ok(self.mapping()?.size())
    }

    /// The largest size this file can reach: what its store can hold (the
    /// file system's limit for a [`FileStore`](crate::FileStore)), at most
    /// [`MAX_FILE_SIZE`](crate::MAX_FILE_SIZE)
    /// ([`AddressSpace::max_file_size`]).
    ///
    /// # Errors
    /// `Closed` after close.
    pub fn max_file_size(&self) -> Result<u64> {
        Ok(self.mapping()?.max_file_size())
    }

    /// This file's counters ([`AddressSpace::stats`]): shared by every
    /// handle of the file; zero after close.
    pub fn stats(&self) -> Stats {
        self.mapping().map(AddressSpace::stats).unwrap_or_default()
    }

    /// Bytes of memory this file's cached folios hold in the page store
    /// (the memfd's allocated blocks; 0 after close).
    pub fn memory_bytes(&self) -> u64 {
        self.mapping().map_or(0, AddressSpace::memory_bytes)
    }

    /// Is the file empty?
    ///
    /// # Errors
    /// `Closed` after close.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Page `index` (of `PAGE_SIZE` bytes), read in if needed and pinned:
    /// zero-copy read access ([`AddressSpace::read_cache_page`]).
    ///
    /// # Errors
    /// `Closed`; [`crate::Error::BeyondEof`]; the store's
    /// read error.
    ///
    /// # Safety
    /// As [`AddressSpace::read_cache_page`]: no mapping of the file writes
    /// the page while the guard lives.
    pub unsafe fn get_page(&self, index: u64) -> Result<PageRef<'_>> {
        // SAFETY: the caller upholds the same contract.
        unsafe { self.mapping()?.read_cache_page(index) }
    }

    /// Page `index`, read in if needed and locked for writing in place
    /// ([`AddressSpace::read_cache_page_mut`]); dirty when dropped after a
    /// write.
    ///
    /// # Errors
    /// As [`get_page`](Self::get_page).
    ///
    /// # Safety
    /// As [`AddressSpace::read_cache_page_mut`]: no mapping of the file
    /// reads or writes the page while the guard lives.
    pub unsafe fn get_page_mut(&self, index: u64) -> Result<PageMut<'_>> {
        // SAFETY: the caller upholds the same contract.
        unsafe { self.mapping_w()?.read_cache_page_mut(index) }
    }

    /// Read at `pos` ([`AddressSpace::read_at`]).
    ///
    /// # Errors
    /// `Closed`; the store's read error; `InvalidArgument` if `buf` shares
    /// memory with the bytes it would receive (a
    /// [`PageMut`](crate::PageMut) of the same page).
    pub fn read_at(&self, buf: &mut [u8], pos: u64) -> Result<usize> {
        self.mapping()?.read_at(buf, pos)
    }

    /// Read exactly `buf.len()` bytes at `pos`, reading again after a short
    /// read (as `std::os::unix::fs::FileExt::read_exact_at`): `read_at`
    /// returns the bytes before a page whose read fails, and the next read
    /// reports the failure.
    ///
    /// # Errors
    /// `UnexpectedEof` (as `Io`) when the file ends first; as `read_at`.
    pub fn read_exact_at(&self, mut buf: &mut [u8], mut pos: u64) -> Result<()> {
        while !buf.is_empty() {
            let n = self.read_at(buf, pos)?;
            if n == 0 {
                return Err(Error::Io(io::Error::from(io::ErrorKind::UnexpectedEof)));
            }
            buf = &mut buf[n..];
            pos += n as u64;
        }
        Ok(())
    }

    /// Write at `pos` ([`AddressSpace::write_at`]).
    ///
    /// # Errors
    /// `Closed`; `EFBIG`; a partial-folio read error.
    pub fn write_at(&self, buf: &[u8], pos: u64) -> Result<usize> {
        self.mapping_w()?.write_at(buf, pos)
    }

    /// Set the size ([`AddressSpace::truncate`]).
    ///
    /// # Errors
    /// `Closed`; `EINVAL` through a read-only handle or past `i64::MAX`
    /// (as `ftruncate(2)`); `EFBIG`; the store's error.
    pub fn truncate(&self, size: u64) -> Result<()> {
        if !self.writable {
            self.mapping()?;
            return Err(Error::InvalidArgument {
                what: "truncate through a read-only handle (EINVAL, as ftruncate(2) on an O_RDONLY descriptor)",
            });
        }
        self.mapping_w()?.truncate(size)
    }

    /// Punch a hole ([`AddressSpace::punch_hole`]). A failed punch loses
    /// no data.
    ///
    /// # Errors
    /// `Closed`; `EINVAL`; `EFBIG`; a write-back error, or `EBUSY` when a
    /// page written during the punch kept being written; the store's
    /// error.
    pub fn punch_hole(&self, off: u64, len: u64) -> Result<()> {
        self.mapping_w()?.punch_hole(off, len)
    }

    /// `posix_fadvise` ([`AddressSpace::advise`]).
    ///
    /// # Errors
    /// `Closed`; as `AddressSpace::advise`.
    pub fn advise(&self, advice: Advice, off: u64, len: u64) -> Result<()> {
        self.mapping()?.advise(advice, off, len)
    }

    /// Cleansing writeback of up to `nr_pages` dirty pages (does not wait
    /// for durability; errors are also kept for the next fsync).
    ///
    /// # Errors
    /// `Closed`; the first write error.
    pub fn writeback(&self, nr_pages: i64) -> Result<u64> {
        let m = self.mapping_for("writeback")?;
        let mut wbc = WritebackControl::none(nr_pages);
        m.writepages(&mut wbc)?;
        Ok(wbc.pages_written)
    }

    /// `fsync(2)` (data integrity, like `fdatasync`): write every dirty
    /// folio, wait, make the store durable. Reports a writeback error that
    /// happened since this handle last reported one (even one hit by
    /// background writeback), once. Failed folios stay dirty and are
    /// retried by the next sync: no data is dropped.
    ///
    /// # Errors
    /// `Closed`; `Writeback` with the recorded errno; the store's sync error.
    pub fn fsync(&self) -> Result<()> {
        self.sync_range(0, u64::MAX)
    }

    /// `fsync` restricted to the bytes `[start, end]` (inclusive), like
    /// `sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER)` followed by the
    /// store's sync.
    ///
    /// # Errors
    /// As [`fsync`](Self::fsync); `EINVAL` if `start > end`.
    pub fn sync_range(&self, start: u64, end: u64) -> Result<()> {
        if start > end {
            return Err(Error::InvalidArgument {
                what: "sync_range start after end",
            });
        }
        let m = self.mapping_for("fsync")?;
        let written = m.write_and_wait_range(start, end);
        let synced = m.store_sync();
        if let Some(errno) = m.wb_err.check_and_advance(&self.wb_err) {
            return Err(Error::Writeback(io::Error::from_raw_os_error(errno)));
        }
        if let Err(e) = written {
            return Err(Error::Writeback(e));
        }
        synced?;
        Ok(())
    }

    /// Flush and close. On error the handle stays open (the data is still
    /// cached and dirty): retry, or drop the handle to give up.
    ///
    /// # Errors
    /// `Closed` if already closed; as [`fsync`](Self::fsync).
    pub fn close(&self) -> Result<()> {
        self.fsync()?;
        if self.closed.swap(true, Ordering::AcqRel) {
            return Err(Error::Closed);
        }
        Ok(())
    }
}

impl Drop for File {
    fn drop(&mut self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.fsync() {
            eprintln!(
                "upcache: {}: dropped without close and the flush failed ({e}); \
                 the data stays dirty and is retried when the last user of the file goes",
                self.mapping.name()
            );
        }
    }
}

/// How to open a file through a [`PageCache`] ([`PageCache::options`]),
/// like [`std::fs::OpenOptions`].
#[derive(Debug)]
pub struct OpenOptions<'c> {
    cache: &'c PageCache,
    write: bool,
    create: bool,
    truncate: bool,
}

impl OpenOptions<'_> {
    /// Open for writing (the default) or read-only. A read-only handle's
    /// writing methods (`write_at`, `truncate`, `punch_hole`, writable
    /// mappings, `get_page_mut`) fail with [`Error::ReadOnly`].
    pub fn write(&mut self, write: bool) -> &mut Self {
        self.write = write;
        self
    }

    /// Create the file if it does not exist (needs `write`).
    pub fn create(&mut self, create: bool) -> &mut Self {
        self.create = create;
        self
    }

    /// Truncate the file to zero length on open (needs `write`). Done
    /// through the cache, so other handles and mappings of a cached file
    /// see it as a `truncate(0)`.
    pub fn truncate(&mut self, truncate: bool) -> &mut Self {
        self.truncate = truncate;
        self
    }

    /// Open `path` with these options.
    ///
    /// # Errors
    /// `EINVAL` for `create`/`truncate` without `write`; [`Error::Open`]
    /// naming the path (`open(2)`'s error); `EACCES` for a writable open of
    /// a file cached from a read-only one; as [`File::truncate`].
    pub fn open(&self, path: impl AsRef<Path>) -> Result<File> {
        let path = path.as_ref();
        if !self.write && (self.create || self.truncate) {
            return Err(Error::InvalidArgument {
                what: "create or truncate needs a writable open",
            });
        }
        let open_err = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };
        // The store is opened read-write whenever the file allows it, so
        // that one address space serves read-only and read-write handles
        // alike; read-only only when the file is (EACCES, EROFS).
        let rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(self.create)
            .open(path);
        let (file, store_writable) = match rw {
            Ok(f) => (f, true),
            Err(e)
                if !self.write
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM)
                    ) =>
            {
                (std::fs::File::open(path).map_err(open_err)?, false)
            }
            Err(e) => return Err(open_err(e)),
        };
        let f = self
            .cache
            .attach(file, &path.display().to_string(), store_writable, self.write)?;
        if self.truncate {
            f.truncate(0)?;
        }
        Ok(f)
    }
}

/// A new address-space id, unique in the process, never reused. The
/// per-thread records name files by id (the page guards a thread holds,
/// the engine callbacks it is inside), and one thread may use the files
/// of several caches: ids counted per cache made a guard or a callback of
/// one cache's first file refuse the first file of another
/// (tests/page_ref.rs, `a_guard_of_one_cache_does_not_refuse_operations_of_another`).
#[cfg(not(loom))]
fn next_mapping_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Loom: no model opens files through a cache; ids per thread suffice.
#[cfg(loom)]
fn next_mapping_id() -> u64 {
    crate::sync::thread_local! {
        static NEXT: std::cell::Cell<u64> = std::cell::Cell::new(1);
    }
    NEXT.with(|n| {
        let id = n.get();
        n.set(id + 1);
        id
    })
}
