//! Regression tests for the integrity issue (#8): no acknowledged write
//! lost, no divergence between the cache and the store. Each exact
//! sequence below failed before its fix.

#[macro_use]
mod common;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{tempdir, watchdog, HookStore, StoreOp};
use upcache::{PageCache, Share, StoreOps, PAGE_SIZE};

/// `read_at(1 byte at 0)` makes a large folio at 0; a write inside it at
/// 32768 and `sync_range(32768, 32777)` must put the bytes on disk (the
/// ranged walk used to start at the range's first index and skip the folio
/// whose head is before it).
#[test]
fn sync_range_covers_a_large_folio_that_starts_before_the_range() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![0u8; 256 * 1024]).unwrap();
    let cache = PageCache::new();
    let file = cache.open(&path).unwrap();
    let mut b = [0u8; 1];
    file.read_at(&mut b, 0).unwrap();
    file.write_at(b"0123456789", 32768).unwrap();
    file.sync_range(32768, 32777).unwrap();
    let disk = std::fs::read(&path).unwrap();
    assert_eq!(
        &disk[32768..32778],
        b"0123456789",
        "sync_range returned Ok without writing"
    );
}

/// The same through a mapping: `flush` of a sub-range.
#[test]
fn mmap_flush_range_covers_a_large_folio_that_starts_before_it() {
    watchdog("flush sub-range", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 256 * 1024]).unwrap();
        let cache = PageCache::new();
        let file = cache.open(&path).unwrap();
        let mut b = [0u8; 1];
        file.read_at(&mut b, 0).unwrap();
        // SAFETY: only this thread touches the mapping.
        let mut map = unsafe { file.mmap_mut(32768, 4096, Share::Shared) }.unwrap();
        map[5] = 0x5A;
        map.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap()[32768 + 5], 0x5A);
        drop(map);
    });
}

/// Empty file; `write_at(12288 at 0)`; `punch_hole(8192, 4096)`; `fsync`:
/// the file on disk must be 12288 bytes (the punch dropped the dirty tail
/// folio of the extending write, which the store had never seen).
#[test]
fn punch_keeps_the_file_size_on_disk() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, b"").unwrap();
    let cache = PageCache::new();
    let file = cache.open(&path).unwrap();
    file.write_at(&vec![7u8; 12288], 0).unwrap();
    file.punch_hole(8192, 4096).unwrap();
    file.fsync().unwrap();
    assert_eq!(file.len().unwrap(), 12288);
    let disk = std::fs::read(&path).unwrap();
    assert_eq!(disk.len(), 12288, "on-disk size after fsync must equal len()");
    assert!(disk[..8192].iter().all(|&x| x == 7));
    assert!(disk[8192..].iter().all(|&x| x == 0));
}

/// Switches that make the store's `set_len` / `punch_hole` fail.
#[derive(Default)]
struct Refuse {
    set_len: AtomicBool,
    punch: AtomicBool,
}

/// A store refusing what `refuse` says, and the switches.
fn refusing(path: &std::path::Path) -> (HookStore, Arc<Refuse>) {
    let refuse = Arc::new(Refuse::default());
    let r = refuse.clone();
    let store = HookStore::new(path, move |op, _, _| match op {
        StoreOp::SetLen if r.set_len.load(Ordering::Relaxed) => Err(io::Error::from_raw_os_error(libc::EIO)),
        StoreOp::Punch if r.punch.load(Ordering::Relaxed) => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        _ => Ok(()),
    });
    (store, refuse)
}

/// A truncate the store refuses changes nothing: size, cached bytes and
/// disk stay as they were.
#[test]
fn refused_truncate_changes_nothing() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![3u8; 256 * 1024]).unwrap();
    let (store, refuse) = refusing(&path);
    let cache = PageCache::new();
    let file = cache.open_with_ops("refusing", StoreOps::new(store)).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    file.read_at(&mut buf, 0).unwrap();
    refuse.set_len.store(true, Ordering::Relaxed);
    assert!(file.truncate(100 * 1024).is_err());
    assert_eq!(file.len().unwrap(), 256 * 1024, "size changed by a refused truncate");
    assert!(file.truncate(300 * 1024).is_err());
    assert_eq!(file.len().unwrap(), 256 * 1024, "size changed by a refused grow");
    file.fsync().unwrap();
    let mut again = vec![0u8; 256 * 1024];
    assert_eq!(file.read_at(&mut again, 0).unwrap(), 256 * 1024);
    assert!(
        again.iter().all(|&x| x == 3),
        "cached bytes changed by a refused truncate"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 256 * 1024);
}

/// ext4 refuses a size past its own maximum with EFBIG: `len()` must not
/// change.
#[test]
fn truncate_past_the_filesystem_maximum_changes_nothing() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![1u8; 10_000]).unwrap();
    let cache = PageCache::new();
    let file = cache.open(&path).unwrap();
    let r = file.truncate(upcache::MAX_FILE_SIZE);
    if r.is_err() {
        assert_eq!(file.len().unwrap(), 10_000, "len() changed by a failed truncate");
    } else {
        assert_eq!(std::fs::metadata(&path).unwrap().len(), upcache::MAX_FILE_SIZE);
        file.truncate(10_000).unwrap();
    }
    file.fsync().unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), file.len().unwrap());
}

/// A punch the store refuses must not revert unsynced writes in the range
/// to older on-disk data.
#[test]
fn failed_punch_keeps_unsynced_writes() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![1u8; 64 * 1024]).unwrap();
    let (store, refuse) = refusing(&path);
    let cache = PageCache::new();
    let file = cache.open_with_ops("refusing", StoreOps::new(store)).unwrap();
    file.write_at(&vec![9u8; 16 * 1024], 8192).unwrap();
    refuse.punch.store(true, Ordering::Relaxed);
    assert!(file.punch_hole(8192, 16 * 1024).is_err());
    let mut buf = vec![0u8; 16 * 1024];
    file.read_at(&mut buf, 8192).unwrap();
    assert!(buf.iter().all(|&x| x == 9), "failed punch reverted unsynced writes");
    file.fsync().unwrap();
    let disk = std::fs::read(&path).unwrap();
    assert!(disk[8192..8192 + 16 * 1024].iter().all(|&x| x == 9));
}

