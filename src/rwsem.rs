//! `struct rw_semaphore` for `i_rwsem` and `invalidate_lock`: a
//! reader-writer lock that also knows, exactly, whether it is held shared or
//! exclusive, so stores and tests can assert the locking contract.
//!
//! (`parking_lot::RwLock::is_locked_exclusive` is true as soon as a writer
//! *waits*, while readers still hold the lock, so it cannot serve.)
//!
//! # Waiting that can back off
//!
//! A thread holding page guards must not sleep on either lock while its
//! holder waits for one of those guards (`address_space.rs`, "Guard
//! waits"). [`RwSem::read_or_bail`] and [`RwSem::write_or_bail`] try the
//! lock, then ask `bail` whether to give up, and otherwise sleep until the
//! lock is released or [`RwSem::kick`] says the reasons to bail changed;
//! then they try again.
//!
//! | step | who | operation |
//! |---|---|---|
//! | wait | bailer | `gen` (Acquire); `bailers += 1` (SeqCst) and a SeqCst fence; try the lock; `bail()`; park on the sem unless `gen` moved |
//! | release | holder | unlock, then a SeqCst fence; `bailers` non-zero: `gen += 1` (Release), wake all |
//! | kick | a new reason to bail (published first) | a SeqCst fence; `bailers` non-zero: `gen += 1`, wake all |
//!
//! Either the bailer's try sees the release, or the releaser's load sees
//! the bailer (the two fences order a store-buffering pair), and a bump
//! of `gen` before the park's check (under the wait-queue lock) keeps it
//! from sleeping; one after finds it parked and wakes it.

use crate::address_space::LockState;
use crate::sync::{fence, AtomicU32, Ordering, WaitQueue};
#[cfg(not(loom))]
use crate::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
#[cfg(loom)]
use loom_lock::{RwLock, RwLockReadGuard, RwLockWriteGuard};

const WRITER: u32 = 1 << 31;

/// Wait-queue tag of threads sleeping in `read_or_bail`/`write_or_bail`.
const WQ_BAILERS: usize = 0;

/// A reader-writer semaphore with an exact holder count.
#[derive(Debug, Default)]
pub struct RwSem {
    lock: RwLock<()>,
    /// Shared holders, plus `WRITER` while held exclusive. Updated after
    /// acquiring and before releasing, so it never over-reports.
    holders: AtomicU32,
    /// Threads in `read_or_bail`/`write_or_bail` (see the module docs).
    bailers: AtomicU32,
    /// Bumped by every release and `kick` that finds bailers.
    gen: AtomicU32,
}

impl RwSem {
    /// New, unlocked.
    pub fn new() -> Self {
        RwSem {
            lock: RwLock::new(()),
            holders: AtomicU32::new(0),
            bailers: AtomicU32::new(0),
            gen: AtomicU32::new(0),
        }
    }

    /// `down_read`.
    pub fn read(&self) -> RwSemReadGuard<'_> {
        let g = self.lock.read();
        self.read_guard(g)
    }

    /// `down_write`.
    pub fn write(&self) -> RwSemWriteGuard<'_> {
        let g = self.lock.write();
        self.write_guard(g)
    }

    fn read_guard<'a>(&'a self, g: RwLockReadGuard<'a, ()>) -> RwSemReadGuard<'a> {
        self.holders.fetch_add(1, Ordering::Relaxed);
        RwSemReadGuard { sem: self, g: Some(g) }
    }

    fn write_guard<'a>(&'a self, g: RwLockWriteGuard<'a, ()>) -> RwSemWriteGuard<'a> {
        self.holders.fetch_or(WRITER, Ordering::Relaxed);
        RwSemWriteGuard { sem: self, g: Some(g) }
    }

    /// `down_read`, unless `bail` returns an error while the lock is
    /// unavailable (checked again after every release and `kick`).
    ///
    /// # Errors
    /// What `bail` returned.
    pub(crate) fn read_or_bail<E>(&self, bail: impl FnMut() -> Option<E>) -> Result<RwSemReadGuard<'_>, E> {
        let g = self.acquire_or_bail(|| self.lock.try_read(), bail)?;
        Ok(self.read_guard(g))
    }

    /// `down_write`, unless `bail` returns an error while the lock is
    /// unavailable (as [`read_or_bail`](Self::read_or_bail)).
    ///
    /// # Errors
    /// What `bail` returned.
    pub(crate) fn write_or_bail<E>(&self, bail: impl FnMut() -> Option<E>) -> Result<RwSemWriteGuard<'_>, E> {
        let g = self.acquire_or_bail(|| self.lock.try_write(), bail)?;
        Ok(self.write_guard(g))
    }

    fn acquire_or_bail<G, E>(
        &self,
        try_lock: impl Fn() -> Option<G>,
        mut bail: impl FnMut() -> Option<E>,
    ) -> Result<G, E> {
        loop {
            // Acquire: pairs with the Release bump in `wake_bailers`.
            let gen = self.gen.load(Ordering::Acquire);
            self.bailers.fetch_add(1, Ordering::SeqCst);
            // SeqCst: pairs with the fence in `wake_bailers` (see the
            // module docs): the try below sees a release, or the releaser
            // sees this bailer.
            fence(Ordering::SeqCst);
            let res = match try_lock() {
                Some(g) => Some(Ok(g)),
                None => bail().map(Err),
            };
            if let Some(res) = res {
                self.bailers.fetch_sub(1, Ordering::Relaxed);
                return res;
            }
            WaitQueue::new().park(self.key(), WQ_BAILERS, 0, || self.gen.load(Ordering::Relaxed) == gen);
            self.bailers.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Wake the threads in `read_or_bail`/`write_or_bail` to try again and
    /// ask their `bail` again: a reason to give up may have appeared.
    pub(crate) fn kick(&self) {
        self.wake_bailers();
    }

    fn wake_bailers(&self) {
        // SeqCst: pairs with the fence in `acquire_or_bail`.
        fence(Ordering::SeqCst);
        if self.bailers.load(Ordering::Relaxed) != 0 {
            // Release: pairs with the Acquire load in `acquire_or_bail`.
            self.gen.fetch_add(1, Ordering::Release);
            WaitQueue::unpark_all(self.key(), WQ_BAILERS);
        }
    }

    #[inline]
    fn key(&self) -> usize {
        self as *const RwSem as usize
    }

    /// Who holds it now.
    pub fn state(&self) -> LockState {
        let h = self.holders.load(Ordering::Relaxed);
        if h & WRITER != 0 {
            LockState::Exclusive
        } else if h != 0 {
            LockState::Shared
        } else {
            LockState::Unlocked
        }
    }
}

/// Shared hold of an [`RwSem`].
#[must_use = "the lock is released when the guard drops"]
pub struct RwSemReadGuard<'a> {
    sem: &'a RwSem,
    g: Option<RwLockReadGuard<'a, ()>>,
}

