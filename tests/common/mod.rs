//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod hugetlb_pool;
pub mod thp;

/// `AddressSpaceOps` methods a test's operations pass unchanged to their
/// `inner` (a `StoreOps`): `()` the inode-level ones, `(read_folio)`,
/// `(writepage)`. Used inside an `impl AddressSpaceOps for ...` block.
#[allow(unused_macros)]
macro_rules! delegate_to_inner {
    () => {
        fn initial_size(&self) -> std::io::Result<u64> {
            self.inner.initial_size()
        }
        fn max_file_size(&self) -> u64 {
            self.inner.max_file_size()
        }
        fn set_size(&self, size: u64) -> std::io::Result<()> {
            self.inner.set_size(size)
        }
        fn punch_hole(&self, off: u64, len: u64) -> std::io::Result<()> {
            self.inner.punch_hole(off, len)
        }
        fn fsync(&self) -> std::io::Result<()> {
            self.inner.fsync()
        }
    };
    (read_folio) => {
        fn read_folio(&self, m: &upcache::aops::AddressSpace, f: upcache::aops::FolioGuard) -> std::io::Result<()> {
            self.inner.read_folio(m, f)
        }
    };
    (writepage) => {
        fn writepage(
            &self,
            m: &upcache::aops::AddressSpace,
            f: upcache::aops::FolioGuard,
            wbc: &mut upcache::aops::WritebackControl,
        ) -> std::io::Result<()> {
            self.inner.writepage(m, f, wbc)
        }
    };
}

use std::io;
use std::path::{Path, PathBuf};

/// A small, seeded, dependency-free PRNG (splitmix64), so a failing
/// sequence can be replayed from its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next_u64() as u8;
        }
    }
}

/// Number of random operations: `default`, or `UPCACHE_TEST_OPS` if set.
pub fn ops_count(default: usize) -> usize {
    std::env::var("UPCACHE_TEST_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seed: `UPCACHE_TEST_SEED` if set, else `default`.
pub fn seed(default: u64) -> u64 {
    std::env::var("UPCACHE_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A temporary directory on the disk filesystem (not tmpfs), so files
/// behave like a storage engine's.
pub fn tempdir() -> tempfile::TempDir {
    let base = std::env::var_os("UPCACHE_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("upcache-test")
        .tempdir_in(base)
        .expect("create temp dir")
}

/// Create `path` with `content`.
pub fn create_file(path: &Path, content: &[u8]) -> io::Result<()> {
    std::fs::write(path, content)
}

/// Run `f` on its own thread and fail with a message if it has not
/// finished within `secs` seconds: a hang becomes a test failure, never a
/// stuck CI job. (The bound is a watchdog, not synchronization.)
pub fn watchdog<T: Send + 'static>(what: &str, secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::Builder::new()
        .name(format!("watched: {what}"))
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(r);
        })
        .expect("spawn watched thread");
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(Ok(v)) => {
            let _ = h.join();
            v
        }
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(_) => panic!("HANG: {what} did not finish within {secs} s (watchdog)"),
    }
}

/// Re-execute this test binary running only `test` with `UPCACHE_CHILD`
/// set to `case` (plus `env`), and return its exit status; kill it and fail
/// if it runs longer than `secs` seconds.
pub fn run_child(test: &str, case: &str, env: &[(&str, String)], secs: u64) -> std::process::ExitStatus {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("UPCACHE_CHILD", case);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn child");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(st) => st.expect("wait child"),
        Err(_) => {
            // SAFETY-free: kill(2) by pid through the shell-less libc-free way.
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            panic!("HANG: child case {case} did not finish within {secs} s (watchdog)");
        }
    }
}

/// 16 bytes of `map` at `at`, read by the kernel (written into a pipe):
/// a page that would raise SIGBUS for a user access gives `None`
/// (`EFAULT`) instead of killing the test.
pub fn kernel_copy_out(map: &upcache::MmapRaw, at: usize) -> Option<Vec<u8>> {
    assert!(at + 16 <= map.len());
    let mut fds = [0i32; 2];
    // SAFETY: a fresh pipe.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: `at + 16` lies inside the live mapping; the kernel reads it
    // (or fails with EFAULT) into our own pipe.
    let n = unsafe { libc::write(fds[1], map.as_ptr().add(at).cast(), 16) };
    let got = if n < 0 {
        assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EFAULT));
        None
    } else {
        assert_eq!(n, 16);
        let mut got = vec![0u8; 16];
        // SAFETY: our pipe's read end into 16 writable bytes.
        assert_eq!(unsafe { libc::read(fds[0], got.as_mut_ptr().cast(), 16) }, 16);
        Some(got)
    };
    // SAFETY: closing our own pipe.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    got
}

/// Run the child case `case` of this test binary's `child_entry` once per
/// mapping mode (`UPCACHE_CHILD_MODE`), on a fresh path each time
/// (`UPCACHE_CHILD_PATH`), under the `run_child` watchdog.
pub fn run_child_per_mode(case: &str) -> Vec<(&'static str, std::process::ExitStatus)> {
    ["Missing", "Minor"]
        .into_iter()
        .map(|mode| {
            let dir = tempdir();
            let path = dir.path().join("f");
            let st = run_child(
                "child_entry",
                case,
                &[
                    ("UPCACHE_CHILD_MODE", mode.to_string()),
                    ("UPCACHE_CHILD_PATH", path.display().to_string()),
                ],
                60,
            );
            (mode, st)
        })
        .collect()
}