/// Builder values and arguments that used to overflow or panic.
#[test]
fn extreme_arguments_are_validated_or_saturate() {
    watchdog("extreme arguments", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 64 * 1024]).unwrap();
        let cache = PageCache::builder().fault_spin(Duration::MAX).build();
        let file = cache.open(&path).unwrap();
        file.write_at(b"x", 0).unwrap();
        assert!(file.writeback(i64::MIN).is_ok());
        assert!(file.writeback(i64::MAX).is_ok());
        // The handler threads must survive an unbounded spin setting.
        // SAFETY: only this thread touches the mapping.
        let map = unsafe { file.mmap(0, 64 * 1024, Share::Shared) }.unwrap();
        assert_eq!(map[0], b'x');
        assert_eq!(map[40_000], 1);
        drop(map);
        let err = cache.open("bad\0path").unwrap_err();
        assert_eq!(err.raw_os_error(), libc::EINVAL, "{err}");
        let missing = dir.path().join("missing");
        let err = cache.open(&missing).unwrap_err();
        assert_eq!(err.raw_os_error(), libc::ENOENT);
        assert!(err.to_string().contains("missing"), "error names the path: {err}");
    });
}

/// Page size sanity for the tests above.
#[test]
fn page_size_is_4k() {
    assert_eq!(PAGE_SIZE, 4096);
}

/// The last user of a file (here a mapping that outlived its handle) writes
/// its dirty folios back while its address space is being dropped. An open
/// of the same file meanwhile must wait for that write, as the kernel's
/// `iget` waits for an inode being freed: a fresh address space would read
/// the old bytes from the store, and the dying one's late write would then
/// overwrite what the new handle writes. `sync_all` must wait for it too,
/// or it returns with the data not in the store.
///
/// The store's write blocks at a gate; the reopen and the `sync_all` run
/// in threads. The bounded wait below only decides when to open the gate:
/// a correct cache passes whatever the timing (both threads wait for the
/// gate), the old one failed because the reopen returned at once and read
/// the old byte.
#[test]
fn reopen_and_sync_all_wait_for_the_last_users_writeback() {
    watchdog("reopen vs the last user's writeback", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 4 * PAGE_SIZE]).unwrap();
        let gate = common::Gate::new(false);
        let armed = Arc::new(AtomicBool::new(false));
        let (g, a) = (gate.clone(), armed.clone());
        let store = HookStore::new(&path, move |op, _, _| {
            if op == StoreOp::Write && a.swap(false, Ordering::SeqCst) {
                g.pass();
            }
            Ok(())
        });
        let cache = Arc::new(PageCache::new());
        let file = cache.open_with_ops("f", StoreOps::new(store)).unwrap();
        let map = file.mmap_raw(0, 4 * PAGE_SIZE).unwrap();
        drop(file);
        map.write(100, &[9]);
        // The next store write (the dying address space's) waits.
        armed.store(true, Ordering::SeqCst);
        let dropper = std::thread::spawn(move || drop(map));
        gate.wait_arrived();
        let (tx, rx) = std::sync::mpsc::channel();
        let (c, p, t) = (cache.clone(), path.clone(), tx.clone());
        let reopen = std::thread::spawn(move || {
            let f = c
                .open_with_ops("f", StoreOps::new(upcache::FileStore::open(&p).unwrap()))
                .unwrap();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, 100).unwrap();
            let _ = t.send(("reopen", b[0]));
        });
        let (c, p, t) = (cache.clone(), path.clone(), tx);
        let syncer = std::thread::spawn(move || {
            c.sync_all().unwrap();
            let _ = t.send(("sync_all", std::fs::read(&p).unwrap()[100]));
        });
        let early = rx.recv_timeout(Duration::from_millis(500)).ok();
        gate.open();
        dropper.join().unwrap();
        reopen.join().unwrap();
        syncer.join().unwrap();
        let mut seen: Vec<_> = early.into_iter().chain(rx.try_iter()).collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![("reopen", 9), ("sync_all", 9)],
            "a reopen or sync_all did not wait for the last user's write-back"
        );
    });
}

/// The last user's drop signals its end even when it unwinds (an engine
/// `writepage` that panics during the drop's write-back): a later open of
/// the file and `sync_all` must not wait for it for ever.
///
/// Async dirty tracking, so that the write before the drop takes no
/// userfault (the kernel resolves it) and no handler thread holds the
/// mapping when it goes: the drop's write-back is the first store write
/// after the hook is armed. The hook panics once only (a second panic
/// while unwinding would abort the test binary).
#[test]
fn a_drop_that_unwinds_does_not_block_reopen_or_sync_all() {
    watchdog("reopen after a panicking drop", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 4 * PAGE_SIZE]).unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let a = armed.clone();
        let store = HookStore::new(&path, move |op, _, _| {
            if op == StoreOp::Write && a.swap(false, Ordering::SeqCst) {
                panic!("the engine's write panics (planted)");
            }
            Ok(())
        });
        let cache = PageCache::builder()
            .mmap_mode(upcache::UffdMode::Minor)
            .dirty_tracking(upcache::DirtyTracking::Async)
            .build();
        let file = cache.open_with_ops("f", StoreOps::new(store)).unwrap();
        let map = file.mmap_raw(0, 4 * PAGE_SIZE).unwrap();
        map.write(100, &[8]);
        file.fsync().unwrap();
        drop(file);
        map.write(100, &[9]);
        armed.store(true, Ordering::SeqCst);
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(map)));
        // The drop's write-back failed (the engine panicked), and the file
        // is gone with its dirty byte: `sync_all` reports that once.
        assert!(
            cache.sync_all().is_err(),
            "the dropped file's failed write-back is reported"
        );
        cache.sync_all().unwrap();
        let f = cache
            .open_with_ops("f", StoreOps::new(upcache::FileStore::open(&path).unwrap()))
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b[0], 1);
    });
}

