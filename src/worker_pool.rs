//! Keeping a fault handler free: the handler pool's accounting and its
//! rescuer (the concurrency management and mayday timer of the kernel's
//! `kernel/workqueue.c`, for the fault engine's `worker_pool`).
//!
//! The kernel serves a fault in the faulting thread, so a fault that
//! blocks (on a folio lock, on `invalidate_lock`, on I/O) holds up that
//! thread only. upcache serves faults on a pool of handler threads, and a
//! handler that blocks inside a fault stops reading the userfaultfd. Once
//! every handler is blocked, no later fault is read, even the one whose
//! progress would unblock them: a thread holding a page guard (or a pin a
//! truncate waits for, with `invalidate_lock` held) that faults on
//! another page deadlocks against the handlers waiting for it
//! (`tests/liveness.rs`,
//! `a_fault_is_served_while_every_handler_is_blocked`).
//!
//! So the pool grows when it is stuck. Each handler counts itself busy
//! while it serves a fault, and every fault served bumps a progress
//! counter. A monitor thread wakes every [`TICK`] while some handler is
//! busy; when every handler was busy at two consecutive ticks and no fault
//! was served in between, it starts a spare handler, which reads the
//! queued faults. A blocked handler stands for one thread blocked in a
//! fault, so the pool never holds more handlers than faulting threads
//! plus its base size (and at most [`MAX_SPARES`] spares). A spare that
//! finds nothing to do for [`SPARE_IDLE`] exits if another handler is
//! free at that moment; should that one get stuck too, the monitor
//! starts another spare.
//!
//! The monitor also ends the pauses of throttled write faults
//! (`fault::ParkedFault`): a fault parked past the dirty limit is
//! released after the flusher's next pass or after 200 ms, whichever
//! comes first, so a flusher blocked in an engine operation cannot hold
//! it for ever. Each pause is an entry in the pool's pause table, and
//! whoever removes the entry (the flusher after its pass, or the monitor
//! when the pause is over) releases the fault: exactly once, so a late
//! second release can neither wake the thread again nor grant it a second
//! round of unthrottled faults.
//!
//! Two cross-thread protocols, each with loom models in
//! `loom-tests/loom_worker_pool.rs`: the monitor's sleep (it sleeps with
//! no deadline while no handler is busy and no fault is paused, and the
//! first handler to turn busy, or fault to be paused, wakes it) and the
//! pause table's exactly-once release. The stall check itself is a timer
//! reading counters: it needs no ordering beyond their atomicity (a stale
//! reading delays a spare by a tick).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::sync::{fence, AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering, WaitQueue};

/// How often the monitor checks a busy pool for progress.
pub(crate) const TICK: Duration = Duration::from_millis(10);

/// How long a spare handler waits for a fault before it exits.
pub(crate) const SPARE_IDLE: Duration = Duration::from_secs(2);

/// Most spare handlers alive at once (a backstop: each busy handler
/// stands for a thread blocked in a fault).
pub(crate) const MAX_SPARES: usize = 1024;

/// Wait-queue tag of the monitor's sleep.
const TAG_MONITOR: usize = 1;

/// The handler pool's counters.
#[derive(Debug)]
pub(crate) struct WorkerPool {
    /// Handlers that never exit (`PageCacheBuilder::fault_threads`).
    base: usize,
    /// Handlers alive: `base` plus the spares.
    nr_workers: AtomicUsize,
    /// Handlers serving a fault now.
    nr_busy: AtomicUsize,
    /// Entries in `pauses` (read without its lock by the monitor's sleep).
    nr_paused: AtomicUsize,
    /// Throttled write faults in their pause, by pause id.
    pauses: Mutex<PauseTable>,
    /// Faults served since the pool started: the monitor's progress mark.
    served: AtomicU64,
    /// The monitor sleeps with no deadline: the next handler to turn busy
    /// must wake it.
    monitor_idle: AtomicBool,
    /// Spares started so far.
    spares_started: AtomicU64,
    wq: WaitQueue,
}

