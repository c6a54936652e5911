//! A small B+tree on upcache: `u64` keys and values in 4 KiB pages of one
//! data file, read through pinned zero-copy pages (`File::get_page`), and
//! written a page at a time (`File::get_page_mut`). The same tree code runs
//! over a plain byte slice (an upcache or kernel mapping), which is how
//! `benches/btree.rs` compares the three (`btree_insert`, `btree_lookup`,
//! `btree_scan`: 100-row range scans).
//!
//! ```sh
//! cargo run --release --example btree            # 200,000 keys
//! cargo run --release --example btree -- 20000   # fewer
//! ```
//!
//! It inserts keys in random order, checks every lookup and a range scan
//! against a sorted model, syncs, reopens the file in a fresh cache with a
//! memory limit of a quarter of the tree and checks again.
//! `tests/btree_example.rs` runs it small.

use std::ops::Deref;
use std::path::Path;

use upcache::{PageCache, PAGE_SIZE};

/// Page layout. Page 0 is the meta page: root page, pages in use.
/// A node page: kind (`u32`: 1 leaf, 2 inner), count (`u32`), then for a
/// leaf the next leaf's page (`u64`, 0 for none) and `count` (key, value)
/// pairs; for an inner node its first child (`u64`) and `count` (key,
/// child) pairs, where a pair's child holds keys ≥ its key.
const HEADER: usize = 16;
/// Entries per node: 255.
pub const FANOUT: usize = (PAGE_SIZE - HEADER) / 16;
const LEAF: u32 = 1;
const INNER: u32 = 2;

type Page = [u8; PAGE_SIZE];

