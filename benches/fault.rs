//! Fault-engine benchmarks. Every group measures its references in the same
//! run on the same data:
//!
//! - `fault_random_4k/{kernel_mmap, upcache_minor, upcache_missing, upcache_large_folios, upcache_hugetlb, upcache_no_readahead, uffd_copy_peer, uffd_copy_peer_64k}`:
//!   first touch of every page of a 256 MiB file in random order by 2
//!   threads; the file is in the kernel's page cache, upcache's cache starts
//!   empty (a new `PageCache` per iteration, so upcache reads every window
//!   from the store). `upcache_no_readahead` is the default mode with a
//!   4 KiB readahead window and `Advice::Random`. The peers are UMap-style
//!   engines (anonymous region, MISSING only, `pread` + `UFFDIO_COPY`):
//!   `uffd_copy_peer` copies 4 KiB per fault with one sleeping handler
//!   thread; `uffd_copy_peer_64k` is the peer at its best configuration,
//!   64 KiB per fault and 2 polling filler threads, like UMap's best run.
//!   `uffd_sigbus_inthread{,_64k,_2m}` (issue #12 item 3's probe) is the same
//!   peer with `UFFD_FEATURE_SIGBUS`: each fault is resolved by a SIGBUS
//!   handler in the faulting thread (`pread` + `UFFDIO_COPY`), no handler
//!   thread and no wake-up.
//! - `mapped_hit_random/{kernel_mmap, kernel_mmap_memfd, upcache, upcache_minor, upcache_missing, upcache_large_folios, upcache_large_folios_no_thp, upcache_hugetlb}`: a new
//!   mapping of a file upcache holds entirely, touched at random (one
//!   thread). `upcache` is the default mode; `kernel_mmap_memfd` maps the
//!   same bytes from a memfd (4 KiB shmem pages, like upcache's).
//!   `upcache_large_folios` is a cache with `large_folios(true)` filled and
//!   mapped with shmem THP set to `always` (root; restored after the side),
//!   `upcache_large_folios_no_thp` the same with the system's setting.
//! - `scan_seq_cold/{kernel_mmap, upcache, upcache_minor, upcache_minor_no_map_ahead, upcache_direct, upcache_large_folios, upcache_direct_large_folios, upcache_hugetlb, upcache_direct_hugetlb}`: sequential scan of a 1 GiB
//!   file on the disk filesystem, dropped from the kernel's page cache
//!   (fsync + POSIX_FADV_DONTNEED) and from upcache before each iteration.
//! - `first_write/{kernel_ext4, upcache, upcache_minor}`: a shared writable mapping of a
//!   64 MiB file on the disk filesystem; every page read first (untimed),
//!   then each page written once (timed).
//!
//! The `*_hugetlb` sides are caches built with `hugetlb(true)` (2 MiB
//! folios in the kernel's hugetlbfs pool, `Minor` mode); the bench sizes
//! `/proc/sys/vm/nr_hugepages` for the side (root) and restores it.
//!
//! After each side of `fault_random_4k`, `mapped_hit_random` and
//! `scan_seq_cold` a `residency ID: ...` line reports what it held at the
//! end of its last iteration (the file's bytes in the kernel page cache,
//! upcache's memfd bytes) and marks it INVALID where an O_DIRECT side used
//! the kernel's page cache.
//!
//! `cargo bench --bench fault` (`UPCACHE_BENCH_DIR` places the files; it
//! must be on a disk filesystem, not tmpfs).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_main, Criterion};

mod common;
use common::{
    bench_dir, drop_kernel_cache, file_cached_bytes, report, shmem_pmd_mapped_kib, HugePool, Residency, ShmemThp,
};
use upcache::uffd::{mode, Uffd};
use upcache::{PageCache, Share, UffdMode, PAGE_SIZE};