/// A one-time race for a store hook: the hook's `meet` (first call only)
/// lets the racing thread go and waits until it is done.
struct Race(std::sync::Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>);

/// The racing thread's side of a [`Race`].
struct Racer {
    go: std::sync::mpsc::Receiver<()>,
    done: std::sync::mpsc::Sender<()>,
}

fn race() -> (Race, Racer) {
    let (go_tx, go) = std::sync::mpsc::channel();
    let (done, done_rx) = std::sync::mpsc::channel();
    (Race(std::sync::Mutex::new(Some((go_tx, done_rx)))), Racer { go, done })
}

impl Race {
    /// The first call runs the racer to its end; later calls return false.
    fn meet(&self) -> bool {
        let taken = self.0.lock().unwrap().take();
        let Some((go, done)) = taken else {
            return false;
        };
        go.send(()).unwrap();
        done.recv().unwrap();
        true
    }
}

impl Racer {
    /// Wait for the hook's `meet`, run `f`, report it done.
    fn run(self, f: impl FnOnce()) {
        self.go.recv().unwrap();
        f();
        self.done.send(()).unwrap();
    }
}

/// How the write racing a punch reaches its page.
#[derive(Clone, Copy, Debug)]
enum Via {
    PageMut,
    Mapping,
}

/// `write_at` dirties pages 2 and 3; `punch_hole` of both, with a store
/// that refuses the punch. While the punch writes page 3 back, another
/// thread writes page 2 again (already written back, clean by then). The
/// punch fails, so it must change nothing: page 2 holds the racing write,
/// in the cache and, after `fsync`, on disk. Before the fix the punch
/// dropped page 2's folio, dirty, without writing it, then the store
/// refused: page 2 read the older bytes of its first write-back.
fn failed_punch_keeps_a_write_that_raced_it(cache: PageCache, via: Via) {
    const P: usize = PAGE_SIZE;
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![1u8; 8 * P]).unwrap();
    let (race, racer) = race();
    let store = HookStore::new(&path, move |op, off, _| match op {
        StoreOp::Punch => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        StoreOp::Write if off == 3 * P as u64 => {
            race.meet();
            Ok(())
        }
        _ => Ok(()),
    });
    let file = cache.open_with_ops("f", StoreOps::new(store)).unwrap();
    let raw = matches!(via, Via::Mapping).then(|| file.mmap_raw(0, 8 * P).unwrap());
    file.write_at(&[9u8; 2 * P], 2 * P as u64).unwrap();
    std::thread::scope(|s| {
        let (raw, file) = (&raw, &file);
        s.spawn(move || {
            racer.run(|| match (raw, via) {
                (Some(raw), Via::Mapping) => raw.write(2 * P, &[7u8; P]),
                _ => {
                    // SAFETY: no mapping of the file exists in this case.
                    let mut page = unsafe { file.get_page_mut(2) }.unwrap();
                    page.fill(7);
                }
            })
        });
        let r = file.punch_hole(2 * P as u64, 2 * P as u64);
        assert!(r.is_err(), "the store refuses every punch: {r:?}");
    });
    let mut buf = vec![0u8; 2 * P];
    file.read_exact_at(&mut buf, 2 * P as u64).unwrap();
    assert!(
        buf[..P].iter().all(|&b| b == 7),
        "{via:?}: a write that raced a failed punch was lost (page 2 reads {})",
        buf[0]
    );
    assert!(
        buf[P..].iter().all(|&b| b == 9),
        "{via:?}: page 3 changed by a failed punch"
    );
    if let Some(raw) = &raw {
        let mut m = vec![0u8; 2 * P];
        raw.read(2 * P, &mut m);
        assert_eq!(m, buf, "{via:?}: the mapping and read_at disagree");
    }
    file.fsync().unwrap();
    drop(raw);
    let disk = std::fs::read(&path).unwrap();
    assert!(
        disk[2 * P..3 * P].iter().all(|&b| b == 7),
        "{via:?}: not on disk after fsync"
    );
}

#[test]
fn failed_punch_keeps_a_page_mut_write_that_raced_it() {
    watchdog("punch vs PageMut", 60, || {
        failed_punch_keeps_a_write_that_raced_it(PageCache::new(), Via::PageMut)
    });
}

#[test]
fn failed_punch_keeps_a_mapped_write_that_raced_it() {
    watchdog("punch vs mapped write, Missing mode", 60, || {
        failed_punch_keeps_a_write_that_raced_it(PageCache::new(), Via::Mapping)
    });
    watchdog("punch vs mapped write, Minor mode", 60, || {
        let cache = PageCache::builder().mmap_mode(upcache::UffdMode::Minor).build();
        failed_punch_keeps_a_write_that_raced_it(cache, Via::Mapping)
    });
    watchdog("punch vs mapped write, Async tracking", 60, || {
        let cache = PageCache::builder()
            .dirty_tracking(upcache::DirtyTracking::Async)
            .build();
        failed_punch_keeps_a_write_that_raced_it(cache, Via::Mapping)
    });
}