fn rd(p: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(p[at..at + 8].try_into().unwrap())
}
fn wr(p: &mut [u8], at: usize, v: u64) {
    p[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn kind(p: &[u8]) -> u32 {
    u32::from_le_bytes(p[0..4].try_into().unwrap())
}
fn count(p: &[u8]) -> usize {
    u32::from_le_bytes(p[4..8].try_into().unwrap()) as usize
}
fn set_header(p: &mut [u8], k: u32, n: usize) {
    p[0..4].copy_from_slice(&k.to_le_bytes());
    p[4..8].copy_from_slice(&(n as u32).to_le_bytes());
}
/// Entry `i`'s key and value (leaf) or key and child (inner).
fn entry(p: &[u8], i: usize) -> (u64, u64) {
    (rd(p, HEADER + i * 16), rd(p, HEADER + i * 16 + 8))
}
fn set_entry(p: &mut [u8], i: usize, (k, v): (u64, u64)) {
    wr(p, HEADER + i * 16, k);
    wr(p, HEADER + i * 16 + 8, v);
}
/// A leaf's next leaf, or an inner node's first child.
fn link(p: &[u8]) -> u64 {
    rd(p, 8)
}
fn set_link(p: &mut [u8], v: u64) {
    wr(p, 8, v);
}

/// Number of entries with key ≤ `key` (binary search).
fn upper_bound(p: &[u8], key: u64) -> usize {
    let (mut lo, mut hi) = (0, count(p));
    while lo < hi {
        let mid = (lo + hi) / 2;
        if entry(p, mid).0 <= key {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The child of inner node `p` that holds `key`.
fn child_for(p: &[u8], key: u64) -> u64 {
    match upper_bound(p, key) {
        0 => link(p),
        i => entry(p, i - 1).1,
    }
}

/// Where a tree's pages live, for writers: read in place
/// ([`PagesRead`]), written a whole page at a time.
pub trait Pages: PagesRead {
    /// Overwrite page `i` (inside the file).
    fn write(&mut self, i: u64, data: &Page);
}

/// A mapped byte slice as pages.
impl Pages for &mut [u8] {
    fn write(&mut self, i: u64, data: &Page) {
        self[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE].copy_from_slice(data);
    }
}

/// An upcache file as pages: pinned zero-copy reads, pinned writes.
pub struct Pinned<'f>(pub &'f upcache::File);

impl PagesRead for Pinned<'_> {
    type Ref<'a>
        = upcache::PageRef<'a>
    where
        Self: 'a;
    fn page_ro(&self, i: u64) -> upcache::PageRef<'_> {
        self.0.page_ro(i)
    }
}

impl Pages for Pinned<'_> {
    fn write(&mut self, i: u64, data: &Page) {
        // SAFETY: a tree written through `Pinned` is never mapped.
        let mut p = unsafe { self.0.get_page_mut(i) }.expect("write a tree page");
        p.copy_from_slice(data);
    }
}

/// Look `key` up (readers need only [`PagesRead`]).
pub fn get<P: PagesRead + ?Sized>(pages: &P, key: u64) -> Option<u64> {
    let mut at = rd(&pages.page_ro(0), 0);
    loop {
        let p = pages.page_ro(at);
        if kind(&p) == LEAF {
            let i = upper_bound(&p, key);
            return (i > 0 && entry(&p, i - 1).0 == key).then(|| entry(&p, i - 1).1);
        }
        at = child_for(&p, key);
    }
}

/// Up to `n` (key, value) pairs with key ≥ `from`, in key order, into
/// `out` (cleared first).
pub fn scan<P: PagesRead + ?Sized>(pages: &P, from: u64, n: usize, out: &mut Vec<(u64, u64)>) {
    out.clear();
    let mut at = rd(&pages.page_ro(0), 0);
    loop {
        let p = pages.page_ro(at);
        if kind(&p) == LEAF {
            break;
        }
        at = child_for(&p, from);
    }
    let mut first = true;
    while at != 0 && out.len() < n {
        let p = pages.page_ro(at);
        let start = if first {
            let i = upper_bound(&p, from);
            if i > 0 && entry(&p, i - 1).0 == from {
                i - 1
            } else {
                i
            }
        } else {
            0
        };
        first = false;
        for i in start..count(&p) {
            if out.len() == n {
                break;
            }
            out.push(entry(&p, i));
        }
        at = link(&p);
    }
}

/// Page access for readers (shared by threads).
pub trait PagesRead {
    /// A page's bytes, in place.
    type Ref<'a>: Deref<Target = [u8]>
    where
        Self: 'a;
    /// Page `i`.
    fn page_ro(&self, i: u64) -> Self::Ref<'_>;
}

impl PagesRead for [u8] {
    type Ref<'a>
        = &'a [u8]
    where
        Self: 'a;
    fn page_ro(&self, i: u64) -> &[u8] {
        &self[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE]
    }
}

impl PagesRead for &mut [u8] {
    type Ref<'a>
        = &'a [u8]
    where
        Self: 'a;
    fn page_ro(&self, i: u64) -> &[u8] {
        (**self).page_ro(i)
    }
}

impl PagesRead for upcache::File {
    type Ref<'a>
        = upcache::PageRef<'a>
    where
        Self: 'a;
    fn page_ro(&self, i: u64) -> upcache::PageRef<'_> {
        // SAFETY: a tree read through its file is never mapped meanwhile.
        unsafe { self.get_page(i) }.expect("read a tree page")
    }
}

/// Copy page `i` out, to modify it.
fn load(pages: &impl Pages, i: u64) -> Box<Page> {
    let mut b = Box::new([0u8; PAGE_SIZE]);
    b.copy_from_slice(&pages.page_ro(i));
    b
}

/// Format a new tree: meta page and an empty root leaf. The file must hold
/// at least 2 pages.
pub fn format(pages: &mut impl Pages) {
    let mut meta = Box::new([0u8; PAGE_SIZE]);
    wr(&mut meta[..], 0, 1); // root
    wr(&mut meta[..], 8, 2); // pages in use
    pages.write(0, &meta);
    let mut leaf = Box::new([0u8; PAGE_SIZE]);
    set_header(&mut leaf[..], LEAF, 0);
    pages.write(1, &leaf);
}

