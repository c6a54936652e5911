//! Where folio bytes live: one sparse `memfd` per cache, in which each open
//! file owns a region of [`MAX_FILE_SIZE`] bytes holding each of its bytes
//! at `region base + file offset`, written through the engine's own
//! unregistered `MAP_SHARED` view of it.
//!
//! One descriptor per cache, not per file: the kernel's page cache costs no
//! descriptor per file, and storage engines keep thousands of files open
//! (issue #12 item 4; `tests/descriptors.rs`). A region is taken when a file
//! is opened and given back, punched empty, when the last folio and mapping
//! of that file are gone (`PageStore` drop).
//!
//! The view is mapped lazily in 1 GiB chunks (virtual address space only,
//! `MAP_NORESERVE`) shared by every file of the cache; a folio never
//! straddles a chunk because folios are naturally aligned and at most
//! 2 MiB, and regions are chunk-aligned. The fault engine maps the very
//! same memfd pages into user mappings, so a mapped page *is* the cached
//! folio. Dropping folios punches the memfd (`FALLOC_FL_PUNCH_HOLE`), which
//! frees the memory and zaps the page from every mapping.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{fallocate, fstat, ftruncate, memfd_create, seek, FallocateFlags, MemfdFlags, SeekFrom};
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};

use crate::sync::{Arc, Mutex, RwLock};
use crate::types::MAX_FILE_SIZE;

#[cfg(not(loom))]
const CHUNK_SHIFT: u32 = 30;
#[cfg(loom)]
const CHUNK_SHIFT: u32 = 18;
const CHUNK_SIZE: u64 = 1 << CHUNK_SHIFT;

/// Regions a cache's memfd holds: the memfd is `MAX_REGIONS` regions long
/// (sparse; `MAX_LFS_FILESIZE` is 2^63 - 1).
#[cfg(not(loom))]
const MAX_REGIONS: u64 = (1u64 << 62) / MAX_FILE_SIZE;
#[cfg(loom)]
const MAX_REGIONS: u64 = 16;

/// A 2 MiB folio is mapped with one PMD only at a virtual address
/// congruent to its memfd offset modulo this.
pub(crate) const PMD_SIZE: usize = 2 << 20;

/// `mmap(2)` of `fd` at `off` at an address congruent to `off` modulo
/// [`PMD_SIZE`], so that 2 MiB shmem folios can be mapped with PMDs
/// whatever the system's shmem THP setting was when the mapping was made
/// (the kernel aligns shmem mappings itself only while it is on): reserve
/// `len + PMD_SIZE` of address space, map over the aligned part with
/// `MAP_FIXED`, give back the rest.
///
/// # Safety
/// As `mmap` with a null hint: the new mapping lies inside a reservation
/// made here, so it aliases no Rust object.
pub(crate) unsafe fn mmap_pmd_aligned(
    len: usize,
    prot: ProtFlags,
    flags: MapFlags,
    fd: BorrowedFd<'_>,
    off: u64,
) -> io::Result<*mut libc::c_void> {
    let span = len + PMD_SIZE;
    // SAFETY: a fresh anonymous PROT_NONE reservation (null hint).
    let res = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            span,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    }?;
    let r = res as usize;
    let want = (off % PMD_SIZE as u64) as usize;
    let a = r + (want + PMD_SIZE - r % PMD_SIZE) % PMD_SIZE;
    // SAFETY: `[a, a + len)` lies inside our own reservation (a < r +
    // PMD_SIZE), which nothing else uses; MAP_FIXED replaces only it.
    let p = match unsafe { mmap(a as *mut _, len, prot, flags | MapFlags::FIXED, fd, off) } {
        Ok(p) => p,
        Err(e) => {
            // Older kernels may have unmapped `[a, a + len)` before failing,
            // and another thread may have mapped something there since:
            // give back only what is certainly still ours.
            // SAFETY: the parts of our reservation around `[a, a + len)`,
            // untouched by the failed call.
            unsafe {
                if a > r {
                    let _ = munmap(res, a - r);
                }
                if r + span > a + len {
                    let _ = munmap((a + len) as *mut _, r + span - (a + len));
                }
            }
            // Take `[a, a + len)` back if it is free, then give it back;
            // if someone else has it now, leave it to them (our reservation
            // there, if still present, leaks address space only).
            // SAFETY: NOREPLACE maps only where nothing is mapped.
            if let Ok(q) = unsafe {
                rustix::mm::mmap_anonymous(
                    a as *mut _,
                    len,
                    ProtFlags::empty(),
                    MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED_NOREPLACE,
                )
            } {
                // SAFETY: the mapping just made, ours alone.
                let _ = unsafe { munmap(q, len) };
            }
            return Err(e.into());
        }
    };
    // SAFETY: the parts of our reservation before and after the mapping,
    // unused.
    unsafe {
        if a > r {
            let _ = munmap(res, a - r);
        }
        if r + span > a + len {
            let _ = munmap((a + len) as *mut _, r + span - (a + len));
        }
    }
    Ok(p)
}

