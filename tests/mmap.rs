//! The fault engine with real userfaultfd, memfd, files and threads.

mod common;

use std::sync::Arc;

use common::{tempdir, watchdog, Rng};
use upcache::{PageCache, Share, UffdMode};

/// Userfaultfd must work here; if it does not, fail loudly with the reason
/// (which names the missing permission), never skip.
fn cache_with(mode: UffdMode) -> PageCache {
    let cache = PageCache::builder().mmap_mode(mode).build();
    if let Err(e) = cache.start_fault_engine() {
        panic!("userfaultfd unavailable, the mmap tests cannot run: {e}");
    }
    cache
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

fn modes() -> [UffdMode; 2] {
    [UffdMode::Minor, UffdMode::Missing]
}

#[test]
fn mapping_reads_the_files_bytes() {
    for mode in modes() {
        let dir = tempdir();
        let path = dir.path().join("f");
        let content = pattern(3 << 20, 1);
        std::fs::write(&path, &content).unwrap();
        let cache = cache_with(mode);
        let file = cache.open(&path).unwrap();
        // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
        let map = unsafe { file.mmap(0, content.len(), Share::Shared) }.unwrap();
        assert_eq!(map.len(), content.len());
        if let Some(o) = (0..content.len()).find(|&o| map[o] != content[o]) {
            panic!(
                "{mode:?}: mapped bytes differ at {o}: {} vs {} (page {}), stats {}",
                map[o],
                content[o],
                o / 4096,
                cache.stats()
            );
        }
        let s = cache.stats();
        assert!(s.faults_slow > 0, "{mode:?}: faults went through the engine: {s}");
    }
}

#[test]
fn many_threads_read_one_mapping() {
    for mode in modes() {
        let dir = tempdir();
        let path = dir.path().join("f");
        let content = Arc::new(pattern(4 << 20, 2));
        std::fs::write(&path, &*content).unwrap();
        let cache = cache_with(mode);
        let file = cache.open(&path).unwrap();
        // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
        let map = Arc::new(unsafe { file.mmap(0, content.len(), Share::Shared) }.unwrap());
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let map = map.clone();
                let content = content.clone();
                s.spawn(move || {
                    let mut rng = Rng::new(t);
                    for _ in 0..3000 {
                        let off = rng.below(content.len() as u64 - 64) as usize;
                        assert_eq!(map[off..off + 64], content[off..off + 64], "{mode:?} at {off}");
                    }
                });
            }
        });
    }
}

#[test]
fn shared_writes_reach_read_at_other_mappings_and_the_file() {
    for mode in modes() {
        let dir = tempdir();
        let path = dir.path().join("f");
        let mut content = pattern(1 << 20, 3);
        std::fs::write(&path, &content).unwrap();
        let cache = cache_with(mode);
        let file = cache.open(&path).unwrap();
        // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
        let mut w = unsafe { file.mmap_mut(0, content.len(), Share::Shared) }.unwrap();
        // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
        let r = unsafe { file.mmap(0, content.len(), Share::Shared) }.unwrap();
        // Touch r first so its pages are mapped before the writes.
        assert_eq!(r[5000], content[5000]);
        for (i, off) in [5000usize, 70_000, 700_001].into_iter().enumerate() {
            w[off] = 0xE0 + i as u8;
            content[off] = 0xE0 + i as u8;
            assert_eq!(r[off], content[off], "{mode:?}: second mapping sees the write at once");
            let mut b = [0u8; 1];
            file.read_at(&mut b, off as u64).unwrap();
            assert_eq!(b[0], content[off], "{mode:?}: read_at sees the mapped write");
        }
        assert!(cache.stats().dirty_bytes > 0, "{mode:?}: mapped writes dirtied folios");
        w.flush().unwrap();
        assert!(std::fs::read(&path).unwrap() == content, "{mode:?}: file after flush");
        // Written again after writeback: page_mkclean re-armed the write fault.
        w[5000] = 0x11;
        content[5000] = 0x11;
        assert!(
            cache.stats().dirty_bytes > 0,
            "{mode:?}: write after writeback re-dirtied"
        );
        file.fsync().unwrap();
        assert!(std::fs::read(&path).unwrap() == content, "{mode:?}: file after fsync");
    }
}

