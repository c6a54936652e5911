//! The fault engine: a pool of handler threads reading userfaultfd
//! messages and resolving them with the mapping's [`VmOps`](crate::VmOps)
//! (`handle_mm_fault`, `do_read_fault`, `do_shared_fault`, `do_wp_page` in
//! the kernel's `mm/memory.c`).
//!
//! Each handler reads one `uffd_msg` at a time, handles it, then spins
//! for `fault_spin` re-reading the fd before sleeping in `poll(2)`: a
//! cross-CPU wake-up costs ~47 µs here, a polling handler answers in
//! 12–17 µs (DESIGN.md). Every fault ends resolved (mapped, or woken to
//! retry) or poisoned (SIGBUS); none is dropped.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::mmap::{UffdMode, VmArea};
use crate::sync::{Arc, AtomicBool, Mutex, Ordering, RwLock};
use crate::types::{PgOff, PAGE_SIZE};
use crate::uffd::{fault_flag, feature, page_down, OpenError, PageFault, Pagemap, RawMsg, Uffd, UffdError};
use crate::vm_ops::{continue_range, Continued, VmFault, VmFaultResult};
use crate::worker_pool::{Sample, WorkerPool, SPARE_IDLE, TICK};

/// Fault engine tunables (set through the `PageCacheBuilder`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct FaultConfig {
    pub(crate) threads: usize,
    pub(crate) spin: Duration,
    pub(crate) fault_around_pages: u64,
    pub(crate) mode: UffdMode,
    pub(crate) map_ahead: bool,
    /// Open the userfaultfd with `UFFD_FEATURE_WP_ASYNC`
    /// (`DirtyTracking::Async`).
    pub(crate) wp_async: bool,
}

/// State shared by the handler threads and the mappings.
pub(crate) struct EngineShared {
    pub(crate) uffd: Uffd,
    /// `/proc/self/pagemap`, for harvesting async-tracked writes (present
    /// iff `cfg.wp_async`).
    pub(crate) pagemap: Option<Pagemap>,
    vmas: RwLock<BTreeMap<usize, Arc<VmArea>>>,
    stop: AtomicBool,
    wake_fd: OwnedFd,
    pub(crate) cfg: FaultConfig,
    /// Busy handlers, progress, spares (`src/worker_pool.rs`).
    pool: WorkerPool,
    /// Every handler thread started (base and spares), joined on drop.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Unthrottled write faults each thread has left ([`ParkedFault`]).
    credit: ThrottleCredit,
}

impl EngineShared {
    pub(crate) fn insert(&self, vma: Arc<VmArea>) {
        self.vmas.write().insert(vma.start(), vma);
    }

    pub(crate) fn remove(&self, vma: &Arc<VmArea>) {
        let mut v = self.vmas.write();
        if v.get(&vma.start()).is_some_and(|x| Arc::ptr_eq(x, vma)) {
            v.remove(&vma.start());
        }
    }

    fn find(&self, addr: usize) -> Option<Arc<VmArea>> {
        let v = self.vmas.read();
        let (_, vma) = v.range(..=addr).next_back()?;
        (addr < vma.end()).then(|| vma.clone())
    }
}

/// The engine: owns the handler threads and their monitor; dropping the
/// last owner (the cache, or a mapping that outlives it) stops and joins
/// them.
pub(crate) struct FaultEngine {
    shared: Arc<EngineShared>,
    monitor: Mutex<Option<JoinHandle<()>>>,
}

