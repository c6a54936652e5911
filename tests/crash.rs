//! Crash test (issue #8): a child process appends records to a file through
//! `write_at` and through a shared mapping, and after every few records
//! makes them durable with `fsync`, `sync_range` or a mapping's
//! `flush_range`, printing `ack G` once the call returned Ok (every record
//! up to G is then promised). The parent SIGKILLs it at a random moment
//! (after a random number of acks, plus jitter) and checks that every
//! acknowledged record is in the file, byte for byte.
//!
//! A process kill keeps what reached the kernel (the store's `pwrite`), so
//! this checks that upcache acknowledges only what it has written. Kills:
//! `UPCACHE_CRASH_KILLS` (default 12; the README's long run uses 100).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use common::{tempdir, Rng};
use upcache::{DirtyTracking, PageCache, UffdMode};

/// Record size: not a divisor of the page size, so records straddle pages
/// and folios.
const REC: u64 = 3000;
/// File size; the child stops (and waits to be killed) when it is full.
const SIZE: u64 = 4 << 20;

fn record(run: u64, g: u64) -> Vec<u8> {
    let mut r = Rng::new(run.wrapping_mul(1_000_003) ^ g);
    let mut v = vec![0u8; REC as usize];
    r.fill(&mut v);
    v
}

/// Run `run`'s configuration: `Missing`, `Minor`, `Minor` with async dirty
/// tracking, `Missing` with large folios, `Minor` on the hugetlb page
/// store, in turn. The last field: hugetlb.
fn run_config(run: u64) -> (UffdMode, DirtyTracking, bool, bool) {
    match run % 5 {
        0 => (UffdMode::Missing, DirtyTracking::WriteFault, false, false),
        1 => (UffdMode::Minor, DirtyTracking::WriteFault, false, false),
        2 => (UffdMode::Minor, DirtyTracking::Async, false, false),
        3 => (UffdMode::Missing, DirtyTracking::WriteFault, true, false),
        _ => (UffdMode::Minor, DirtyTracking::WriteFault, true, true),
    }
}

/// The child's side. A no-op unless `UPCACHE_CRASH_CHILD` is set.
#[test]
fn crash_child_entry() {
    let Ok(path) = std::env::var("UPCACHE_CRASH_CHILD") else {
        return;
    };
    let run: u64 = std::env::var("UPCACHE_CRASH_RUN").unwrap().parse().unwrap();
    let (mode, tracking, large, hugetlb) = run_config(run);
    let cache = PageCache::builder()
        .mmap_mode(mode)
        .dirty_tracking(tracking)
        .large_folios(large)
        .hugetlb(hugetlb)
        .build();
    cache.start_fault_engine().expect("userfaultfd");
    let file = cache.open(&path).unwrap();
    let map = file.mmap_raw(0, SIZE as usize).unwrap();
    let mut rng = Rng::new(run);
    let mut out = std::io::stdout().lock();
    let mut first_unsynced = 1u64;
    let mut g = 1u64;
    while (g + 1) * REC <= SIZE {
        let off = g * REC;
        let data = record(run, g);
        if rng.below(2) == 0 {
            file.write_at(&data, off).unwrap();
        } else {
            map.write(off as usize, &data);
        }
        if rng.below(4) == 0 {
            let (start, end) = (first_unsynced * REC, (g + 1) * REC);
            match rng.below(3) {
                0 => file.fsync().unwrap(),
                1 => file.sync_range(start, end).unwrap(),
                _ => map.flush_range(start as usize, (end - start) as usize).unwrap(),
            }
            writeln!(out, "ack {g}").unwrap();
            out.flush().unwrap();
            first_unsynced = g + 1;
        }
        g += 1;
    }
    writeln!(out, "full").unwrap();
    out.flush().unwrap();
    // Wait to be killed (the parent never lets a child exit on its own).
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    common::watchdog("crash test", 600, crash_runs);
}

fn crash_runs() {
    let kills: u64 = std::env::var("UPCACHE_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let dir = tempdir();
    let mut rng = Rng::new(common::seed(77));
    let mut checked = 0u64;
    // The hugetlb runs' children take their pages from this pool.
    let pool = common::hugetlb_pool::pool_or_skip(8);
    for run in 0..kills {
        if run_config(run).3 && pool.is_none() {
            continue;
        }
        let path = dir.path().join(format!("crash-{run}"));
        std::fs::write(&path, vec![0u8; SIZE as usize]).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child_entry", "--nocapture", "--test-threads=1"])
            .env("UPCACHE_CRASH_CHILD", &path)
            .env("UPCACHE_CRASH_RUN", run.to_string())
            .stdout(Stdio::piped())
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let kill_after = 1 + rng.below(40);
        let jitter = rng.below(200_000);
        let mut acked = 0u64;
        let mut acks = 0u64;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            let Some(Ok(line)) = lines.next() else {
                panic!("run {run}: child exited before being killed: {:?}", child.wait());
            };
            if let Some(g) = line.strip_prefix("ack ") {
                acked = g.parse().unwrap();
                acks += 1;
                if acks == kill_after {
                    break;
                }
            } else if line == "full" {
                break;
            }
        }
        // Jitter, so the kill lands anywhere in the child's next writes
        // (not synchronization: any moment is a valid kill point).
        let mut x = 0u64;
        for i in 0..jitter {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        child.kill().unwrap();
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(9), "run {run}: child did not die by SIGKILL: {st:?}");
        let disk = std::fs::read(&path).unwrap();
        assert_eq!(disk.len() as u64, SIZE, "run {run}: file size");
        for g in 1..=acked {
            let off = (g * REC) as usize;
            assert!(
                disk[off..off + REC as usize] == record(run, g)[..],
                "run {run} ({:?}): acknowledged record {g} (of {acked}) is not in the file after SIGKILL",
                run_config(run)
            );
        }
        checked += acked;
    }
    eprintln!("crash: {kills} kills, {checked} acknowledged records checked");
    assert!(checked > 0, "no acknowledged record was ever checked");
}
