//! Count a pattern in a large real file through an upcache mapping, and
//! check the count against a plain `read(2)` scan of the same file.
//!
//! ```text
//! cargo run --release --example mmap_grep [PATTERN [PATH]]
//! ```
//!
//! Without PATH it generates a 256 MiB text file in the temp directory.

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use upcache::{PageCache, Share};

fn count(hay: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() || hay.len() < needle.len() {
        return 0;
    }
    let first = needle[0];
    let mut n = 0;
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        match hay[i..hay.len() - needle.len() + 1].iter().position(|&b| b == first) {
            None => break,
            Some(p) => {
                i += p;
                if &hay[i..i + needle.len()] == needle {
                    n += 1;
                }
                i += 1;
            }
        }
    }
    n
}

/// Count with a plain streaming read (the reference), handling matches
/// that straddle buffer boundaries.
fn count_by_read(path: &PathBuf, needle: &[u8]) -> std::io::Result<usize> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut carry: Vec<u8> = Vec::new();
    let mut total = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let mut chunk = std::mem::take(&mut carry);
        chunk.extend_from_slice(&buf[..n]);
        total += count(&chunk, needle);
        let keep = needle.len().saturating_sub(1).min(chunk.len());
        carry = chunk[chunk.len() - keep..].to_vec();
    }
    Ok(total)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let pattern = args.next().unwrap_or_else(|| "upcache".to_string());
    let dir = tempfile::tempdir()?;
    let path = match args.next() {
        Some(p) => PathBuf::from(p),
        None => {
            let path = dir.path().join("grep.txt");
            let mut text = Vec::with_capacity(256 << 20);
            let mut i = 0u64;
            while text.len() < 256 << 20 {
                if i % 97 == 0 {
                    text.extend_from_slice(format!("line {i}: the upcache page cache maps this\n").as_bytes());
                } else {
                    text.extend_from_slice(format!("line {i}: nothing to see here\n").as_bytes());
                }
                i += 1;
            }
            std::fs::write(&path, &text)?;
            path
        }
    };
    let size = std::fs::metadata(&path)?.len() as usize;
    println!("searching {} ({size} bytes) for {pattern:?}", path.display());

    let cache = PageCache::new();
    let file = cache.open(&path)?;
    let t = Instant::now();
    // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
    let map = unsafe { file.mmap(0, size.max(1), Share::Shared) }?;
    let mapped = count(&map[..size], pattern.as_bytes());
    let t_map = t.elapsed();
    drop(map);

    let t = Instant::now();
    let reference = count_by_read(&path, pattern.as_bytes())?;
    let t_read = t.elapsed();

    println!("through an upcache mapping: {mapped} matches in {t_map:?}");
    println!("through read(2):            {reference} matches in {t_read:?}");
    println!("stats: {}", cache.stats());
    if mapped != reference {
        return Err(format!("count mismatch: mapping {mapped}, read {reference}").into());
    }
    println!("counts agree");
    Ok(())
}