impl FaultEngine {
    /// Open the userfaultfd and start the handlers.
    pub(crate) fn start(cfg: FaultConfig) -> Result<Arc<FaultEngine>, OpenError> {
        let uffd = if cfg.wp_async {
            let uffd = Uffd::open(feature::WP_ASYNC)?;
            if uffd.features() & feature::WP_ASYNC == 0 {
                return Err(OpenError::MissingFeatures {
                    missing: feature::WP_ASYNC,
                    names: "WP_ASYNC (needed by DirtyTracking::Async)".into(),
                });
            }
            uffd
        } else {
            Uffd::open(0)?
        };
        let pagemap = if cfg.wp_async {
            Some(Pagemap::open().map_err(OpenError::Handshake)?)
        } else {
            None
        };
        let wake_fd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| OpenError::Handshake(e.into()))?;
        let shared = Arc::new(EngineShared {
            uffd,
            pagemap,
            vmas: RwLock::new(BTreeMap::new()),
            stop: AtomicBool::new(false),
            wake_fd,
            cfg,
            pool: WorkerPool::new(cfg.threads.max(1)),
            threads: Mutex::new(Vec::new()),
            credit: ThrottleCredit::default(),
        });
        let engine = Arc::new(FaultEngine {
            shared: shared.clone(),
            monitor: Mutex::new(None),
        });
        for i in 0..cfg.threads.max(1) {
            // Dropping `engine` stops the threads already started.
            start_handler(&shared, format!("upcache-fault-{i}"), false).map_err(OpenError::Threads)?;
        }
        let sh = shared.clone();
        let monitor = std::thread::Builder::new()
            .name("upcache-rescuer".into())
            .spawn(move || monitor_main(&sh))
            .map_err(OpenError::Threads)?;
        *engine.monitor.lock() = Some(monitor);
        Ok(engine)
    }

    pub(crate) fn shared(&self) -> &Arc<EngineShared> {
        &self.shared
    }
}

