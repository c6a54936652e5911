//! What each side of a memory benchmark really held, printed next to its
//! time (issue: "a ratio whose two sides do different work is not a
//! result"): the backing file's bytes in the kernel page cache (`mincore`
//! on a fresh mapping), upcache's memfd bytes, and for a cgroup-limited
//! kernel side the group's `memory.usage_in_bytes` and its page-cache part.
//! A side that held more than its budget, or an upcache side that also
//! used the kernel's page cache when it should not, is marked INVALID.

#![allow(dead_code)]

use std::path::Path;

/// Bytes of `path` resident in the kernel page cache, from `mincore(2)` on
/// a fresh read-only mapping (which maps nothing itself).
pub fn file_cached_bytes(path: &Path) -> u64 {
    let f = std::fs::File::open(path).expect("open for mincore");
    let len = f.metadata().unwrap().len() as usize;
    if len == 0 {
        return 0;
    }
    // SAFETY: a private read-only mapping only inspected with mincore,
    // never read; the file is not truncated meanwhile.
    let map = unsafe { memmap2::Mmap::map(&f) }.expect("mmap for mincore");
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: `map` covers `len` bytes; `vec` has one byte per page.
    let r = unsafe { libc::mincore(map.as_ptr() as *mut _, len, vec.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * 4096
}

/// A cgroup v1 memory group's usage and the page-cache part of it. Panics
/// when the group cannot be read: a side whose limit cannot be checked is
/// not a result.
pub fn cgroup_usage(group: &str) -> (u64, u64) {
    let usage = std::fs::read_to_string(format!("{group}/memory.usage_in_bytes"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("{group}/memory.usage_in_bytes unreadable"));
    let cache = std::fs::read_to_string(format!("{group}/memory.stat"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("cache ").and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or_else(|| panic!("{group}/memory.stat has no cache line"));
    (usage, cache)
}

/// The shmem THP knob as the kernel reports it (the bracketed choice of
/// `/sys/kernel/mm/transparent_hugepage/shmem_enabled`).
pub fn shmem_thp_state() -> String {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .ok()
        .and_then(|s| {
            let a = s.find('[')?;
            let b = s[a..].find(']')? + a;
            Some(s[a + 1..b].to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// What one benchmark side held at the end of its last iteration.
#[derive(Clone, Debug, Default)]
pub struct Residency {
    /// Backing file bytes in the kernel page cache.
    pub file_cached: u64,
    /// upcache's memfd bytes (None for a kernel side).
    pub memfd: Option<u64>,
    /// cgroup usage and its page-cache part (kernel side in a group).
    pub cgroup: Option<(u64, u64)>,
    /// The side's memory budget, if it has one.
    pub budget: Option<u64>,
    /// The side must not use the kernel's page cache (O_DIRECT).
    pub direct: bool,
}

impl Residency {
    /// Why the result does not measure what it says, if it does not.
    pub fn invalid(&self) -> Option<String> {
        let mut why = Vec::new();
        if let (Some(b), Some(m)) = (self.budget, self.memfd) {
            if m > b {
                why.push(format!("memfd {:.1} MiB > budget {:.1} MiB", mib(m), mib(b)));
            }
        }
        if let (Some(b), Some((u, _))) = (self.budget, self.cgroup) {
            if u > b {
                why.push(format!("cgroup {:.1} MiB > budget {:.1} MiB", mib(u), mib(b)));
            }
        }
        // A cgroup-limited kernel side: the file's cached pages are charged
        // to the group, so more of them than the budget means some were
        // charged elsewhere (cached before the side joined the group).
        if let (Some(b), Some(_)) = (self.budget, self.cgroup) {
            if self.file_cached > b + self.slack() {
                why.push(format!(
                    "{:.1} MiB of the file cached, over the group's budget {:.1} MiB",
                    mib(self.file_cached),
                    mib(b)
                ));
            }
        }
        // O_DIRECT side: the kernel's page cache of the file must stay
        // (almost) empty: slack for unaligned tails and metadata.
        if self.direct && self.file_cached > self.slack() {
            why.push(format!(
                "O_DIRECT side left {:.1} MiB of the file in the kernel page cache",
                mib(self.file_cached)
            ));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// Slack for the checks: 1 MiB, or 1/64 of a small budget (at least
    /// 64 KiB), so that a leak of a few percent of a small budget fails.
    fn slack(&self) -> u64 {
        self.budget.map_or(1 << 20, |b| (b / 64).clamp(64 << 10, 1 << 20))
    }

    /// Print one line for `id` (the criterion ID).
    pub fn print(&self, id: &str) {
        let mut s = format!(
            "residency {id}: file in kernel page cache {:.1} MiB",
            mib(self.file_cached)
        );
        if let Some(m) = self.memfd {
            s += &format!(", upcache memfd {:.1} MiB", mib(m));
        }
        if let Some((u, c)) = self.cgroup {
            s += &format!(", cgroup usage {:.1} MiB (page cache {:.1} MiB)", mib(u), mib(c));
        }
        if let Some(b) = self.budget {
            s += &format!(", budget {:.1} MiB", mib(b));
        }
        s += &format!(", shmem THP {}", shmem_thp_state());
        match self.invalid() {
            Some(why) => println!("{s}  INVALID: {why}"),
            None => println!("{s}  valid"),
        }
    }
}

/// Print `r` for `id` if the side ran (criterion's filter may skip it).
/// An INVALID side fails the run: its time, already printed by criterion,
/// does not measure what its ID says.
pub fn report(id: &str, r: &Option<Residency>) {
    if let Some(r) = r {
        r.print(id);
        if let Some(why) = r.invalid() {
            panic!("{id}: INVALID result ({why})");
        }
    }
}

/// The kernel's dirty thresholds here, in bytes: (background, limit), from
/// `/proc/sys/vm/dirty_{background_,}{bytes,ratio}` and `MemAvailable`
/// (the kernel counts "dirtyable" memory, about what is available). A
/// benchmark whose kernel side writes through the page cache gives upcache
/// the same thresholds, so neither side starts writeback the other would
/// not.
pub fn kernel_dirty_thresholds() -> (u64, u64) {
    let read = |f: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/sys/vm/{f}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("MemAvailable:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .unwrap_or(0)
        * 1024;
    let pick = |bytes: u64, ratio: u64| if bytes != 0 { bytes } else { avail * ratio / 100 };
    (
        pick(read("dirty_background_bytes"), read("dirty_background_ratio")),
        pick(read("dirty_bytes"), read("dirty_ratio")),
    )
}

/// Where benchmarks put their files: `UPCACHE_BENCH_DIR`, else the
/// temporary directory (it must be a disk filesystem, not tmpfs).
pub fn bench_dir() -> std::path::PathBuf {
    std::env::var_os("UPCACHE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// Drop `path` from the kernel's page cache: `fsync` (dirty pages are not
/// dropped), then `POSIX_FADV_DONTNEED`.
pub fn drop_kernel_cache(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    // DONTNEED silently keeps pages that are mapped, locked, dirty or under
    // writeback: a "cold" side that starts warm measures nothing.
    let left = file_cached_bytes(path);
    assert!(
        left <= 1 << 20,
        "{}: {:.1} MiB still in the kernel page cache after dropping it (mapped somewhere?)",
        path.display(),
        mib(left)
    );
}

/// A cgroup v1 memory group limited to `limit` bytes (read back and
/// checked), removed when dropped, unwinding included (its processes, the
/// benches' children, have exited by then).
pub struct MemCgroup(&'static str);

impl MemCgroup {
    /// Create `path` (replacing an empty leftover) with `limit`.
    pub fn create(path: &'static str, limit: u64) -> MemCgroup {
        let _ = std::fs::remove_dir(path);
        std::fs::create_dir(path).expect("create the cgroup (root and cgroup v1 memory needed)");
        let g = MemCgroup(path);
        std::fs::write(format!("{path}/memory.limit_in_bytes"), limit.to_string()).unwrap();
        let set: u64 = std::fs::read_to_string(format!("{path}/memory.limit_in_bytes"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(
            set,
            limit & !4095,
            "{path}: the limit reads back as {set}, not the budget {limit}"
        );
        g
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(self.0);
    }
}

/// Write `path`'s dirty pages to disk now, so that the kernel's
/// background writeback of a freshly made file cannot run inside a later
/// side's timed pass.
pub fn sync_file(path: &Path) {
    std::fs::File::open(path).unwrap().sync_all().unwrap();
}

/// `n` pseudo-random values below `max` (xorshift64 from `seed`).
pub fn random_below(seed: u64, n: usize, max: u64) -> Vec<u64> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % max
        })
        .collect()
}

/// Run `f` over each of two key lists on its own thread; the wall time.
pub fn two_threads(lists: [Vec<u64>; 2], f: &(impl Fn(u64) + Sync)) -> std::time::Duration {
    let t = std::time::Instant::now();
    std::thread::scope(|s| {
        for list in &lists {
            s.spawn(move || {
                for &k in list {
                    f(k);
                }
            });
        }
    });
    t.elapsed()
}

/// Re-run this benchmark binary as a child with `env` (the kernel side of
/// a cgroup comparison) and return the nanoseconds it prints.
pub fn child_time(env: &[(&str, std::ffi::OsString)]) -> std::time::Duration {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("spawn the kernel-side child");
    assert!(
        out.status.success(),
        "kernel child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ns: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("child's time");
    std::time::Duration::from_nanos(ns)
}

#[path = "../../tests/common/thp.rs"]
mod thp;
#[allow(unused_imports)]
pub use thp::{shmem_pmd_mapped_kib, ShmemThp};

#[path = "../../tests/common/hugetlb_pool.rs"]
mod hugetlb_pool;
#[allow(unused_imports)]
pub use hugetlb_pool::{meminfo, HugePool};
