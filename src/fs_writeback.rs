//! Cache-wide writeback (`fs/fs-writeback.c`, `mm/page-writeback.c`'s
//! dirty throttling, `fs/super.c`'s freeze): the flusher thread, writer
//! throttling, `sync_all`, and `freeze` / `thaw`.
//!
//! - **Flusher**: wakes every `expire / 4`; writes back (cleansing) every
//!   file whose oldest dirtying is older than `dirty_expire`, and every
//!   file while dirty memory is above `dirty_background_bytes`.
//! - **Throttling** (`balance_dirty_pages`): a `write_at` that finds dirty
//!   memory above `dirty_limit_bytes` first writes back part of its own
//!   file, so writers cannot grow dirty memory without bound. A write fault
//!   (page_mkwrite) past the limit is parked instead (its thread stays
//!   blocked in the kernel; the handler thread, which serves everybody's
//!   faults, moves on) and released after the flusher's next pass, or
//!   after 200 ms if that pass takes longer (`fault::ParkedFault`): its
//!   thread is woken, faults again and a handler serves it (never the
//!   flusher, which a page guard's folio lock could hold up).
//! - **Freeze** (`freeze_super`): new dirtying (write_at, page_mkwrite,
//!   truncate, punch) waits while frozen; `freeze` waits for dirtiers in
//!   flight, then syncs every file: on return the files on disk are a
//!   consistent snapshot. A write fault arriving while frozen is parked
//!   (the faulting thread stays blocked in the kernel, the handler thread
//!   moves on) and released by `thaw` the same way.

use std::collections::HashMap;
use std::io;
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crate::address_space::{AddressSpace, Eviction};
use crate::aops::WritebackControl;
use crate::errseq::ErrSeq;
use crate::fault::ParkedFault;
use crate::stats::CacheStats;
use crate::sync::{Arc, AtomicBool, AtomicU64, Mutex, Ordering, RwLock, RwLockReadGuard, UnparkOp, WaitQueue, Weak};
use crate::types::PgOff;

/// Every address space of a cache, by id (for the flusher, reclaim,
/// sync_all).
/// An address space's entry stays while its drop writes it back (its
/// [`Eviction`] not done), so that `sync_all` can wait for that write.
#[derive(Default)]
pub(crate) struct Spaces(Mutex<HashMap<u64, SpaceEntry>>);

/// An address space and its eviction signal.
type SpaceEntry = (Weak<AddressSpace>, Arc<Eviction>);

impl Spaces {
    pub(crate) fn register(&self, m: &Arc<AddressSpace>) {
        let mut t = self.0.lock();
        t.retain(|_, (w, ev)| w.strong_count() > 0 || !ev.is_done());
        t.insert(m.id(), (Arc::downgrade(m), m.eviction.clone()));
    }

    pub(crate) fn get(&self, id: u64) -> Option<Arc<AddressSpace>> {
        self.0.lock().get(&id).and_then(|(w, _)| w.upgrade())
    }

    /// Is address space `id` one of these, live or dying?
    pub(crate) fn contains(&self, id: u64) -> bool {
        self.0.lock().contains_key(&id)
    }

    pub(crate) fn all(&self) -> Vec<Arc<AddressSpace>> {
        self.0.lock().values().filter_map(|(w, _)| w.upgrade()).collect()
    }

    /// `sync_filesystem` over these address spaces: integrity writeback
    /// and store sync of every live one, then a wait for every dying one's
    /// drop (which writes it back and reports a failure itself), so that
    /// on return every write made before the call is in the store.
    ///
    /// # Errors
    /// The first live address space's write or sync error.
    pub(crate) fn sync_all(&self) -> io::Result<()> {
        let mut first = Ok(());
        for m in self.all() {
            let r = m.sync_range_checked(0, u64::MAX);
            if first.is_ok() {
                first = r;
            }
        }
        for ev in self.dying() {
            ev.wait();
        }
        first
    }