impl Drop for FaultEngine {
    fn drop(&mut self) {
        // Release: pairs with the handlers' Acquire load. The monitor's
        // sleep reads it under the wait queue's lock, which
        // `wake_monitor` takes after this store (`src/worker_pool.rs`).
        self.shared.stop.store(true, Ordering::Release);
        let _ = rustix::io::write(&self.shared.wake_fd, &1u64.to_ne_bytes());
        self.shared.pool.wake_monitor();
        if let Some(m) = self.monitor.lock().take() {
            m.thread().unpark();
            let _ = m.join();
        }
        // The monitor is gone: no spare starts any more.
        let threads = std::mem::take(&mut *self.shared.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Start a handler thread (`spare`: one the monitor added, which exits
/// when idle).
fn start_handler(sh: &Arc<EngineShared>, name: String, spare: bool) -> std::io::Result<()> {
    let sh2 = sh.clone();
    let t = std::thread::Builder::new()
        .name(name)
        .spawn(move || handler_main(&sh2, spare))?;
    let mut threads = sh.threads.lock();
    // Spares that exited: nothing left to join.
    threads.retain(|t| !t.is_finished());
    threads.push(t);
    Ok(())
}

/// The rescuer (`src/worker_pool.rs`): while some handler is busy, check
/// every `TICK` that faults are being served, and start a spare handler
/// when every handler has been stuck for a whole tick; while throttled
/// faults are paused, end each pause on time.
fn monitor_main(sh: &Arc<EngineShared>) {
    let pool = &sh.pool;
    let mut prev: Option<Sample> = None;
    // Say why a stuck pool gets no spare, but not every tick.
    let mut warned: Option<Instant> = None;
    loop {
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        if !pool.any_work() {
            prev = None;
            pool.monitor_sleep(&sh.stop);
            continue;
        }
        // A timer, not synchronization: woken early only by the engine's
        // drop (which then finds `stop` set).
        std::thread::park_timeout(TICK);
        for p in pool.due_pauses(Instant::now()) {
            sh.release(p.tid, p.address);
        }
        let now = pool.sample();
        if let Some(p) = prev {
            if pool.need_spare(p, now) {
                let n = pool.spares_started();
                if let Err(e) = start_handler(sh, format!("upcache-fault-s{n}"), true) {
                    pool.spare_failed();
                    if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        warned = Some(Instant::now());
                        eprintln!("upcache: every fault handler is blocked and a spare could not start: {e}");
                    }
                }
                prev = None;
                continue;
            }
        }
        prev = Some(now);
    }
}

fn handler_main(sh: &EngineShared, spare: bool) {
    // One message per read: serving a fault may block (a folio lock a page
    // guard holds, a store read), and messages read with it would wait in
    // this thread's batch while other handlers sit idle. The fault they
    // stand for may be the one whose progress unblocks this handler (the
    // guard holder's own fault): a deadlock with a free handler
    // (tests/liveness.rs,
    // `a_handler_blocked_on_one_fault_does_not_strand_the_others`). A
    // read costs well under a microsecond; a fault round trip 7-47 us.
    let mut msgs = [RawMsg::default(); 1];
    let mut worker = Worker {
        pool: &sh.pool,
        counted: true,
    };
    loop {
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        let mut n = match sh.uffd.read_msgs(&mut msgs) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("upcache: reading userfaultfd failed, fault handler exits: {e}");
                return;
            }
        };
        // Spares do not spin: they are there for a stuck pool, not for
        // latency, and must not take the CPU from the handlers that spin.
        if n == 0 && !spare && !sh.cfg.spin.is_zero() {
            // Saturating: a huge spin setting means "always spin", never
            // an overflow panic in the handler.
            let now = Instant::now();
            let deadline = now.checked_add(sh.cfg.spin).unwrap_or(now + Duration::from_secs(3600));
            while n == 0 && Instant::now() < deadline && !sh.stop.load(Ordering::Relaxed) {
                crate::sync::spin_loop();
                n = sh.uffd.read_msgs(&mut msgs).unwrap_or(0);
            }
        }
        if n == 0 {
            use rustix::event::{poll, PollFd, PollFlags};
            // SAFETY: the fd is owned by `sh.uffd`, alive for this borrow.
            let ufd = unsafe { std::os::fd::BorrowedFd::borrow_raw(sh.uffd.raw_fd()) };
            let mut fds = [
                PollFd::new(&ufd, PollFlags::IN),
                PollFd::new(&sh.wake_fd, PollFlags::IN),
            ];
            if spare {
                let idle = rustix::event::Timespec {
                    tv_sec: SPARE_IDLE.as_secs() as i64,
                    tv_nsec: 0,
                };
                if matches!(poll(&mut fds, Some(&idle)), Ok(0)) && sh.pool.try_retire() {
                    worker.counted = false;
                    return;
                }
            } else {
                let _ = poll(&mut fds, None);
            }
            continue;
        }
        sh.pool.begin_work();
        let _done = EndWork(&sh.pool);
        for m in &msgs[..n] {
            if let Some(pf) = m.page_fault() {
                // A panic while serving a fault (in the store, an engine
                // callback or upcache itself) ends that fault in SIGBUS and
                // the handler goes on: a dead handler would leave the
                // faulting thread, and every later fault, hanging.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle_fault(sh, pf)));
                if r.is_err() {
                    eprintln!(
                        "upcache: panic while serving a fault at {:#x}; the faulting thread gets SIGBUS",
                        pf.address
                    );
                    // The granule of the mapping, if it is still there
                    // (gone: unregister woke the thread already).
                    // Recorded like every poison, so that a clear (the
                    // folio read, or created) serves the page again.
                    match sh.find(page_down(pf.address)) {
                        Some(v) => {
                            v.poisoned.store(true, Ordering::Relaxed);
                            let pgoff = v.addr_to_pgoff(page_down(pf.address));
                            v.with_poison_mark(pgoff, pgoff.add(1), || {
                                poison_page(sh, page_down(pf.address), granule_bytes(&v))
                            });
                        }
                        None => poison_page(sh, page_down(pf.address), PAGE_SIZE),
                    }
                }
            }
        }
    }
}

/// A handler thread's place in `nr_workers`, given up however the thread
/// ends (`try_retire` gave it up already).
struct Worker<'a> {
    pool: &'a WorkerPool,
    counted: bool,
}

impl Drop for Worker<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.pool.worker_exited();
        }
    }
}

/// Ends a handler's busy period, however its fault ended.
struct EndWork<'a>(&'a WorkerPool);

impl Drop for EndWork<'_> {
    fn drop(&mut self) {
        self.0.end_work();
    }
}

