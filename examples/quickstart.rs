//! The main job: cache a real file through upcache, read and write it,
//! fsync, map it (faults served by upcache over userfaultfd), read and
//! write through the mapping, flush, verify every step against the file read
//! back with `std::fs`, and print what happened.
//!
//! ```text
//! cargo run --release --example quickstart [PATH]
//! ```
//!
//! Without PATH it generates a 64 MiB file in the temp directory. With PATH
//! it works on a copy of that file (your file is never modified).

use std::path::PathBuf;
use std::time::Instant;

use upcache::{PageCache, Share};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("quickstart.dat");
    match std::env::args_os().nth(1).map(PathBuf::from) {
        Some(src) => {
            std::fs::copy(&src, &path)?;
            println!("working on a copy of {}", src.display());
        }
        None => {
            let data: Vec<u8> = (0..64u64 << 20).map(|i| ((i * 2654435761) >> 13) as u8).collect();
            std::fs::write(&path, data)?;
            println!("generated a 64 MiB file");
        }
    }
    let mut expect = std::fs::read(&path)?;
    let size = expect.len() as u64;
    println!("file: {} ({} bytes)", path.display(), size);

    let cache = PageCache::new();
    let file = cache.open(&path)?;

    // 1. Read the whole file through the cache, in 1 MiB reads.
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = file.read_at(&mut buf, off)?;
        assert!(
            buf[..n] == expect[off as usize..off as usize + n],
            "read mismatch at {off}"
        );
        off += n as u64;
    }
    println!("read {size} bytes cold in {:?} (verified)", t.elapsed());

    // 2. Read it again: all hits now.
    let before = cache.stats();
    let t = Instant::now();
    let mut off = 0u64;
    while off < size {
        off += file.read_at(&mut buf, off)? as u64;
    }
    let after = cache.stats();
    println!(
        "read {size} bytes warm in {:?}: {} hits, {} misses",
        t.elapsed(),
        after.hits - before.hits,
        after.misses - before.misses
    );

    // 3. Write 1000 small records at scattered offsets, and extend the file.
    let mut x = 0x1234_5678_9abc_def0u64;
    for i in 0..1000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let rec = format!("record {i:04} at {x:016x}\n").into_bytes();
        let pos = x % size.saturating_sub(rec.len() as u64).max(1);
        file.write_at(&rec, pos)?;
        let end = pos as usize + rec.len();
        if end > expect.len() {
            expect.resize(end, 0);
        }
        expect[pos as usize..end].copy_from_slice(&rec);
    }
    let tail = b"-- appended by upcache quickstart --\n";
    file.write_at(tail, size + 4096)?;
    expect.resize(size as usize + 4096, 0);
    expect.extend_from_slice(tail);
    println!(
        "wrote 1000 records and an append; dirty: {} KiB",
        cache.stats().dirty_bytes / 1024
    );

    // 4. fsync: integrity writeback, then verify the file on disk.
    let t = Instant::now();
    file.fsync()?;
    println!("fsync in {:?}", t.elapsed());
    let disk = std::fs::read(&path)?;
    assert_eq!(disk.len(), expect.len(), "file length after fsync");
    assert!(disk == expect, "file contents after fsync");
    println!("verified: the file on disk equals the expected {} bytes", disk.len());

    // 5. Map the file: the mapping's pages are the cached folios.
    let t = Instant::now();
    // SAFETY: the mapping is read and written only through short-lived borrows, never while another writer changes the same bytes.
    let mut map = unsafe { file.mmap_mut(0, expect.len(), Share::Shared) }?;
    assert!(map[..] == expect[..], "mapped bytes differ from the file");
    println!(
        "mapped {} bytes and read them all through the mapping in {:?} (verified)",
        map.len(),
        t.elapsed()
    );
    let before = cache.stats();
    let note = b"written through an upcache mapping";
    let at = expect.len() / 2;
    map[at..at + note.len()].copy_from_slice(note);
    expect[at..at + note.len()].copy_from_slice(note);
    let mut back = vec![0u8; note.len()];
    file.read_at(&mut back, at as u64)?;
    assert_eq!(&back[..], &note[..], "read_at sees the mapped write at once");
    println!(
        "wrote through the mapping at {at}: read_at sees it; {} write fault(s) marked {} KiB dirty",
        cache.stats().faults_wp - before.faults_wp,
        cache.stats().dirty_bytes / 1024
    );
    map.flush()?;
    let disk = std::fs::read(&path)?;
    assert!(disk == expect, "file contents after msync");
    println!("flushed the mapping; the file on disk has the mapped write (verified)");
    drop(map);

    file.close()?;
    println!("stats: {}", cache.stats());
    Ok(())
}
