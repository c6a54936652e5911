//! `vm_operations_struct` and the generic filemap versions
//! (`filemap_fault`, `filemap_map_pages`, `filemap_page_mkwrite`).
//!
//! | method | held on entry | may block | returns |
//! |---|---|---|---|
//! | `fault` | nothing of the folio | yes | the folio locked and uptodate, or `Retry`, or `SigBus`; takes `invalidate_lock` shared to create or read a folio |
//! | `map_pages` | nothing; pins the epoch itself (the RCU read side) | **no**: trylock only | pages mapped; never maps past EOF, locked, not-uptodate or READAHEAD folios |
//! | `page_mkwrite` | nothing | yes | the folio locked, uptodate and dirty (read first if a stale fault found a folio not read yet; takes `invalidate_lock` shared for that read), or `Retry` if it was truncated meanwhile or that read failed; waits for writeback when the store needs stable pages |
//! | `access` | nothing | yes | bytes copied |

use std::cell::Cell;
use std::ops::Range;

use crate::folio::FolioGuard;
use crate::mmap::VmArea;
use crate::sync::epoch;
use crate::types::{PgOff, PAGE_SHIFT, PAGE_SIZE};
use crate::uffd::UffdError;

/// One fault being handled (`struct vm_fault`).
pub struct VmFault<'a> {
    /// The mapping faulted on.
    pub vma: &'a VmArea,
    /// Page-aligned faulting address.
    pub address: usize,
    /// File page index of `address`.
    pub pgoff: PgOff,
    /// `uffd::fault_flag::*`.
    pub flags: u64,
    /// A readahead window the fault started, for the engine to read after
    /// the faulting thread was woken (async readahead).
    pub async_ra: Cell<Option<Range<u64>>>,
}

impl std::fmt::Debug for VmFault<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmFault")
            .field("vma", self.vma)
            .field("address", &format_args!("{:#x}", self.address))
            .field("pgoff", &self.pgoff.0)
            .field("flags", &self.flags)
            .finish()
    }
}

/// Outcome of `fault` / `page_mkwrite` (`vm_fault_t`).
#[derive(Debug)]
pub enum VmFaultResult {
    /// The folio, locked and uptodate (and, from page_mkwrite, dirty).
    Locked(FolioGuard),
    /// Try again (`VM_FAULT_NOPAGE` / `VM_FAULT_RETRY`): the folio went away.
    Retry,
    /// The access cannot be served: raise SIGBUS (`VM_FAULT_SIGBUS`).
    SigBus,
}

/// Outcome of `map_pages`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapPages {
    /// Pages mapped.
    pub mapped: usize,
    /// Was the faulting page among them?
    pub fault_mapped: bool,
    /// Some page was already mapped by someone else: the faulting thread
    /// may not have been woken by our ioctl.
    pub needs_wake: bool,
}

/// What the fault engine calls for a mapping. Every method has the generic
/// filemap behaviour as its default.
pub trait VmOps: Send + Sync + 'static {
    /// Bring the faulting page's folio uptodate and return it locked.
    ///
    /// # Locking
    /// Nothing held on entry; may sleep on locks and I/O.
    fn fault(&self, vmf: &VmFault<'_>) -> VmFaultResult {
        filemap_fault(vmf)
    }

    /// Map the ready folios of file pages `range` without sleeping.
    ///
    /// # Locking
    /// Nothing held; pins the epoch; trylock only.
    fn map_pages(&self, vmf: &VmFault<'_>, range: Range<PgOff>) -> MapPages {
        filemap_map_pages(vmf, range)
    }

    /// The first write to a clean page of a shared-writable mapping.
    ///
    /// # Locking
    /// Nothing held on entry; returns the folio locked and dirty.
    fn page_mkwrite(&self, vmf: &VmFault<'_>) -> VmFaultResult {
        filemap_page_mkwrite(vmf)
    }
}

/// The generic vm operations of a cached file.
#[derive(Debug, Default, Clone, Copy)]
pub struct FilemapVmOps;

impl VmOps for FilemapVmOps {}

/// `filemap_fault`: look up or read the folio of the faulting page and
/// return it locked and uptodate.
///
/// Beyond EOF → SigBus. Absent → synchronous readahead of a window (under
/// `invalidate_lock` shared), look again. Not uptodate → `read_folio` under
/// `invalidate_lock` shared; a read error → SigBus. Locked, then re-checked:
/// truncated meanwhile → look again; beyond the (new) EOF → SigBus.
pub fn filemap_fault(vmf: &VmFault<'_>) -> VmFaultResult {
    vmf.vma.mapping().filemap_fault_folio(vmf.pgoff, &vmf.async_ra)
}