/// As above, but the write-back of the page written during the punch
/// fails: the punch must stop with `EIO` before the store's punch (the
/// store would otherwise lose the page, which only the cache holds), keep
/// the page cached and dirty, and a later `fsync` must put it on disk.
#[test]
fn punch_stops_before_the_store_when_a_page_written_during_it_cannot_be_written() {
    watchdog("punch vs PageMut, failing write-back", 60, || {
        const P: usize = PAGE_SIZE;
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 8 * P]).unwrap();
        let (race, racer) = race();
        let raced = Arc::new(AtomicBool::new(false));
        let failing = Arc::new(AtomicBool::new(true));
        let punched = Arc::new(AtomicBool::new(false));
        let (r2, f2, p2) = (raced.clone(), failing.clone(), punched.clone());
        let store = HookStore::new(&path, move |op, off, _| match op {
            StoreOp::Punch => {
                p2.store(true, Ordering::SeqCst);
                Ok(())
            }
            StoreOp::Write if off == 3 * P as u64 => {
                if race.meet() {
                    r2.store(true, Ordering::SeqCst);
                }
                Ok(())
            }
            StoreOp::Write if off == 2 * P as u64 && r2.load(Ordering::SeqCst) && f2.load(Ordering::SeqCst) => {
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
            _ => Ok(()),
        });
        let cache = PageCache::new();
        let file = cache.open_with_ops("f", StoreOps::new(store)).unwrap();
        file.write_at(&[9u8; 2 * P], 2 * P as u64).unwrap();
        std::thread::scope(|s| {
            let file = &file;
            s.spawn(move || {
                racer.run(|| {
                    // SAFETY: no mapping of the file exists.
                    let mut page = unsafe { file.get_page_mut(2) }.unwrap();
                    page.fill(7);
                })
            });
            let err = file.punch_hole(2 * P as u64, 2 * P as u64).unwrap_err();
            assert_eq!(err.raw_os_error(), libc::EIO, "{err}");
        });
        assert!(
            !punched.load(Ordering::SeqCst),
            "the store punched a range whose page only the cache held"
        );
        let mut buf = vec![0u8; 2 * P];
        file.read_exact_at(&mut buf, 2 * P as u64).unwrap();
        assert!(buf[..P].iter().all(|&b| b == 7), "page 2 lost: reads {}", buf[0]);
        assert!(buf[P..].iter().all(|&b| b == 9), "page 3 changed: reads {}", buf[P]);
        failing.store(false, Ordering::SeqCst);
        // The failed write-back is reported once; the data stays dirty
        // and the next sync writes it.
        let _ = file.fsync();
        file.fsync().unwrap();
        let disk = std::fs::read(&path).unwrap();
        assert!(disk[2 * P..3 * P].iter().all(|&b| b == 7), "page 2 not on disk");
        assert!(disk[3 * P..4 * P].iter().all(|&b| b == 9), "page 3 not on disk");
    });
}

/// A store sync that fails covers the bytes every handle of the file gave
/// the store: a second handle's `fsync` that runs while the failing sync
/// is still in the store must report that failure, not succeed on the
/// store's next (clean) sync — the kernel reports a descriptor's error to
/// one `fdatasync` only, and both handles share the store's descriptor
/// (found by review, thirteenth session: the error was recorded only
/// after the failing sync returned).
#[test]
fn a_failed_store_sync_reaches_a_concurrent_fsync_of_another_handle() {
    watchdog("concurrent fsyncs of two handles", 120, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, [0u8; PAGE_SIZE]).unwrap();
        let gate = common::Gate::new(false);
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (g, s) = (gate.clone(), syncs.clone());
        let store = HookStore::new(&path, move |op, _, _| {
            if op == StoreOp::Sync && s.fetch_add(1, Ordering::SeqCst) == 0 {
                g.pass();
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            Ok(())
        });
        let cache = PageCache::new();
        let h1 = cache.open_with_ops("f", StoreOps::new(store)).unwrap();
        // The same file: this open's operations are dropped unused.
        let h2 = cache
            .open_with_ops("f", StoreOps::new(upcache::FileStore::open(&path).unwrap()))
            .unwrap();
        h2.write_at(b"B", 0).unwrap();
        std::thread::scope(|sc| {
            // h1's fsync writes "B" back, then its store sync fails (held
            // at the gate meanwhile).
            let a = sc.spawn(|| h1.fsync());
            gate.wait_arrived();
            let (tx, rx) = std::sync::mpsc::channel();
            let b = sc.spawn(move || {
                tx.send(common::gettid()).unwrap();
                h2.fsync()
            });
            common::wait_until_parked(rx.recv().unwrap(), || b.is_finished());
            gate.open();
            assert!(a.join().unwrap().is_err(), "the failing sync's own fsync");
            let r = b.join().unwrap();
            assert_eq!(
                r.as_ref().map_err(|e| e.raw_os_error()),
                Err(libc::EIO),
                "h2's fsync during the failing store sync that covered its write: {r:?}"
            );
        });
    });
}

/// The last user of a file going (here a mapping, after the handle was
/// dropped) syncs the store when write-back gave it bytes since the last
/// sync: drop flushes, and `sync_all` after it has no file left to sync
/// (found by review, thirteenth session: the drop synced only when folios
/// were still dirty, so bytes a background write-back wrote were never
/// synced).
#[test]
fn the_last_user_going_syncs_what_write_back_gave_the_store() {
    watchdog("the last user's drop", 120, last_user_going_syncs);
}

fn last_user_going_syncs() {
    /// Says when the store (the address space's operations) is dropped:
    /// after the address space's drop has run.
    struct Dropped(std::sync::mpsc::Sender<()>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, [0u8; 2 * PAGE_SIZE]).unwrap();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = log.clone();
    let (tx, gone) = std::sync::mpsc::channel();
    let dropped = Dropped(tx);
    let store = HookStore::new(&path, move |op, _, _| {
        let _ = &dropped;
        l.lock().unwrap().push(op);
        Ok(())
    });
    let cache = PageCache::new();
    let f = cache.open_with_ops("f", StoreOps::new(store)).unwrap();
    let m = f.mmap_raw(0, 2 * PAGE_SIZE).unwrap();
    drop(f);
    m.write(0, b"X");
    // Cleansing write-back: the store gets the byte, no sync.
    m.flush_async().unwrap();
    let wrote = log.lock().unwrap().iter().rposition(|&op| op == StoreOp::Write);
    let wrote = wrote.expect("flush_async wrote the page to the store");
    drop(m);
    // The address space is gone (its last reference may have been a
    // handler thread's): `sync_all` now has nothing of it to sync.
    gone.recv().unwrap();
    let log = log.lock().unwrap();
    assert!(
        log[wrote..].contains(&StoreOp::Sync),
        "no store sync after the last write-back: {log:?}"
    );
    assert_eq!(std::fs::read(&path).unwrap()[0], b'X');
}

