//! `Folio`: a power-of-two run of cached pages, its flag word, refcount, lock
//! and writeback bit (the kernel's `struct folio`, `folio_lock()`,
//! `folio_wait_bit()` and `folio_end_writeback()`).
//!
//! # The flag word
//!
//! All state lives in one `AtomicU32` changed only by read-modify-write
//! operations. Bits:
//!
//! | bit | set by | cleared by | meaning |
//! |---|---|---|---|
//! | `LOCKED` | `lock`/`trylock` (Acquire) | `unlock` (Release) | exclusive owner; protects `UPTODATE`/`DIRTY` transitions and membership |
//! | `LOCK_WAITERS` | a sleeper, CAS from a value with `LOCKED` set | the waker, under the wait-queue lock, when the queue empties | `unlock` must take the slow path |
//! | `UPTODATE` | the filler (read_folio / write_end), folio locked, Release | never (a folio is never made not-uptodate; it is dropped instead) | data valid; readers may copy without the lock (Acquire) |
//! | `DIRTY` | `folio_mark_dirty` (folio locked, or `WRITEBACK` held) | `folio_clear_dirty_for_io` (folio locked), truncate | data newer than the store |
//! | `WRITEBACK` | `folio_start_writeback` (folio locked) | `folio_end_writeback` (no lock; Release) | I/O in flight; truncate waits for it to clear |
//! | `WB_WAITERS` | a sleeper in `wait_writeback`, CAS from a value with `WRITEBACK` | the waker when the queue empties | `end_writeback` must wake |
//! | `ERROR` | read_folio failure (folio locked) | a later successful fill | last read failed |
//! | `READAHEAD` | readahead, on the folio that should trigger the next window | a reader that hit it | async readahead marker |
//! | `REFERENCED` | any access (`mark_accessed`) | reclaim's clock hand | recently used |
//! | `ACTIVE` | reclaim promotion | reclaim demotion | on the hot list |
//! | `FRESH` | readahead, on each folio it creates (folio locked, new) | the first `mark_accessed` | the next access is the first, not a reuse |
//!
//! Once set, `UPTODATE` is never cleared while the folio is in the cache.
//!
//! # Refcount
//!
//! The page cache holds one reference for as long as the folio is indexed;
//! each [`FolioRef`] holds one more. `try_get` refuses a count of zero, so a
//! lockless lookup can never revive a folio being freed (the lookup protocol
//! is in `address_space`). The folio's memory is released through the epoch
//! collector, never directly, because lockless readers may still be looking
//! at its refcount.
//!
//! The count word also carries `REF_DETACHED` (bit 31), set once by removal
//! (`detach`). `put` decides everything from the value its `fetch_sub`
//! returned: `REF_DETACHED | 2` means "a remover may be waiting for the
//! count to drain to its own reference: wake it", a count of 1 means "last
//! reference: free". It never touches the folio after its decrement, so it
//! needs no epoch pin: once the decrement is visible another holder may put
//! the last reference and free the folio (the wake uses only the address as
//! a key, like the kernel's `folio_put` + `wake_up_var`).
//!
//! # Page pins
//!
//! A [`PageRef`](crate::PageRef) hands out `&[u8]` to an uptodate folio's
//! bytes, so nobody may change them while it lives. `pins` counts live
//! `PageRef`s; every write to an uptodate folio's bytes goes through
//! `copy_in_raw` or `zero_raw`, under the folio lock, and those first wait
//! until the count is zero (`wait_pins_drained`). The protocol:
//!
//! | step | who | holds | operation |
//! |---|---|---|---|
//! | pin (fast) | reader | a reference | `pins += 1` (Relaxed), then `flags.fetch_or(0)` (AcqRel): `LOCKED` set → `unpin` and take the slow path; else re-check mapping, uptodate, size |
//! | pin (slow) | reader | folio lock | `pins += 1` (Relaxed: the lock's Release/Acquire orders it before any later lock holder's check) |
//! | pin (nested) | reader that already pins this folio | its pin | `pins += 1` (Relaxed), lock not looked at: its first pin keeps every writer before the drain (the count cannot reach 0), and waiting for the lock would wait for a writer that waits for that pin |
//! | unpin | reader | a reference | `pins -= 1` (Release); old value `PIN_WAITERS \| 1` wakes the waiter |
//! | drain | writer | folio lock | load `pins` (Acquire); non-zero: set `PIN_WAITERS` by CAS and sleep until the count is zero |
//!
//! While a writer holds the lock, a new pin either is seen by the writer's
//! drain or sees `LOCKED` and is dropped again. The pinner checks the lock
//! bit with a read-modify-write (no SeqCst, which loom does not model
//! fully): if it precedes the lock's RMW in the flag word's order, the
//! lock reads a value in its release sequence, so the pin increment
//! happens before the drain's load of `pins`, which therefore counts it;
//! otherwise the pinner's RMW reads `LOCKED`. So the writer waits for the pins
//! that existed when it took the lock, and no pin survives that it missed. (A
//! pin raised and dropped again only delays the drain; its `unpin` wakes
//! the writer.) Hot pages (a tree's root) are pinned by many threads at
//! once without taking the folio lock: with the lock, two threads
//! descending a B+tree serialized on the root's lock (`btree_lookup` in
//! BENCHMARKS.md). Count and waiter bit share one word, so `unpin` learns
//! "wake" from the value its own decrement returned (no Dekker pairing).
//! Other writers of folio memory never meet a pin: fills write only folios
//! that are not uptodate (a `PageRef` needs an uptodate one), and memory is
//! punched only after the references drained (truncate) or were frozen
//! (reclaim), which a `PageRef`'s reference prevents. Writes through user
//! mappings are the `unsafe` mapping constructors' contract.
//!
//! # Field protection
//!
//! | field | protection |
//! |---|---|
//! | `index`, `order`, `data` | immutable after creation |
//! | `flags` | atomic RMW, see the table above |
//! | `refcount` | atomic; low 31 bits the count, 0 means being freed and is never raised again; `REF_DETACHED` set once by `detach`, never cleared |
//! | `pins` | atomic; raised only under the folio lock, see "Page pins" |
//! | `mapping` | written under the index lock (attach, detach); read by lockless lookups and re-checked under the folio lock |

