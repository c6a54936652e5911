//! The one synchronization shim.
//!
//! Every atomic, lock, wait queue and epoch guard in upcache comes from this
//! module. Normally it re-exports `std` atomics, `parking_lot` locks,
//! `parking_lot_core` address-keyed parking and `crossbeam-epoch`; under
//! `--cfg loom` (with `--cfg crossbeam_loom`, which puts crossbeam-epoch in
//! its own loom mode) it re-exports loom's versions so that the models in
//! `loom-tests/` explore every interleaving of the real protocol code.
//!
//! `tests/sync_shim.rs` fails if any other file of `src/` names
//! `std::sync::atomic`, `parking_lot` or a std lock directly. (Clippy's
//! `disallowed_types` cannot express the rule: it sees through the
//! re-exports below and would flag every use.)

pub use crossbeam_epoch as epoch;

#[cfg(not(loom))]
mod imp {
    pub use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
    pub use std::sync::{Arc, Weak};
    pub use std::thread_local;

    use super::UnparkOp;

    /// A mutual-exclusion lock (`parking_lot::Mutex`).
    pub type Mutex<T> = parking_lot::Mutex<T>;
    /// Guard of [`Mutex`].
    pub type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;
    /// A reader-writer lock (`parking_lot::RwLock`).
    pub type RwLock<T> = parking_lot::RwLock<T>;
    /// Shared guard of [`RwLock`].
    pub type RwLockReadGuard<'a, T> = parking_lot::RwLockReadGuard<'a, T>;
    /// Exclusive guard of [`RwLock`].
    pub type RwLockWriteGuard<'a, T> = parking_lot::RwLockWriteGuard<'a, T>;
    /// A condition variable paired with [`Mutex`].
    pub type Condvar = parking_lot::Condvar;

    /// A reader-writer lock usable in a `static`.
    pub const fn const_rwlock<T>(val: T) -> RwLock<T> {
        parking_lot::const_rwlock(val)
    }

    /// Spin-loop hint.
    #[inline]
    pub fn spin_loop() {
        std::hint::spin_loop();
    }

    /// Give the CPU to another thread (a bounded retry loop's back-off).
    pub fn yield_now() {
        std::thread::yield_now();
    }

    /// Address-keyed wait queue: the kernel's page wait table.
    ///
    /// Normally it holds no state at all: sleepers park in
    /// `parking_lot_core`'s global hash table, keyed by the owner's address
    /// plus a small tag (one tag per event: unlock, writeback end, ...).
    /// Under loom it is one global queue keyed the same way, so the model
    /// sees every park and wake.
    #[derive(Default, Debug)]
    pub struct WaitQueue;

    impl WaitQueue {
        /// Create an empty queue.
        pub const fn new() -> Self {
            WaitQueue
        }

        #[inline]
        fn key(&self, owner: usize, tag: usize) -> usize {
            debug_assert!(tag < 8);
            owner + tag
        }

        /// Sleep on `(owner, tag)` unless `validate` (run under the queue
        /// lock) returns false. Returns when woken by an `unpark_*` on the
        /// same key or at once when `validate` fails. Spurious returns are
        /// allowed: callers re-check their condition in a loop.
        ///
        /// `validate` must not panic nor park/unpark. Crate-private for that
        /// reason: every caller's closure only loads atomics (this module
        /// is public only for `epoch`).
        pub(crate) fn park(&self, owner: usize, tag: usize, token: usize, validate: impl FnOnce() -> bool) {
            // SAFETY: `validate` neither panics nor calls back into the parking
            // lot (documented contract of this method); the key is a plain
            // number, valid whatever the owner's lifetime.
            unsafe {
                parking_lot_core::park(
                    self.key(owner, tag),
                    validate,
                    || {},
                    |_, _| {},
                    parking_lot_core::ParkToken(token),
                    None,
                );
            }
        }

        /// Wake sleepers on `(owner, tag)` chosen by `filter` (given each
        /// sleeper's token, in queue order); `callback(have_more)` runs under
        /// the queue lock once the choice is made. Returns how many woke.
        pub(crate) fn unpark_filter(
            &self,
            owner: usize,
            tag: usize,
            mut filter: impl FnMut(usize) -> UnparkOp,
            callback: impl FnOnce(bool),
        ) -> usize {
            // SAFETY: neither closure panics nor re-enters the parking lot.
            let res = unsafe {
                parking_lot_core::unpark_filter(
                    self.key(owner, tag),
                    |t| match filter(t.0) {
                        UnparkOp::Unpark => parking_lot_core::FilterOp::Unpark,
                        UnparkOp::Skip => parking_lot_core::FilterOp::Skip,
                    },
                    |r| {
                        callback(r.have_more_threads);
                        parking_lot_core::DEFAULT_UNPARK_TOKEN
                    },
                )
            };
            res.unparked_threads
        }

        /// Wake every sleeper on `(owner, tag)`. Needs no queue reference,
        /// so a caller may wake sleepers on an object it may no longer
        /// dereference (the key is just a number).
        pub fn unpark_all(owner: usize, tag: usize) -> usize {
            WaitQueue.unpark_filter(owner, tag, |_| UnparkOp::Unpark, |_| {})
        }
    }
}

#[cfg(loom)]
mod imp {
    pub use loom::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
    // Per loom thread, not per OS thread (loom runs its threads on one).
    pub use loom::thread_local;
    // Reference counting is not part of any protocol loom checks here;
    // std's Arc (with Weak, which loom lacks) serves both builds.
    pub use std::sync::{Arc, Weak};