/// Engine operations whose first `writepage` unlocks the folio clean and
/// fails only after a gate opens (an engine error, or a panic, after it
/// let the folio go): a window in which the folio is clean, unlocked and
/// not under writeback, its bytes never written.
struct FailAfterUnlock {
    inner: StoreOps<upcache::FileStore>,
    gate: Arc<common::Gate>,
    first: AtomicBool,
}

impl upcache::aops::AddressSpaceOps for FailAfterUnlock {
    delegate_to_inner!(read_folio);
    delegate_to_inner!();
    fn writepage(
        &self,
        m: &upcache::aops::AddressSpace,
        f: upcache::aops::FolioGuard,
        wbc: &mut upcache::aops::WritebackControl,
    ) -> io::Result<()> {
        if self.first.swap(false, Ordering::SeqCst) {
            drop(f);
            self.gate.pass();
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.writepage(m, f, wbc)
    }
}

/// An `fsync` that runs while a failing `writepage` has left its folio
/// clean and unlocked (before the caller dirties it again) still writes
/// the folio, or fails: it took the folio for "cleaned by someone else"
/// and returned `Ok` with the byte not in the store (found by review,
/// thirteenth session).
#[test]
fn fsync_during_a_failed_writepage_window_writes_the_folio() {
    watchdog("fsync in a failed writepage's window", 120, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, [0u8; PAGE_SIZE]).unwrap();
        let gate = common::Gate::new(false);
        let cache = PageCache::new();
        let ops = FailAfterUnlock {
            inner: StoreOps::new(upcache::FileStore::open(&path).unwrap()),
            gate: gate.clone(),
            first: AtomicBool::new(true),
        };
        let f = cache.open_with_ops("f", ops).unwrap();
        f.write_at(b"W", 0).unwrap();
        std::thread::scope(|s| {
            let a = s.spawn(|| f.writeback(1));
            gate.wait_arrived();
            let r = f.fsync();
            let stored = std::fs::read(&path).unwrap()[0];
            gate.open();
            assert!(a.join().unwrap().is_err(), "the failing writepage's caller");
            if r.is_ok() {
                assert_eq!(stored, b'W', "fsync returned Ok without the byte in the store");
            }
        });
        // Whatever happened, a later fsync leaves the byte in the store.
        f.fsync().unwrap();
        assert_eq!(std::fs::read(&path).unwrap()[0], b'W');
    });
}

/// Open `path` with [`FailAfterUnlock`] operations, write "W" at 0, and
/// run a background write-back of up to `nr` pages whose `writepage`
/// fails after unlocking the folio clean while this thread then holds a
/// `PageMut` of it, so the failing caller cannot dirty it again. Returns
/// the file, its folio at 0 clean but still tagged DIRTY.
fn fail_background_writepage_under_page_mut(cache: &PageCache, path: &std::path::Path, nr: i64) -> upcache::File {
    let gate = common::Gate::new(false);
    let ops = FailAfterUnlock {
        inner: StoreOps::new(upcache::FileStore::open(path).unwrap()),
        gate: gate.clone(),
        first: AtomicBool::new(true),
    };
    let f = cache.open_with_ops("f", ops).unwrap();
    f.write_at(b"W", 0).unwrap();
    let m = f.address_space().unwrap();
    std::thread::scope(|s| {
        let a = s.spawn(|| {
            let mut wbc = upcache::aops::WritebackControl::none(nr);
            wbc.for_background = true;
            m.writepages(&mut wbc)
        });
        gate.wait_arrived();
        // SAFETY: the file has no mapping.
        let held = unsafe { f.get_page_mut(0) }.unwrap();
        gate.open();
        assert!(a.join().unwrap().is_err(), "the failing writepage's caller");
        drop(held);
    });
    f
}

/// A background write-back whose `writepage` failed after unlocking the
/// folio clean, and which then cannot relock it to dirty it again (a
/// `PageMut` holds it), records the error for the next `fsync`; that
/// `fsync` reports it and still writes the folio (its DIRTY tag stayed),
/// and reclaim, while 256 pages are read through a 64-page CLOCK cache,
/// does not evict it as clean. Before, the folio stayed clean with nothing
/// recorded: every `fsync` returned `Ok` and the byte never reached the
/// store (found by review, thirteenth session).
#[test]
fn a_background_writepage_failure_that_cannot_redirty_is_reported() {
    watchdog("background writepage failure under a PageMut", 120, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 256 * PAGE_SIZE]).unwrap();
        let cache = PageCache::builder()
            .memory_limit(64 * PAGE_SIZE as u64)
            // CLOCK, so that a scan evicts page 0 too (S3-FIFO keeps a
            // page used twice out of a scan's way).
            .replacement_policy(upcache::ReplacementPolicy::Clock)
            .max_folio_order(0)
            .readahead_bytes(PAGE_SIZE as u64)
            .build();
        let f = fail_background_writepage_under_page_mut(&cache, &path, 1);
        // Direct reclaim in this thread: page 0 is the coldest folio.
        let mut b = [0u8; PAGE_SIZE];
        for page in 1..256 {
            f.read_at(&mut b, (page * PAGE_SIZE) as u64).unwrap();
        }
        assert!(f.stats().evicted_bytes > 0, "reclaim ran: {:?}", f.stats());
        let r = f.fsync();
        assert_eq!(
            r.as_ref().map_err(|e| e.raw_os_error()),
            Err(libc::EIO),
            "the background failure reaches fsync: {r:?}"
        );
        assert_eq!(std::fs::read(&path).unwrap()[0], b'W', "fsync wrote the folio");
        f.fsync().unwrap();
    });
}

