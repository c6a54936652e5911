//! Hit ratio of the replacement policies under a memory limit, measured on
//! the real cache (read_at of 4 KiB pages of a real file, readahead off so
//! that a miss brings in exactly one page):
//!
//! - `zipf(0.99)`: accesses drawn from a Zipf(0.99) distribution over the
//!   file's pages, the cache holding 25 % of them;
//! - `scan+hot`: 80 % of accesses uniform over a hot set of half the cache,
//!   interleaved with a one-pass sequential scan of the rest of the file.
//!
//! Prints a markdown table: S3-FIFO (upcache's policy) vs CLOCK (one-queue
//! second chance) vs exact LRU simulated on the same trace.
//!
//! ```text
//! cargo run --release --example hit_ratio
//! ```

use upcache::{Advice, PageCache, ReplacementPolicy, PAGE_SIZE};

const PAGES: usize = 16 * 1024; // a 64 MiB file
const CACHE_PAGES: u64 = PAGES as u64 / 4;
const ACCESSES: usize = 300_000;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn zipf_trace(n: usize, s: f64, len: usize, seed: u64) -> Vec<usize> {
    let mut cdf = Vec::with_capacity(n);
    let mut acc = 0.0;
    for k in 1..=n {
        acc += 1.0 / (k as f64).powf(s);
        cdf.push(acc);
    }
    let total = acc;
    let mut rng = Rng(seed);
    // Scatter ranks over the file so popularity is not laid out in order.
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        perm.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    (0..len)
        .map(|_| {
            let u = rng.unit() * total;
            perm[cdf.partition_point(|&c| c < u).min(n - 1)]
        })
        .collect()
}

fn scan_hot_trace(n: usize, len: usize, seed: u64) -> Vec<usize> {
    let hot = (CACHE_PAGES / 2) as usize;
    let mut rng = Rng(seed);
    let mut scan = hot;
    (0..len)
        .map(|_| {
            if rng.next() % 5 == 0 {
                scan = if scan + 1 >= n { hot } else { scan + 1 };
                scan
            } else {
                (rng.next() % hot as u64) as usize
            }
        })
        .collect()
}

fn hit_ratio(path: &std::path::Path, policy: ReplacementPolicy, trace: &[usize]) -> f64 {
    let cache = PageCache::builder()
        .memory_limit(CACHE_PAGES * PAGE_SIZE as u64)
        .replacement_policy(policy)
        .max_folio_order(0)
        .build();
    let file = cache.open(path).unwrap();
    file.advise(Advice::Random, 0, 0).unwrap();
    let mut buf = vec![0u8; PAGE_SIZE];
    // Warm up with the first fifth of the trace, measure the rest.
    let warm = trace.len() / 5;
    for &p in &trace[..warm] {
        file.read_at(&mut buf, (p * PAGE_SIZE) as u64).unwrap();
    }
    let before = cache.stats();
    for &p in &trace[warm..] {
        file.read_at(&mut buf, (p * PAGE_SIZE) as u64).unwrap();
    }
    let after = cache.stats();
    // Each access ends in exactly one hit (a miss reads the page, then the
    // lookup is retried and hits), so the miss ratio is misses / accesses.
    let misses = (after.misses - before.misses) as f64;
    1.0 - misses / (trace.len() - warm) as f64
}

/// Exact LRU, simulated on the trace (no cache involved): the reference
/// the issue asks for.
fn lru_hit_ratio(trace: &[usize]) -> f64 {
    use std::collections::{BTreeMap, HashMap};
    let mut last: HashMap<usize, u64> = HashMap::new();
    let mut by_time: BTreeMap<u64, usize> = BTreeMap::new();
    let warm = trace.len() / 5;
    let mut misses = 0u64;
    for (t, &p) in trace.iter().enumerate() {
        let t = t as u64;
        match last.insert(p, t) {
            Some(old) => {
                by_time.remove(&old);
            }
            None => {
                if t as usize >= warm {
                    misses += 1;
                }
                if last.len() as u64 > CACHE_PAGES {
                    let (&oldest, &victim) = by_time.iter().next().unwrap();
                    by_time.remove(&oldest);
                    last.remove(&victim);
                }
            }
        }
        by_time.insert(t, p);
    }
    1.0 - misses as f64 / (trace.len() - warm) as f64
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hit-ratio.dat");
    std::fs::write(&path, vec![1u8; PAGES * PAGE_SIZE]).unwrap();
    let workloads = [
        ("zipf(0.99)", zipf_trace(PAGES, 0.99, ACCESSES, 1)),
        ("scan+hot", scan_hot_trace(PAGES, ACCESSES, 2)),
    ];
    println!(
        "cache: {} of {} pages (25 %), {} accesses, first 20 % warm-up",
        CACHE_PAGES, PAGES, ACCESSES
    );
    println!();
    println!("| workload | S3-FIFO (upcache) | CLOCK | exact LRU (simulated) |");
    println!("|---|---|---|---|");
    for (name, trace) in &workloads {
        let s3 = hit_ratio(&path, ReplacementPolicy::S3Fifo, trace);
        let clock = hit_ratio(&path, ReplacementPolicy::Clock, trace);
        let lru = lru_hit_ratio(trace);
        println!(
            "| {name} | {:.1} % | {:.1} % | {:.1} % |",
            s3 * 100.0,
            clock * 100.0,
            lru * 100.0
        );
    }
}