/// Pages cached before a shared-writable mapping exists, pages cached
/// while it exists (by `read_at`), and pages evicted and cached again all
/// report their first write through it: `fsync` writes every one. In
/// `Missing` mode the kernel maps cached pages itself, so each of those
/// pages must be write-protected in the mapping before it can be touched.
#[test]
fn first_writes_to_pages_cached_before_during_and_after_mapping_reach_the_file() {
    const PAGES: usize = 48;
    for mode in modes() {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; PAGES * 4096]).unwrap();
        let cache = cache_with(mode);
        let file = cache.open(&path).unwrap();
        let mut buf = vec![0u8; 16 * 4096];
        // Pages 0..16 cached before the mapping.
        file.read_at(&mut buf, 0).unwrap();
        // SAFETY: only this thread touches the mapping.
        let mut m = unsafe { file.mmap_mut(0, PAGES * 4096, Share::Shared) }.unwrap();
        // Pages 16..32 cached while it exists.
        file.read_at(&mut buf, 16 * 4096).unwrap();
        // Pages 32..48 cached, then dropped (punched) and cached again.
        file.read_at(&mut buf, 32 * 4096).unwrap();
        file.advise(upcache::Advice::DontNeed, 32 * 4096, 16 * 4096).unwrap();
        file.read_at(&mut buf, 32 * 4096).unwrap();
        for p in 0..PAGES {
            m[p * 4096 + 7] = p as u8 + 1;
        }
        file.fsync().unwrap();
        let disk = std::fs::read(&path).unwrap();
        for p in 0..PAGES {
            assert_eq!(
                disk[p * 4096 + 7],
                p as u8 + 1,
                "{mode:?}: the write to page {p} never reached the file"
            );
        }
        drop(m);
    }
}

#[test]
fn write_at_is_visible_through_existing_mappings() {
    for mode in modes() {
        let dir = tempdir();
        let path = dir.path().join("f");
        let content = pattern(256 << 10, 4);
        std::fs::write(&path, &content).unwrap();
        let cache = cache_with(mode);
        let file = cache.open(&path).unwrap();
        // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
        let map = unsafe { file.mmap(0, content.len(), Share::Shared) }.unwrap();
        assert!(map[..] == content[..]);
        file.write_at(b"hello, mapping", 12345).unwrap();
        assert_eq!(&map[12345..12359], b"hello, mapping", "{mode:?}");
    }
}

#[test]
fn private_mapping_writes_never_reach_the_file() {
    for mode in modes() {
        let dir = tempdir();
        let path = dir.path().join("f");
        let content = pattern(128 << 10, 5);
        std::fs::write(&path, &content).unwrap();
        let cache = cache_with(mode);
        let file = cache.open(&path).unwrap();
        // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
        let mut p = unsafe { file.mmap_mut(0, content.len(), Share::Private) }.unwrap();
        // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
        let shared = unsafe { file.mmap(0, content.len(), Share::Shared) }.unwrap();
        p[100] ^= 0xFF;
        p[100_000] ^= 0xFF;
        assert_eq!(p[100], content[100] ^ 0xFF);
        assert_eq!(
            shared[100], content[100],
            "{mode:?}: private write leaked into the shared view"
        );
        let mut b = [0u8; 1];
        file.read_at(&mut b, 100).unwrap();
        assert_eq!(b[0], content[100]);
        file.fsync().unwrap();
        assert!(
            std::fs::read(&path).unwrap() == content,
            "{mode:?}: private write reached the file"
        );
    }
}

#[test]
fn dropping_mappings_while_other_threads_fault_neither_hangs_nor_crashes() {
    let dir = tempdir();
    let path = dir.path().join("f");
    let content = pattern(2 << 20, 6);
    std::fs::write(&path, &content).unwrap();
    let cache = cache_with(UffdMode::Minor);
    let file = Arc::new(cache.open(&path).unwrap());
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let file = file.clone();
            let content = &content;
            s.spawn(move || {
                let mut rng = Rng::new(t);
                for _ in 0..40 {
                    // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
                    let map = unsafe { file.mmap(0, content.len(), Share::Shared) }.unwrap();
                    for _ in 0..20 {
                        let off = rng.below(content.len() as u64) as usize;
                        assert_eq!(map[off], content[off]);
                    }
                    // Dropped while the other threads' faults are in flight
                    // on their own mappings of the same folios.
                    drop(map);
                }
            });
        }
    });
    assert_eq!(file.address_space().unwrap().nr_mappings(), 0);
}