fn wake_page(sh: &EngineShared, page: usize) {
    let _ = sh.uffd.wake(page, PAGE_SIZE);
}

fn handle_fault(sh: &EngineShared, pf: PageFault) {
    let page = page_down(pf.address);
    let Some(vma) = sh.find(page) else {
        // Unmapped meanwhile: unregister already woke the thread.
        wake_page(sh, page);
        return;
    };
    if !vma.enter() {
        wake_page(sh, page);
        return;
    }
    let _exit = FaultExit(&vma);
    // On a hugetlb store a 2 MiB page is served whole: look up, read and
    // check end of file at its first page (which the folio starts at).
    let g = vma.mapping().map_granule_pages();
    let vmf = VmFault {
        vma: &vma,
        address: page,
        pgoff: PgOff(vma.addr_to_pgoff(page).0 / g * g),
        flags: pf.flags,
        async_ra: Default::default(),
    };
    if pf.flags & fault_flag::WP != 0 {
        do_wp_page(sh, &vmf, pf.tid);
    } else {
        do_fault(sh, &vmf);
        if let Some(window) = vmf.async_ra.take() {
            // The faulting thread runs again; read its next window now, and
            // (map-ahead) map it into this mapping before the thread gets
            // there, so a sequential stream does not fault per folio.
            // A panic in it (the engine's `readahead`) is the next
            // window's, not the served page's: caught here, so that the
            // handler's catch does not poison a page that was served
            // (`faults::a_panicking_async_readahead_leaves_the_served_page_mapped`).
            // The window's folios were unlocked by the unwind, not
            // uptodate: touching them reads them again.
            let ahead = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if vma.mapping().page_cache_async_readahead(window.clone()).is_ok()
                    && vma.mode() == UffdMode::Minor
                    && sh.cfg.map_ahead
                {
                    let r = vma.ops.map_pages(&vmf, PgOff(window.start)..PgOff(window.end));
                    if r.needs_wake {
                        wake_page(sh, vmf.address);
                    }
                }
            }));
            if ahead.is_err() {
                eprintln!(
                    "upcache: panic in the readahead after a fault at {:#x}; the window is read again when touched",
                    vmf.address
                );
            }
        }
    }
}

