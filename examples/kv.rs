//! A small key-value store on upcache, as a storage engine would build it:
//! a hash table of 4 KiB bucket pages in one data file, a write-ahead log,
//! pinned zero-copy pages (`get_page` / `get_page_mut`), WAL-ordered
//! writeback (`PageMut::set_lsn` + `BackingStore::write_barrier`) and a
//! memory limit below the data size, so pages are evicted and read back.
//!
//! ```sh
//! cargo run --release --example kv            # 200,000 keys
//! cargo run --release --example kv -- 20000   # fewer
//! ```
//!
//! It inserts every key, updates some, commits (log fsync), `fsync`s the
//! data, reopens the file in a fresh cache and checks every value, and
//! checks that no data page ever reached the file before the log records
//! of its changes were durable. `tests/kv_example.rs` runs it small.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use upcache::aops::SyncMode;
use upcache::{BackingStore, FileStore, PageCache, StoreOps, PAGE_SIZE};

/// Entries per bucket page: a `u64` count, then (key, value) pairs.
const SLOTS: usize = (PAGE_SIZE - 8) / 16;

/// The write-ahead log: records appended in memory-order to a file,
/// made durable on demand.
pub struct Wal {
    file: std::fs::File,
    /// Bytes appended, and the next LSN (one per record).
    tail: Mutex<(u64, u64)>,
    /// Highest LSN known durable.
    durable: AtomicU64,
    /// Log fsyncs done (by commits and by write barriers).
    pub syncs: AtomicU64,
}

impl Wal {
    fn create(path: &Path) -> io::Result<Wal> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Wal {
            file,
            tail: Mutex::new((0, 1)),
            durable: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        })
    }

    /// Append a record; returns its LSN (not yet durable).
    fn append(&self, key: u64, value: u64) -> io::Result<u64> {
        let mut t = self.tail.lock().unwrap();
        let lsn = t.1;
        let mut rec = [0u8; 24];
        rec[..8].copy_from_slice(&lsn.to_le_bytes());
        rec[8..16].copy_from_slice(&key.to_le_bytes());
        rec[16..].copy_from_slice(&value.to_le_bytes());
        self.file.write_all_at(&rec, t.0)?;
        t.0 += 24;
        t.1 += 1;
        Ok(lsn)
    }

    /// Make every record up to `lsn` durable (one `fdatasync` unless it
    /// already is).
    fn sync_upto(&self, lsn: u64) -> io::Result<()> {
        if self.durable.load(Ordering::Acquire) >= lsn {
            return Ok(());
        }
        let last = self.tail.lock().unwrap().1 - 1;
        self.file.sync_data()?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.durable.fetch_max(last, Ordering::AcqRel);
        Ok(())
    }
}

/// The data file's store: a plain file whose writes wait for the log.
pub struct DataStore {
    file: FileStore,
    wal: Arc<Wal>,
    /// Page writes that arrived with their LSN not yet durable (must stay 0).
    pub early_writes: AtomicU64,
    /// LSN of the newest change to each page, as the engine recorded it.
    page_lsn: Mutex<std::collections::HashMap<u64, u64>>,
}

