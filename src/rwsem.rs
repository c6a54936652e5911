//! `struct rw_semaphore` for `i_rwsem` and `invalidate_lock`: a
//! reader-writer lock that also knows, exactly, whether it is held shared or
//! exclusive, so stores and tests can assert the locking contract.
//!
//! (`parking_lot::RwLock::is_locked_exclusive` is true as soon as a writer
//! *waits*, while readers still hold the lock, so it cannot serve.)

use crate::address_space::LockState;
use crate::sync::{AtomicU32, Ordering, RwLock, RwLockReadGuard, RwLockWriteGuard};

const WRITER: u32 = 1 << 31;

/// A reader-writer semaphore with an exact holder count.
#[derive(Debug, Default)]
pub struct RwSem {
    lock: RwLock<()>,
    /// Shared holders, plus `WRITER` while held exclusive. Updated after
    /// acquiring and before releasing, so it never over-reports.
    holders: AtomicU32,
}

impl RwSem {
    /// New, unlocked.
    pub fn new() -> Self {
        RwSem {
            lock: RwLock::new(()),
            holders: AtomicU32::new(0),
        }
    }

    /// `down_read`.
    pub fn read(&self) -> RwSemReadGuard<'_> {
        let g = self.lock.read();
        self.holders.fetch_add(1, Ordering::Relaxed);
        RwSemReadGuard { sem: self, _g: g }
    }

    /// `down_write`.
    pub fn write(&self) -> RwSemWriteGuard<'_> {
        let g = self.lock.write();
        self.holders.fetch_or(WRITER, Ordering::Relaxed);
        RwSemWriteGuard { sem: self, _g: g }
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
    _g: RwLockReadGuard<'a, ()>,
}

impl Drop for RwSemReadGuard<'_> {
    fn drop(&mut self) {
        self.sem.holders.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Exclusive hold of an [`RwSem`].
#[must_use = "the lock is released when the guard drops"]
pub struct RwSemWriteGuard<'a> {
    sem: &'a RwSem,
    _g: RwLockWriteGuard<'a, ()>,
}

impl Drop for RwSemWriteGuard<'_> {
    fn drop(&mut self) {
        self.sem.holders.fetch_and(!WRITER, Ordering::Relaxed);
    }
}