impl Drop for RwSemReadGuard<'_> {
    fn drop(&mut self) {
        self.sem.holders.fetch_sub(1, Ordering::Relaxed);
        drop(self.g.take());
        self.sem.wake_bailers();
    }
}

/// Exclusive hold of an [`RwSem`].
#[must_use = "the lock is released when the guard drops"]
pub struct RwSemWriteGuard<'a> {
    sem: &'a RwSem,
    g: Option<RwLockWriteGuard<'a, ()>>,
}

impl Drop for RwSemWriteGuard<'_> {
    fn drop(&mut self) {
        self.sem.holders.fetch_and(!WRITER, Ordering::Relaxed);
        drop(self.g.take());
        self.sem.wake_bailers();
    }
}

/// Under loom, the lock inside an [`RwSem`] is this small rwlock of loom
/// atomics and the crate's wait queue instead of loom's `RwLock`, whose
/// `try_read`/`try_write` can *block*: the try is a scheduling point, and a
/// writer that takes the lock there leaves the trying thread blocked until
/// it unlocks. A try that sleeps would make the models report deadlocks
/// that `parking_lot`, whose tries never sleep, cannot have. Production
/// builds use `parking_lot::RwLock`.
#[cfg(loom)]
mod loom_lock {
    use std::marker::PhantomData;

    use crate::sync::{AtomicU32, Ordering, WaitQueue};

    const WRITER: u32 = 1 << 31;
    /// Wait-queue tag of this lock's sleepers (the `RwSem` uses tag 0 on
    /// an address that may be this lock's).
    const WQ_LOCK: usize = 1;

    #[derive(Debug, Default)]
    pub(super) struct RwLock<T> {
        /// Readers, or `WRITER`.
        state: AtomicU32,
        _t: PhantomData<T>,
    }

    pub(super) struct RwLockReadGuard<'a, T>(&'a RwLock<T>);
    pub(super) struct RwLockWriteGuard<'a, T>(&'a RwLock<T>);

    impl RwLock<()> {
        pub(super) fn new(_: ()) -> Self {
            RwLock {
                state: AtomicU32::new(0),
                _t: PhantomData,
            }
        }

        fn key(&self) -> usize {
            self as *const Self as usize
        }

        pub(super) fn try_read(&self) -> Option<RwLockReadGuard<'_, ()>> {
            let mut s = self.state.load(Ordering::Relaxed);
            while s & WRITER == 0 {
                match self
                    .state
                    .compare_exchange(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
                {
                    Ok(_) => return Some(RwLockReadGuard(self)),
                    Err(now) => s = now,
                }
            }
            None
        }

        pub(super) fn try_write(&self) -> Option<RwLockWriteGuard<'_, ()>> {
            self.state
                .compare_exchange(0, WRITER, Ordering::Acquire, Ordering::Relaxed)
                .ok()
                .map(|_| RwLockWriteGuard(self))
        }

        pub(super) fn read(&self) -> RwLockReadGuard<'_, ()> {
            loop {
                if let Some(g) = self.try_read() {
                    return g;
                }
                WaitQueue::new().park(self.key(), WQ_LOCK, 0, || {
                    self.state.load(Ordering::Relaxed) & WRITER != 0
                });
            }
        }

        pub(super) fn write(&self) -> RwLockWriteGuard<'_, ()> {
            loop {
                if let Some(g) = self.try_write() {
                    return g;
                }
                WaitQueue::new().park(self.key(), WQ_LOCK, 0, || self.state.load(Ordering::Relaxed) != 0);
            }
        }
    }

    impl<T> Drop for RwLockReadGuard<'_, T> {
        fn drop(&mut self) {
            // Release: pairs with the Acquire of the next holder.
            if self.0.state.fetch_sub(1, Ordering::Release) == 1 {
                WaitQueue::unpark_all(self.0 as *const RwLock<T> as usize, WQ_LOCK);
            }
        }
    }

    impl<T> Drop for RwLockWriteGuard<'_, T> {
        fn drop(&mut self) {
            // Release: pairs with the Acquire of the next holder.
            self.0.state.store(0, Ordering::Release);
            WaitQueue::unpark_all(self.0 as *const RwLock<T> as usize, WQ_LOCK);
        }
    }
}