impl BackingStore for DataStore {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.file.read_at(buf, off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        // The check the write barrier exists for.
        let durable = self.wal.durable.load(Ordering::Acquire);
        let lsns = self.page_lsn.lock().unwrap();
        for p in off / PAGE_SIZE as u64..(off + buf.len() as u64).div_ceil(PAGE_SIZE as u64) {
            if lsns.get(&p).is_some_and(|&l| l > durable) {
                self.early_writes.fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(lsns);
        self.file.write_all_at(buf, off)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
    fn set_len(&self, size: u64) -> io::Result<()> {
        self.file.set_len(size)
    }
    fn write_barrier(&self, lsn: u64, _mode: SyncMode) -> io::Result<bool> {
        self.wal.sync_upto(lsn)?;
        Ok(true)
    }
}

/// The key-value store: `buckets` pages, linear probing across pages.
pub struct Kv {
    /// The data file, through the cache.
    pub file: upcache::File,
    /// The log.
    pub wal: Arc<Wal>,
    /// The data file's store (its write barrier waits for the log).
    pub store: Arc<DataStore>,
    buckets: u64,
}

/// The bucket a key hashes to (before probing): splitmix64's finalizer.
/// (A plain multiplicative hash sends sequential keys round the buckets
/// as a Weyl sequence, which visits every bucket before revisiting one: a
/// cyclic scan over 4× the cache, where no replacement policy can hit.)
pub fn hash(key: u64) -> u64 {
    let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn slot(page: &[u8], i: usize) -> (u64, u64) {
    let at = 8 + i * 16;
    (
        u64::from_le_bytes(page[at..at + 8].try_into().unwrap()),
        u64::from_le_bytes(page[at + 8..at + 16].try_into().unwrap()),
    )
}

fn count(page: &[u8]) -> usize {
    u64::from_le_bytes(page[..8].try_into().unwrap()) as usize
}

impl Kv {
    /// Create the data file (`buckets` zeroed pages) and the log in `dir`.
    pub fn create(cache: &PageCache, dir: &Path, buckets: u64) -> upcache::Result<Kv> {
        let data = dir.join("kv.data");
        std::fs::File::create(&data)?.set_len(buckets * PAGE_SIZE as u64)?;
        let wal = Arc::new(Wal::create(&dir.join("kv.wal"))?);
        let store = Arc::new(DataStore {
            file: FileStore::open(&data)?,
            wal: wal.clone(),
            early_writes: AtomicU64::new(0),
            page_lsn: Mutex::new(Default::default()),
        });
        let file = cache.open_with_ops(&data.display().to_string(), StoreOps::new(store.clone()))?;
        // Hashed keys: random page access, no readahead.
        file.advise(upcache::Advice::Random, 0, 0)?;
        Ok(Kv {
            file,
            wal,
            store,
            buckets,
        })
    }

    /// Insert or update `key`.
    pub fn put(&self, key: u64, value: u64) -> upcache::Result<()> {
        let lsn = self.wal.append(key, value)?;
        let mut b = hash(key) % self.buckets;
        loop {
            // SAFETY: this engine never maps its data file.
            let mut page = unsafe { self.file.get_page_mut(b) }?;
            let n = count(&page);
            if let Some(i) = (0..n).find(|&i| slot(&page, i).0 == key) {
                page[8 + i * 16 + 8..8 + i * 16 + 16].copy_from_slice(&value.to_le_bytes());
            } else if n < SLOTS {
                page[8 + n * 16..8 + n * 16 + 8].copy_from_slice(&key.to_le_bytes());
                page[8 + n * 16 + 8..8 + n * 16 + 16].copy_from_slice(&value.to_le_bytes());
                page[..8].copy_from_slice(&(n as u64 + 1).to_le_bytes());
            } else {
                drop(page);
                b = (b + 1) % self.buckets;
                continue;
            }
            page.set_lsn(lsn);
            self.store.page_lsn.lock().unwrap().insert(b, lsn);
            return Ok(());
        }
    }

    /// Look `key` up, reading the bucket page in place (no copy).
    pub fn get(&self, key: u64) -> upcache::Result<Option<u64>> {
        lookup(&self.file, self.buckets, key)
    }

    /// Make every change durable: the log, then the data pages.
    pub fn commit(&self) -> upcache::Result<()> {
        let last = self.wal.tail.lock().unwrap().1 - 1;
        self.wal.sync_upto(last)?;
        self.file.fsync()
    }
}

/// Find `key` in the data file's bytes `data` (a mapping of the whole file).
pub fn lookup_in(data: &[u8], buckets: u64, key: u64) -> Option<u64> {
    let mut b = hash(key) % buckets;
    loop {
        let page = &data[b as usize * PAGE_SIZE..(b as usize + 1) * PAGE_SIZE];
        let n = count(page);
        if let Some(i) = (0..n).find(|&i| slot(page, i).0 == key) {
            return Some(slot(page, i).1);
        }
        if n < SLOTS {
            return None;
        }
        b = (b + 1) % buckets;
    }
}

/// Byte offset of `key`'s value in a mapped data file of `buckets` pages
/// (for in-place updates through a writable mapping).
pub fn value_offset_in(data: &[u8], buckets: u64, key: u64) -> Option<usize> {
    let mut b = hash(key) % buckets;
    loop {
        let base = b as usize * PAGE_SIZE;
        let page = &data[base..base + PAGE_SIZE];
        let n = count(page);
        if let Some(i) = (0..n).find(|&i| slot(page, i).0 == key) {
            return Some(base + 8 + i * 16 + 8);
        }
        if n < SLOTS {
            return None;
        }
        b = (b + 1) % buckets;
    }
}

/// Find `key` in a data file of `buckets` pages.
pub fn lookup(file: &upcache::File, buckets: u64, key: u64) -> upcache::Result<Option<u64>> {
    let mut b = hash(key) % buckets;
    loop {
        // SAFETY: this engine never maps its data file.
        let page = unsafe { file.get_page(b) }?;
        let n = count(&page);
        if let Some(i) = (0..n).find(|&i| slot(&page, i).0 == key) {
            return Ok(Some(slot(&page, i).1));
        }
        if n < SLOTS {
            return Ok(None);
        }
        b = (b + 1) % buckets;
    }
}

fn value_of(key: u64, round: u64) -> u64 {
    key.wrapping_mul(31).wrapping_add(round)
}

/// The value `run` stores for `key` after its updates.
pub fn final_value(key: u64) -> u64 {
    value_of(key, u64::from(key % 3 == 0))
}

/// Build a committed store of `keys` keys in `dir` (no memory limit);
/// returns the number of bucket pages.
pub fn build(dir: &Path, keys: u64) -> upcache::Result<u64> {
    let buckets = (keys / (SLOTS as u64 / 3)).max(4);
    let cache = PageCache::new();
    let kv = Kv::create(&cache, dir, buckets)?;
    for k in 0..keys {
        kv.put(k, final_value(k))?;
    }
    kv.commit()?;
    Ok(buckets)
}

/// Insert `keys` keys, update every third, commit, reopen and verify.
/// Returns a one-line report.
pub fn run(dir: &Path, keys: u64) -> upcache::Result<String> {
    // 1/3 of the keys per page on average, and a cache of a quarter of
    // the data: pages are evicted and read back all along.
    let buckets = (keys / (SLOTS as u64 / 3)).max(4);
    let data_bytes = buckets * PAGE_SIZE as u64;
    let limit = (data_bytes / 4).max(256 * 1024);
    let cache = PageCache::builder().memory_limit(limit).build();
    let kv = Kv::create(&cache, dir, buckets)?;
    for k in 0..keys {
        kv.put(k, value_of(k, 0))?;
    }
    for k in (0..keys).step_by(3) {
        kv.put(k, value_of(k, 1))?;
    }
    for k in (0..keys).step_by(7) {
        let want = value_of(k, u64::from(k % 3 == 0));
        assert_eq!(kv.get(k)?, Some(want), "key {k} before commit");
    }
    kv.commit()?;
    let early = kv.store.early_writes.load(Ordering::Relaxed);
    let log_syncs = kv.wal.syncs.load(Ordering::Relaxed);
    let stats = kv.file.stats();
    drop(kv);
    drop(cache);

    // Reopen in a fresh cache and check every key.
    let cache = PageCache::builder().memory_limit(limit).build();
    let file = cache.open(dir.join("kv.data"))?;
    file.advise(upcache::Advice::Random, 0, 0)?;
    for k in 0..keys {
        let want = value_of(k, u64::from(k % 3 == 0));
        assert_eq!(lookup(&file, buckets, k)?, Some(want), "key {k} after reopen");
    }
    assert_eq!(lookup(&file, buckets, keys + 1)?, None);
    assert_eq!(early, 0, "a data page reached the file before its log records");
    Ok(format!(
        "kv: {keys} keys in {buckets} pages ({} KiB data, {} KiB cache limit): \
         verified after reopen; {log_syncs} log fsyncs, 0 pages written before their log; \
         data file: {stats}",
        data_bytes / 1024,
        limit / 1024
    ))
}

#[allow(dead_code)]
fn main() -> upcache::Result<()> {
    let keys = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let dir = tempfile::tempdir()?;
    println!("{}", run(dir.path(), keys)?);
    Ok(())
}