/// A read or first-touch fault (MISSING or MINOR).
fn do_fault(sh: &EngineShared, vmf: &VmFault<'_>) {
    let vma = vmf.vma;
    let m = vma.mapping();
    let around = sh.cfg.fault_around_pages.max(1);
    // A missing fault on a page whose folio is already uptodate: either a
    // fill finished meanwhile, or that fill never wrote the page (see
    // below). A lookup here spares the usual fault, which finds no such
    // folio, the page-store check's system call.
    let was_uptodate =
        vma.mode() == UffdMode::Missing && m.filemap_get_folio(vmf.pgoff).is_some_and(|f| f.is_uptodate());
    for _ in 0..64 {
        let size_before = m.size();
        let clears_before = m.poison_clears.load(Ordering::Relaxed);
        if vma.mode() == UffdMode::Minor {
            // Fast path: map what is ready around the fault.
            let start = PgOff(vmf.pgoff.0 & !(around - 1));
            let r = vma.ops.map_pages(vmf, start..start.add(around));
            if r.fault_mapped {
                m.stats.fault_fast();
                if r.needs_wake {
                    wake_page(sh, vmf.address);
                }
                return;
            }
        }
        match vma.ops.fault(vmf) {
            VmFaultResult::Locked(g) => {
                m.stats.fault_slow();
                let folio_end = g.index().add(g.nr_pages());
                match vma.mode() {
                    UffdMode::Minor => {
                        let eof = PgOff(m.size().div_ceil(PAGE_SIZE as u64));
                        let end = if folio_end < eof { folio_end } else { eof };
                        let wp = vma.tracks_writes() && !g.is_dirty();
                        let range = vma.user_range(g.index(), end);
                        let covers = range.as_ref().is_some_and(|r| r.contains(&vmf.address));
                        let out = match range {
                            Some(r) => continue_range(vma, r, wp),
                            None => Continued::Failed,
                        };
                        drop(g);
                        // Not covered: a truncate published a size below
                        // the faulting page after the fault checked it;
                        // the CONTINUE (which wakes only its range) left
                        // the thread asleep. It faults again (SIGBUS).
                        if out != Continued::Clean || !covers {
                            wake_page(sh, vmf.address);
                        }
                        if sh.cfg.map_ahead {
                            // Map the rest of the readahead window that this
                            // fault just brought in: a sequential reader
                            // then faults once per window, not per folio.
                            let ahead = m.ra.window_pages.max(around);
                            let r = vma.ops.map_pages(vmf, end..vmf.pgoff.add(ahead));
                            if r.needs_wake {
                                wake_page(sh, vmf.address);
                            }
                        }
                    }
                    UffdMode::Missing => {
                        // A missing fault means the memfd had no page here.
                        // If the folio was uptodate all along, its fill may
                        // never have written this page, and the thread's
                        // retry would fault again, forever: give it zeros.
                        // (A fill this fault ran that left the hole is
                        // caught at the thread's next fault.)
                        if was_uptodate {
                            m.fill_hole_in_uptodate_folio(vmf.pgoff);
                        }
                        // The page is in the memfd now; the kernel maps it
                        // when the thread retries. In a shared-writable
                        // mapping, first write-protect the (empty) PTEs of a
                        // clean folio, which installs uffd-wp markers: else
                        // the kernel would map it writable and the first
                        // write would never reach page_mkwrite.
                        if vma.tracks_writes() && !g.is_dirty() {
                            if let Some(r) = vma.user_range(g.index(), folio_end) {
                                let _ = sh.uffd.writeprotect(r.start, r.len(), true);
                            }
                        }
                        drop(g);
                        wake_page(sh, vmf.address);
                    }
                }
                return;
            }
            VmFaultResult::Retry => continue,
            VmFaultResult::SigBus => {
                sigbus_read(sh, vmf, size_before, clears_before);
                return;
            }
        }
    }
    // Could not make progress (truncate storms): let the thread retry.
    wake_page(sh, vmf.address);
}

/// A write to a write-protected page of a shared-writable mapping:
/// page_mkwrite, then unprotect the folio's pages in this mapping.
fn do_wp_page(sh: &EngineShared, vmf: &VmFault<'_>, tid: u32) {
    let vma = vmf.vma;
    let m = vma.mapping();
    // sb_start_pagefault: while the cache is frozen, park the fault (its
    // thread stays blocked in the kernel) rather than this handler thread.
    let _sb = match &m.wb {
        Some(wb) => match wb.gate.try_start_write() {
            Some(g) => Some(g),
            None => {
                // Thawed meanwhile: handed back, and released at once (its
                // thread faults again).
                drop(wb.gate.park_fault(ParkedFault::frozen(&vma.engine, tid, vmf.address)));
                return;
            }
        },
        None => None,
    };
    if let Some(wb) = &m.wb {
        // Past the dirty limit a write fault waits for one flusher pass
        // (at most `THROTTLE_MAX_PAUSE`), then is woken to fault again,
        // and its thread earns a few unthrottled faults (`ParkedFault`):
        // the pass may clean (and re-protect) another page the same store
        // instruction needs, and without the credit the two faults would
        // take turns being throttled forever (tests/liveness.rs,
        // `throttled_mapped_write_across_two_folios_completes`).
        // Not once the cache is shut down: no flusher would release it.
        if wb.over_dirty_limit() && !wb.is_stopped() && !sh.credit.take(tid) {
            // Counted before it is parked: once parked it may be released
            // at once (a pass with nothing to write), and its thread must
            // not be able to finish before its throttle is counted.
            vma.mapping().stats.throttled();
            wb.throttle_fault(ParkedFault::throttled(&vma.engine, tid, vmf.address));
            return;
        }
        wb.kick();
    }
    match vma.ops.page_mkwrite(vmf) {
        VmFaultResult::Locked(g) => {
            m.stats.fault_wp();
            let eof = PgOff(m.size().div_ceil(PAGE_SIZE as u64));
            let folio_end = g.index().add(g.nr_pages());
            let end = if folio_end < eof { folio_end } else { eof };
            let Some(r) = vma.user_range(g.index(), end) else {
                // A truncate published a size at or below the folio's
                // start after page_mkwrite checked it: nothing of the folio
                // is left to unprotect. The thread faults again (SIGBUS).
                drop(g);
                wake_page(sh, vmf.address);
                return;
            };
            let mut tries = 0;
            loop {
                match sh.uffd.writeprotect(r.start, r.len(), false) {
                    Err(UffdError::Again { .. }) if tries < 1000 => {
                        tries += 1;
                        crate::sync::yield_now();
                    }
                    Ok(()) => break,
                    Err(_) => {
                        wake_page(sh, vmf.address);
                        break;
                    }
                }
            }
            drop(g);
            if !r.contains(&vmf.address) {
                // A truncate published a size below the faulting page
                // after page_mkwrite checked it: the unprotect (which
                // wakes only its own range) did not cover it. Wake the
                // thread to fault again and get SIGBUS (tests/sigbus.rs,
                // `a_write_fault_cut_off_by_a_racing_truncate_raises_sigbus`).
                wake_page(sh, vmf.address);
            }
        }
        VmFaultResult::Retry => wake_page(sh, vmf.address),
        VmFaultResult::SigBus => sigbus(sh, vmf),
    }
}