    /// `syncfs`'s walk: integrity writeback and store sync of every live
    /// address space, then a wait for every dying one. Only errors that
    /// are not recorded in the error words are returned (`EDEADLK` for a
    /// folio this thread's `PageMut` holds, `Reentrant`): the recorded
    /// ones (write and store-sync failures, this call's and earlier
    /// ones) reach the caller through the superblock's word, once
    /// (`Writeback::syncfs`). A per-file check here reported an error a
    /// second time at the next call, since `sync_all` never marks a
    /// file's own word seen.
    pub(crate) fn syncfs_files(&self) -> io::Result<()> {
        let mut first = Ok(());
        for m in self.all() {
            let r = m.sync_for_syncfs();
            if first.is_ok() {
                first = r;
            }
        }
        for ev in self.dying() {
            ev.wait();
        }
        first
    }

    /// The address spaces whose last user is gone and whose drop is still
    /// writing them back.
    pub(crate) fn dying(&self) -> Vec<Arc<Eviction>> {
        self.0
            .lock()
            .values()
            .filter(|(w, ev)| w.strong_count() == 0 && !ev.is_done())
            .map(|(_, ev)| ev.clone())
            .collect()
    }
}

/// `sb_start_write` / `freeze_super`.
#[derive(Default)]
pub(crate) struct FreezeGate {
    lock: RwLock<()>,
    frozen: AtomicBool,
    wq: WaitQueue,
    parked: Mutex<Vec<ParkedFault>>,
}

crate::sync::thread_local! {
    /// The freeze gates this thread is inside (one entry per
    /// [`GateGuard`]): a page guard holds its cache's gate while the
    /// engine runs, and the engine may enter the gate again.
    #[allow(clippy::missing_const_for_thread_local)]
    static GATES_HELD: std::cell::RefCell<Vec<usize>> = std::cell::RefCell::new(Vec::new());
}

/// Inside the freeze gate (`sb_start_write` .. `sb_end_write`).
pub(crate) struct GateGuard<'a> {
    _g: RwLockReadGuard<'a, ()>,
    gate: usize,
}

impl<'a> GateGuard<'a> {
    fn new(g: RwLockReadGuard<'a, ()>, gate: &FreezeGate) -> GateGuard<'a> {
        let gate = gate as *const FreezeGate as usize;
        // `try_with`: in a thread whose thread-locals are being destroyed
        // there is no record to keep (`with` would panic: an abort).
        let _ = GATES_HELD.try_with(|h| h.borrow_mut().push(gate));
        GateGuard { _g: g, gate }
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        let _ = GATES_HELD.try_with(|h| {
            let mut h = h.borrow_mut();
            if let Some(i) = h.iter().rposition(|&g| g == self.gate) {
                h.swap_remove(i);
            }
        });
    }
}

impl FreezeGate {
    /// Enter a dirtying operation; sleeps while the cache is frozen.
    ///
    /// A thread already inside this gate enters again at once, even while
    /// a `freeze` waits (`read_recursive`): the freeze waits for it to
    /// leave, so it cannot be frozen yet, and the lock's preference for a
    /// waiting writer would make it wait for the freeze that waits for it.
    pub(crate) fn start_write(&self) -> GateGuard<'_> {
        if self.held_here() {
            return GateGuard::new(self.lock.read_recursive(), self);
        }
        loop {
            let g = self.lock.read();
            if !self.frozen.load(Ordering::Acquire) {
                return GateGuard::new(g, self);
            }
            drop(g);
            self.wq
                .park(self as *const _ as usize, 0, 0, || self.frozen.load(Ordering::Acquire));
        }
    }

    /// Is this thread inside the gate (a page guard, a write in progress)?
    pub(crate) fn held_here(&self) -> bool {
        let me = self as *const FreezeGate as usize;
        GATES_HELD.try_with(|h| h.borrow().contains(&me)).unwrap_or(false)
    }

