//! A process that called `mlockall(MCL_CURRENT | MCL_FUTURE)` (storage
//! engines do, to keep their memory out of swap): the kernel then fills
//! in every new mapping inside `mmap` itself, before upcache could
//! register it with userfaultfd. Each case runs in a child process (the
//! lock is process-wide). Needs `CAP_IPC_LOCK` or a large enough
//! `RLIMIT_MEMLOCK`: without, it says so loudly and passes, unless
//! `UPCACHE_REQUIRE_MLOCK` is set (CI runs as root and sets it).
//!
//! Before the fix, the engine view's first 1 GiB window was filled with
//! zero pages of the memfd at once, a `Missing`-mode mapping then read
//! those zeros instead of the file, and a write to a clean cached page
//! through a mapping filled in before registration was never seen as a
//! write: `fsync` left the disk unchanged.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{kernel_copy_out, run_child, tempdir, HookStore, Rng, StoreOp};
use upcache::{PageCache, StoreOps, UffdMode};

const MIB: usize = 1 << 20;
/// The child's exit code when it may not lock its memory.
const SKIP: i32 = 77;

fn model() -> Vec<u8> {
    let mut v = vec![0u8; 4 * MIB];
    Rng::new(5).fill(&mut v);
    v
}

#[test]
fn mappings_of_a_process_that_locks_all_its_memory() {
    if std::env::var_os("UPCACHE_CHILD").is_some() {
        return;
    }
    for mode in ["Missing", "Minor"] {
        let dir = tempdir();
        let path = dir.path().join("f");
        std::fs::write(&path, model()).unwrap();
        let st = run_child(
            "child_entry",
            "mlockall",
            &[
                ("UPCACHE_CHILD_MODE", mode.to_string()),
                ("UPCACHE_CHILD_PATH", path.display().to_string()),
            ],
            120,
        );
        if st.code() == Some(SKIP) {
            // The child could not lock its memory (no `CAP_IPC_LOCK`, a
            // small `RLIMIT_MEMLOCK`): say so loudly; CI (root) sets
            // `UPCACHE_REQUIRE_MLOCK`, which turns the skip into a failure.
            let msg = "SKIPPED: mlockall(MCL_CURRENT | MCL_FUTURE) refused (needs CAP_IPC_LOCK or a large \
                       RLIMIT_MEMLOCK; run as root)";
            eprintln!("\n*** {msg} ***\n");
            assert!(std::env::var_os("UPCACHE_REQUIRE_MLOCK").is_none(), "{msg}");
            return;
        }
        assert!(st.success(), "{mode}: the child failed: {st:?}");
        let disk = std::fs::read(&path).unwrap();
        let mut want = model();
        want[100] = !want[100];
        want[3 * MIB + 7] = !want[3 * MIB + 7];
        assert!(disk == want, "{mode}: the mapped writes reached the disk by fsync");
    }
}

#[test]
fn child_entry() {
    let Ok(case) = std::env::var("UPCACHE_CHILD") else {
        return;
    };
    assert_eq!(case, "mlockall");
    let mode = match std::env::var("UPCACHE_CHILD_MODE").unwrap().as_str() {
        "Missing" => UffdMode::Missing,
        _ => UffdMode::Minor,
    };
    let path = std::path::PathBuf::from(std::env::var("UPCACHE_CHILD_PATH").unwrap());
    // SAFETY: plain libc call on this (child) process.
    let r = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
    if r != 0 {
        eprintln!(
            "mlockall refused: {} (needs CAP_IPC_LOCK or RLIMIT_MEMLOCK)",
            std::io::Error::last_os_error()
        );
        std::process::exit(SKIP);
    }
    let model = model();
    let cache = PageCache::builder().mmap_mode(mode).build();
    cache
        .start_fault_engine()
        .expect("userfaultfd must be available (see README)");
    let f = cache.open(&path).unwrap();
    // The first MiB cached and clean before the mapping exists.
    let mut buf = vec![0u8; MIB];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(
        f.memory_bytes() < 64 * MIB as u64,
        "{mode:?}: the page store holds {} bytes after a 1 MiB read",
        f.memory_bytes()
    );
    let map = f.mmap_raw(0, 4 * MIB).unwrap();
    let mut b = [0u8; 64];
    map.read(3 * MIB, &mut b);
    assert!(
        b[..] == model[3 * MIB..3 * MIB + 64],
        "{mode:?}: a mapped read of an uncached page reads the file"
    );
    // A write to a clean cached page, and to the page just read.
    map.write(100, &[!model[100]]);
    map.write(3 * MIB + 7, &[!model[3 * MIB + 7]]);
    f.fsync().unwrap();
    drop(map);
    f.close().unwrap();

    // A page whose read failed raises SIGBUS until its folio is read
    // again; clearing that poison zaps it, and a locked mapping refuses
    // `MADV_DONTNEED` (the poison stayed: `MADV_DONTNEED_LOCKED` zaps).
    let path2 = path.with_extension("err");
    std::fs::write(&path2, &model).unwrap();
    let fail = Arc::new(AtomicBool::new(true));
    let f2 = fail.clone();
    let store = HookStore::new(&path2, move |op, _, _| {
        if op == StoreOp::Read && f2.load(Ordering::SeqCst) {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(())
        }
    });
    let g = cache.open_with_ops("err", StoreOps::new(store)).unwrap();
    let map2 = g.mmap_raw(0, 4 * MIB).unwrap();
    // Kernel-mode accesses: poison shows as EFAULT instead of killing
    // the child.
    let copy_out = |at: usize| kernel_copy_out(&map2, at);
    assert_eq!(
        copy_out(2 * MIB + 5),
        None,
        "{mode:?}: a failed read is SIGBUS (EFAULT)"
    );
    fail.store(false, Ordering::SeqCst);
    g.read_exact_at(&mut buf[..64], 2 * MIB as u64).unwrap();
    let got = copy_out(2 * MIB + 5).expect("the page is served once its folio was read");
    assert!(got[..] == model[2 * MIB + 5..2 * MIB + 21], "{mode:?}");
    drop(map2);
    eprintln!("child {case} {mode:?}: ok");
    std::process::exit(0);
}