fn make_file(path: &Path, size: u64) {
    let chunk: Vec<u8> = (0..(1 << 20)).map(|i| (i * 13 % 251) as u8 + 1).collect();
    let f = std::fs::File::create(path).unwrap();
    for i in 0..size / chunk.len() as u64 {
        f.write_all_at(&chunk, i * chunk.len() as u64).unwrap();
    }
    f.sync_all().unwrap();
}

fn warm_kernel_cache(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while f.read_at(&mut buf, off).unwrap() > 0 {
        off += buf.len() as u64;
    }
}

/// A group of slow iterations: 10 samples, `secs` of measurement.
fn slow_group<'a>(
    c: &'a mut Criterion,
    name: &str,
    secs: u64,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .measurement_time(Duration::from_secs(secs))
        .warm_up_time(Duration::from_secs(1));
    g
}

/// Time `iters` runs of `one`, each returning the time of its measured part
/// (setup and teardown outside it are not counted).
fn iter_each(b: &mut criterion::Bencher<'_>, mut one: impl FnMut() -> Duration) {
    b.iter_custom(|iters| (0..iters).map(|_| one()).sum())
}

fn shuffled_pages(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

/// Touch (read one byte of) every listed page of `base`, split over
/// `threads` threads; returns the wall time.
fn touch_pages(base: usize, pages: &[usize], threads: usize) -> Duration {
    let t = Instant::now();
    std::thread::scope(|s| {
        for part in pages.chunks(pages.len().div_ceil(threads)) {
            s.spawn(move || {
                let mut sum = 0u64;
                for &p in part {
                    // SAFETY: `base` is a live mapping covering every listed
                    // page (the caller keeps it mapped during the call).
                    sum += unsafe { std::ptr::read_volatile((base + p * PAGE_SIZE) as *const u8) } as u64;
                }
                std::hint::black_box(sum);
            });
        }
    });
    t.elapsed()
}

/// A kernel mapping of a file (memmap2), the reference side.
struct KernelMap {
    ptr: usize,
    _map: memmap2::MmapRaw,
}

impl KernelMap {
    fn new(path: &Path, len: usize, write: bool) -> (KernelMap, std::fs::File) {
        let f = std::fs::OpenOptions::new().read(true).write(write).open(path).unwrap();
        let mut o = memmap2::MmapOptions::new();
        o.len(len);
        let map = if write { o.map_raw(&f) } else { o.map_raw_read_only(&f) }.unwrap();
        (
            KernelMap {
                ptr: map.as_ptr() as usize,
                _map: map,
            },
            f,
        )
    }
}

const RANDOM_SIZE: u64 = 256 << 20;

/// A fresh private anonymous region of `len` bytes for a UMap-style peer;
/// the caller unmaps it.
fn anon_region(len: usize) -> usize {
    use rustix::mm::{mmap_anonymous, MapFlags, ProtFlags};
    // SAFETY: a fresh private anonymous mapping (no MAP_FIXED) aliases no
    // Rust object.
    (unsafe {
        mmap_anonymous(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    })
    .unwrap() as usize
}

/// The UMap-style peer: anonymous region, MISSING only, `fillers`
/// handler threads, `pread` + `UFFDIO_COPY` of `page` bytes per fault (the
/// aligned block around the faulting address). `poll_spin`: handlers spin
/// on the non-blocking fd, as upcache's do, instead of sleeping in poll.
/// Returns the touch time and the anonymous memory it filled (RSS of the
/// region, from mincore).
fn uffd_copy_peer(path: &Path, pages: &[usize], page: usize, fillers: usize, poll_spin: bool) -> (Duration, u64) {
    let len = RANDOM_SIZE as usize;
    let base = anon_region(len);
    let uffd = Uffd::open(0).expect("userfaultfd");
    // SAFETY: `base..base + len` is the anonymous mapping made above for
    // this engine alone.
    unsafe { uffd.register_owned(base, len, mode::MISSING) }.unwrap();
    let file = std::fs::File::open(path).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let t = std::thread::scope(|s| {
        for _ in 0..fillers {
            s.spawn(|| {
                let mut msgs = [upcache::uffd::RawMsg::default(); 16];
                let mut buf = vec![0u8; page];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = uffd.read_msgs(&mut msgs).unwrap();
                    if n == 0 {
                        if poll_spin {
                            std::hint::spin_loop();
                            continue;
                        }
                        // SAFETY: the fd is owned by `uffd`, alive here.
                        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(uffd.raw_fd()) };
                        let mut pfd = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
                        let timeout = rustix::event::Timespec {
                            tv_sec: 0,
                            tv_nsec: 10_000_000,
                        };
                        let _ = rustix::event::poll(&mut pfd, Some(&timeout));
                        continue;
                    }
                    for m in &msgs[..n] {
                        if let Some(pf) = m.page_fault() {
                            let block = (pf.address - base) & !(page - 1);
                            file.read_exact_at(&mut buf, block as u64).unwrap();
                            // SAFETY: `buf` is a readable buffer of `page` bytes.
                            if unsafe { uffd.copy(base + block, buf.as_ptr(), page) }.is_err() {
                                // Filled by the other handler meanwhile
                                // (EEXIST): the faulting thread still
                                // waits for a wake-up.
                                let _ = uffd.wake(base + block, page);
                            }
                        }
                    }
                }
            });
        }
        let t = touch_pages(base, pages, 2);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        t
    });
    let mut vec = vec![0u8; len / PAGE_SIZE];
    // SAFETY: `base` maps `len` bytes; one byte per page in `vec`.
    unsafe { libc::mincore(base as *mut _, len, vec.as_mut_ptr()) };
    let filled = vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE_SIZE as u64;
    // SAFETY: our own mapping, no longer touched.
    unsafe { rustix::mm::munmap(base as *mut _, len).unwrap() };
    (t, filled)
}