use std::fmt;
use std::ptr::NonNull;

use crate::page_store::PageStore;
use crate::sync::{epoch, Arc, AtomicU32, AtomicU64, Ordering, UnparkOp, WaitQueue};
use crate::types::{PgOff, PAGE_SHIFT, PAGE_SIZE};

/// Folio flag bits (see the module docs for the state table).
pub mod flags {
    /// Folio lock held.
    pub const LOCKED: u32 = 1 << 0;
    /// Somebody sleeps waiting for `LOCKED` to clear.
    pub const LOCK_WAITERS: u32 = 1 << 1;
    /// Contents valid.
    pub const UPTODATE: u32 = 1 << 2;
    /// Contents newer than the backing store.
    pub const DIRTY: u32 = 1 << 3;
    /// Write to the store in flight.
    pub const WRITEBACK: u32 = 1 << 4;
    /// Somebody sleeps waiting for `WRITEBACK` to clear.
    pub const WB_WAITERS: u32 = 1 << 5;
    /// The last read of this folio failed.
    pub const ERROR: u32 = 1 << 6;
    /// Readahead marker: hitting it starts the next async window.
    pub const READAHEAD: u32 = 1 << 7;
    /// Accessed since the reclaim hand last passed.
    pub const REFERENCED: u32 = 1 << 8;
    /// On the active (hot) list.
    pub const ACTIVE: u32 = 1 << 9;
    /// Read in by readahead and not accessed since: the first access is
    /// the one readahead anticipated, not a reuse, and does not count.
    pub const FRESH: u32 = 1 << 10;
}
use flags::*;

/// Wait-queue tags: one per event a thread can sleep for.
const WQ_LOCK: usize = 0;
const WQ_WRITEBACK: usize = 1;
const WQ_REFS: usize = 2;
const WQ_PINS: usize = 3;

/// `pins` bit set by a writer (folio locked) sleeping in
/// `wait_pins_drained`: the last `unpin` must wake it.
const PIN_WAITERS: u32 = 1 << 31;
/// The count part of `pins`.
const PIN_COUNT: u32 = !PIN_WAITERS;

/// `refcount` bit set by `detach`: the folio left its mapping, and a
/// remover may sleep in `wait_refs_drained` until the count falls to 1.
const REF_DETACHED: u32 = 1 << 31;
/// The count part of `refcount`.
const REF_COUNT: u32 = !REF_DETACHED;

/// Most references (or pins) a folio may hold, far above any real use
/// (`Arc`'s `MAX_REFCOUNT`). Safe code can leak references without end
/// (`mem::forget` of `FolioRef` or `PageRef` clones); a count that went
/// on would carry into the flag bit above it and then read as the last
/// reference, freeing a folio the index still holds. Past this ceiling
/// the process aborts, as `Arc` does: an increment made before the check
/// is never undone, and the ceiling leaves 2^30 increments of room for
/// the threads that race past it.
const MAX_COUNT: u32 = 1 << 30;

/// A reference or pin count passed [`MAX_COUNT`]: references are being
/// leaked; abort before the count wraps.
#[cold]
#[inline(never)]
fn count_overflow(what: &str) -> ! {
    eprintln!("upcache: a folio's {what} count passed 2^30 (leaked references); aborting");
    std::process::abort()
}

/// Park tokens on the lock queue.
const TOKEN_EXCLUSIVE: usize = 0;
const TOKEN_WAIT_ONLY: usize = 1;

/// A folio: `2^order` pages of one file, cached in the address space's memfd.
pub struct Folio {
    flags: AtomicU32,
    refcount: AtomicU32,
    /// Id of the owning `AddressSpace`, 0 once removed from it.
    mapping: AtomicU64,
    index: PgOff,
    order: u8,
    /// Live page pins ([`crate::PageRef`]) in the low 31 bits, `PIN_WAITERS`
    /// in bit 31 (see "Page pins" in the module docs).
    pins: AtomicU32,
    /// The engine's word (`folio->private`): the largest value set since
    /// the folio entered the cache, e.g. the LSN of its newest change,
    /// handed to `AddressSpaceOps::write_barrier` before every write-back.
    private: AtomicU64,
    /// First byte of the folio in the page store's engine view.
    data: *mut u8,
    /// Keeps the page store (and so the view `data` points into) mapped
    /// for as long as this folio exists: a [`FolioRef`] may outlive its
    /// `File`, its `AddressSpace` and its `PageCache`. `None` only in the
    /// loom models, which never touch data.
    _store: Option<Arc<PageStore>>,
    wq: WaitQueue,
}

// SAFETY: all mutable state is atomic; `data` points into the page store's
// shared view, which the folio keeps mapped (`_store`), and access to its
// bytes follows the folio lock protocol.
unsafe impl Send for Folio {}
// SAFETY: as above; `&Folio` exposes only atomics and raw copies.
unsafe impl Sync for Folio {}

impl fmt::Debug for Folio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Folio")
            .field("index", &self.index.0)
            .field("order", &self.order)
            .field("flags", &format_args!("{:#x}", self.flags.load(Ordering::Relaxed)))
            .field("refcount", &(self.refcount.load(Ordering::Relaxed) & REF_COUNT))
            .finish()
    }
}