/// Unthrottled write faults granted to a thread each time one of its
/// throttled (or frozen) write faults is released: enough for every page
/// one instruction (or one `memcpy`, which stores its head and tail last)
/// needs writable at once, so throttling delays a writer and never
/// starves it. Per thread, as the kernel's `nr_dirtied_pause` is per
/// task: a credit shared by a mapping's threads could be spent by the
/// others before the released thread faults again.
pub(crate) const THROTTLE_CREDIT: u32 = 8;

/// Each thread's unthrottled write faults left (by `uffd_msg`'s `ptid`).
#[derive(Default)]
struct ThrottleCredit(Mutex<HashMap<u32, (u32, Instant)>>);

impl ThrottleCredit {
    /// Threads with credit left that are remembered at most. A released
    /// thread that never faults again (or faults again once the cache is
    /// under its limit) leaves its entry behind; past this many, entries
    /// older than `STALE` go (a released thread faults again at once, so
    /// an old entry is one nobody needs), and should all be recent, the
    /// table starts afresh (each thread then waits once more).
    const MAX_THREADS: usize = 4096;
    const STALE: Duration = Duration::from_secs(1);

    fn grant(&self, tid: u32) {
        let now = Instant::now();
        let mut c = self.0.lock();
        if c.len() >= Self::MAX_THREADS {
            c.retain(|_, (_, at)| now.duration_since(*at) < Self::STALE);
            if c.len() >= Self::MAX_THREADS {
                c.clear();
            }
        }
        let e = c.entry(tid).or_insert((0, now));
        *e = (e.0.max(THROTTLE_CREDIT), now);
    }

    /// Spend one of `tid`'s unthrottled write faults; false if none is
    /// left.
    fn take(&self, tid: u32) -> bool {
        let mut c = self.0.lock();
        match c.get_mut(&tid) {
            Some((1, _)) => {
                c.remove(&tid);
                true
            }
            Some((left, _)) => {
                *left -= 1;
                true
            }
            None => false,
        }
    }
}

impl EngineShared {
    /// Let a write fault that waited go again: its thread earns
    /// unthrottled faults and is woken; it faults again and a handler
    /// serves it. Whoever releases never serves it itself: that takes the
    /// folio lock, which a `PageMut` may hold while its holder waits for
    /// this very releaser — its own write fault throttled until the
    /// flusher's next pass (tests/liveness.rs,
    /// `a_throttled_fault_on_a_guarded_folio_does_not_stall_the_others`).
    fn release(&self, tid: u32, address: usize) {
        self.credit.grant(tid);
        wake_page(self, address);
    }
}