/// The in-thread probe's state, read by its SIGBUS handler (statics: a
/// signal handler gets no context argument of ours).
mod inthread {
    use std::sync::atomic::{
        AtomicI32, AtomicUsize,
        Ordering::{Acquire, Relaxed, Release},
    };

    pub static UFFD: AtomicI32 = AtomicI32::new(-1);
    pub static FILE: AtomicI32 = AtomicI32::new(-1);
    pub static BASE: AtomicUsize = AtomicUsize::new(0);
    pub static LEN: AtomicUsize = AtomicUsize::new(0);
    pub static PAGE: AtomicUsize = AtomicUsize::new(0);

    /// `UFFDIO_COPY`: `_IOWR(0xAA, 0x03, struct uffdio_copy)` (40 bytes).
    const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
    /// Fill buffers of `PAGE` bytes, one per faulting thread, made before
    /// the pass (a handler must not allocate): a handler takes one by
    /// swapping its slot to 0 and puts it back when done.
    pub static BUFS: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

    #[repr(C)]
    struct UffdioCopy {
        dst: u64,
        src: u64,
        len: u64,
        mode: u64,
        copy: i64,
    }

    /// SIGBUS handler (async-signal-safe: atomics, `pread`, `ioctl`, a
    /// buffer made before the pass): a missing fault in the probe's region, delivered as
    /// SIGBUS by `UFFD_FEATURE_SIGBUS`, is filled from the file in the
    /// faulting thread; returning retries the access. Any other SIGBUS
    /// aborts.
    pub extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO.
        let addr = unsafe { (*info).si_addr() } as usize;
        let (base, len, page) = (BASE.load(Relaxed), LEN.load(Relaxed), PAGE.load(Relaxed));
        if addr < base || addr >= base + len || page == 0 {
            // SAFETY: abort is async-signal-safe.
            unsafe { libc::abort() };
        }
        // SAFETY: the calling thread's errno, restored before returning
        // (the interrupted code may be about to read it).
        let errno = unsafe { libc::__errno_location() };
        // SAFETY: as above.
        let saved = unsafe { *errno };
        let block = (addr - base) & !(page - 1);
        let (slot, buf) = loop {
            if let Some(t) = BUFS
                .iter()
                .find_map(|s| Some((s, s.swap(0, Acquire))).filter(|t| t.1 != 0))
            {
                break t;
            }
            std::hint::spin_loop();
        };
        let buf = buf as *mut u8;
        let mut done = 0;
        while done < page {
            // SAFETY: `buf` (this handler's own, taken from its slot) has
            // room for `page - done` bytes at `done`.
            let n = unsafe {
                libc::pread(
                    FILE.load(Relaxed),
                    buf.add(done) as *mut libc::c_void,
                    page - done,
                    (block + done) as libc::off_t,
                )
            };
            // SAFETY: as above.
            if n < 0 && unsafe { *errno } == libc::EINTR {
                continue;
            }
            if n <= 0 {
                // SAFETY: abort is async-signal-safe.
                unsafe { libc::abort() };
            }
            done += n as usize;
        }
        let mut copy = UffdioCopy {
            dst: (base + block) as u64,
            src: buf as u64,
            len: page as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `copy` and `page` bytes of `buf` and
        // fills the registered, still missing range at `dst`; EEXIST
        // (another thread filled it first) leaves it as it is.
        let r = unsafe { libc::ioctl(UFFD.load(Relaxed), UFFDIO_COPY, &mut copy) };
        // SAFETY: errno of this thread, as above.
        if r != 0 && !matches!(unsafe { *errno }, libc::EEXIST | libc::EAGAIN) {
            // Any other failure would refault for ever: abort instead.
            // SAFETY: abort is async-signal-safe.
            unsafe { libc::abort() };
        }
        // Release: our `pread` and copy of `buf` happen before the next
        // handler's `swap` (Acquire) takes it.
        slot.store(buf as usize, Release);
        // SAFETY: as above.
        unsafe { *errno = saved };
    }
}