    /// loom's mutex with parking_lot's signature.
    #[derive(Debug, Default)]
    pub struct Mutex<T>(loom::sync::Mutex<T>);
    /// Guard of [`Mutex`].
    pub type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;
    impl<T> Mutex<T> {
        /// New unlocked mutex.
        pub fn new(t: T) -> Self {
            Mutex(loom::sync::Mutex::new(t))
        }
        /// Lock, sleeping if needed.
        pub fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap()
        }
        /// Lock without sleeping.
        pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            self.0.try_lock().ok()
        }
    }

    /// loom's rwlock with parking_lot's signature.
    #[derive(Debug, Default)]
    pub struct RwLock<T>(loom::sync::RwLock<T>);
    /// Shared guard of [`RwLock`].
    pub type RwLockReadGuard<'a, T> = loom::sync::RwLockReadGuard<'a, T>;
    /// Exclusive guard of [`RwLock`].
    pub type RwLockWriteGuard<'a, T> = loom::sync::RwLockWriteGuard<'a, T>;
    impl<T> RwLock<T> {
        /// New unlocked rwlock.
        pub fn new(t: T) -> Self {
            RwLock(loom::sync::RwLock::new(t))
        }
        /// Take shared.
        pub fn read(&self) -> RwLockReadGuard<'_, T> {
            self.0.read().unwrap()
        }
        /// Take exclusive.
        pub fn write(&self) -> RwLockWriteGuard<'_, T> {
            self.0.write().unwrap()
        }
        /// Take shared without sleeping.
        pub fn try_read(&self) -> Option<RwLockReadGuard<'_, T>> {
            self.0.try_read().ok()
        }
        /// Take shared even while a writer waits (parking_lot's
        /// `read_recursive`; loom's rwlock has no writer preference to
        /// bypass, so this is its `read`).
        pub fn read_recursive(&self) -> RwLockReadGuard<'_, T> {
            self.0.read().unwrap()
        }
        /// Take exclusive without sleeping.
        pub fn try_write(&self) -> Option<RwLockWriteGuard<'_, T>> {
            self.0.try_write().ok()
        }
    }

    /// Spin-loop hint: a yield point for loom.
    pub fn spin_loop() {
        loom::thread::yield_now();
    }

    /// Give the CPU to another thread: a yield point for loom.
    pub fn yield_now() {
        loom::thread::yield_now();
    }

    /// Result of a wake filter.
    use super::UnparkOp;

    #[derive(Debug)]
    struct Sleeper {
        owner: usize,
        tag: usize,
        token: usize,
        id: usize,
    }

    #[derive(Debug, Default)]
    struct Queue {
        sleepers: Vec<Sleeper>,
        next_id: usize,
    }

    #[derive(Debug, Default)]
    struct Table {
        q: loom::sync::Mutex<Queue>,
        cv: loom::sync::Condvar,
    }

    loom::lazy_static! {
        /// The model's page wait table: one per model execution, keyed by
        /// `(owner, tag)` like `parking_lot_core`'s global table.
        static ref TABLE: Table = Table::default();
    }

    /// Under loom: one global queue (mutex + condvar) with the exact
    /// semantics of `parking_lot_core`'s address-keyed table: `validate`
    /// and the wake callback run under the queue lock, and a wake needs
    /// only the key, never the object.
    #[derive(Debug, Default)]
    pub struct WaitQueue;

    impl WaitQueue {
        /// Create an empty queue.
        pub fn new() -> Self {
            WaitQueue
        }

        /// See the non-loom version.
        pub(crate) fn park(&self, owner: usize, tag: usize, token: usize, validate: impl FnOnce() -> bool) {
            let mut q = TABLE.q.lock().unwrap();
            if !validate() {
                return;
            }
            let id = q.next_id;
            q.next_id += 1;
            q.sleepers.push(Sleeper { owner, tag, token, id });
            while q.sleepers.iter().any(|s| s.id == id) {
                q = TABLE.cv.wait(q).unwrap();
            }
        }

        /// See the non-loom version.
        pub(crate) fn unpark_filter(
            &self,
            owner: usize,
            tag: usize,
            mut filter: impl FnMut(usize) -> UnparkOp,
            callback: impl FnOnce(bool),
        ) -> usize {
            let mut q = TABLE.q.lock().unwrap();
            let mut woke = 0;
            q.sleepers.retain(|s| {
                if s.owner != owner || s.tag != tag {
                    return true;
                }
                match filter(s.token) {
                    UnparkOp::Unpark => {
                        woke += 1;
                        false
                    }
                    UnparkOp::Skip => true,
                }
            });
            let have_more = q.sleepers.iter().any(|s| s.owner == owner && s.tag == tag);
            callback(have_more);
            drop(q);
            if woke > 0 {
                TABLE.cv.notify_all();
            }
            woke
        }

        /// See the non-loom version.
        pub fn unpark_all(owner: usize, tag: usize) -> usize {
            WaitQueue.unpark_filter(owner, tag, |_| UnparkOp::Unpark, |_| {})
        }
    }
}

pub use imp::*;

/// What a wake filter decides for one sleeper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnparkOp {
    /// Wake this sleeper.
    Unpark,
    /// Leave it asleep.
    Skip,
}