impl Folio {
    /// Allocate a folio, locked, with two references (the page cache's and
    /// the returned one's) and attached to `mapping`.
    pub(crate) fn alloc_locked(
        mapping: u64,
        index: PgOff,
        order: u8,
        data: *mut u8,
        store: Option<Arc<PageStore>>,
    ) -> FolioGuard {
        debug_assert!(order <= crate::types::MAX_ORDER);
        debug_assert_eq!(
            index.0 & ((1u64 << order) - 1),
            0,
            "folio index not aligned to its order"
        );
        let f = Box::new(Folio {
            flags: AtomicU32::new(LOCKED),
            refcount: AtomicU32::new(2),
            mapping: AtomicU64::new(mapping),
            index,
            order,
            pins: AtomicU32::new(0),
            private: AtomicU64::new(0),
            data,
            _store: store,
            wq: WaitQueue::new(),
        });
        FolioGuard {
            folio: FolioRef {
                ptr: NonNull::from(Box::leak(f)),
            },
        }
    }

    /// First page index.
    #[inline]
    pub fn index(&self) -> PgOff {
        self.index
    }
    /// log2 of the number of pages.
    #[inline]
    pub fn order(&self) -> u8 {
        self.order
    }
    /// Number of pages.
    #[inline]
    pub fn nr_pages(&self) -> u64 {
        1u64 << self.order
    }
    /// Size in bytes.
    #[inline]
    pub fn size(&self) -> usize {
        PAGE_SIZE << self.order
    }
    /// File offset of the first byte.
    #[inline]
    pub fn pos(&self) -> u64 {
        self.index.0 << PAGE_SHIFT
    }
    /// Does the folio cover page `index`?
    #[inline]
    pub fn contains(&self, index: PgOff) -> bool {
        index.0 >= self.index.0 && index.0 < self.index.0 + self.nr_pages()
    }
    /// Raw flag word (for assertions and stats).
    #[inline]
    pub fn flags(&self) -> u32 {
        self.flags.load(Ordering::Acquire)
    }
    /// Current reference count.
    #[inline]
    pub fn ref_count(&self) -> u32 {
        self.refcount.load(Ordering::Acquire) & REF_COUNT
    }
    /// Owning address space id (0 when detached).
    #[inline]
    pub(crate) fn mapping_id(&self) -> u64 {
        // Acquire; pairs with the Release in `detach`.
        self.mapping.load(Ordering::Acquire)
    }
    /// Mark the folio removed from its mapping. Index lock held, folio locked.
    pub(crate) fn detach(&self) {
        debug_assert!(self.is_locked());
        // Release: pairs with the Acquire in `mapping_id`.
        self.mapping.store(0, Ordering::Release);
        // On the count word itself, so that `put` learns "detached" from the
        // value its own decrement returns (one location, one total order:
        // no Dekker pairing to get wrong). Relaxed: the bit orders nothing
        // else; `wait_refs_drained` runs in this thread after it.
        self.refcount.fetch_or(REF_DETACHED, Ordering::Relaxed);
    }

    /// Is the folio locked (by anyone)?
    #[inline]
    pub fn is_locked(&self) -> bool {
        self.flags() & LOCKED != 0
    }
    /// Are the contents valid? Acquire: pairs with the Release in
    /// `FolioGuard::mark_uptodate`, so the filled bytes are visible.
    #[inline]
    pub fn is_uptodate(&self) -> bool {
        self.flags() & UPTODATE != 0
    }
    /// Dirty?
    #[inline]
    pub fn is_dirty(&self) -> bool {
        self.flags() & DIRTY != 0
    }
    /// Under writeback?
    #[inline]
    pub fn is_writeback(&self) -> bool {
        self.flags() & WRITEBACK != 0
    }
    /// Did the last read fail?
    #[inline]
    pub fn has_error(&self) -> bool {
        self.flags() & ERROR != 0
    }
    /// Carries the readahead marker?
    #[inline]
    pub fn is_readahead(&self) -> bool {
        self.flags() & READAHEAD != 0
    }

    /// `folio_mark_accessed`: note a use for reclaim. One load on the hot
    /// path when the bit is already set (no cache-line bouncing).
    #[inline]
    pub fn mark_accessed(&self) {
        // A two-bit use counter for the replacement policy: REFERENCED on
        // the first use, ACTIVE on the next (S3-FIFO's frequency, capped).
        // A folio readahead brought in counts from its second access: the
        // first is the read it was brought in for. Counting it made every
        // page of a sequential stream look reused, so reclaim kept the
        // pages already read and evicted those read ahead but not yet
        // reached, which were then read again (`tests/reclaim.rs`).
        let f = self.flags.load(Ordering::Relaxed);
        if f & FRESH != 0 {
            self.flags.fetch_and(!FRESH, Ordering::Relaxed);
        } else if f & REFERENCED == 0 {
            self.flags.fetch_or(REFERENCED, Ordering::Relaxed);
        } else if f & ACTIVE == 0 {
            self.flags.fetch_or(ACTIVE, Ordering::Relaxed);
        }
    }

    /// Uses since the policy last looked: 0, 1 or 2.
    #[inline]
    pub(crate) fn use_count(&self) -> u32 {
        let f = self.flags.load(Ordering::Relaxed);
        (f & REFERENCED != 0) as u32 + (f & ACTIVE != 0) as u32
    }

    /// Mark a folio readahead just created (`FRESH`): its first access
    /// will not count as a reuse.
    pub(crate) fn set_fresh(&self) {
        self.flags.fetch_or(FRESH, Ordering::Relaxed);
    }

    /// Take one use off the counter (the policy gave the folio a pass).
    pub(crate) fn dec_use(&self) {
        let f = self.flags.load(Ordering::Relaxed);
        let bit = if f & ACTIVE != 0 { ACTIVE } else { REFERENCED };
        self.flags.fetch_and(!bit, Ordering::Relaxed);
    }