/// A cache's memfd, its view and its region allocator.
pub(crate) struct PageMemfd {
    memfd: OwnedFd,
    /// chunk number (memfd offset >> CHUNK_SHIFT) → base address of its
    /// view. Written only when a folio is created in a chunk not yet
    /// mapped; folios cache their data pointer.
    chunks: RwLock<HashMap<u64, usize>>,
    /// Region allocator: regions given back, and the first never used.
    regions: Mutex<(Vec<u64>, u64)>,
    /// A hugetlbfs memfd (`MFD_HUGETLB`, 2 MiB pages): see
    /// [`PageStore::allocate`].
    hugetlb: bool,
}

impl PageMemfd {
    /// Create the memfd, sized to hold every region (sparse, no memory):
    /// shmem, or with `hugetlb` a hugetlbfs memfd of 2 MiB pages
    /// ([`PageCacheBuilder::hugetlb`](crate::PageCacheBuilder::hugetlb)).
    pub(crate) fn new(hugetlb: bool) -> io::Result<Arc<PageMemfd>> {
        let flags = if hugetlb {
            MemfdFlags::CLOEXEC | MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB
        } else {
            MemfdFlags::CLOEXEC
        };
        let memfd = memfd_create("upcache", flags).map_err(|e| {
            let e = io::Error::from(e);
            if hugetlb {
                io::Error::new(e.kind(), format!("memfd_create(MFD_HUGETLB | MFD_HUGE_2MB): {e}"))
            } else {
                e
            }
        })?;
        ftruncate(&memfd, MAX_REGIONS * MAX_FILE_SIZE)?;
        Ok(Arc::new(PageMemfd {
            memfd,
            chunks: RwLock::new(HashMap::new()),
            regions: Mutex::new((Vec::new(), 0)),
            hugetlb,
        }))
    }

    /// Bytes of memory the memfd holds (its allocated blocks), every file.
    pub(crate) fn allocated_bytes(&self) -> u64 {
        fstat(&self.memfd).map(|st| st.st_blocks as u64 * 512).unwrap_or(0)
    }

    /// Engine-view address of memfd offset `off`; maps its chunk on first
    /// use.
    fn view_ptr(&self, off: u64) -> io::Result<*mut u8> {
        let chunk = off >> CHUNK_SHIFT;
        let inner = (off & (CHUNK_SIZE - 1)) as usize;
        if let Some(&base) = self.chunks.read().get(&chunk) {
            return Ok((base + inner) as *mut u8);
        }
        let mut chunks = self.chunks.write();
        if let Some(&base) = chunks.get(&chunk) {
            return Ok((base + inner) as *mut u8);
        }
        // SAFETY: a fresh mapping (inside its own reservation) cannot alias
        // any Rust object; the memfd is MAX_REGIONS regions long, so the
        // chunk is backed; it stays mapped until `Drop`, after every region
        // (and so every folio) is gone. PMD-aligned: large folios that are
        // huge pages are read and filled through PMD mappings here.
        //
        // Mapped inaccessible first, then opened with `mprotect`: in a
        // process that called `mlockall(MCL_FUTURE)` an accessible new
        // mapping is filled in by `mmap` itself, which would allocate the
        // whole window in the memfd (a `Missing`-mode mapping then reads
        // those zero pages as file data, `tests/mlockall.rs`); `mprotect`
        // of a shared mapping fills in nothing.
        let p = unsafe {
            mmap_pmd_aligned(
                CHUNK_SIZE as usize,
                ProtFlags::empty(),
                MapFlags::SHARED | MapFlags::NORESERVE,
                self.memfd.as_fd(),
                chunk << CHUNK_SHIFT,
            )
        }?;
        // SAFETY: our own fresh mapping, not yet handed out.
        if let Err(e) = unsafe {
            rustix::mm::mprotect(
                p,
                CHUNK_SIZE as usize,
                rustix::mm::MprotectFlags::READ | rustix::mm::MprotectFlags::WRITE,
            )
        } {
            // SAFETY: our own fresh mapping, never handed out.
            let _ = unsafe { munmap(p, CHUNK_SIZE as usize) };
            return Err(e.into());
        }
        // A forked child must not inherit the engine view: it could write
        // cached folios behind the parent's back.
        // SAFETY: our own fresh mapping; DONTFORK changes only fork(2)'s
        // treatment of it.
        unsafe { libc::madvise(p, CHUNK_SIZE as usize, libc::MADV_DONTFORK) };
        chunks.insert(chunk, p as usize);
        Ok((p as usize + inner) as *mut u8)
    }
}