/// Longest pause of a throttled write fault (the kernel's `MAX_PAUSE` in
/// `balance_dirty_pages`, 200 ms): it is released after the flusher's
/// next pass or after this long, whichever comes first.
pub(crate) const THROTTLE_MAX_PAUSE: Duration = Duration::from_millis(200);

/// A write fault left waiting, its thread blocked in the kernel: throttled
/// past the dirty limit (released after the flusher's next pass) or
/// parked while the cache is frozen (released by `thaw`). It holds the
/// engine, not the mapping: releasing is a credit and a wake, and must
/// never be where a mapping's last reference (and the final write-back
/// of its file) is dropped.
pub(crate) struct ParkedFault {
    sh: Arc<EngineShared>,
    tid: u32,
    address: usize,
    /// The pause in the pool's table (throttled faults only).
    pause: Option<u64>,
}

impl ParkedFault {
    /// A write fault parked while the cache is frozen.
    pub(crate) fn frozen(sh: &Arc<EngineShared>, tid: u32, address: usize) -> ParkedFault {
        ParkedFault {
            sh: sh.clone(),
            tid,
            address,
            pause: None,
        }
    }

    /// A write fault throttled past the dirty limit. Its pause is bounded:
    /// the monitor releases it after `THROTTLE_MAX_PAUSE` even if the
    /// flusher's pass has not ended. A pass can block in an engine
    /// operation that waits for the very thread whose fault is throttled
    /// (a write barrier waiting for a throttled log writer): without the
    /// bound neither would ever go on (tests/liveness.rs,
    /// `a_throttled_fault_is_released_while_the_flusher_is_blocked`).
    pub(crate) fn throttled(sh: &Arc<EngineShared>, tid: u32, address: usize) -> ParkedFault {
        let pause = sh.pool.begin_pause(tid, address, Instant::now() + THROTTLE_MAX_PAUSE);
        ParkedFault {
            sh: sh.clone(),
            tid,
            address,
            pause: Some(pause),
        }
    }

    /// Let the fault go again now (see the `Drop`).
    pub(crate) fn release(self) {}

    /// Is this throttled fault still in its pause (not yet released by
    /// the monitor)?
    pub(crate) fn is_paused(&self) -> bool {
        self.pause.is_some_and(|id| self.sh.pool.is_paused(id))
    }
}

/// Dropping a parked fault releases it (see `EngineShared::release`),
/// unless the monitor ended its pause and released it already: however
/// its holder lets go of it (a release, a list emptied, a panic that
/// unwinds through a loop of releases), its thread is never left blocked.
impl Drop for ParkedFault {
    fn drop(&mut self) {
        if let Some(id) = self.pause {
            if self.sh.pool.end_pause(id).is_none() {
                return;
            }
        }
        self.sh.release(self.tid, self.address);
    }
}

/// Leaves a fault entered with `VmArea::enter` on every path, panics
/// included (teardown waits for faults in flight).
struct FaultExit<'a>(&'a VmArea);

impl Drop for FaultExit<'_> {
    fn drop(&mut self) {
        self.0.exit();
    }
}

/// Answer a fault that cannot be served with SIGBUS for the faulting
/// thread (`UFFDIO_POISON`), as the kernel's filemap_fault does.
fn sigbus(sh: &EngineShared, vmf: &VmFault<'_>) {
    vmf.vma.poisoned.store(true, Ordering::Relaxed);
    vmf.vma.mapping().stats.sigbus();
    vmf.vma.with_poison_mark(vmf.pgoff, vmf.pgoff.add(1), || {
        poison_page(sh, vmf.address, granule_bytes(vmf.vma))
    });
}

/// Bytes the kernel maps, protects and poisons as one in `vma`: a page, or
/// a 2 MiB page on a hugetlb store.
fn granule_bytes(vma: &VmArea) -> usize {
    (vma.mapping().map_granule_pages() as usize) << crate::types::PAGE_SHIFT
}