    /// Enter without sleeping on the freeze: `None` while frozen (write
    /// faults, on the handler threads). Not behind a waiting `freeze`
    /// either (`read_recursive`): the thread the freeze waits for may be
    /// waiting for this very fault.
    pub(crate) fn try_start_write(&self) -> Option<GateGuard<'_>> {
        let g = self.lock.read_recursive();
        (!self.frozen.load(Ordering::Acquire)).then(|| GateGuard::new(g, self))
    }

    /// Park a write fault until thaw. Returns it back if the cache was
    /// thawed meanwhile (the caller releases it now): checked under the
    /// `parked` lock, which `thaw` takes after clearing `frozen`, so no
    /// fault is parked after the thaw that should release it.
    pub(crate) fn park_fault(&self, f: ParkedFault) -> Option<ParkedFault> {
        let mut q = self.parked.lock();
        if !self.frozen.load(Ordering::Acquire) {
            return Some(f);
        }
        q.push(f);
        None
    }

    fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }
}

/// Dirty-memory tunables.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DirtyConfig {
    pub(crate) expire: Duration,
    pub(crate) background_bytes: u64,
    pub(crate) limit_bytes: u64,
}

/// The flusher thread and the cache-wide writeback entry points.
pub(crate) struct Writeback {
    pub(crate) spaces: Arc<Spaces>,
    pub(crate) gate: FreezeGate,
    stats: Arc<CacheStats>,
    cfg: DirtyConfig,
    epoch: Instant,
    stop: AtomicBool,
    flusher: Mutex<Option<(Thread, JoinHandle<()>)>>,
    /// Write faults throttled past the dirty limit: released after the
    /// flusher's next pass, unless the fault engine's monitor released
    /// them first (200 ms; those are dropped from here at the next
    /// throttle, so a flusher stuck in a pass does not grow the list).
    throttled: Mutex<Vec<ParkedFault>>,
    /// `sb->s_wb_err`: every write-back or store-sync error of any file of
    /// the cache (`AddressSpace::set_error` records it here too), so that
    /// `sync_all` reports it even after the file is gone.
    pub(crate) sb_err: ErrSeq,
    /// `sync_all`'s cursor in `sb_err` (the `f_sb_err` of the one
    /// descriptor `syncfs(2)` is called on): each error reported once.
    sb_cursor: AtomicU64,
}

impl Writeback {
    pub(crate) fn new(spaces: Arc<Spaces>, stats: Arc<CacheStats>, cfg: DirtyConfig) -> Arc<Writeback> {
        let w = Arc::new(Writeback {
            spaces,
            gate: FreezeGate::default(),
            stats,
            cfg,
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
            flusher: Mutex::new(None),
            throttled: Mutex::new(Vec::new()),
            sb_err: ErrSeq::new(),
            sb_cursor: AtomicU64::new(0),
        });
        w.sb_cursor.store(w.sb_err.sample(), Ordering::Relaxed);
        // The flusher holds only a weak reference: it must not keep the
        // cache alive.
        let weak = Arc::downgrade(&w);
        let period = (cfg.expire / 4).max(Duration::from_millis(10));
        let h = std::thread::Builder::new()
            .name("upcache-flush".into())
            .spawn(move || flusher_main(weak, period))
            .expect("spawn flusher thread");
        *w.flusher.lock() = Some((h.thread().clone(), h));
        w
    }