    /// Clear the use counter.
    pub(crate) fn clear_uses(&self) {
        self.flags.fetch_and(!(REFERENCED | ACTIVE), Ordering::Relaxed);
    }

    /// `folio_ref_unfreeze`: give a frozen folio its references back (an
    /// eviction that could not complete).
    pub(crate) fn unfreeze_refs(&self, count: u32) {
        // A frozen folio is locked by the freezer, so nobody detached it.
        debug_assert_eq!(self.refcount.load(Ordering::Relaxed), 0);
        // Release: pairs with the Acquire of a later try_get.
        self.refcount.store(count, Ordering::Release);
    }

    /// `folio_ref_freeze`: drop the count from `expected` to 0 if nobody
    /// else holds a reference, so that no lookup can take one any more.
    /// Folio locked. Reclaim uses it: a folio someone reads, writes or
    /// waits on is never evicted.
    pub(crate) fn freeze_refs(&self, expected: u32) -> bool {
        debug_assert!(self.is_locked());
        // Acquire: pairs with the Release decrements of earlier holders.
        self.refcount
            .compare_exchange(expected, 0, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Set `DIRTY`; true if it was clean. Folio locked or under writeback.
    /// Use `AddressSpace::folio_mark_dirty` to also tag and count it.
    pub(crate) fn test_set_dirty(&self) -> bool {
        self.flags.fetch_or(DIRTY, Ordering::AcqRel) & DIRTY == 0
    }

    /// Clear `DIRTY`; true if it was dirty. Folio locked.
    pub(crate) fn test_clear_dirty(&self) -> bool {
        debug_assert!(self.is_locked());
        self.flags.fetch_and(!DIRTY, Ordering::AcqRel) & DIRTY != 0
    }

    // ----- refcount -------------------------------------------------------

    /// `folio_try_get`: take a reference unless the count is zero (the folio
    /// is being freed). Used by lockless lookups under an epoch guard.
    #[inline]
    pub(crate) fn try_get(&self) -> bool {
        let mut c = self.refcount.load(Ordering::Relaxed);
        loop {
            if c & REF_COUNT == 0 {
                return false;
            }
            if c & REF_COUNT >= MAX_COUNT {
                count_overflow("reference");
            }
            // Acquire on success: pairs with the Release decrement in `put`
            // so that we see everything done before the last put we revived
            // from (the count never goes 0 -> 1, so this only orders us after
            // earlier holders).
            match self
                .refcount
                .compare_exchange_weak(c, c + 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(v) => c = v,
            }
        }
    }

    /// Take another reference; the caller already holds one.
    #[inline]
    fn get(&self) {
        let old = self.refcount.fetch_add(1, Ordering::Relaxed);
        debug_assert!(old & REF_COUNT > 0);
        if old & REF_COUNT >= MAX_COUNT {
            count_overflow("reference");
        }
    }

    /// Drop a reference. The last one frees the folio through the epoch
    /// collector.
    ///
    /// # Safety
    ///
    /// The caller owns one reference to the folio at `ptr`, and gives it up.
    unsafe fn put(ptr: NonNull<Folio>) {
        // The key is the folio's address: computed before the decrement,
        // used after it without dereferencing anything.
        let key = ptr.as_ptr() as usize;
        // SAFETY: we own a reference, so the folio is alive until our
        // decrement; nothing below dereferences it afterwards except on the
        // last reference, which nobody else can drop.
        let old = unsafe { ptr.as_ref() }.refcount.fetch_sub(1, Ordering::AcqRel);
        // AcqRel: Release so that the freer sees every holder's accesses;
        // Acquire for the freer's side of the same pairing.
        let n = old & REF_COUNT;
        debug_assert!(n > 0, "folio put with a zero count");
        if n == 1 {
            let p = SendPtr(ptr);
            let guard = epoch::pin();
            // SAFETY: the count reached zero, so `try_get` can never succeed
            // again and the index no longer holds the folio (the cache's own
            // reference is dropped only after removal). Lockless readers that
            // loaded the pointer earlier are pinned; the epoch defers the
            // free until they unpin.
            unsafe {
                guard.defer_unchecked(move || {
                    let p = p;
                    drop(Box::from_raw(p.0.as_ptr()));
                });
            }
        } else if old == REF_DETACHED | 2 {
            // Detached, one reference left: maybe a remover waiting in
            // `wait_refs_drained` for exactly this. Wake by key; the folio
            // may already be gone (its last holder was someone else), then
            // the wake is spurious and harmless.
            WaitQueue::unpark_all(key, WQ_REFS);
        }
    }

    /// Is only one reference (the caller's) left? Once a detached folio's
    /// count is down to one nobody else can take one. Acquire: as in
    /// [`wait_refs_drained`](Self::wait_refs_drained).
    pub(crate) fn refs_drained(&self) -> bool {
        self.refcount.load(Ordering::Acquire) & REF_COUNT <= 1
    }

    /// Does anyone but the caller hold a reference? For a detached folio:
    /// `wait_refs_drained` would sleep.
    pub(crate) fn refs_busy(&self) -> bool {
        // Acquire: pairs with the AcqRel decrements in `put`, so the holders'
        // accesses happen before whatever the caller does next (punch).
        self.refcount.load(Ordering::Acquire) & REF_COUNT > 1
    }

    /// Sleep until only one reference (the caller's) is left. The folio must
    /// be detached (so that `put` knows to wake us) and the caller must hold
    /// no lock that a reference holder could be waiting for.
    pub(crate) fn wait_refs_drained(&self) {
        debug_assert_eq!(self.mapping_id(), 0);
        debug_assert_ne!(self.refcount.load(Ordering::Relaxed) & REF_DETACHED, 0);
        let busy = || self.refs_busy();
        if busy() && crate::page_ref::held_by_this_thread(self) {
            // Unreachable through the API (truncate and punch return
            // EDEADLK first). Unwinding from here would leave a detached
            // folio whose memory the guard still reads while a new folio
            // reuses it, so do not unwind.
            eprintln!(
                "upcache: this thread holds a page guard of the folio at page index {} that its own truncate is removing; aborting",
                self.index.0
            );
            std::process::abort();
        }
        while busy() {
            // `validate` runs under the queue lock and `put` wakes under it
            // after its decrement: no lost wake-up.
            self.wq.park(self.key(), WQ_REFS, 0, busy);
        }
    }

    #[inline]
    fn key(&self) -> usize {
        // Keys are the folio's address plus a tag < 8; a Folio is larger
        // than 8 bytes so keys of different folios never collide.
        self as *const Folio as usize
    }

    // ----- page pins ------------------------------------------------------

    /// Take a page pin. Folio locked and uptodate.
    pub(crate) fn pin_locked(&self) {
        debug_assert!(self.is_locked());
        debug_assert!(self.is_uptodate());
        // Relaxed: the folio lock orders this increment before the check
        // of any later lock holder (Release in `unlock_raw`, Acquire in
        // `trylock_raw`).
        let old = self.pins.fetch_add(1, Ordering::Relaxed);
        if old & PIN_COUNT >= MAX_COUNT {
            count_overflow("pin");
        }
    }

    /// Pin without the folio lock (the fast path of `read_cache_page`):
    /// raise the count, then check the lock bit. False, with the pin
    /// dropped again, if the folio is locked: its holder may be a writer
    /// that has already looked at the count. The caller holds a reference
    /// and re-checks the folio's mapping and uptodate state afterwards.
    pub(crate) fn try_pin_unlocked(&self) -> bool {
        // The lock check is a read-modify-write, not a load (see "Page
        // pins"): it either comes before the locker's RMW in the flag
        // word's modification order, and then (Release) synchronizes with
        // the lock (Acquire), so the writer's later load of `pins` sees
        // this increment, or it comes after and reads LOCKED. A plain load
        // could read a flag word older than a lock whose holder has
        // already drained (loom finds it at 4 preemptions).
        let old = self.pins.fetch_add(1, Ordering::Relaxed);
        if old & PIN_COUNT >= MAX_COUNT {
            count_overflow("pin");
        }
        if self.flags.fetch_or(0, Ordering::AcqRel) & LOCKED == 0 {
            return true;
        }
        self.unpin();
        false
    }

    /// Pin again a folio the caller already pins, without looking at the
    /// lock: the caller's pin keeps every writer waiting in
    /// `wait_pins_drained` (the count cannot reach zero before it is
    /// dropped), so the bytes cannot change, and waiting for the lock could
    /// mean waiting for a writer that waits for the caller's own pin.
    pub(crate) fn pin_nested(&self) {
        let old = self.pins.fetch_add(1, Ordering::Relaxed);
        debug_assert!(old & PIN_COUNT > 0, "pin_nested without a pin");
        if old & PIN_COUNT >= MAX_COUNT {
            count_overflow("pin");
        }
    }

    /// Drop a page pin, waking the writer that waits for the last one.
    /// The caller holds a reference, so the folio is alive.
    pub(crate) fn unpin(&self) {
        // Release: pairs with the Acquire in `wait_pins_drained`, so the
        // pinned reader's loads happen before the writer's stores.
        let old = self.pins.fetch_sub(1, Ordering::Release);
        debug_assert!(old & PIN_COUNT > 0, "unpin without a pin");
        if old == PIN_WAITERS | 1 {
            self.wq.unpark_filter(
                self.key(),
                WQ_PINS,
                |_| UnparkOp::Unpark,
                |have_more| {
                    if !have_more {
                        self.pins.fetch_and(!PIN_WAITERS, Ordering::Relaxed);
                    }
                },
            );
        }
    }

    /// The engine's private word (see [`FolioGuard::set_private_max`]); 0
    /// until set.
    pub fn private(&self) -> u64 {
        // Relaxed: set and read under the folio lock, which orders them.
        self.private.load(Ordering::Relaxed)
    }

    /// Number of live page pins.
    pub fn pin_count(&self) -> u32 {
        self.pins.load(Ordering::Relaxed) & PIN_COUNT
    }

    /// Sleep until no page pin is left. Folio locked (so no new pin can be
    /// taken): one load when there is none.
    pub(crate) fn wait_pins_drained(&self) {
        debug_assert!(self.is_locked());
        loop {
            // Acquire: pairs with the Release in `unpin`. A lockless pin
            // whose flag RMW came before our lock happens before this load
            // (`try_pin_unlocked`), so it is counted.
            let p = self.pins.load(Ordering::Acquire);
            if p & PIN_COUNT == 0 {
                return;
            }
            crate::page_ref::assert_not_pinned_here(self, "change its bytes");
            if p & PIN_WAITERS == 0
                && self
                    .pins
                    .compare_exchange_weak(p, p | PIN_WAITERS, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            // Sleep only while pins are left and the waiter bit is set
            // (checked under the queue lock, where the last `unpin`'s
            // callback clears it): no lost wake-up.
            self.wq.park(self.key(), WQ_PINS, 0, || {
                let p = self.pins.load(Ordering::Relaxed);
                p & PIN_COUNT != 0 && p & PIN_WAITERS != 0
            });
        }
    }

    // ----- lock -----------------------------------------------------------

    /// `folio_trylock`: take the lock if free. One atomic op.
    #[inline]
    pub(crate) fn trylock_raw(&self) -> bool {
        // Acquire: pairs with the Release in `unlock_raw`.
        self.flags.fetch_or(LOCKED, Ordering::Acquire) & LOCKED == 0
    }

    /// `folio_lock`: take the lock, sleeping if needed.
    #[inline]
    pub(crate) fn lock_raw(&self) {
        if !self.trylock_raw() {
            self.lock_slow(true);
        }
    }

    /// `folio_wait_locked`: sleep until the folio is unlocked, without
    /// taking the lock.
    pub fn wait_unlocked(&self) {
        if self.is_locked() {
            self.lock_slow(false);
        }
    }

    #[cold]
    fn lock_slow(&self, take: bool) {
        crate::page_ref::assert_not_locked_here(self);
        let token = if take { TOKEN_EXCLUSIVE } else { TOKEN_WAIT_ONLY };
        let mut spins = 0u32;
        loop {
            let f = self.flags.load(Ordering::Relaxed);
            if f & LOCKED == 0 {
                if !take {
                    // Acquire so the caller sees what the last holder did.
                    crate::sync::fence(Ordering::Acquire);
                    return;
                }
                if self.trylock_raw() {
                    return;
                }
                continue;
            }
            if spins < 16 && f & LOCK_WAITERS == 0 {
                spins += 1;
                crate::sync::spin_loop();
                continue;
            }
            if f & LOCK_WAITERS == 0
                && self
                    .flags
                    .compare_exchange_weak(f, f | LOCK_WAITERS, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            // Sleep only if the lock is still held and the waiters bit still
            // set (checked under the queue lock, where `unlock_slow`'s
            // callback clears it): no wake-up can be lost.
            self.wq.park(self.key(), WQ_LOCK, token, || {
                self.flags.load(Ordering::Relaxed) & (LOCKED | LOCK_WAITERS) == (LOCKED | LOCK_WAITERS)
            });
        }
    }

    /// `folio_unlock`. One atomic op unless someone sleeps.
    #[inline]
    pub(crate) fn unlock_raw(&self) {
        // Release: pairs with the Acquire in `trylock_raw` / `lock_slow`.
        let old = self.flags.fetch_and(!LOCKED, Ordering::Release);
        debug_assert!(old & LOCKED != 0, "unlocking an unlocked folio");
        if old & LOCK_WAITERS != 0 {
            self.unlock_slow();
        }
    }

    #[cold]
    fn unlock_slow(&self) {
        // Wake every wait-only sleeper and one that wants the lock (the
        // kernel's exclusive/non-exclusive page waiters). Clear the waiters
        // bit under the queue lock when nobody is left.
        let mut woke_exclusive = false;
        self.wq.unpark_filter(
            self.key(),
            WQ_LOCK,
            |token| {
                if token == TOKEN_WAIT_ONLY {
                    UnparkOp::Unpark
                } else if !woke_exclusive {
                    woke_exclusive = true;
                    UnparkOp::Unpark
                } else {
                    UnparkOp::Skip
                }
            },
            |have_more| {
                if !have_more {
                    self.flags.fetch_and(!LOCK_WAITERS, Ordering::Relaxed);
                }
            },
        );
    }

    // ----- writeback ------------------------------------------------------

    /// Set `WRITEBACK`. Folio locked; it must not already be under writeback.
    pub(crate) fn set_writeback_bit(&self) {
        debug_assert!(self.is_locked());
        let old = self.flags.fetch_or(WRITEBACK, Ordering::AcqRel);
        assert!(
            old & WRITEBACK == 0,
            "folio_start_writeback on a folio already under writeback"
        );
    }

    /// Clear `WRITEBACK` and wake everyone waiting for it.
    pub(crate) fn clear_writeback_bit(&self) {
        // Release: pairs with the Acquire in `wait_writeback`; a waiter that
        // sees the bit clear sees the write's effects (and error state).
        let old = self.flags.fetch_and(!WRITEBACK, Ordering::AcqRel);
        assert!(
            old & WRITEBACK != 0,
            "folio_end_writeback on a folio not under writeback"
        );
        if old & WB_WAITERS != 0 {
            self.wq.unpark_filter(
                self.key(),
                WQ_WRITEBACK,
                |_| UnparkOp::Unpark,
                |have_more| {
                    if !have_more {
                        self.flags.fetch_and(!WB_WAITERS, Ordering::Relaxed);
                    }
                },
            );
        }
    }

    /// `folio_wait_writeback`: sleep until `WRITEBACK` is clear.
    pub fn wait_writeback(&self) {
        loop {
            // Acquire: pairs with the Release in `clear_writeback_bit`.
            let f = self.flags.load(Ordering::Acquire);
            if f & WRITEBACK == 0 {
                return;
            }
            if f & WB_WAITERS == 0
                && self
                    .flags
                    .compare_exchange_weak(f, f | WB_WAITERS, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            self.wq.park(self.key(), WQ_WRITEBACK, 0, || {
                self.flags.load(Ordering::Relaxed) & (WRITEBACK | WB_WAITERS) == (WRITEBACK | WB_WAITERS)
            });
        }
    }

    // ----- data -------------------------------------------------------------

    /// Copy `dst.len()` bytes starting `off` bytes into the folio.
    ///
    /// Readers copy without the folio lock (as `filemap_read` does): a
    /// concurrent writer may be observed partially, never out of bounds.
    ///
    /// # Panics
    /// If the range is not inside the folio, if the folio is not uptodate
    /// (its bytes may then be a fill's `&mut [u8]`,
    /// [`FolioGuard::data_mut`]), or if `dst` is the folio's own bytes.
    pub fn copy_out(&self, off: usize, dst: &mut [u8]) {
        assert!(
            off.checked_add(dst.len()).is_some_and(|e| e <= self.size()),
            "copy_out of {} bytes at {off} outside a folio of {} bytes",
            dst.len(),
            self.size()
        );
        assert!(self.is_uptodate(), "copy_out of a folio that is not uptodate");
        assert!(
            !self.bytes_overlap(off, dst),
            "copy_out into the folio's own bytes (a PageMut of the same page)"
        );
        // SAFETY: `data..data+size` lies in the page store's view, mapped for
        // the life of the store, which outlives its folios; the range was
        // bounds-checked above; `dst` does not overlap it (checked above).
        unsafe { std::ptr::copy_nonoverlapping(self.data.add(off), dst.as_mut_ptr(), dst.len()) }
    }

    /// Do the folio's bytes `[off, off + buf.len())` share memory with
    /// `buf` (a `PageMut` of the same page handed to a copy)?
    pub(crate) fn bytes_overlap(&self, off: usize, buf: &[u8]) -> bool {
        let s = (self.data as usize).wrapping_add(off);
        let d = buf.as_ptr() as usize;
        !buf.is_empty() && s < d.saturating_add(buf.len()) && d < s.saturating_add(buf.len())
    }

    /// Pointer to the folio's bytes in the engine view (valid for
    /// [`size`](Self::size) bytes while the caller holds a reference).
    /// The bytes are shared with user mappings and other threads: access
    /// them only with raw copies, never through a long-lived reference.
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.data
    }

    /// Copy `src` into the folio at `off`, with a raw copy (no reference
    /// to folio memory is formed). Folio locked by the caller (crate use:
    /// write_at, truncate's zeroing).
    pub(crate) fn copy_in_raw(&self, off: usize, src: &[u8]) {
        assert!(off.checked_add(src.len()).is_some_and(|e| e <= self.size()));
        debug_assert!(self.is_locked());
        // A `PageRef` may be reading these bytes as `&[u8]`.
        self.wait_pins_drained();
        // Loom: a scheduling point between the drain and the copy, which
        // real threads have, so the models can put a new pin there.
        #[cfg(loom)]
        crate::sync::yield_now();
        // SAFETY: in bounds (checked), inside the store view kept mapped
        // by `_store`; `src` is a distinct allocation. Other readers copy
        // without the lock as the kernel's filemap_read does.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.data.add(off), src.len()) }
    }

    /// [`zero_raw`](Self::zero_raw) if no [`PageRef`](crate::PageRef)
    /// pins the folio now, never waiting for one: `false` (nothing
    /// written) otherwise. Folio locked and uptodate.
    pub(crate) fn try_zero_raw(&self, off: usize, len: usize) -> bool {
        assert!(off.checked_add(len).is_some_and(|e| e <= self.size()));
        assert!(self.is_uptodate(), "try_zero_raw of a folio that is not uptodate");
        debug_assert!(self.is_locked());
        // Acquire, as in `wait_pins_drained`: a lockless pin whose flag RMW
        // came before our lock is counted here; a later one sees LOCKED
        // and backs off without reading.
        if self.pins.load(Ordering::Acquire) & PIN_COUNT != 0 {
            return false;
        }
        // SAFETY: as in `copy_in_raw`: inside the folio (asserted), the
        // folio locked, no pin (checked just above; new pins back off
        // while it is locked).
        unsafe { std::ptr::write_bytes(self.data.add(off), 0, len) }
        true
    }

    /// Zero `len` bytes at `off` with a raw write. Folio locked and
    /// uptodate: a folio that is not has no bytes to clear (its fill
    /// writes them all), and on a `Missing`-mode file the write would put
    /// pages into the page store, which the kernel maps without asking.
    pub(crate) fn zero_raw(&self, off: usize, len: usize) {
        assert!(off.checked_add(len).is_some_and(|e| e <= self.size()));
        assert!(self.is_uptodate(), "zero_raw of a folio that is not uptodate");
        debug_assert!(self.is_locked());
        // A `PageRef` may be reading these bytes as `&[u8]`.
        self.wait_pins_drained();
        // SAFETY: as in `copy_in_raw`.
        unsafe { std::ptr::write_bytes(self.data.add(off), 0, len) }
    }
}

struct SendPtr(NonNull<Folio>);
// SAFETY: a Folio is Send + Sync; the pointer is only dereferenced to free it.
unsafe impl Send for SendPtr {}

/// An owned reference to a folio (`folio_get` / `folio_put`).
pub struct FolioRef {
    ptr: NonNull<Folio>,
}

// SAFETY: Folio is Send + Sync and the reference count is atomic.
unsafe impl Send for FolioRef {}
// SAFETY: as above.
unsafe impl Sync for FolioRef {}

impl FolioRef {
    /// Wrap a pointer whose reference the caller just took with `try_get`.
    ///
    /// # Safety
    ///
    /// The caller owns one reference to the folio at `ptr`.
    pub(crate) unsafe fn from_raw(ptr: NonNull<Folio>) -> FolioRef {
        FolioRef { ptr }
    }

    /// `folio_lock`: sleep until the lock is ours.
    pub fn lock(self) -> FolioGuard {
        self.lock_raw();
        FolioGuard { folio: self }
    }

    /// `folio_trylock`: the lock if free now, else the reference back.
    pub fn trylock(self) -> Result<FolioGuard, FolioRef> {
        if self.trylock_raw() {
            Ok(FolioGuard { folio: self })
        } else {
            Err(self)
        }
    }

    /// Identity comparison.
    #[inline]
    pub fn ptr_eq(&self, other: &Folio) -> bool {
        std::ptr::eq(self.ptr.as_ptr(), other)
    }
}

impl Clone for FolioRef {
    fn clone(&self) -> Self {
        self.get();
        FolioRef { ptr: self.ptr }
    }
}

impl std::ops::Deref for FolioRef {
    type Target = Folio;
    #[inline]
    fn deref(&self) -> &Folio {
        // SAFETY: we own a reference, so the folio is not freed.
        unsafe { self.ptr.as_ref() }
    }
}

impl Drop for FolioRef {
    fn drop(&mut self) {
        // SAFETY: we own exactly one reference and give it up here.
        unsafe { Folio::put(self.ptr) }
    }
}

impl fmt::Debug for FolioRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

/// A locked folio: proof that the caller holds the folio lock. Dropping it
/// unlocks (and drops the reference).
pub struct FolioGuard {
    folio: FolioRef,
}

impl FolioGuard {
    /// `folio_unlock`, keeping the reference.
    pub fn unlock(self) -> FolioRef {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: `me` is never dropped, so the reference is moved out once.
        let folio = unsafe { std::ptr::read(&me.folio) };
        folio.unlock_raw();
        folio
    }

    /// The reference this guard holds.
    pub fn folio(&self) -> &FolioRef {
        &self.folio
    }

    /// `folio_mark_uptodate`: publish the filled contents. Release: pairs
    /// with the Acquire in [`Folio::is_uptodate`].
    pub fn mark_uptodate(&self) {
        self.folio.flags.fetch_or(UPTODATE, Ordering::Release);
        self.folio.flags.fetch_and(!ERROR, Ordering::Relaxed);
    }

    /// Raise the folio's private word to at least `v` (e.g. the LSN of the
    /// change just made to it): the value passed to
    /// [`AddressSpaceOps::write_barrier`](crate::aops::AddressSpaceOps::write_barrier)
    /// before the folio is written back. Never lowered while cached.
    pub fn set_private_max(&self, v: u64) {
        self.folio.private.fetch_max(v, Ordering::Relaxed);
    }

    /// `folio_set_error`: the fill failed; the folio stays not uptodate.
    /// What the failed fill put in the page store is freed: a `Missing`-mode
    /// mapping maps any page present there without asking upcache, and
    /// would show those torn bytes instead of faulting (and re-reading, or
    /// raising SIGBUS). The next fill starts from holes. Not on a hugetlb
    /// store: its mappings are `Minor`-mode (nothing maps a folio that is
    /// not uptodate), and the folio keeps the huge page it was given at
    /// creation, so that the retry needs none from the pool
    /// (`tests/hugetlb.rs`: a retry into the punched page failed).
    pub fn set_error(&self) {
        self.folio.flags.fetch_or(ERROR, Ordering::Release);
        if !self.folio.is_uptodate() {
            if let Some(store) = self.folio._store.as_ref().filter(|s| !s.is_hugetlb()) {
                // Nobody can hold a reference to the bytes of a locked folio
                // that is not uptodate (`data_mut` borrows this guard). A
                // failed punch leaves the torn pages; nothing better to do
                // here than say so.
                if let Err(e) = store.punch(self.pos(), self.size() as u64) {
                    eprintln!("upcache: freeing a failed fill's pages: {e}");
                }
            }
        }
    }

    /// The bytes of a folio being filled (`read_folio`, `readahead`).
    ///
    /// Only a locked folio that is **not uptodate** has bytes nobody else
    /// may look at: lockless readers (`copy_out`), `map_pages` and faults
    /// all wait for UPTODATE, and in `Missing` mode fills go through
    /// [`AddressSpace::fill_folio`](crate::aops::AddressSpace::fill_folio). Once
    /// a folio is uptodate its bytes are shared with user mappings and
    /// readers, so no `&mut [u8]` to them can exist: use
    /// [`Folio::copy_out`] and the address space's write paths instead.
    ///
    /// # Panics
    /// If the folio is uptodate.
    pub fn data_mut(&mut self) -> &mut [u8] {
        assert!(
            !self.folio.is_uptodate(),
            "FolioGuard::data_mut on an uptodate folio: its bytes are shared"
        );
        // SAFETY: the range is the folio's own slot in the page store view,
        // kept mapped by the folio (`_store`); the folio is locked and not
        // uptodate, so no reader, mapping or writer touches it (see above),
        // and `&mut self` makes this the only slice.
        unsafe { std::slice::from_raw_parts_mut(self.folio.data, self.folio.size()) }
    }
}

impl FolioGuard {
    /// Free a folio whose references were frozen to zero and which has left
    /// the index: unlock it and release its memory through the epoch.
    pub(crate) fn free_frozen(self) {
        debug_assert_eq!(self.folio.ref_count(), 0);
        debug_assert_eq!(self.folio.mapping_id(), 0);
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: `me` is never dropped, so the reference is moved out once;
        // it is then forgotten because the count is already zero.
        let folio = unsafe { std::ptr::read(&me.folio) };
        // Nobody waits on the lock: a waiter holds a reference, and the
        // count was frozen from exactly ours and the index's.
        folio.flags.fetch_and(!LOCKED, Ordering::Release);
        let p = SendPtr(folio.ptr);
        std::mem::forget(folio);
        let guard = epoch::pin();
        // SAFETY: the count is zero and frozen (try_get fails), the folio is
        // out of the index, and we held the last reference; pinned readers
        // that loaded the pointer before removal are protected by deferring.
        unsafe {
            guard.defer_unchecked(move || {
                let p = p;
                drop(Box::from_raw(p.0.as_ptr()));
            });
        }
    }
}

impl std::ops::Deref for FolioGuard {
    type Target = Folio;
    #[inline]
    fn deref(&self) -> &Folio {
        &self.folio
    }
}

impl Drop for FolioGuard {
    fn drop(&mut self) {
        self.folio.unlock_raw();
    }
}

impl fmt::Debug for FolioGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FolioGuard").field(&*self.folio).finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    /// Metadata per cached folio stays within the 56 bytes issue #12 holds
    /// it to (the kernel's `struct page` is 64): a one-page folio costs
    /// this plus its 8-byte index slot.
    #[test]
    fn folio_metadata_is_at_most_56_bytes() {
        assert!(
            std::mem::size_of::<super::Folio>() <= 56,
            "struct Folio is {} bytes",
            std::mem::size_of::<super::Folio>()
        );
    }
}
