//! Open files cost what the kernel's do (issue #12, item 4): with
//! `RLIMIT_NOFILE` at 1024, 900 files are open and mapped at once through
//! one `PageCache`, each costing one descriptor (its own); the page store
//! is one memfd for the whole cache. Regions given back by closed files are
//! reused without leaking their bytes into the next file.
//!
//! One test in this binary on purpose: it lowers the process's descriptor
//! limit.

mod common;

use common::{tempdir, watchdog};
use upcache::{PageCache, Share};

const FILES: usize = 900;
const PAGE: usize = 4096;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
}

fn content(i: usize) -> Vec<u8> {
    let mut v = vec![(i % 251) as u8; 2 * PAGE];
    v[..8].copy_from_slice(&(i as u64).to_le_bytes());
    v
}

#[test]
fn nine_hundred_files_open_and_mapped_under_a_1024_descriptor_limit() {
    watchdog("900 files open and mapped", 120, || {
        let lim = libc::rlimit {
            rlim_cur: 1024,
            rlim_max: 1024,
        };
        // SAFETY: setrlimit reads the struct we pass; lowering our own
        // limit is always permitted.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);

        let dir = tempdir();
        let paths: Vec<_> = (0..FILES + 100).map(|i| dir.path().join(format!("f{i}"))).collect();
        for (i, p) in paths.iter().enumerate() {
            std::fs::write(p, content(i)).unwrap();
        }
        let cache = PageCache::new();
        cache.start_fault_engine().expect("userfaultfd");
        let base = open_fds();
        let mut open = Vec::new();
        for (i, p) in paths.iter().enumerate().take(FILES) {
            let f = cache
                .open(p)
                .unwrap_or_else(|e| panic!("opening file {i} with {} descriptors in use: {e}", open_fds()));
            // SAFETY: nothing else writes or truncates these test files.
            let m = unsafe { f.mmap(0, 2 * PAGE, Share::Shared) }
                .unwrap_or_else(|e| panic!("mapping file {i} with {} descriptors in use: {e}", open_fds()));
            open.push((f, m));
        }
        let used = open_fds() - base;
        assert!(
            used <= FILES + 2,
            "{FILES} files open and mapped cost {used} descriptors: more than one each (+ the page store's memfd)"
        );
        for (i, (_, m)) in open.iter().enumerate() {
            assert_eq!(&m[..], &content(i)[..], "file {i} read through its mapping");
        }

        // Close the first 100 (file and mapping) and open 100 others: their
        // regions are reused, and what the closed files cached (written
        // bytes included) must not show through.
        for (f, m) in open.iter().take(100) {
            // Written through the file, read back through the mapping.
            f.write_at(&[0xEE; 100], 100).unwrap();
            assert_eq!(m[100], 0xEE);
            f.fsync().unwrap();
        }
        open.drain(..100);
        for (i, p) in paths.iter().enumerate().skip(FILES) {
            let f = cache.open(p).unwrap();
            // SAFETY: as above.
            let m = unsafe { f.mmap(0, 2 * PAGE, Share::Shared) }.unwrap();
            assert_eq!(
                &m[..],
                &content(i)[..],
                "file {i}, opened after others closed, through its mapping"
            );
            let mut buf = vec![0u8; 2 * PAGE];
            f.read_exact_at(&mut buf, 0).unwrap();
            assert_eq!(buf, content(i), "file {i}, opened after others closed, through read_at");
            open.push((f, m));
        }
        for (i, (_, m)) in open.iter().enumerate() {
            let file = i + 100;
            assert_eq!(&m[..], &content(file)[..], "file {file} after the reuse");
        }
        drop(open);
        let on_disk = std::fs::read(&paths[0]).unwrap();
        assert_eq!(&on_disk[100..200], &[0xEE; 100][..]);
    });
}