impl crate::address_space::AddressSpace {
    /// The body of [`filemap_fault`] for file page `index`: everything but
    /// the user mapping, so that the loom models run this very code. A
    /// sequential miss leaves the window to read next in `async_ra`.
    pub(crate) fn filemap_fault_folio(&self, index: PgOff, async_ra: &Cell<Option<Range<u64>>>) -> VmFaultResult {
        let m = self;
        for _ in 0..64 {
            if index.byte() >= m.size() {
                return VmFaultResult::SigBus;
            }
            let Some(f) = m.filemap_get_folio(index) else {
                m.stats.miss();
                match m.page_cache_sync_readahead(index, 1) {
                    Ok(next) => {
                        if next.is_some() {
                            // Read by the engine once the faulting thread runs.
                            async_ra.set(next);
                        }
                    }
                    Err(_) => return VmFaultResult::SigBus,
                }
                continue;
            };
            if !f.is_uptodate() {
                drop(f);
                if m.filemap_update_folio(index).is_err() {
                    return VmFaultResult::SigBus;
                }
                continue;
            }
            let g = f.lock();
            // Re-check under the lock: truncate removes folios locked.
            if g.mapping_id() != m.id() || !g.is_uptodate() {
                continue;
            }
            if index.byte() >= m.size() {
                return VmFaultResult::SigBus;
            }
            g.mark_accessed();
            return VmFaultResult::Locked(g);
        }
        // Pathological churn (truncated under us 64 times): let the thread
        // retry the access rather than spin here.
        VmFaultResult::Retry
    }

    /// The body of [`filemap_page_mkwrite`] for file page `index`.
    pub(crate) fn filemap_page_mkwrite_folio(&self, index: PgOff) -> VmFaultResult {
        let m = self;
        for _ in 0..64 {
            let Some(g) = m.filemap_lock_folio(index) else {
                return VmFaultResult::Retry;
            };
            if index.byte() >= m.size() {
                return VmFaultResult::Retry;
            }
            if !g.is_uptodate() {
                // A stale write fault: the page it was raised on went away
                // (evicted, or punched by a failed fill) before this ran,
                // and a folio not read yet holds the index now. Dirtying it
                // would make bytes nobody read file data (and its
                // write-back could never start). Read it first, as
                // `filemap_fault` does (`invalidate_lock` ranks above the
                // folio lock); if the read fails, the thread's next access
                // faults on the missing page and gets SIGBUS there.
                drop(g);
                if m.filemap_update_folio(index).is_err() {
                    return VmFaultResult::Retry;
                }
                continue;
            }
            // Stable pages, always: the store may be reading the folio's
            // bytes (`Writeback::data`); the write waits until it is done.
            g.wait_writeback();
            m.folio_mark_dirty(&g);
            return VmFaultResult::Locked(g);
        }
        // Truncated and re-created under us 64 times: let the thread retry.
        VmFaultResult::Retry
    }
}

/// `filemap_page_mkwrite`: lock the folio, re-check it is still in the
/// file and below EOF, wait for writeback if the store wants stable pages,
/// mark it dirty.
pub fn filemap_page_mkwrite(vmf: &VmFault<'_>) -> VmFaultResult {
    vmf.vma.mapping().filemap_page_mkwrite_folio(vmf.pgoff)
}

/// `filemap_map_pages`: the fast path. Under one epoch guard, walk the
/// folios of `range` (clamped to the mapping and EOF), skip anything not
/// ready (absent, locked, not uptodate, READAHEAD, being freed, truncated),
/// trylock the rest and map each run of consecutive folios with one
/// `UFFDIO_CONTINUE`, write-protected unless the folio is already dirty in
/// a shared-writable mapping. Never sleeps, never does I/O.
pub fn filemap_map_pages(vmf: &VmFault<'_>, range: Range<PgOff>) -> MapPages {
    let vma = vmf.vma;
    let vend = vma.pgoff().0 + (vma.len() >> PAGE_SHIFT) as u64;
    let start = range.start.0.max(vma.pgoff().0);
    let end = range.end.0.min(vend);
    let mut res = MapPages::default();
    vma.mapping()
        .map_pages_range(start..end, vma.tracks_writes(), &mut |pages, wp, _folios| {
            if let Some(r) = vma.user_range(PgOff(pages.start), PgOff(pages.end)) {
                let out = continue_range(vma, r.clone(), wp);
                res.mapped += r.len() >> PAGE_SHIFT;
                res.needs_wake |= out != Continued::Clean;
                if r.contains(&vmf.address) && out != Continued::Failed {
                    res.fault_mapped = true;
                }
            }
        });
    res
}

/// Maps one run of consecutive file pages, write-protected or not, whose
/// folios the caller holds locked (the slice): the user-mapping half of
/// `map_pages` (`UFFDIO_CONTINUE` in the fault engine, a recording page
/// table in the loom models).
pub(crate) type MapRun<'a> = dyn FnMut(Range<u64>, bool, &[FolioGuard]) + 'a;