/// What a [`HookStore`] is about to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOp {
    Read,
    Write,
    SetLen,
    Punch,
    /// `sync_data` (offset and length 0).
    Sync,
}

type Hook = Box<dyn Fn(StoreOp, u64, u64) -> io::Result<()> + Send + Sync>;

/// A real file store whose every read, write, resize and punch first runs
/// a test's hook with `(op, offset, length)`: the hook may fail the call
/// (return `Err`), block it (a [`Gate`]) or panic. One type for the
/// fault-injecting stores of the tests, instead of a delegating
/// `BackingStore` impl per test.
pub struct HookStore {
    inner: upcache::FileStore,
    hook: Hook,
}

impl HookStore {
    pub fn new(path: &Path, hook: impl Fn(StoreOp, u64, u64) -> io::Result<()> + Send + Sync + 'static) -> HookStore {
        HookStore {
            inner: upcache::FileStore::open(path).unwrap(),
            hook: Box::new(hook),
        }
    }
}

impl upcache::BackingStore for HookStore {
    fn read_at(&self, b: &mut [u8], o: u64) -> io::Result<usize> {
        (self.hook)(StoreOp::Read, o, b.len() as u64)?;
        self.inner.read_at(b, o)
    }
    fn write_all_at(&self, b: &[u8], o: u64) -> io::Result<()> {
        (self.hook)(StoreOp::Write, o, b.len() as u64)?;
        self.inner.write_all_at(b, o)
    }
    fn sync_data(&self) -> io::Result<()> {
        (self.hook)(StoreOp::Sync, 0, 0)?;
        self.inner.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn max_file_size(&self) -> u64 {
        self.inner.max_file_size()
    }
    fn set_len(&self, s: u64) -> io::Result<()> {
        (self.hook)(StoreOp::SetLen, s, 0)?;
        self.inner.set_len(s)
    }
    fn punch_hole(&self, o: u64, l: u64) -> io::Result<()> {
        (self.hook)(StoreOp::Punch, o, l)?;
        self.inner.punch_hole(o, l)
    }
}

/// A gate a store operation waits at: `pass` records the arrival and
/// blocks until `open`; the test waits for the arrival with `wait_arrived`.
#[derive(Default)]
pub struct Gate {
    state: std::sync::Mutex<(bool, bool)>, // (arrived, open)
    cv: std::sync::Condvar,
}

impl Gate {
    pub fn new(open: bool) -> std::sync::Arc<Gate> {
        std::sync::Arc::new(Gate {
            state: std::sync::Mutex::new((false, open)),
            cv: std::sync::Condvar::new(),
        })
    }
    pub fn pass(&self) {
        let mut s = self.state.lock().unwrap();
        s.0 = true;
        self.cv.notify_all();
        while !s.1 {
            s = self.cv.wait(s).unwrap();
        }
    }
    pub fn wait_arrived(&self) {
        let mut s = self.state.lock().unwrap();
        while !s.0 {
            s = self.cv.wait(s).unwrap();
        }
    }
    pub fn open(&self) {
        self.state.lock().unwrap().1 = true;
        self.cv.notify_all();
    }
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// A thread started by [`spawn_tracked`]: its id, and whether its
/// closure has returned or unwound.
pub struct Tracked<T> {
    handle: std::thread::JoinHandle<T>,
    pub tid: i32,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Run `f` on a new thread that reports its id and when `f` ends, for
/// tests that wait until it sleeps ([`Tracked::wait_parked`]) and check
/// that it has not finished.
pub fn spawn_tracked<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Tracked<T> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    struct Done(Arc<AtomicBool>);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let done = Arc::new(AtomicBool::new(false));
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let d = Done(done.clone());
    let handle = std::thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        let _done = d;
        f()
    });
    Tracked {
        handle,
        tid: tid_rx.recv().unwrap(),
        done,
    }
}

impl<T> Tracked<T> {
    /// Has the closure returned (or unwound)?
    pub fn done(&self) -> bool {
        self.done.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wait until the thread sleeps on a futex, or has finished.
    pub fn wait_parked(&self) {
        wait_until_parked(self.tid, || self.done());
    }

    /// Its result; `Err` if it panicked.
    pub fn join(self) -> std::thread::Result<T> {
        self.handle.join()
    }
}

/// Does thread `tid` of this process sleep on a futex now?
pub fn parked(tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan"))
        .unwrap_or_default()
        .contains("futex")
}

/// Wait until thread `tid` of this process sleeps on a futex (a lock, pin
/// or gate wait), or `done()` says it ended. A check loop, not a sleep.
pub fn wait_until_parked(tid: i32, done: impl Fn() -> bool) {
    let path = format!("/proc/self/task/{tid}/wchan");
    while !done() {
        if std::fs::read_to_string(&path).unwrap_or_default().contains("futex") {
            return;
        }
        std::thread::yield_now();
    }
}