impl Drop for PageMemfd {
    fn drop(&mut self) {
        for (_, base) in self.chunks.write().drain() {
            // SAFETY: `base` came from our `mmap` of CHUNK_SIZE bytes; every
            // PageStore holds an Arc of this memfd, so none (and no folio
            // pointing into the view) is left.
            let _ = unsafe { munmap(base as *mut _, CHUNK_SIZE as usize) };
        }
    }
}

/// One address space's region of its cache's memfd.
pub(crate) struct PageStore {
    memfd: Arc<PageMemfd>,
    /// Memfd offset of file offset 0.
    base: u64,
    /// Loom models' page table: told of every punch (which zaps the range
    /// from every user mapping), after the memory is freed.
    #[cfg(loom)]
    pub(crate) on_punch: std::sync::OnceLock<PteHook>,
    /// Loom models' page table: told of every `page_mkclean` (which, for
    /// real, write-protects the folio in every shared-writable mapping).
    #[cfg(loom)]
    pub(crate) on_mkclean: std::sync::OnceLock<PteHook>,
    /// Loom models' async-tracked page table: `PAGEMAP_SCAN` of a range of
    /// file pages (written runs, protected again).
    #[cfg(loom)]
    pub(crate) on_scan: std::sync::OnceLock<ScanHook>,
    /// Loom models' async-tracked page table: a zap (`MADV_DONTNEED`).
    #[cfg(loom)]
    pub(crate) on_zap: std::sync::OnceLock<PteHook>,
    /// Loom models' `Missing`-mode page table: SIGBUS poison installed on
    /// file pages past end of file (`poison_past_eof`), under `i_mmap`.
    #[cfg(loom)]
    pub(crate) on_poison: std::sync::OnceLock<PteHook>,
    /// Loom models' `Missing`-mode page table: poison cleared by a zap of
    /// poisoned mappings (`unpoison_growth`), under `i_mmap`.
    #[cfg(loom)]
    pub(crate) on_unpoison: std::sync::OnceLock<PteHook>,
    /// Loom models' page table: a zap of every mapping of a range
    /// (`unmap_mapping_range`), under `i_mmap`.
    #[cfg(loom)]
    pub(crate) on_unmap: std::sync::OnceLock<PteHook>,
}

/// A loom model's `PAGEMAP_SCAN`: file pages in, written runs out.
#[cfg(loom)]
pub(crate) type ScanHook = std::sync::Arc<dyn Fn(std::ops::Range<u64>) -> Vec<std::ops::Range<u64>> + Send + Sync>;

/// A loom model's page-table hook: `(pos, len)` of the file range.
#[cfg(loom)]
pub(crate) type PteHook = std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Call a loom model's hook, if it set one (once, before its threads).
#[cfg(loom)]
pub(crate) fn call_pte_hook(hook: &std::sync::OnceLock<PteHook>, pos: u64, len: u64) {
    if let Some(hook) = hook.get() {
        hook(pos, len);
    }
}

/// Could the kernel give this memfd large (THP or mTHP) shmem folios? Read
/// from `/sys/kernel/mm/transparent_hugepage/shmem_enabled` and the
/// per-size `hugepages-*/shmem_enabled`: `always`, `within_size` and
/// `force` do (a memfd is sized to the largest file, so every offset is
/// "within size"); `never`, `advise` (no VMA asks: fills use `pwrite` and
/// an unadvised view) and `deny` do not. Unreadable files count as off.
pub(crate) fn shmem_thp_possible() -> bool {
    let dir = std::path::Path::new("/sys/kernel/mm/transparent_hugepage");
    let top = std::fs::read_to_string(dir.join("shmem_enabled")).unwrap_or_default();
    let top_on = thp_setting_enables(&top);
    if top_on {
        return true;
    }
    let Ok(sizes) = std::fs::read_dir(dir) else {
        return false;
    };
    sizes.flatten().any(|e| {
        let s = std::fs::read_to_string(e.path().join("shmem_enabled")).unwrap_or_default();
        thp_setting_enables(&s)
    })
}