/// [`sigbus`] for a read fault, decided again under `i_mmap`: if what
/// made the page unservable has gone meanwhile, wake the thread to fault
/// again instead. The one who made it go — a read that brought the folio
/// uptodate (`clear_read_error_poison`), a growth of the file over the
/// page (`unpoison_growth`) — clears poison under `i_mmap` after the
/// change: either it runs after this and finds the poison (the mapping is
/// marked poisoned first), or it ran before and this sees the change.
/// Poison is never taken off here afterwards: that zap could drop a real
/// page mapped and written in between (tests/sigbus.rs,
/// `poison_for_a_read_error_cleared_meanwhile_does_not_stay`).
///
/// The reasons that can go are looked at: the folio is now cached and
/// uptodate, the page was past the end when the fault began and is below
/// it now, or a clear of poison ran since the fault began (`poison_clears`:
/// an errored folio dropped or re-read, a growth). A failure that stays
/// (the store still fails, the page store cannot be grown) is answered
/// with poison once no clear intervenes, so this never loops.
fn sigbus_read(sh: &EngineShared, vmf: &VmFault<'_>, size_before: u64, clears_before: u64) {
    let m = vmf.vma.mapping();
    // The lookup must not spin on a frozen folio while `i_mmap` is held:
    // reclaim keeps a folio frozen while it takes `i_mmap` (the async
    // eviction check), so drop the lock and look again instead (bounded:
    // past that, let the thread fault again; its fault waits for the
    // frozen folio outside any lock).
    for _ in 0..1000 {
        let _vmas = m.i_mmap.lock();
        if m.poison_clears.load(Ordering::Relaxed) != clears_before && vmf.pgoff.byte() < m.size() {
            wake_page(sh, vmf.address);
            return;
        }
        if vmf.pgoff.byte() < m.size() {
            let grown = vmf.pgoff.byte() >= size_before;
            let guard = crate::sync::epoch::pin();
            let cached = match m.try_get_folio_pinned(vmf.pgoff, &guard) {
                crate::address_space::Lookup::Found(f) => f.is_uptodate(),
                crate::address_space::Lookup::Absent => false,
                crate::address_space::Lookup::Busy => {
                    drop(guard);
                    drop(_vmas);
                    crate::sync::yield_now();
                    continue;
                }
            };
            if grown || cached {
                wake_page(sh, vmf.address);
                return;
            }
        }
        sigbus(sh, vmf);
        return;
    }
    wake_page(sh, vmf.address);
}

/// `UFFDIO_POISON` one page; the faulting thread gets SIGBUS.
///
/// `EEXIST` means the PTE is not none: either a real page (mapped by
/// someone meanwhile, e.g. the file grew back: the retry is served) or a
/// uffd-wp *marker* (Missing-mode shared-writable mappings keep them armed
/// on absent pages), which POISON cannot replace. A marker is cleared by
/// un-write-protecting the page, then POISON is tried again; treating
/// EEXIST as done would leave the thread refaulting forever.
///
/// `granule`: the bytes the kernel poisons as one there (a page, or the
/// whole 2 MiB page holding `addr` on a hugetlb store).
fn poison_page(sh: &EngineShared, addr: usize, granule: usize) {
    let page = addr / granule * granule;
    for _ in 0..2 {
        match sh.uffd.poison(page, granule) {
            Ok(()) => return,
            Err(UffdError::Exists { .. }) => {
                // Clears a wp marker on a none PTE (then POISON works).
                let _ = sh.uffd.writeprotect(page, granule, false);
            }
            Err(_) => break,
        }
    }
    // A real page is mapped there (the file grew back meanwhile): protect
    // it again, since the unprotect above may have made a clean page
    // writable behind page_mkwrite's back (over-protecting only costs a
    // WP fault; outside a WP-registered range this fails harmlessly), and
    // let the thread retry. Not with async dirty tracking: there an
    // unprotected page reads as written to the next harvest (a spare
    // writeback at worst), and protecting it would erase the record of a
    // write the program made meanwhile (wp_async.rs).
    if !sh.cfg.wp_async {
        let _ = sh.uffd.writeprotect(page, granule, true);
    }
    let _ = sh.uffd.wake(page, granule);
}