#[test]
fn bad_mmap_arguments_are_einval() {
    let dir = tempdir();
    let path = dir.path().join("f");
    std::fs::write(&path, [1u8; 100]).unwrap();
    let cache = cache_with(UffdMode::Minor);
    let file = cache.open(&path).unwrap();
    assert_eq!(
        // SAFETY: every call fails; nothing is mapped.
        unsafe { file.mmap(0, 0, Share::Shared) }.unwrap_err().raw_os_error(),
        22
    );
    assert_eq!(
        // SAFETY: every call fails; nothing is mapped.
        unsafe { file.mmap(100, 4096, Share::Shared) }
            .unwrap_err()
            .raw_os_error(),
        22
    );
    assert_eq!(
        // SAFETY: every call fails; nothing is mapped.
        unsafe { file.mmap(!4095u64, 4096, Share::Shared) }
            .unwrap_err()
            .raw_os_error(),
        27
    );
    file.close().unwrap();
    assert!(matches!(
        // SAFETY: every call fails; nothing is mapped.
        unsafe { file.mmap(0, 4096, Share::Shared) },
        Err(upcache::Error::Closed)
    ));
}

/// Bytes a program stores through a mapping past end of file, inside the
/// page that holds it, never become file data: when the file grows (by
/// `truncate` or by a write that starts further on), the range between the
/// old and the new end reads as zeros, as the kernel guarantees
/// (`pagecache_isize_extended` zeroes the post-EOF part of a dirty EOF
/// folio). Checked on a kernel twin (ext4, memmap2) first.
#[test]
fn mapped_stores_past_eof_read_as_zeros_after_the_file_grows() {
    // Mapped accesses block on faults: a hang fails with a message.
    watchdog(
        "mapped_stores_past_eof_read_as_zeros_after_the_file_grows",
        60,
        mapped_stores_past_eof_read_as_zeros_after_the_file_grows_body,
    );
}

fn mapped_stores_past_eof_read_as_zeros_after_the_file_grows_body() {
    let dir = tempdir();
    for grow_by_write in [false, true] {
        let old = 1000usize;
        let new = 10_000usize;
        let expect = |buf: &[u8], who: &str| {
            assert!(buf[..old].iter().all(|&b| b == 7), "{who}: data below the old end");
            if let Some(o) = (old..new - 1).find(|&o| buf[o] != 0) {
                panic!(
                    "{who} (grow by write: {grow_by_write}): byte {o} is {:#x} after growth, not 0",
                    buf[o]
                );
            }
        };
        let grow = |f: &dyn Fn(u64), w: &dyn Fn(&[u8], u64)| {
            if grow_by_write {
                w(&[9], new as u64 - 1);
            } else {
                f(new as u64);
            }
        };
        // The kernel twin.
        {
            let path = dir.path().join(format!("twin-{grow_by_write}"));
            std::fs::write(&path, vec![7u8; old]).unwrap();
            let twin = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
            // SAFETY: only this thread touches the twin's mapping.
            let mut map = unsafe { memmap2::MmapOptions::new().len(4096).map_mut(&twin) }.unwrap();
            map[old..4096].fill(0xAB);
            use std::os::unix::fs::FileExt;
            grow(&|n| twin.set_len(n).unwrap(), &|b, o| twin.write_all_at(b, o).unwrap());
            let mut buf = vec![0u8; new];
            twin.read_exact_at(&mut buf, 0).unwrap();
            expect(&buf, "kernel");
        }
        for mode in modes() {
            let path = dir.path().join(format!("f-{grow_by_write}-{mode:?}"));
            std::fs::write(&path, vec![7u8; old]).unwrap();
            let cache = cache_with(mode);
            let file = cache.open(&path).unwrap();
            // SAFETY: only this thread touches the mapping, through short-lived borrows.
            let mut map = unsafe { file.mmap_mut(0, 4096, Share::Shared) }.unwrap();
            map[old..4096].fill(0xAB);
            grow(&|n| file.truncate(n).unwrap(), &|b, o| {
                assert_eq!(file.write_at(b, o).unwrap(), b.len())
            });
            let mut buf = vec![0u8; new];
            file.read_exact_at(&mut buf, 0).unwrap();
            expect(&buf, &format!("upcache {mode:?} read_at"));
            expect(
                &map[..4096]
                    .iter()
                    .chain(buf[4096..].iter())
                    .copied()
                    .collect::<Vec<_>>(),
                &format!("upcache {mode:?} mapping"),
            );
            drop(map);
            file.fsync().unwrap();
            let on_disk = std::fs::read(&path).unwrap();
            expect(&on_disk, &format!("upcache {mode:?} file on disk"));
        }
    }
}