/// Does a `shmem_enabled` file's selected (bracketed) value give a memfd
/// large folios without a `MADV_HUGEPAGE` VMA?
pub(crate) fn thp_setting_enables(s: &str) -> bool {
    let selected = s.split('[').nth(1).and_then(|r| r.split(']').next()).unwrap_or("");
    matches!(selected, "always" | "within_size" | "force")
}

impl PageStore {
    /// Take a free region of `memfd`.
    ///
    /// # Errors
    /// `ENFILE` when every region is in use.
    pub(crate) fn new(memfd: &Arc<PageMemfd>) -> io::Result<PageStore> {
        let base = {
            let mut r = memfd.regions.lock();
            match r.0.pop() {
                Some(b) => b,
                None if r.1 < MAX_REGIONS => {
                    r.1 += 1;
                    (r.1 - 1) * MAX_FILE_SIZE
                }
                None => return Err(io::Error::from_raw_os_error(libc::ENFILE)),
            }
        };
        Ok(PageStore {
            memfd: memfd.clone(),
            base,
            #[cfg(loom)]
            on_punch: std::sync::OnceLock::new(),
            #[cfg(loom)]
            on_mkclean: std::sync::OnceLock::new(),
            #[cfg(loom)]
            on_scan: std::sync::OnceLock::new(),
            #[cfg(loom)]
            on_zap: std::sync::OnceLock::new(),
            #[cfg(loom)]
            on_poison: std::sync::OnceLock::new(),
            #[cfg(loom)]
            on_unpoison: std::sync::OnceLock::new(),
            #[cfg(loom)]
            on_unmap: std::sync::OnceLock::new(),
        })
    }