/// Insert or update `key`. The file must have room for the pages a split
/// allocates (`capacity_pages` sizes it).
pub fn insert(pages: &mut impl Pages, key: u64, value: u64) {
    let mut meta = load(pages, 0);
    let root = rd(&meta[..], 0);
    if let Some((sep, right)) = insert_rec(pages, &mut meta, root, key, value) {
        // The root split: a new root above the two halves.
        let new_root = alloc(&mut meta);
        let mut p = Box::new([0u8; PAGE_SIZE]);
        set_header(&mut p[..], INNER, 1);
        set_link(&mut p[..], root);
        set_entry(&mut p[..], 0, (sep, right));
        pages.write(new_root, &p);
        wr(&mut meta[..], 0, new_root);
    }
    pages.write(0, &meta);
}

fn alloc(meta: &mut Page) -> u64 {
    let n = rd(&meta[..], 8);
    wr(&mut meta[..], 8, n + 1);
    n
}

/// Insert into the subtree at `at`; returns (separator, new right page)
/// if `at` split.
fn insert_rec(pages: &mut impl Pages, meta: &mut Page, at: u64, key: u64, value: u64) -> Option<(u64, u64)> {
    let mut p = load(pages, at);
    let (pos, entry_new) = if kind(&p[..]) == LEAF {
        let i = upper_bound(&p[..], key);
        if i > 0 && entry(&p[..], i - 1).0 == key {
            set_entry(&mut p[..], i - 1, (key, value));
            pages.write(at, &p);
            return None;
        }
        (i, (key, value))
    } else {
        let child = child_for(&p[..], key);
        let (sep, right) = insert_rec(pages, meta, child, key, value)?;
        (upper_bound(&p[..], sep), (sep, right))
    };
    let n = count(&p[..]);
    let mut all: Vec<(u64, u64)> = (0..n).map(|i| entry(&p[..], i)).collect();
    all.insert(pos, entry_new);
    if all.len() <= FANOUT {
        for (i, e) in all.iter().enumerate() {
            set_entry(&mut p[..], i, *e);
        }
        let k = kind(&p[..]);
        set_header(&mut p[..], k, all.len());
        pages.write(at, &p);
        return None;
    }
    // Split in halves.
    let right_page = alloc(meta);
    let mid = all.len() / 2;
    let mut right = Box::new([0u8; PAGE_SIZE]);
    let sep;
    if kind(&p[..]) == LEAF {
        sep = all[mid].0;
        set_header(&mut right[..], LEAF, all.len() - mid);
        set_link(&mut right[..], link(&p[..]));
        for (i, e) in all[mid..].iter().enumerate() {
            set_entry(&mut right[..], i, *e);
        }
        set_header(&mut p[..], LEAF, mid);
        set_link(&mut p[..], right_page);
    } else {
        // The middle key moves up; its child becomes the right node's
        // first child.
        sep = all[mid].0;
        set_header(&mut right[..], INNER, all.len() - mid - 1);
        set_link(&mut right[..], all[mid].1);
        for (i, e) in all[mid + 1..].iter().enumerate() {
            set_entry(&mut right[..], i, *e);
        }
        set_header(&mut p[..], INNER, mid);
    }
    for (i, e) in all[..mid].iter().enumerate() {
        set_entry(&mut p[..], i, *e);
    }
    pages.write(right_page, &right);
    pages.write(at, &p);
    Some((sep, right_page))
}

/// Pages a tree of `keys` keys may need, inserted in any order (nodes at
/// least half full, plus the inner levels and the meta page), rounded up.
pub fn capacity_pages(keys: u64) -> u64 {
    let leaves = keys.div_ceil(FANOUT as u64 / 2) + 1;
    2 + leaves + leaves / (FANOUT as u64 / 2) * 2 + 16
}

