//! The ★ rules of the locking contract, checked inside the engine's
//! callbacks: a store that asserts, on every call, the lock state
//! `locking-rules.md` prescribes. A violated rule panics inside the
//! callback and fails the test. Each callback also counts its calls so the
//! test proves the checks actually ran.

mod common;

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use common::{tempdir, Rng};
use upcache::aops::{AddressSpace, AddressSpaceOps, FolioGuard, LockState, ReadaheadControl, WritebackControl};
use upcache::{FileStore, PageCache, StoreOps};

#[derive(Default)]
struct Calls {
    read_folio: AtomicUsize,
    readahead: AtomicUsize,
    writepage: AtomicUsize,
    write_begin: AtomicUsize,
    write_end: AtomicUsize,
    invalidate_folio: AtomicUsize,
    dirty_folio: AtomicUsize,
    free_folio: AtomicUsize,
}

struct Checking {
    inner: StoreOps<FileStore>,
    calls: Arc<Calls>,
}

impl AddressSpaceOps for Checking {
    fn read_folio(&self, m: &AddressSpace, folio: FolioGuard) -> io::Result<()> {
        self.calls.read_folio.fetch_add(1, Relaxed);
        assert!(folio.is_locked(), "read_folio: folio must be locked on entry");
        assert!(!folio.is_uptodate(), "read_folio on an uptodate folio");
        assert_eq!(
            m.invalidate_lock_state(),
            LockState::Shared,
            "read_folio: invalidate_lock must be held shared"
        );
        // The guard moves into the op, which unlocks by dropping it: the
        // "unlocked on return" rule is enforced by the type.
        self.inner.read_folio(m, folio)
    }

    fn readahead(&self, m: &AddressSpace, rac: &mut ReadaheadControl) {
        self.calls.readahead.fetch_add(1, Relaxed);
        assert_eq!(
            m.invalidate_lock_state(),
            LockState::Shared,
            "readahead: invalidate_lock must be held shared"
        );
        while let Some(folio) = rac.next_folio() {
            assert!(folio.is_locked(), "readahead: each folio locked");
            let _ = self.read_folio(m, folio);
        }
    }

    fn writepage(&self, m: &AddressSpace, folio: FolioGuard, wbc: &mut WritebackControl) -> io::Result<()> {
        self.calls.writepage.fetch_add(1, Relaxed);
        assert!(folio.is_locked(), "writepage: folio locked on entry");
        assert!(!folio.is_writeback(), "writepage: not yet under writeback");
        assert!(
            !folio.is_dirty(),
            "writepage: dirty bit cleared for I/O before the call"
        );
        // Start writeback ourselves to check WRITEBACK is set before the
        // folio is unlocked, then let the generic code do the write.
        let f = folio.folio().clone();
        let pos = folio.pos();
        let len = folio.size().min(m.size().saturating_sub(pos) as usize);
        let wb = m.folio_start_writeback(folio);
        assert!(f.is_writeback(), "WRITEBACK set by folio_start_writeback");
        assert!(
            !f.is_locked() || f.is_writeback(),
            "unlocked only once WRITEBACK is set"
        );
        use upcache::BackingStore;
        let r = self.inner.store().write_all_at(&wb.data()[..len], pos);
        match r {
            Ok(()) => wb.end(),
            Err(ref e) => wb.end_with_error(e.raw_os_error().unwrap_or(5)),
        }
        let _ = wbc;
        r
    }

    fn dirty_folio(&self, _m: &AddressSpace, folio: &upcache::aops::Folio) {
        self.calls.dirty_folio.fetch_add(1, Relaxed);
        assert!(
            folio.is_locked() || folio.is_writeback(),
            "dirty_folio: folio locked or under writeback"
        );
        assert!(folio.is_dirty());
    }

    fn write_begin(&self, m: &AddressSpace, pos: u64, len: usize) -> io::Result<FolioGuard> {
        self.calls.write_begin.fetch_add(1, Relaxed);
        assert_eq!(
            m.inode_lock_state(),
            LockState::Exclusive,
            "write_begin: i_rwsem exclusive"
        );
        let g = upcache::aops::generic_write_begin(m, pos, len)?;
        assert!(g.is_locked());
        Ok(g)
    }

    fn write_end(&self, m: &AddressSpace, pos: u64, copied: usize, folio: FolioGuard) -> usize {
        self.calls.write_end.fetch_add(1, Relaxed);
        assert!(folio.is_locked(), "write_end: folio locked on entry");
        assert_eq!(
            m.inode_lock_state(),
            LockState::Exclusive,
            "write_end: i_rwsem exclusive"
        );
        upcache::aops::generic_write_end(m, pos, copied, folio)
    }