    /// Milliseconds since the cache started (the dirtied-when clock).
    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// The cache is going away: stop the flusher, thaw (a frozen cache
    /// has nobody left to thaw it) and answer every parked or throttled
    /// write fault. Mappings may outlive the cache; their later write
    /// faults are neither parked nor throttled (`is_stopped`).
    pub(crate) fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        let h = self.flusher.lock().take();
        if let Some((t, h)) = h {
            t.unpark();
            let _ = h.join();
        }
        self.thaw();
        // Never leave a faulting thread parked.
        self.release_throttled();
    }

    /// Has the cache shut down (no flusher, no freeze)?
    pub(crate) fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Is dirty memory (write-back in flight included) past the hard limit?
    pub(crate) fn over_dirty_limit(&self) -> bool {
        self.limited_bytes() > self.cfg.limit_bytes
    }

    /// Throttle a write fault past the dirty limit: park it (its thread
    /// stays blocked in the kernel, the handler moves on) until the
    /// flusher's next pass, which it starts now.
    pub(crate) fn throttle_fault(&self, f: ParkedFault) {
        let mut q = self.throttled.lock();
        if self.is_stopped() {
            // No flusher will release it: let it go now.
            drop(q);
            f.release();
            return;
        }
        // Released after the flusher's next pass, or by the fault
        // engine's monitor after the longest pause if that pass takes
        // longer (`ParkedFault::throttled`). Those the monitor released
        // go now (dropping them does nothing more).
        q.retain(ParkedFault::is_paused);
        q.push(f);
        drop(q);
        if let Some((t, _)) = &*self.flusher.lock() {
            t.unpark();
        }
    }

    /// Let the throttled write faults go again (after a flusher pass:
    /// whatever it achieved, throttling is a delay, never a hang). Their
    /// threads fault again and the handlers serve them; the flusher never
    /// does (`ParkedFault::release`).
    fn release_throttled(&self) {
        let parked = std::mem::take(&mut *self.throttled.lock());
        for f in parked {
            f.release();
        }
    }

    fn dirty_bytes(&self) -> u64 {
        self.stats.dirty_bytes()
    }

    /// What the hard limit bounds: dirty bytes and those under write-back.
    fn limited_bytes(&self) -> u64 {
        self.stats.dirty_and_writeback_bytes()
    }

    /// Wake the flusher now (direct reclaim found dirty folios).
    pub(crate) fn wake_flusher(&self) {
        if let Some((t, _)) = &*self.flusher.lock() {
            t.unpark();
        }
    }

    /// Wake the flusher (dirty memory grew past the background level).
    pub(crate) fn kick(&self) {
        if self.dirty_bytes() > self.cfg.background_bytes {
            if let Some((t, _)) = &*self.flusher.lock() {
                t.unpark();
            }
        }
    }

    /// `balance_dirty_pages`: past the dirty limit, the writer cleans part
    /// of its own file before dirtying more.
    ///
    /// # Errors
    /// The write-back's error when it failed and dirty memory is still past
    /// the limit: a `write_at` about to dirty more then fails instead
    /// (a store that fails every write must not let writers grow dirty
    /// memory without bound).
    pub(crate) fn balance_dirty_pages(&self, m: &AddressSpace) -> io::Result<()> {
        let dirty = self.limited_bytes();
        if dirty <= self.cfg.limit_bytes {
            self.kick();
            return Ok(());
        }
        m.stats.throttled();
        let over = (dirty - self.cfg.limit_bytes) / crate::types::PAGE_SIZE as u64;
        let mut wbc = WritebackControl::none((over as i64).max(32));
        wbc.for_background = true;
        let r = m.writepages(&mut wbc);
        self.kick();
        // Refused only when this file holds a good part of the dirty
        // memory: a file whose one folio keeps failing must not see its
        // writes refused because another, healthy file keeps the cache
        // over the limit. Dirty bytes only: write-back in flight (another
        // file's, healthy) throttles, but never makes a write fail.
        match r {
            Err(e)
                if self.dirty_bytes() > self.cfg.limit_bytes
                    && m.stats.own_dirty_bytes() > self.cfg.limit_bytes / 4 =>
            {
                Err(e)
            }
            _ => Ok(()),
        }
    }

    /// One flusher pass.
    fn flush_pass(&self) {
        let now = self.now_ms();
        let expire = u64::try_from(self.cfg.expire.as_millis()).unwrap_or(u64::MAX);
        let over_background = self.dirty_bytes() > self.cfg.background_bytes;
        for m in self.spaces.all() {
            // Mapped writes of async-tracked mappings count as dirty from
            // here on (`Stats`, expiry, the background threshold).
            let _ = m.harvest_mapped_writes(PgOff(0), PgOff(u64::MAX), crate::wp_async::HarvestMode::Background);
            let when = m.dirtied_when();
            if when == 0 && (m.nr_dirty_folios() == 0 || !over_background) {
                // Clean (or marked clean by a pass that raced a new
                // dirtying: past the background level it is written
                // anyway, and the next dirtying of a clean folio sets the
                // time again).
                continue;
            }
            if over_background || now.saturating_sub(when) >= expire {
                let mut wbc = WritebackControl::none(i64::MAX);
                wbc.for_background = true;
                let _ = m.writepages(&mut wbc);
                m.reset_dirtied_when(when, now);
            }
        }
    }

    /// `sync_filesystem`: integrity writeback and store sync of every file.
    pub(crate) fn sync_all(&self) -> io::Result<()> {
        self.spaces.sync_all()
    }

    /// `syncfs(2)`: [`sync_all`](Self::sync_all), then every error
    /// recorded for any file of the cache since the last call is reported
    /// once (`errseq_check_and_advance(&sb->s_wb_err, &file->f_sb_err)`):
    /// one a handle's `fsync` saw first, and one of a file whose last user
    /// is gone (its final write-back).
    pub(crate) fn syncfs(&self) -> io::Result<()> {
        let r = self.spaces.syncfs_files();
        // A recorded error is reported whenever the cursor passes it, in
        // preference to an unrecorded one (`EDEADLK`), which the caller
        // meets again at its next call if its cause stays.
        match self.sb_err.check_and_advance(&self.sb_cursor) {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => r,
        }
    }

    /// `freeze_super`: block new dirtying, wait for dirtiers in flight, sync
    /// everything. On a sync error the cache is thawed and the error
    /// returned.
    pub(crate) fn freeze(&self) -> io::Result<()> {
        if self.gate.held_here() {
            // The freeze would wait for this very thread to leave the gate.
            return Err(io::Error::from_raw_os_error(libc::EDEADLK));
        }
        {
            let _w = self.gate.lock.write();
            if self.is_stopped() {
                return Err(io::Error::other("the cache is shut down"));
            }
            if self.gate.frozen.swap(true, Ordering::AcqRel) {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    "the cache is already frozen (EBUSY)",
                ));
            }
        }
        if let Err(e) = self.sync_all() {
            self.thaw();
            return Err(e);
        }
        Ok(())
    }

    /// `thaw_super`: let writers in again and release parked write faults.
    pub(crate) fn thaw(&self) -> bool {
        if self.gate.held_here() {
            // Inside the gate, so not frozen (a freeze waits for every
            // thread inside to leave); taking it exclusive would wait for
            // this thread.
            return false;
        }
        let was = {
            let _w = self.gate.lock.write();
            self.gate.frozen.swap(false, Ordering::AcqRel)
        };
        self.gate
            .wq
            .unpark_filter(&self.gate as *const _ as usize, 0, |_| UnparkOp::Unpark, |_| {});
        // Their threads fault again; the handlers serve them, never the
        // thawing thread, which may hold a guard one of them needs.
        let parked = std::mem::take(&mut *self.gate.parked.lock());
        for f in parked {
            f.release();
        }
        was
    }

    pub(crate) fn is_frozen(&self) -> bool {
        self.gate.is_frozen()
    }
}

fn flusher_main(w: Weak<Writeback>, period: Duration) {
    loop {
        {
            let Some(w) = w.upgrade() else { return };
            if w.stop.load(Ordering::Acquire) {
                return;
            }
            // An engine panic in a pass (its `writepage` or write barrier)
            // must not end the flusher: throttled write faults wait for it
            // to release them, and expiry writeback would stop for good.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if !w.is_frozen() {
                    w.flush_pass();
                }
            }));
            if r.is_err() {
                eprintln!("upcache: a flusher pass panicked (an engine operation); the flusher goes on");
            }
            // Never ends the flusher either (nothing here calls the
            // engine; a panic would be upcache's own bug).
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.release_throttled())).is_err() {
                eprintln!("upcache: releasing throttled write faults panicked; the flusher goes on");
            }
        }
        std::thread::park_timeout(period);
    }
}