/// A mapping's `flush` reports a write-back error that happened after the
/// mapping was made, once, even when another handle's `fsync` reported it
/// first — as `msync(2)` checks its mapping's own file's error cursor. It
/// reported only errors nobody had seen, so this flush returned `Ok` for a
/// byte the failed store sync may have lost (found by review, thirteenth
/// session).
#[test]
fn a_mappings_flush_reports_an_error_another_handle_saw_first() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, [0u8; PAGE_SIZE]).unwrap();
    let failed = Arc::new(AtomicBool::new(false));
    let f2 = failed.clone();
    let store = HookStore::new(&path, move |op, _, _| {
        if op == StoreOp::Sync && !f2.swap(true, Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    });
    let cache = PageCache::new();
    let h1 = cache.open_with_ops("f", StoreOps::new(store)).unwrap();
    let h2 = cache
        .open_with_ops("f", StoreOps::new(upcache::FileStore::open(&path).unwrap()))
        .unwrap();
    let m = h2.mmap_raw(0, PAGE_SIZE).unwrap();
    m.write(0, b"Y");
    let e = h1.fsync().unwrap_err();
    assert_eq!(e.raw_os_error(), libc::EIO, "{e}");
    let r = m.flush();
    assert_eq!(
        r.as_ref().map_err(|e| e.raw_os_error()),
        Err(libc::EIO),
        "the mapping's flush after another handle saw the error: {r:?}"
    );
    m.flush().unwrap();
    assert_eq!(std::fs::read(&path).unwrap()[0], b'Y');
}

/// A truncate inside a large folio that a failed background `writepage`
/// left clean (but still tagged DIRTY) writes the folio before dropping
/// it whole, so the bytes below the new end reach the store: it took the
/// folio for clean and dropped them (found by a review of the fix above,
/// thirteenth session).
#[test]
fn truncate_writes_a_large_folio_a_failed_writepage_left_clean() {
    watchdog("truncate after a failed writepage", 120, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 4 << 20]).unwrap();
        let cache = PageCache::builder().large_folios(true).build();
        let f = fail_background_writepage_under_page_mut(&cache, &path, 512);
        // The 2 MiB folio at 0 straddles the new end: removed whole.
        f.truncate(2 * PAGE_SIZE as u64).unwrap();
        let disk = std::fs::read(&path).unwrap();
        assert_eq!(disk.len(), 2 * PAGE_SIZE);
        assert_eq!(disk[0], b'W', "the truncate dropped a folio whose write had failed");
    });
}

/// Bytes a mapping writes past end of file in the last page are not file
/// data: they never reach the store, and when the file then grows over
/// them they read as zeros (POSIX; the kernel zeroes that tail when the
/// size grows). Cases: grown by `truncate`, grown by a `write_at` past the
/// junk, and written back first (`fsync`), which zeroes them in the cache
/// as the kernel's write-back does, then grown.
#[test]
fn mapped_bytes_past_end_of_file_never_become_file_data() {
    watchdog("mapped bytes past EOF", 60, || {
        for case in ["truncate", "write_at", "fsync"] {
            let dir = tempdir();
            let path = dir.path().join("f");
            std::fs::write(&path, vec![1u8; 100]).unwrap();
            let cache = PageCache::new();
            let f = cache.open(&path).unwrap();
            let raw = f.mmap_raw(0, 4096).unwrap();
            raw.write(200, b"junk");
            drop(raw);
            if case == "fsync" {
                f.fsync().unwrap();
                assert_eq!(std::fs::read(&path).unwrap(), vec![1u8; 100], "fsync wrote past EOF");
                // The write-back zeroed them in the cache too, as the
                // kernel's does at every write-back of the page.
                // SAFETY: nothing maps the file any more.
                let page = unsafe { f.get_page(0) }.unwrap();
                assert_eq!(
                    page[200..204],
                    [0u8; 4],
                    "junk past EOF still cached after the write-back"
                );
            }
            if case == "write_at" {
                f.write_at(b"end", 1000).unwrap();
            } else {
                f.truncate(4096).unwrap();
            }
            let mut b = [9u8; 4];
            f.read_exact_at(&mut b, 200).unwrap();
            assert_eq!(b, [0u8; 4], "{case}: bytes a mapping wrote past EOF became file data");
            // SAFETY: nothing maps the file any more.
            let page = unsafe { f.get_page(0) }.unwrap();
            assert_eq!(page[200..204], [0u8; 4], "{case}: get_page");
            drop(page);
            f.fsync().unwrap();
            assert_eq!(std::fs::read(&path).unwrap()[200..204], [0u8; 4], "{case}: on disk");
        }
    });
}

/// The write-back's zeroing past end of file never changes the bytes a
/// `PageRef` is reading, nor waits for one: with the page pinned by the
/// syncing thread itself, `fsync` completes and the pinned bytes stay as
/// they were; the next write-back after the pin is gone zeroes them.
#[test]
fn write_back_never_zeroes_past_eof_under_a_pin() {
    watchdog("zeroing past EOF under a pin", 60, || {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 100]).unwrap();
        let cache = PageCache::new();
        let f = cache.open(&path).unwrap();
        let raw = f.mmap_raw(0, 4096).unwrap();
        raw.write(200, b"junk");
        // SAFETY: the mapping writes nothing while the guard lives.
        let page = unsafe { f.get_page(0) }.unwrap();
        f.fsync().unwrap();
        assert_eq!(
            &page[200..204],
            b"junk",
            "a pinned page's bytes changed under its guard"
        );
        drop(page);
        raw.write(0, b"d"); // dirty again
        f.fsync().unwrap();
        let mut b = [9u8; 4];
        raw.read(200, &mut b);
        assert_eq!(b, [0u8; 4], "the write-back after the pin did not zero past EOF");
    });
}