/// Issue #12 item 3's probe: the UMap-style peer (anonymous region,
/// MISSING, `pread` + `UFFDIO_COPY` of `page` bytes) but with
/// `UFFD_FEATURE_SIGBUS`, so each fault is resolved by a SIGBUS handler in
/// the faulting thread: no handler thread, no wake-up.
fn uffd_sigbus_inthread(path: &Path, pages: &[usize], page: usize) -> Duration {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering::Relaxed;
    const FEATURE_SIGBUS: u64 = 1 << 7;
    let len = RANDOM_SIZE as usize;
    // One fill buffer per touching thread (`touch_pages(.., 2)`).
    let mut bufs = [vec![0u8; page], vec![0u8; page]];
    for (slot, b) in inthread::BUFS.iter().zip(&mut bufs) {
        slot.store(b.as_mut_ptr() as usize, Relaxed);
    }
    let base = anon_region(len);
    let uffd = Uffd::open(FEATURE_SIGBUS).expect("userfaultfd");
    assert!(
        uffd.features() & FEATURE_SIGBUS != 0,
        "UFFD_FEATURE_SIGBUS not granted: the probe would wait for a handler thread it does not have"
    );
    // SAFETY: `base..base + len` is the anonymous mapping made above for
    // this engine alone.
    unsafe { uffd.register_owned(base, len, mode::MISSING) }.unwrap();
    let file = std::fs::File::open(path).unwrap();
    inthread::UFFD.store(uffd.raw_fd(), Relaxed);
    inthread::FILE.store(file.as_raw_fd(), Relaxed);
    inthread::BASE.store(base, Relaxed);
    inthread::LEN.store(len, Relaxed);
    inthread::PAGE.store(page, Relaxed);
    // SAFETY: installs our handler (async-signal-safe, see above) for the
    // duration of the touch pass, then restores the previous one.
    let old = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = inthread::on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(libc::sigaction(libc::SIGBUS, &sa, &mut old), 0);
        old
    };
    let t = touch_pages(base, pages, 2);
    // SAFETY: restores the handler saved above.
    unsafe { libc::sigaction(libc::SIGBUS, &old, std::ptr::null_mut()) };
    inthread::PAGE.store(0, Relaxed);
    for slot in &inthread::BUFS {
        slot.store(0, Relaxed);
    }
    drop(bufs);
    drop(uffd);
    // SAFETY: our own mapping, no longer touched.
    unsafe { rustix::mm::munmap(base as *mut _, len).unwrap() };
    t
}