/// A throttled write fault in its pause: whom to release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pause {
    /// The faulting thread (`uffd_msg`'s `ptid`; 0 without
    /// `UFFD_FEATURE_THREAD_ID`).
    pub(crate) tid: u32,
    /// The faulting address.
    pub(crate) address: usize,
    /// When the monitor ends the pause.
    until: Instant,
}

#[derive(Debug, Default)]
struct PauseTable {
    next_id: u64,
    by_id: BTreeMap<u64, Pause>,
}

/// What the monitor saw at one tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sample {
    all_busy: bool,
    served: u64,
}

impl WorkerPool {
    /// A pool of `base` handlers (their threads are the caller's to start).
    pub(crate) fn new(base: usize) -> WorkerPool {
        WorkerPool {
            base,
            nr_workers: AtomicUsize::new(base),
            nr_busy: AtomicUsize::new(0),
            nr_paused: AtomicUsize::new(0),
            pauses: Mutex::new(PauseTable::default()),
            served: AtomicU64::new(0),
            monitor_idle: AtomicBool::new(false),
            spares_started: AtomicU64::new(0),
            wq: WaitQueue::new(),
        }
    }

    fn key(&self) -> usize {
        self as *const WorkerPool as usize
    }

    /// A handler read a fault and starts serving it.
    pub(crate) fn begin_work(&self) {
        self.nr_busy.fetch_add(1, Ordering::Relaxed);
        self.wake_idle_monitor();
    }

    /// A throttled fault of thread `tid` at `address` starts a pause that
    /// the monitor ends at `until` (unless [`end_pause`](Self::end_pause)
    /// ends it first). Returns the pause's id.
    pub(crate) fn begin_pause(&self, tid: u32, address: usize, until: Instant) -> u64 {
        let id = {
            let mut t = self.pauses.lock();
            let id = t.next_id;
            t.next_id += 1;
            t.by_id.insert(id, Pause { tid, address, until });
            // Under the table lock: `nr_paused` never reads below the
            // entries a remover is about to take out.
            self.nr_paused.fetch_add(1, Ordering::Relaxed);
            id
        };
        self.wake_idle_monitor();
        id
    }

    /// End pause `id` early (the flusher's pass is over, the cache shuts
    /// down). Returns the fault to release, or `None` if its pause ended
    /// already: the monitor released it, and a second release must not
    /// happen.
    pub(crate) fn end_pause(&self, id: u64) -> Option<Pause> {
        let mut t = self.pauses.lock();
        let p = t.by_id.remove(&id)?;
        self.nr_paused.fetch_sub(1, Ordering::Relaxed);
        Some(p)
    }

    /// Is pause `id` still on?
    pub(crate) fn is_paused(&self, id: u64) -> bool {
        self.pauses.lock().by_id.contains_key(&id)
    }

    /// Monitor: end every pause due at `now`; the caller releases the
    /// faults returned.
    pub(crate) fn due_pauses(&self, now: Instant) -> Vec<Pause> {
        let mut t = self.pauses.lock();
        if t.by_id.is_empty() {
            return Vec::new();
        }
        let mut due = Vec::new();
        t.by_id.retain(|_, p| {
            let keep = p.until > now;
            if !keep {
                due.push(*p);
            }
            keep
        });
        self.nr_paused.fetch_sub(due.len(), Ordering::Relaxed);
        due
    }

    /// After an increment of `nr_busy` or `nr_paused`.
    fn wake_idle_monitor(&self) {
        // SeqCst fence between the increment and the load below: pairs
        // with the fence in `monitor_sleep`, between its store of
        // `monitor_idle` and its load of `nr_busy` (a store-buffer pair:
        // either the monitor sees this handler busy and stays awake, or
        // this handler sees the monitor asleep and wakes it). Fences, not
        // SeqCst accesses: the C++ model (and loom) guarantee the pattern
        // only with fences on both sides.
        fence(Ordering::SeqCst);
        if self.monitor_idle.load(Ordering::Relaxed) && self.monitor_idle.swap(false, Ordering::Relaxed) {
            // The wake takes the queue lock `monitor_sleep`'s validation
            // runs under: the monitor either has not validated yet (and
            // sees `monitor_idle` false) or is asleep and woken.
            self.wq
                .unpark_filter(self.key(), TAG_MONITOR, |_| crate::sync::UnparkOp::Unpark, |_| {});
        }
    }