/// A private mapping's copied pages are its own memory: evicting the
/// file's folios or punching a hole under them leaves them as written, as
/// the kernel's `MAP_PRIVATE` of a file keeps its copies across
/// `POSIX_FADV_DONTNEED` and `FALLOC_FL_PUNCH_HOLE` (only truncation past
/// them drops them). Pages the mapping never wrote follow the file.
#[test]
fn a_private_mappings_copies_survive_eviction_and_punch() {
    watchdog("private copies", 60, || {
        for mode in [upcache::UffdMode::Minor, upcache::UffdMode::Missing] {
            let dir = tempdir();
            let path = dir.path().join("p");
            let size = 256 * 1024;
            let model: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8 + 1).collect();
            std::fs::write(&path, &model).unwrap();
            let cache = PageCache::new();
            let f = cache.open(&path).unwrap();
            // SAFETY: only this thread touches the mapping.
            let mut p = unsafe { f.mmap_mut_with_mode(0, size, Share::Private, mode) }.unwrap();
            p[100] = 0;
            p[128 * 1024 + 5] = 0;
            assert_eq!(p[4096], model[4096]);
            let cached = f.memory_bytes();
            f.advise(upcache::Advice::DontNeed, 0, size as u64).unwrap();
            assert!(
                f.memory_bytes() < cached,
                "{mode:?}: advise(DontNeed) evicted nothing ({cached} bytes cached)"
            );
            assert_eq!(p[100], 0, "{mode:?}: eviction dropped a private copy");
            assert_eq!(p[4096], model[4096], "{mode:?}: a page never written reads the file");
            f.punch_hole(128 * 1024, 64 * 1024).unwrap();
            assert_eq!(p[128 * 1024 + 5], 0, "{mode:?}: a punch dropped a private copy");
            assert_eq!(p[128 * 1024 + 4096], 0, "{mode:?}: a page never written reads the hole");
            assert_eq!(p[100], 0, "{mode:?}: the first copy is still there");
        }
    });
}

/// A punch that reaches past end of file zeroes the rest of the page that
/// holds it, bytes past the end included, as the kernel's does (ext4
/// widens such a punch to that page's end; compared here with a kernel
/// mapping of a twin file): what a mapping had stored past the end is
/// gone. A punch that ends below the end leaves those bytes to write-back
/// timing (zeroed at every write-back, by the kernel too): not compared.
#[test]
fn punch_across_end_of_file_zeroes_the_rest_of_its_page_as_the_kernel_does() {
    use std::os::unix::fs::FileExt;
    watchdog("punch across EOF", 60, || {
        for (off, len) in [(4500u64, 10_000u64), (100, 4996), (5000, 100), (0, 1 << 20)] {
            let dir = tempdir();
            let path = dir.path().join("f");
            let twin_path = dir.path().join("twin");
            let data = vec![1u8; 5000];
            std::fs::write(&path, &data).unwrap();
            std::fs::write(&twin_path, &data).unwrap();
            let twin = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&twin_path)
                .unwrap();
            // SAFETY: only this test touches the twin, below its page end.
            let mut kmap = unsafe { memmap2::MmapOptions::new().len(8192).map_mut(&twin) }.unwrap();
            kmap[6000..6004].copy_from_slice(b"junk");
            let cache = PageCache::new();
            let f = cache.open(&path).unwrap();
            let raw = f.mmap_raw(0, 8192).unwrap();
            raw.write(6000, b"junk");
            f.punch_hole(off, len).unwrap();
            // SAFETY: punching our own descriptor; no memory involved.
            let r = unsafe {
                libc::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(&twin),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as i64,
                    len as i64,
                )
            };
            assert_eq!(r, 0, "kernel punch");
            let mut ours = [0u8; 8];
            raw.read(5998, &mut ours);
            let theirs: [u8; 8] = kmap[5998..6006].try_into().unwrap();
            assert_eq!(
                ours, theirs,
                "punch {off}+{len}: bytes past end of file through a mapping"
            );
            let mut a = vec![0u8; 5000];
            let mut b = vec![0u8; 5000];
            f.read_exact_at(&mut a, 0).unwrap();
            twin.read_exact_at(&mut b, 0).unwrap();
            assert!(a == b, "punch {off}+{len}: file bytes");
            assert_eq!(f.len().unwrap(), 5000);
        }
    });
}