fn fault_random_4k(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let path = dir.path().join("fault-random");
    make_file(&path, RANDOM_SIZE);
    warm_kernel_cache(&path);
    let pages = shuffled_pages((RANDOM_SIZE / PAGE_SIZE as u64) as usize, 7);
    let mut g = slow_group(c, "fault_random_4k", 20);
    let mut last = None;
    g.bench_function("kernel_mmap", |b| {
        iter_each(b, || {
            let (m, _f) = KernelMap::new(&path, RANDOM_SIZE as usize, false);
            let t = touch_pages(m.ptr, &pages, 2);
            last = Some(Residency {
                file_cached: file_cached_bytes(&path),
                ..Default::default()
            });
            t
        })
    });
    report("fault_random_4k/kernel_mmap", &last);
    for (id, mode, ra) in [
        ("upcache_minor", UffdMode::Minor, None),
        ("upcache_missing", UffdMode::Missing, None),
        ("upcache_large_folios", UffdMode::Missing, Some(0)),
        // `Some(1)`: the hugetlb page store (2 MiB folios, `Minor` mode).
        ("upcache_hugetlb", UffdMode::Minor, Some(1)),
        // One page per miss: the same work per fault as the 4 KiB peer.
        (
            "upcache_no_readahead",
            upcache::PageCacheBuilder::DEFAULT_MMAP_MODE,
            Some(PAGE_SIZE as u64),
        ),
    ] {
        let mut last = None;
        g.bench_function(id, |b| {
            iter_each(b, || {
                let mut builder = PageCache::builder().mmap_mode(mode);
                // `Some(0)`: large folios (a 2 MiB folio per miss) with
                // shmem THP on for this side.
                let _thp = (ra == Some(0)).then(|| ShmemThp::always().expect("shmem THP knob (root)"));
                let _pool =
                    (ra == Some(1)).then(|| HugePool::with_free((RANDOM_SIZE >> 21) + 8).expect("hugetlb pool (root)"));
                match ra {
                    Some(0) => builder = builder.large_folios(true),
                    Some(1) => builder = builder.hugetlb(true),
                    Some(ra) => builder = builder.readahead_bytes(ra).readahead_max_bytes(ra),
                    None => {}
                }
                let cache = builder.build();
                let file = cache.open(&path).unwrap();
                if ra.is_some_and(|r| r > 1) {
                    file.advise(upcache::Advice::Random, 0, 0).unwrap();
                }
                // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
                let map = unsafe { file.mmap(0, RANDOM_SIZE as usize, Share::Shared) }.unwrap();
                let t = touch_pages(map.as_ptr() as usize, &pages, 2);
                last = Some(Residency {
                    file_cached: file_cached_bytes(&path),
                    memfd: Some(file.memory_bytes()),
                    ..Default::default()
                });
                t
            })
        });
        report(&format!("fault_random_4k/{id}"), &last);
    }
    for (id, page, fillers, spin) in [
        ("uffd_copy_peer", PAGE_SIZE, 1, false),
        // UMap at its best here: 64 KiB pages, 2 fillers, polling.
        ("uffd_copy_peer_64k", 64 << 10, 2, true),
    ] {
        let mut filled = None;
        g.bench_function(id, |b| {
            iter_each(b, || {
                let (t, f) = uffd_copy_peer(&path, &pages, page, fillers, spin);
                filled = Some(f);
                t
            })
        });
        if let Some(filled) = filled {
            println!(
                "residency fault_random_4k/{id}: file in kernel page cache {:.1} MiB, peer's anonymous memory {:.1} MiB",
                file_cached_bytes(&path) as f64 / (1 << 20) as f64,
                filled as f64 / (1 << 20) as f64
            );
        }
    }
    for (id, page) in [
        ("uffd_sigbus_inthread", PAGE_SIZE),
        ("uffd_sigbus_inthread_64k", 64 << 10),
        // An in-thread mode at 2 MiB per fault (issue #12 item 3), next
        // to `upcache_hugetlb` and `upcache_large_folios`.
        ("uffd_sigbus_inthread_2m", 2 << 20),
    ] {
        g.bench_function(id, |b| iter_each(b, || uffd_sigbus_inthread(&path, &pages, page)));
    }
    g.finish();
}