    fn invalidate_folio(&self, m: &AddressSpace, folio: &FolioGuard, offset: usize, len: usize) {
        self.calls.invalidate_folio.fetch_add(1, Relaxed);
        assert!(folio.is_locked(), "invalidate_folio: folio locked");
        assert!(!folio.is_writeback(), "invalidate_folio: writeback waited for");
        assert_eq!(
            m.invalidate_lock_state(),
            LockState::Exclusive,
            "invalidate_folio: invalidate_lock exclusive"
        );
        assert_eq!(m.inode_lock_state(), LockState::Exclusive, "truncate holds i_rwsem");
        assert!(offset + len <= folio.size());
    }

    fn free_folio(&self, _m: &AddressSpace, folio: &upcache::aops::Folio) {
        self.calls.free_folio.fetch_add(1, Relaxed);
        assert!(folio.is_locked(), "free_folio: folio locked");
    }

    fn initial_size(&self) -> io::Result<u64> {
        self.inner.initial_size()
    }
    fn set_size(&self, size: u64) -> io::Result<()> {
        self.inner.set_size(size)
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(off, len)
    }
    fn fsync(&self) -> io::Result<()> {
        self.inner.fsync()
    }
}

#[test]
fn callbacks_run_with_the_documented_locks_held() {
    let dir = tempdir();
    let path = dir.path().join("f");
    let mut rng = Rng::new(9);
    let mut content = vec![0u8; 300 * 1024];
    rng.fill(&mut content);
    std::fs::write(&path, &content).unwrap();

    let calls = Arc::new(Calls::default());
    let cache = PageCache::new();
    let ops = Checking {
        inner: StoreOps::new(FileStore::open(&path).unwrap()),
        calls: calls.clone(),
    };
    let file = cache.open_with_ops("checked", ops).unwrap();
    let mut buf = vec![0u8; 10_000];
    for i in 0..2_000u64 {
        let off = rng.below(400 * 1024);
        match i % 7 {
            0..=2 => {
                file.read_at(&mut buf, off).unwrap();
            }
            3 | 4 => {
                let len = 1 + rng.below(9_000) as usize;
                file.write_at(&buf[..len], off).unwrap();
            }
            5 => {
                if i % 35 == 5 {
                    file.truncate(rng.below(400 * 1024)).unwrap();
                } else {
                    file.punch_hole(off, 1 + rng.below(40_000)).unwrap();
                }
            }
            _ => file.fsync().unwrap(),
        }
    }
    file.close().unwrap();
    for (name, c) in [
        ("read_folio", &calls.read_folio),
        ("readahead", &calls.readahead),
        ("writepage", &calls.writepage),
        ("write_begin", &calls.write_begin),
        ("write_end", &calls.write_end),
        ("invalidate_folio", &calls.invalidate_folio),
        ("dirty_folio", &calls.dirty_folio),
        ("free_folio", &calls.free_folio),
    ] {
        assert!(c.load(Relaxed) > 0, "{name} was never called: its checks did not run");
    }
}

#[test]
fn concurrent_callbacks_keep_their_locks() {
    // Several threads at once: the assertions above must hold under
    // contention too (a reader's read_folio while a writer truncates...).
    let dir = tempdir();
    let path = dir.path().join("g");
    std::fs::write(&path, vec![7u8; 256 * 1024]).unwrap();
    let calls = Arc::new(Calls::default());
    let cache = PageCache::new();
    let ops = Checking {
        inner: StoreOps::new(FileStore::open(&path).unwrap()),
        calls: calls.clone(),
    };
    let file = Arc::new(cache.open_with_ops("checked", ops).unwrap());
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let file = file.clone();
            s.spawn(move || {
                let mut rng = Rng::new(100 + t);
                let mut buf = vec![0u8; 8192];
                for i in 0..1500 {
                    let off = rng.below(256 * 1024);
                    match (i + t) % 6 {
                        0..=2 => {
                            file.read_at(&mut buf, off).unwrap();
                        }
                        3 => {
                            file.write_at(&buf[..1 + rng.below(8192) as usize], off).unwrap();
                        }
                        4 => file.punch_hole(off, 1 + rng.below(30_000)).unwrap(),
                        _ => file.fsync().unwrap(),
                    }
                }
            });
        }
    });
    assert!(calls.read_folio.load(Relaxed) > 0 && calls.writepage.load(Relaxed) > 0);
}