/// Clearing the SIGBUS of a read error must not take a private mapping's
/// copies with it. A `Missing`-mode mapping of a large-folio file is
/// poisoned past end of file as soon as the last folio exists; after a
/// failed and then successful read of the first folio, the clear zapped
/// the whole folio in every poisoned mapping (`MADV_DONTNEED`), which in
/// a private one discards the pages it copied on write: the private byte
/// read back as file data.
#[test]
fn a_private_mappings_copies_survive_a_cleared_read_error() {
    watchdog("private copies vs poison clear", 60, || {
        const MIB: usize = 1 << 20;
        let dir = tempdir();
        let path = dir.path().join("p");
        let size = 3 * MIB + 100;
        let model: Vec<u8> = (0..size).map(|i| (i * 13 % 251) as u8 + 1).collect();
        std::fs::write(&path, &model).unwrap();
        let fail = Arc::new(AtomicBool::new(false));
        let f2 = fail.clone();
        let store = HookStore::new(&path, move |op, _, _| {
            if op == StoreOp::Read && f2.load(Ordering::SeqCst) {
                Err(io::Error::from_raw_os_error(libc::EIO))
            } else {
                Ok(())
            }
        });
        let cache = PageCache::builder().large_folios(true).build();
        cache.start_fault_engine().expect("userfaultfd (see README)");
        let f = cache.open_with_ops("p", StoreOps::new(store)).unwrap();
        // SAFETY: only this thread touches the mapping, below end of file.
        let mut p = unsafe { f.mmap_mut_with_mode(0, 4 * MIB, Share::Private, upcache::UffdMode::Missing) }.unwrap();
        // The last folio: its pages past the end are poisoned.
        assert_eq!(p[2 * MIB + 10], model[2 * MIB + 10]);
        p[10] = 0;
        f.advise(upcache::Advice::DontNeed, 0, 0).unwrap();
        assert_eq!(p[10], 0, "eviction dropped the private copy");
        fail.store(true, Ordering::SeqCst);
        let mut b = [0u8; 8];
        assert!(f.read_at(&mut b, 0).is_err(), "the store fails the read");
        fail.store(false, Ordering::SeqCst);
        f.read_exact_at(&mut b, 0).unwrap();
        assert!(b[..] == model[..8]);
        assert_eq!(p[10], 0, "clearing a read error's poison dropped a private copy");
        assert_eq!(p[4096], model[4096], "a page never written reads the file");
    });
}

/// A failing store as the tests below use it: every write and sync fails
/// with `EIO` while the flag is set.
fn failing_store(path: &std::path::Path) -> (HookStore, Arc<AtomicBool>) {
    let fail = Arc::new(AtomicBool::new(false));
    let f2 = fail.clone();
    let store = HookStore::new(path, move |op, _, _| {
        if matches!(op, StoreOp::Write | StoreOp::Sync) && f2.load(Ordering::SeqCst) {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(())
        }
    });
    (store, fail)
}

/// A file of the cache on a [`failing_store`], with a dirty page: its
/// handle and the store's failure switch.
fn dirty_file_on_a_failing_store(
    cache: &PageCache,
    dir: &std::path::Path,
    name: &str,
) -> (upcache::File, Arc<AtomicBool>) {
    let path = dir.join(name);
    std::fs::write(&path, vec![1u8; 8192]).unwrap();
    let (store, fail) = failing_store(&path);
    let f = cache.open_with_ops(name, StoreOps::new(store)).unwrap();
    f.write_at(b"new", 0).unwrap();
    (f, fail)
}

/// `sync_all` is `syncfs(2)`: it reports every write-back or store-sync
/// error of any file of the cache since the last `sync_all`, once, even
/// one a handle's `fsync` reported first (the kernel keeps the
/// superblock's own error word for this). It sampled each file's error
/// word afresh and returned `Ok` after the handle had seen the failure,
/// though the bytes the failed sync covered may never have reached the
/// disk.
#[test]
fn sync_all_reports_a_failure_a_handle_saw_first_once() {
    watchdog("sync_all error cursor", 60, || {
        let dir = tempdir();
        let cache = PageCache::new();
        let (f, fail) = dirty_file_on_a_failing_store(&cache, dir.path(), "f");
        fail.store(true, Ordering::SeqCst);
        assert!(f.fsync().is_err(), "the store fails");
        fail.store(false, Ordering::SeqCst);
        let e = cache
            .sync_all()
            .expect_err("sync_all reports the failure since its last call");
        assert_eq!(e.raw_os_error(), libc::EIO, "{e}");
        cache.sync_all().expect("reported once");
        f.fsync().expect("the handle saw it already");
    });
}

/// A file dropped without `close` while its store fails: the drop's
/// final write-back fails and its dirty bytes cannot be kept (the file
/// is gone), as a kernel write-back error loses them too — but the loss
/// is reported to the next `sync_all`, as `syncfs(2)` reports it. It
/// returned `Ok`.
#[test]
fn a_dropped_files_failed_final_write_back_reaches_sync_all() {
    watchdog("dropped file's failure", 60, || {
        let dir = tempdir();
        let cache = PageCache::new();
        let (f, fail) = dirty_file_on_a_failing_store(&cache, dir.path(), "f");
        fail.store(true, Ordering::SeqCst);
        drop(f);
        fail.store(false, Ordering::SeqCst);
        let e = cache
            .sync_all()
            .expect_err("the lost write of the dropped file is reported");
        assert_eq!(e.raw_os_error(), libc::EIO, "{e}");
        cache.sync_all().expect("reported once");
    });
}

/// `sync_all` never lets an error of its own (`EDEADLK`: this thread's
/// `PageMut` holds a dirty folio) hide a recorded failure: another file's
/// failed final write-back is reported first, then the `EDEADLK` while
/// the guard lives, then `Ok`. The cursor moved past the failure while
/// `EDEADLK` was returned, and the failure was never reported.
#[test]
fn sync_all_reports_a_recorded_failure_before_its_own_edeadlk() {
    watchdog("sync_all EDEADLK vs a recorded failure", 60, || {
        let dir = tempdir();
        let cache = PageCache::new();
        let (b, fail) = dirty_file_on_a_failing_store(&cache, dir.path(), "b");
        fail.store(true, Ordering::SeqCst);
        drop(b);
        fail.store(false, Ordering::SeqCst);
        let pa = dir.path().join("a");
        std::fs::write(&pa, vec![1u8; 8192]).unwrap();
        let a = cache.open(&pa).unwrap();
        a.write_at(b"dirty", 0).unwrap();
        // SAFETY: nothing maps the file.
        let guard = unsafe { a.get_page_mut(0) }.unwrap();
        let e = cache.sync_all().expect_err("the recorded failure");
        assert_eq!(e.raw_os_error(), libc::EIO, "{e}");
        let e = cache.sync_all().expect_err("the guard's folio");
        assert_eq!(e.raw_os_error(), libc::EDEADLK, "{e}");
        drop(guard);
        cache.sync_all().expect("all written");
    });
}
