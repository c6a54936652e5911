//! Randomized differential test of the buffered paths: the same seeded
//! sequence of read/write/truncate/punch/writeback/fsync/close+reopen is
//! applied to an upcache file and to a plain `Vec<u8>` model. Every read is
//! compared with the model; after every fsync (and close) the real file,
//! read back with `std::fs`, must equal the model too.
//!
//! `UPCACHE_TEST_OPS=N` runs more operations, `UPCACHE_TEST_SEED=S` replays
//! a seed.

mod common;

use common::{ops_count, seed, tempdir, Rng};
use upcache::{PageCache, PAGE_SIZE};

const MAX_SIZE: u64 = 768 * 1024;

fn run(cache: PageCache, seed: u64, ops: usize) {
    run_with(cache, seed, ops, false)
}

fn run_with(cache: PageCache, seed: u64, ops: usize, direct: bool) {
    let dir = tempdir();
    let path = dir.path().join("data");
    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; 200 * 1024 + 123];
    rng.fill(&mut model);
    std::fs::write(&path, &model).unwrap();

    let open = |cache: &PageCache| {
        if direct {
            let store = upcache::DirectFileStore::open(&path).expect("O_DIRECT on the test directory's filesystem");
            cache.open_with_ops("direct", upcache::StoreOps::new(store)).unwrap()
        } else {
            cache.open(&path).unwrap()
        }
    };
    let mut file = Some(open(&cache));
    let mut buf = vec![0u8; 4 * PAGE_SIZE];
    let mut counts = [0usize; 8];
    for op in 0..ops {
        let f = file.as_ref().unwrap();
        let size = model.len() as u64;
        let ctx = format!("seed {seed} op {op}");
        match rng.below(100) {
            // read, sometimes past EOF
            0..=34 => {
                counts[0] += 1;
                let off = rng.below(size + 2 * PAGE_SIZE as u64);
                let len = 1 + rng.below(buf.len() as u64) as usize;
                let n = f.read_at(&mut buf[..len], off).unwrap();
                let expect = if off >= size { 0 } else { len.min((size - off) as usize) };
                assert_eq!(n, expect, "{ctx}: read length at {off}+{len}, size {size}");
                if n > 0 {
                    assert!(
                        buf[..n] == model[off as usize..off as usize + n],
                        "{ctx}: read bytes at {off}+{len}"
                    );
                }
            }
            // write, sometimes extending past EOF with a hole
            35..=69 => {
                counts[1] += 1;
                let off = rng.below(MAX_SIZE - buf.len() as u64);
                let len = 1 + rng.below(buf.len() as u64) as usize;
                rng.fill(&mut buf[..len]);
                assert_eq!(f.write_at(&buf[..len], off).unwrap(), len, "{ctx}");
                let end = off as usize + len;
                if end > model.len() {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&buf[..len]);
            }
            70..=76 => {
                counts[2] += 1;
                let new = rng.below(MAX_SIZE);
                f.truncate(new).unwrap();
                model.resize(new as usize, 0);
            }
            77..=84 => {
                counts[3] += 1;
                let off = rng.below(size + PAGE_SIZE as u64);
                let len = 1 + rng.below(64 * 1024);
                f.punch_hole(off, len).unwrap();
                let end = (off + len).min(size);
                if off < end {
                    model[off as usize..end as usize].fill(0);
                }
            }
            85..=89 => {
                counts[4] += 1;
                f.writeback(1 + rng.below(32) as i64).unwrap();
            }
            90..=97 => {
                counts[5] += 1;
                f.fsync().unwrap();
                let disk = std::fs::read(&path).unwrap();
                assert_eq!(disk.len(), model.len(), "{ctx}: file length after fsync");
                assert!(disk == model, "{ctx}: file bytes after fsync");
            }
            _ => {
                counts[6] += 1;
                file.take().unwrap().close().unwrap();
                let disk = std::fs::read(&path).unwrap();
                assert!(disk == model, "{ctx}: file bytes after close");
                file = Some(open(&cache));
            }
        }
    }
    let f = file.take().unwrap();
    f.close().unwrap();
    assert!(std::fs::read(&path).unwrap() == model, "final file");
    // Every kind of operation ran.
    assert!(counts[..7].iter().all(|&c| c > 0), "op mix {counts:?}");
}

#[test]
fn random_ops_match_model_and_file() {
    run(PageCache::new(), seed(1), ops_count(10_000));
}

#[test]
fn random_ops_small_folios_tiny_readahead() {
    let cache = PageCache::builder().max_folio_order(0).readahead_bytes(4096).build();
    run(cache, seed(2), ops_count(10_000) / 2);
}

#[test]
fn random_ops_large_folios() {
    let cache = PageCache::builder().max_folio_order(9).readahead_bytes(2 << 20).build();
    run(cache, seed(3), ops_count(10_000) / 2);
}

#[test]
fn random_ops_with_o_direct_store() {
    run_with(PageCache::new(), seed(4), ops_count(10_000) / 2, true);
}