    /// The memfd (the fault engine maps it into user mappings).
    pub(crate) fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.memfd.as_fd()
    }

    /// The memfd offset of file offset `pos` (where a user mapping of the
    /// file at `pos` maps the memfd).
    pub(crate) fn memfd_offset(&self, pos: u64) -> u64 {
        assert!(pos <= MAX_FILE_SIZE, "page store offset past the largest file");
        self.base + pos
    }

    /// Engine-view address of file offset `pos`; maps its chunk on first use.
    pub(crate) fn view_ptr(&self, pos: u64) -> io::Result<*mut u8> {
        assert!(pos < MAX_FILE_SIZE, "page store offset past the largest file");
        self.memfd.view_ptr(self.base + pos)
    }

    /// Is this a hugetlbfs page store (2 MiB pages, no `pwrite`, memory
    /// taken only by [`allocate`](Self::allocate))?
    pub(crate) fn is_hugetlb(&self) -> bool {
        self.memfd.hugetlb
    }

    /// Give `[pos, pos + len)` its huge pages before anything touches it
    /// (`fallocate(2)`, mode 0). A touch of an unallocated hugetlbfs page
    /// through a `MAP_NORESERVE` view takes a page from the pool or, with
    /// none free, raises SIGBUS in the touching thread: every folio of a
    /// hugetlb store is allocated here, when it is created, so that an
    /// empty pool is an error of the operation that needed the folio.
    /// Nothing on shmem (its pages come with the first touch or write).
    ///
    /// # Errors
    /// `ENOMEM` (with the pool named) when no huge page is free; the
    /// `fallocate` error otherwise.
    pub(crate) fn allocate(&self, pos: u64, len: u64) -> io::Result<()> {
        if !self.is_hugetlb() || len == 0 {
            return Ok(());
        }
        assert!(
            pos + len <= MAX_FILE_SIZE,
            "page store allocation past the largest file"
        );
        // hugetlbfs checks for a pending signal before each page it
        // allocates and fails with `EINTR` (a profiler's `SIGPROF` did it
        // to 4 % of the calls under a 20 µs timer, seventeenth session's
        // probe): retry, as `pwrite` does; the pages already allocated
        // stay and are skipped.
        let r = loop {
            match fallocate(&self.memfd.memfd, FallocateFlags::KEEP_SIZE, self.base + pos, len) {
                Err(rustix::io::Errno::INTR) => continue,
                r => break r,
            }
        };
        match r {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::NOSPC) | Err(rustix::io::Errno::NOMEM) => Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "no free 2 MiB huge page for the hugetlb page cache (HugePages_Free in /proc/meminfo; \
                 raise /proc/sys/vm/nr_hugepages or lower the cache's memory limit)",
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Write `data` at `pos` with `pwrite(2)`: the kernel fills each memfd
    /// page under its own page lock and marks it uptodate only when full,
    /// so a kernel fault on a user mapping never maps a half-filled page.
    pub(crate) fn pwrite(&self, pos: u64, mut data: &[u8]) -> io::Result<()> {
        // hugetlbfs has no write path; its caches map in `Minor` mode only,
        // where fills go through the view (`do_mmap`).
        debug_assert!(!self.is_hugetlb(), "pwrite to a hugetlb page store");
        assert!(
            pos + data.len() as u64 <= MAX_FILE_SIZE,
            "page store write past the largest file"
        );
        let mut off = self.base + pos;
        while !data.is_empty() {
            match rustix::io::pwrite(&self.memfd.memfd, data, off) {
                Ok(n) => {
                    data = &data[n..];
                    off += n as u64;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Free the memory of `[pos, pos + len)` (`FALLOC_FL_PUNCH_HOLE`), which
    /// also unmaps it from every user mapping of the memfd.
    pub(crate) fn punch(&self, pos: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        assert!(pos + len <= MAX_FILE_SIZE, "page store punch past the largest file");
        fallocate(
            &self.memfd.memfd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            self.base + pos,
            len,
        )?;
        #[cfg(loom)]
        call_pte_hook(&self.on_punch, pos, len);
        Ok(())
    }

    /// Bytes of memory this file's region holds: its data extents
    /// (`SEEK_DATA`/`SEEK_HOLE`, which shmem answers from its page cache).
    pub(crate) fn allocated_bytes(&self) -> u64 {
        self.data_extents().iter().map(|r| r.end - r.start).sum()
    }

    /// Give the page at file offset `pos` memory if it has none, reading
    /// as zeros (`fallocate(2)` mode 0, which never touches a page that
    /// exists: no byte can be lost to a race). Nothing on hugetlb (every
    /// folio holds its page from creation). See
    /// `AddressSpace::fill_hole_in_uptodate_folio`.
    pub(crate) fn fill_hole(&self, pos: u64) -> io::Result<()> {
        if self.is_hugetlb() {
            return Ok(());
        }
        assert!(
            pos + crate::types::PAGE_SIZE as u64 <= MAX_FILE_SIZE,
            "page store fill past the largest file"
        );
        fallocate(
            &self.memfd.memfd,
            FallocateFlags::KEEP_SIZE,
            self.base + pos,
            crate::types::PAGE_SIZE as u64,
        )?;
        Ok(())
    }

    /// Does the page at file offset `pos` hold memory?
    pub(crate) fn page_present(&self, pos: u64) -> bool {
        seek(&self.memfd.memfd, SeekFrom::Data(self.base + pos)).is_ok_and(|d| d == self.base + pos)
    }

    /// The byte ranges of this file's region that hold memory, as file
    /// offsets (`SEEK_DATA`/`SEEK_HOLE`, which shmem answers from its page
    /// cache).
    pub(crate) fn data_extents(&self) -> Vec<std::ops::Range<u64>> {
        let fd = &self.memfd.memfd;
        let end = self.base + MAX_FILE_SIZE;
        let mut pos = self.base;
        let mut out = Vec::new();
        while pos < end {
            let Ok(data) = seek(fd, SeekFrom::Data(pos)) else {
                break; // ENXIO: no data after pos
            };
            if data >= end {
                break;
            }
            let hole = seek(fd, SeekFrom::Hole(data)).map_or(end, |h| h.min(end));
            out.push(data - self.base..hole - self.base);
            pos = hole;
        }
        out
    }
}

impl Drop for PageStore {
    fn drop(&mut self) {
        // Every folio (each holds an Arc of this store) and every user
        // mapping (each holds the address space) is gone: free whatever
        // the region still holds (pages past EOF of a folio kept by a
        // failed truncate) and give it back.
        let _ = fallocate(
            &self.memfd.memfd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            self.base,
            MAX_FILE_SIZE,
        );
        self.memfd.regions.lock().0.push(self.base);
    }
}

#[cfg(test)]
mod tests {
    use super::thp_setting_enables;

    #[test]
    fn shmem_thp_settings_that_give_a_memfd_large_folios() {
        assert!(!thp_setting_enables("always within_size advise [never] deny force\n"));
        assert!(!thp_setting_enables("always within_size [advise] never deny force\n"));
        assert!(!thp_setting_enables("always within_size advise never [deny] force\n"));
        assert!(thp_setting_enables("[always] within_size advise never deny force\n"));
        assert!(thp_setting_enables("always [within_size] advise never deny force\n"));
        assert!(thp_setting_enables("always within_size advise never deny [force]\n"));
        // Per-size files: `inherit` follows the top-level value, read there.
        assert!(!thp_setting_enables("always [inherit] within_size advise never\n"));
        assert!(!thp_setting_enables(""));
    }
}