impl crate::address_space::AddressSpace {
    /// The body of [`filemap_map_pages`] over file pages `range`, clamped
    /// to EOF: under one epoch guard, skip what is not ready, trylock the
    /// rest, hand each run of consecutive locked folios to `map` (with
    /// `wp` set unless the folio is dirty or `tracks_writes` is false),
    /// unlock after `map` returned. Never sleeps, never spins on a folio.
    pub(crate) fn map_pages_range(&self, range: Range<u64>, tracks_writes: bool, map: &mut MapRun<'_>) {
        let m = self;
        let eof = m.size().div_ceil(PAGE_SIZE as u64);
        let end = range.end.min(eof);
        let mut i = range.start;
        let mut run = Run::default();
        let guard = epoch::pin();
        while i < end {
            let mut next = i + 1;
            // Never spin on a frozen folio: skip it (the slow path handles
            // that page).
            let found = match m.try_get_folio_pinned(PgOff(i), &guard) {
                crate::address_space::Lookup::Found(f) => Some(f),
                _ => None,
            };
            let ready = found.and_then(|f| {
                next = f.index().0 + f.nr_pages();
                if !f.is_uptodate() || f.is_readahead() || f.is_locked() {
                    return None;
                }
                let g = f.trylock().ok()?;
                (g.mapping_id() == m.id() && g.is_uptodate()).then_some(g)
            });
            // The size again, now that the folio is locked: a truncate
            // that published a smaller size before we locked it zapped the
            // pages past its end already and must not find them mapped
            // again (it zaps once more under the lock of a folio it keeps,
            // for a mapper that locked it first).
            let eof_now = ready.as_ref().map_or(end, |_| m.size().div_ceil(PAGE_SIZE as u64));
            let ready = ready.filter(|_| i < eof_now);
            match ready {
                Some(g) => {
                    let wp = tracks_writes && !g.is_dirty();
                    let b = next.min(end).min(eof_now);
                    if !run.folios.is_empty() && (wp != run.wp || i != run.end) {
                        run.flush(map);
                    }
                    if run.folios.is_empty() {
                        run.start = i;
                        run.wp = wp;
                    }
                    run.end = b;
                    g.mark_accessed();
                    run.folios.push(g);
                }
                None => run.flush(map),
            }
            i = next;
        }
        run.flush(map);
        drop(guard);
    }
}

#[derive(Default)]
struct Run {
    start: u64,
    end: u64,
    wp: bool,
    folios: Vec<FolioGuard>,
}

impl Run {
    fn flush(&mut self, map: &mut MapRun<'_>) {
        if self.folios.is_empty() {
            return;
        }
        map(self.start..self.end, self.wp, &self.folios);
        // Unlock only after the pages are mapped: truncate, which takes the
        // folio lock before removing it, then zaps them with its punch.
        self.folios.clear();
    }
}

/// Outcome of [`continue_range`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Continued {
    /// Every page mapped by one ioctl, which woke the faulting threads.
    Clean,
    /// Every page is mapped, some by someone else: wake explicitly.
    Raced,
    /// The mapping is going away or the kernel refused: nothing to wake
    /// beyond an explicit wake.
    Failed,
}

/// `UFFDIO_CONTINUE` over a user range, skipping pages already mapped.
pub(crate) fn continue_range(vma: &VmArea, r: Range<usize>, wp: bool) -> Continued {
    let uffd = &vma.engine.uffd;
    // What the kernel maps as one (a 2 MiB page on a hugetlb store).
    let step = (vma.mapping().map_granule_pages() as usize) << PAGE_SHIFT;
    let mut start = r.start;
    let mut out = Continued::Clean;
    let mut tries = 0;
    let mut filled = None;
    // One granule per CONTINUE once the kernel said the range is not
    // inside one VMA (the user split the mapping).
    let mut single = false;
    while start < r.end {
        let len = if single { step.min(r.end - start) } else { r.end - start };
        match uffd.continue_range(start, len, wp) {
            Ok(()) if single => start += len,
            Ok(()) => break,
            Err(UffdError::Fault { done }) => {
                // No page in the memfd, or the mapping is going away. The
                // caller holds the covering folios locked and uptodate, so
                // nothing punched a missing page: its fill never wrote it.
                // Give it memory (zeros) and map it, or the thread would
                // fault on it forever (`tests/faults.rs`).
                let at = start + done;
                let index = vma.pgoff().add(((at - vma.start()) >> PAGE_SHIFT) as u64);
                if filled == Some(at) || !vma.mapping().fill_hole_in_uptodate_folio(index) {
                    return Continued::Failed;
                }
                filled = Some(at);
                start = at;
            }
            Err(UffdError::NoPage { done }) if !single => {
                // ENOENT: the range is not inside one VMA (`madvise`,
                // `mprotect` or a partial `mlock` split the mapping; a
                // missing page is EFAULT). Go on one granule at a time,
                // each inside one VMA.
                single = true;
                start += done;
            }
            Err(UffdError::Exists { done }) | Err(UffdError::NoPage { done }) => {
                // Already mapped by another handler (or, for a single
                // granule's NoPage, no VMA there any more): skip it.
                out = Continued::Raced;
                start += done + step;
            }
            Err(UffdError::Again { done }) => {
                start += done;
                tries += 1;
                if tries > 1000 {
                    return Continued::Failed;
                }
                crate::sync::yield_now();
            }
            Err(UffdError::Gone(_)) => return Continued::Failed,
            Err(UffdError::Os(e)) => {
                eprintln!("upcache: UFFDIO_CONTINUE failed: {e}");
                return Continued::Failed;
            }
        }
    }
    out
}