fn mapped_hit_random(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let path = dir.path().join("mapped-hit");
    make_file(&path, RANDOM_SIZE);
    warm_kernel_cache(&path);
    let pages = shuffled_pages((RANDOM_SIZE / PAGE_SIZE as u64) as usize, 9);
    let mut g = slow_group(c, "mapped_hit_random", 10);
    let mut last = None;
    g.bench_function("kernel_mmap", |b| {
        iter_each(b, || {
            let (m, _f) = KernelMap::new(&path, RANDOM_SIZE as usize, false);
            let t = touch_pages(m.ptr, &pages, 1);
            last = Some(Residency {
                file_cached: file_cached_bytes(&path),
                ..Default::default()
            });
            t
        })
    });
    report("mapped_hit_random/kernel_mmap", &last);
    // The same pages in a memfd (4 KiB shmem pages, as upcache's), mapped
    // by the kernel: what the page-table work costs without ext4's large
    // folios.
    let memfd = rustix::fs::memfd_create("bench", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let memfd = std::fs::File::from(memfd);
    {
        let mut buf = vec![0u8; 1 << 20];
        let src = std::fs::File::open(&path).unwrap();
        for off in (0..RANDOM_SIZE).step_by(buf.len()) {
            src.read_exact_at(&mut buf, off).unwrap();
            memfd.write_all_at(&buf, off).unwrap();
        }
    }
    g.bench_function("kernel_mmap_memfd", |b| {
        iter_each(b, || {
            let map = memmap2::MmapOptions::new()
                .len(RANDOM_SIZE as usize)
                .map_raw_read_only(&memfd)
                .unwrap();
            touch_pages(map.as_ptr() as usize, &pages, 1)
        })
    });
    let default_mode = upcache::PageCacheBuilder::DEFAULT_MMAP_MODE;
    // `upcache_hugetlb`: the hugetlb page store, each 2 MiB folio mapped
    // with one entry by one `UFFDIO_CONTINUE` (a `Minor` userfault per
    // 2 MiB); the pool is sized for that side only.
    for (id, mode, hugetlb) in [
        ("upcache", default_mode, false),
        ("upcache_minor", UffdMode::Minor, false),
        ("upcache_missing", UffdMode::Missing, false),
        ("upcache_hugetlb", UffdMode::Minor, true),
    ] {
        let _pool = hugetlb.then(|| HugePool::with_free((RANDOM_SIZE >> 21) + 8).expect("hugetlb pool (root)"));
        let cache = PageCache::builder().mmap_mode(mode).hugetlb(hugetlb).build();
        let file = cache.open(&path).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for off in (0..RANDOM_SIZE).step_by(buf.len()) {
            file.read_exact_at(&mut buf, off).unwrap();
        }
        let mut last = None;
        g.bench_function(id, |b| {
            iter_each(b, || {
                // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
                let map = unsafe { file.mmap(0, RANDOM_SIZE as usize, Share::Shared) }.unwrap();
                let t = touch_pages(map.as_ptr() as usize, &pages, 1);
                last = Some(Residency {
                    file_cached: file_cached_bytes(&path),
                    memfd: Some(file.memory_bytes()),
                    ..Default::default()
                });
                t
            })
        });
        report(&format!("mapped_hit_random/{id}"), &last);
    }
    // Large folios: 2 MiB folios; with shmem THP on (set for this side and
    // restored) each is one huge page, mapped with a PMD.
    for (id, thp) in [("upcache_large_folios", true), ("upcache_large_folios_no_thp", false)] {
        let _thp = thp.then(|| ShmemThp::always().expect("shmem THP knob (root)"));
        let cache = PageCache::builder().large_folios(true).build();
        let file = cache.open(&path).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for off in (0..RANDOM_SIZE).step_by(buf.len()) {
            file.read_exact_at(&mut buf, off).unwrap();
        }
        let mut last = None;
        let mut pmd = 0;
        g.bench_function(id, |b| {
            iter_each(b, || {
                // SAFETY: the mapping is only read, through short-lived borrows.
                let map = unsafe { file.mmap(0, RANDOM_SIZE as usize, Share::Shared) }.unwrap();
                let before = shmem_pmd_mapped_kib();
                let t = touch_pages(map.as_ptr() as usize, &pages, 1);
                pmd = shmem_pmd_mapped_kib().saturating_sub(before);
                last = Some(Residency {
                    file_cached: file_cached_bytes(&path),
                    memfd: Some(file.memory_bytes()),
                    ..Default::default()
                });
                t
            })
        });
        if last.is_some() {
            println!(
                "mapped_hit_random/{id}: the timed mapping got {} MiB PMD-mapped",
                pmd >> 10
            );
        }
        report(&format!("mapped_hit_random/{id}"), &last);
    }
    g.finish();
}

const SCAN_SIZE: u64 = 1 << 30;

fn scan_seq_cold(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let path = dir.path().join("scan-cold");
    make_file(&path, SCAN_SIZE);
    let pages: Vec<usize> = (0..(SCAN_SIZE / PAGE_SIZE as u64) as usize).collect();
    let mut g = slow_group(c, "scan_seq_cold", 30);
    let mut last = None;
    g.bench_function("kernel_mmap", |b| {
        iter_each(b, || {
            drop_kernel_cache(&path);
            let (m, _f) = KernelMap::new(&path, SCAN_SIZE as usize, false);
            let t = touch_pages(m.ptr, &pages, 1);
            last = Some(Residency {
                file_cached: file_cached_bytes(&path),
                ..Default::default()
            });
            t
        })
    });
    report("scan_seq_cold/kernel_mmap", &last);
    let default_mode = upcache::PageCacheBuilder::DEFAULT_MMAP_MODE;
    for (id, mode, map_ahead) in [
        ("upcache", default_mode, true),
        ("upcache_minor", UffdMode::Minor, true),
        ("upcache_minor_no_map_ahead", UffdMode::Minor, false),
    ] {
        scan_upcache(&mut g, id, &path, &pages, mode, map_ahead, false);
    }
    // The O_DIRECT store: the disk reads straight into the folios, no copy
    // through the kernel's page cache.
    scan_upcache(&mut g, "upcache_direct", &path, &pages, default_mode, true, true);
    {
        let _thp = ShmemThp::always().expect("shmem THP knob (root)");
        LARGE.with(|l| l.set(true));
        scan_upcache(&mut g, "upcache_large_folios", &path, &pages, default_mode, true, false);
        scan_upcache(
            &mut g,
            "upcache_direct_large_folios",
            &path,
            &pages,
            default_mode,
            true,
            true,
        );
        LARGE.with(|l| l.set(false));
    }
    {
        let _pool = HugePool::with_free((SCAN_SIZE >> 21) + 8).expect("hugetlb pool (root)");
        HUGETLB.with(|l| l.set(true));
        scan_upcache(&mut g, "upcache_hugetlb", &path, &pages, UffdMode::Minor, true, false);
        scan_upcache(
            &mut g,
            "upcache_direct_hugetlb",
            &path,
            &pages,
            UffdMode::Minor,
            true,
            true,
        );
        HUGETLB.with(|l| l.set(false));
    }
    g.finish();
}

thread_local! {
    /// The `scan_upcache` side being measured uses large folios.
    static LARGE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The `scan_upcache` side being measured uses the hugetlb page store.
    static HUGETLB: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn scan_upcache(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: &str,
    path: &Path,
    pages: &[usize],
    mode: UffdMode,
    map_ahead: bool,
    direct: bool,
) {
    let mut last = None;
    {
        g.bench_function(id, |b| {
            iter_each(b, || {
                drop_kernel_cache(path);
                let cache = PageCache::builder()
                    .mmap_mode(mode)
                    .map_ahead(map_ahead)
                    .large_folios(LARGE.with(|l| l.get()))
                    .hugetlb(HUGETLB.with(|l| l.get()))
                    .build();
                let store = direct.then(|| std::sync::Arc::new(upcache::DirectFileStore::open(path).unwrap()));
                let file = match &store {
                    Some(s) => cache.open_with_ops("scan", upcache::StoreOps::new(s.clone())).unwrap(),
                    None => cache.open(path).unwrap(),
                };
                // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
                let map = unsafe { file.mmap(0, SCAN_SIZE as usize, Share::Shared) }.unwrap();
                let t = touch_pages(map.as_ptr() as usize, pages, 1);
                if let Some(s) = &store {
                    // The direct side must really be O_DIRECT.
                    assert_eq!(s.direct_fallbacks(), 0, "{id}: buffered I/O on the direct side");
                }
                last = Some(Residency {
                    file_cached: file_cached_bytes(path),
                    memfd: Some(file.memory_bytes()),
                    direct,
                    ..Default::default()
                });
                t
            })
        });
    }
    report(&format!("scan_seq_cold/{id}"), &last);
}

const WRITE_SIZE: u64 = 64 << 20;

fn write_pages(base: usize, pages: usize) -> Duration {
    let t = Instant::now();
    for p in 0..pages {
        // SAFETY: `base` is a live writable mapping of `pages` pages.
        unsafe { std::ptr::write_volatile((base + p * PAGE_SIZE) as *mut u8, p as u8) };
    }
    t.elapsed()
}

fn first_write(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let path = dir.path().join("first-write");
    make_file(&path, WRITE_SIZE);
    let n = (WRITE_SIZE / PAGE_SIZE as u64) as usize;
    let all: Vec<usize> = (0..n).collect();
    let mut g = slow_group(c, "first_write", 10);
    g.bench_function("kernel_ext4", |b| {
        iter_each(b, || {
            let (m, f) = KernelMap::new(&path, WRITE_SIZE as usize, true);
            f.sync_all().unwrap(); // every page clean: the first write pays page_mkwrite
            touch_pages(m.ptr, &all, 1);
            write_pages(m.ptr, n)
        })
    });
    let default_mode = upcache::PageCacheBuilder::DEFAULT_MMAP_MODE;
    for (id, mode) in [("upcache", default_mode), ("upcache_minor", UffdMode::Minor)] {
        let cache = PageCache::builder().mmap_mode(mode).build();
        let file = cache.open(&path).unwrap();
        g.bench_function(id, |b| {
            iter_each(b, || {
                file.fsync().unwrap(); // every folio clean
                                       // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
                let mut map = unsafe { file.mmap_mut(0, WRITE_SIZE as usize, Share::Shared) }.unwrap();
                touch_pages(map.as_mut_ptr() as usize, &all, 1);
                write_pages(map.as_mut_ptr() as usize, n)
            })
        });
    }
    g.finish();
}

#[allow(missing_docs)]
mod groups {
    criterion::criterion_group!(
        benches,
        super::fault_random_4k,
        super::mapped_hit_random,
        super::scan_seq_cold,
        super::first_write
    );
}
use groups::benches;
criterion_main!(benches);