/// The value stored for `key` by `build`.
pub fn value_of(key: u64) -> u64 {
    key.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xABCD
}

/// The `i`-th of `n` keys in a fixed random order (a permutation of
/// `0..n` scaled by 3, so that gaps exist between keys).
pub fn key_at(i: u64, n: u64) -> u64 {
    // An odd multiplier modulo n' (a power of two ≥ n), skipping values ≥ n.
    let m = n.next_power_of_two();
    let mut x = i;
    loop {
        x = (x
            .wrapping_mul(0x5851_F42D_4C95_7F2D)
            .wrapping_add(0x1405_7B7E_F767_814F))
            & (m - 1);
        if x < n {
            return x * 3;
        }
    }
}

/// Create `data` sized for `keys` keys and insert them all through pinned
/// pages; returns the page count of the file.
pub fn build(cache: &PageCache, data: &Path, keys: u64) -> upcache::Result<u64> {
    let file = cache.options().write(true).create(true).truncate(true).open(data)?;
    let pages = capacity_pages(keys);
    file.truncate(pages * PAGE_SIZE as u64)?;
    let mut t = Pinned(&file);
    format(&mut t);
    for i in 0..keys {
        let k = key_at(i, keys);
        insert(&mut t, k, value_of(k));
    }
    file.fsync()?;
    file.close()?;
    Ok(pages)
}

/// Check every key and a few scans of `file` holding `keys` keys.
pub fn verify(file: &upcache::File, keys: u64) -> Result<(), String> {
    for k in 0..keys {
        let want = Some(value_of(k * 3));
        let got = get(file, k * 3);
        if got != want {
            return Err(format!("key {}: got {got:?}, want {want:?}", k * 3));
        }
        if get(file, k * 3 + 1).is_some() {
            return Err(format!("key {} was never inserted", k * 3 + 1));
        }
    }
    let mut out = Vec::new();
    for from in [0, 1, keys / 2 * 3 + 2, keys * 3 - 3] {
        scan(file, from, 100, &mut out);
        let first = from.div_ceil(3);
        let want: Vec<(u64, u64)> = (first..keys.min(first + 100))
            .map(|k| (k * 3, value_of(k * 3)))
            .collect();
        if out != want {
            return Err(format!("scan from {from}: {} rows, first {:?}", out.len(), out.first()));
        }
    }
    Ok(())
}

/// Build, verify, reopen under a memory limit and verify again.
pub fn run(dir: &Path, keys: u64) -> upcache::Result<String> {
    let data = dir.join("btree.data");
    let cache = PageCache::new();
    let t = std::time::Instant::now();
    let pages = build(&cache, &data, keys)?;
    let built = t.elapsed();
    let file = cache.open(&data)?;
    verify(&file, keys).map_err(|e| upcache::Error::Io(std::io::Error::other(e)))?;
    drop(file);
    let used = std::fs::metadata(&data)?.len() / PAGE_SIZE as u64;
    // Reopen with a quarter of the file in memory.
    let limit = (used * PAGE_SIZE as u64 / 4).max(256 * 1024);
    let small = PageCache::builder().memory_limit(limit).build();
    let file = small.open(&data)?;
    verify(&file, keys).map_err(|e| upcache::Error::Io(std::io::Error::other(e)))?;
    let s = file.stats();
    Ok(format!(
        "{keys} keys in {pages} pages, built in {built:?}; verified, then verified again after reopening \
         with a {} KiB limit: {} hits, {} misses",
        limit >> 10,
        s.hits,
        s.misses
    ))
}

#[allow(dead_code)]
fn main() -> upcache::Result<()> {
    let keys = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let dir = std::env::temp_dir().join(format!("upcache-btree-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let r = run(&dir, keys);
    let _ = std::fs::remove_dir_all(&dir);
    println!("{}", r?);
    Ok(())
}