    /// The handler finished serving its fault.
    pub(crate) fn end_work(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.nr_busy.fetch_sub(1, Ordering::Relaxed);
    }

    /// Monitor: sleep until a handler turns busy or a fault is paused,
    /// unless there is such work now, or `stop` says the engine is going
    /// away.
    pub(crate) fn monitor_sleep(&self, stop: &AtomicBool) {
        self.monitor_idle.store(true, Ordering::Relaxed);
        // Pairs with the fence in `begin_work` (above) and, for `stop`,
        // with the one in `wake_monitor`.
        fence(Ordering::SeqCst);
        self.wq.park(self.key(), TAG_MONITOR, 0, || {
            self.monitor_idle.load(Ordering::Relaxed)
                && self.nr_busy.load(Ordering::Relaxed) == 0
                && self.nr_paused.load(Ordering::Relaxed) == 0
                && !stop.load(Ordering::Relaxed)
        });
        self.monitor_idle.store(false, Ordering::Relaxed);
    }

    /// Wake a sleeping monitor (the engine is stopping: the caller has set
    /// `stop`). The queue lock orders this wake after the monitor's
    /// validation or before it; the fence makes `stop` visible to a
    /// validation that comes after.
    pub(crate) fn wake_monitor(&self) {
        fence(Ordering::SeqCst);
        self.wq
            .unpark_filter(self.key(), TAG_MONITOR, |_| crate::sync::UnparkOp::Unpark, |_| {});
    }

    /// Is any handler busy, or any fault paused? (The monitor's reason
    /// to tick.)
    pub(crate) fn any_work(&self) -> bool {
        self.nr_busy.load(Ordering::Relaxed) != 0 || self.nr_paused.load(Ordering::Relaxed) != 0
    }

    /// The monitor's reading at one tick.
    pub(crate) fn sample(&self) -> Sample {
        Sample {
            all_busy: self.nr_busy.load(Ordering::Relaxed) >= self.nr_workers.load(Ordering::Relaxed),
            served: self.served.load(Ordering::Relaxed),
        }
    }

    /// Should a spare start, given the previous tick's reading and this
    /// one's? Every handler busy at both, nothing served between them,
    /// and room for another spare. Reserves the spare's place (undo with
    /// [`spare_failed`](Self::spare_failed) if its thread cannot start).
    pub(crate) fn need_spare(&self, prev: Sample, now: Sample) -> bool {
        if !(prev.all_busy && now.all_busy && prev.served == now.served) {
            return false;
        }
        let n = self.nr_workers.load(Ordering::Relaxed);
        if n >= self.base + MAX_SPARES {
            return false;
        }
        self.nr_workers.fetch_add(1, Ordering::Relaxed);
        self.spares_started.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The spare reserved by `need_spare` did not start.
    pub(crate) fn spare_failed(&self) {
        self.nr_workers.fetch_sub(1, Ordering::Relaxed);
    }

    /// A handler exits other than by [`try_retire`](Self::try_retire)
    /// (the userfaultfd could not be read, a panic outside a fault): it
    /// no longer counts, or the monitor would wait for it to turn busy
    /// and never see the pool stuck.
    pub(crate) fn worker_exited(&self) {
        self.nr_workers.fetch_sub(1, Ordering::Relaxed);
    }

    /// A spare found no fault for `SPARE_IDLE`: may it exit? Only while
    /// another handler is free, so that queued faults still get read.
    pub(crate) fn try_retire(&self) -> bool {
        let mut n = self.nr_workers.load(Ordering::Relaxed);
        loop {
            let busy = self.nr_busy.load(Ordering::Relaxed);
            if n <= self.base || n < busy + 2 {
                return false;
            }
            match self
                .nr_workers
                .compare_exchange(n, n - 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(cur) => n = cur,
            }
        }
    }

    /// Spares started so far.
    pub(crate) fn spares_started(&self) -> u64 {
        self.spares_started.load(Ordering::Relaxed)
    }
}
