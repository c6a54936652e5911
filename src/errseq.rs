//! `errseq_t`: report each writeback error once to every file handle.
//!
//! The word packs an errno (low 12 bits), a SEEN flag and a counter. A write
//! error bumps the counter (if the previous error was seen) and records the
//! errno; each [`File`](crate::File) keeps the value it last saw and reports
//! an error when the word moved past it. So an error reaches every handle's
//! next `fsync` exactly once, however many folios failed, as in the kernel.

use crate::sync::{AtomicU64, Ordering};

const ERRNO_MASK: u64 = 0xfff;
const SEEN: u64 = 1 << 12;
const CTR_ONE: u64 = 1 << 13;

/// An error sequence word.
#[derive(Debug, Default)]
pub(crate) struct ErrSeq(AtomicU64);

impl ErrSeq {
    pub(crate) fn new() -> Self {
        ErrSeq(AtomicU64::new(0))
    }

    /// `errseq_set`: record `errno`.
    pub(crate) fn set(&self, errno: i32) {
        let errno = (errno as u64) & ERRNO_MASK;
        let errno = if errno == 0 { libc_eio() } else { errno };
        let mut old = self.0.load(Ordering::Relaxed);
        loop {
            let mut new = (old & !(ERRNO_MASK | SEEN)) | errno;
            // Bump the counter when the old error was seen (or none was
            // recorded yet), so that samplers notice a new one.
            if old & SEEN != 0 || old & ERRNO_MASK == 0 {
                new = new.wrapping_add(CTR_ONE);
            }
            if new == old {
                return;
            }
            // Release: pairs with the Acquire in `check_and_advance`.
            match self
                .0
                .compare_exchange_weak(old, new, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(v) => old = v,
            }
        }
    }

    /// `errseq_sample`: the cursor for a new file handle. An error nobody
    /// has seen yet is reported to the new handle too (cursor 0).
    pub(crate) fn sample(&self) -> u64 {
        let v = self.0.load(Ordering::Acquire);
        if v & ERRNO_MASK != 0 && v & SEEN == 0 {
            0
        } else {
            v & !SEEN
        }
    }

    /// `errseq_check_and_advance`: the errno recorded since `*since`, once.
    pub(crate) fn check_and_advance(&self, since: &AtomicU64) -> Option<i32> {
        let mut cur = self.0.load(Ordering::Acquire);
        let old_since = since.load(Ordering::Acquire);
        if cur & !SEEN == old_since {
            return None;
        }
        if cur & SEEN == 0 {
            // Mark it seen so the next error bumps the counter.
            loop {
                match self
                    .0
                    .compare_exchange_weak(cur, cur | SEEN, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => break,
                    Err(v) => {
                        cur = v;
                        if cur & SEEN != 0 {
                            break;
                        }
                    }
                }
            }
        }
        let new_since = cur & !SEEN;
        // Several threads may fsync the same handle: one of them reports.
        match since.compare_exchange(old_since, new_since, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Some((cur & ERRNO_MASK) as i32),
            Err(_) => None,
        }
    }
}

fn libc_eio() -> u64 {
    rustix::io::Errno::IO.raw_os_error() as u64
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn reported_once_per_handle() {
        let e = ErrSeq::new();
        let a = AtomicU64::new(e.sample());
        let b = AtomicU64::new(e.sample());
        assert_eq!(e.check_and_advance(&a), None);
        e.set(5);
        e.set(5);
        assert_eq!(e.check_and_advance(&a), Some(5));
        assert_eq!(e.check_and_advance(&a), None);
        assert_eq!(e.check_and_advance(&b), Some(5));
        // A handle opened after the error was seen does not see it.
        let c = AtomicU64::new(e.sample());
        assert_eq!(e.check_and_advance(&c), None);
        // A new error after being seen is reported again.
        e.set(28);
        assert_eq!(e.check_and_advance(&a), Some(28));
        assert_eq!(e.check_and_advance(&c), Some(28));
    }

    #[test]
    fn unseen_error_reaches_new_handle() {
        let e = ErrSeq::new();
        e.set(5);
        let a = AtomicU64::new(e.sample());
        assert_eq!(e.check_and_advance(&a), Some(5));
    }
}
