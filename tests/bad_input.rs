//! Bad input gets a clear error, never UB or a hang.

mod common;

use common::tempdir;
use upcache::{Error, PageCache, MAX_FILE_SIZE};

fn open() -> (tempfile::TempDir, upcache::File) {
    let dir = tempdir();
    let p = dir.path().join("f");
    std::fs::write(&p, vec![3u8; 10_000]).unwrap();
    let f = PageCache::new().open(&p).unwrap();
    (dir, f)
}

#[test]
fn zero_length_io_is_a_no_op() {
    let (_d, f) = open();
    assert_eq!(f.read_at(&mut [], 5).unwrap(), 0);
    assert_eq!(f.write_at(&[], 5).unwrap(), 0);
    assert_eq!(f.len().unwrap(), 10_000);
}

#[test]
fn zero_length_punch_is_einval() {
    let (_d, f) = open();
    let e = f.punch_hole(0, 0).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    assert_eq!(e.raw_os_error(), 22);
}

#[test]
fn past_max_file_size_is_efbig() {
    let (_d, f) = open();
    for e in [
        f.write_at(b"x", MAX_FILE_SIZE).unwrap_err(),
        f.truncate(MAX_FILE_SIZE + 1).unwrap_err(),
        f.punch_hole(1, i64::MAX as u64).unwrap_err(),
    ] {
        assert!(matches!(e, Error::FileTooLarge { .. }), "{e}");
        assert_eq!(e.raw_os_error(), 27, "EFBIG");
    }
    // Past `i64::MAX` the kernel's answer is EINVAL (a negative `loff_t`;
    // `tests/engine_api.rs` compares with the kernel's own).
    for e in [
        f.write_at(b"x", u64::MAX).unwrap_err(),
        f.write_at(&[], u64::MAX).unwrap_err(),
        f.punch_hole(1, u64::MAX).unwrap_err(),
        f.truncate(u64::MAX).unwrap_err(),
    ] {
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
        assert_eq!(e.raw_os_error(), 22, "EINVAL");
    }
    // Nothing changed.
    assert_eq!(f.len().unwrap(), 10_000);
}

/// As the kernel's `generic_write_check_limits`: a write that starts below
/// the largest file and crosses it is cut short at it; an empty write
/// succeeds wherever it points below `i64::MAX` (the length is checked
/// first). Run on the
/// disk's file system (its own limit) and on tmpfs (which holds
/// `MAX_FILE_SIZE`).
#[test]
fn a_write_crossing_the_largest_file_is_short() {
    let (d, disk) = open();
    let shm = tempfile::tempdir_in("/dev/shm").expect("a tmpfs at /dev/shm");
    let p = shm.path().join("f");
    std::fs::write(&p, vec![3u8; 10_000]).unwrap();
    let tmpfs = PageCache::new().open(&p).unwrap();
    assert_eq!(tmpfs.max_file_size().unwrap(), MAX_FILE_SIZE);
    for f in [disk, tmpfs] {
        let max = f.max_file_size().unwrap();
        assert!(max <= MAX_FILE_SIZE);
        assert_eq!(f.write_at(&[], max + 1).unwrap(), 0);
        assert_eq!(f.write_at(b"xy", max - 1).unwrap(), 1);
        assert_eq!(f.len().unwrap(), max);
        let mut b = [0u8; 4];
        assert_eq!(f.read_at(&mut b, max - 2).unwrap(), 2);
        assert_eq!(&b[..2], &[0, b'x']);
        // The store holds what the cache took.
        f.fsync().unwrap();
        f.truncate(10_000).unwrap();
    }
    drop((d, shm));
}

#[test]
fn reads_past_eof_and_huge_lengths_are_clamped() {
    let (_d, f) = open();
    let mut big = vec![0u8; 1 << 20];
    assert_eq!(f.read_at(&mut big, 0).unwrap(), 10_000);
    assert_eq!(f.read_at(&mut big, 10_000).unwrap(), 0);
    assert_eq!(f.read_at(&mut big, MAX_FILE_SIZE * 2).unwrap(), 0);
    // A range past i64::MAX is EINVAL, as `pread(2)`'s.
    let e = f.read_at(&mut big, u64::MAX - 3).unwrap_err();
    assert_eq!(e.raw_os_error(), 22, "{e}");
    f.punch_hole(20_000, 100).unwrap(); // past EOF: nothing to do
    assert_eq!(f.len().unwrap(), 10_000);
}

#[test]
fn inverted_sync_range_is_einval() {
    let (_d, f) = open();
    assert!(matches!(f.sync_range(10, 5), Err(Error::InvalidArgument { .. })));
}

#[test]
fn use_after_close_is_ebadf() {
    let (_d, f) = open();
    f.close().unwrap();
    let mut b = [0u8; 4];
    for e in [
        f.read_at(&mut b, 0).unwrap_err(),
        f.write_at(&b, 0).unwrap_err(),
        f.truncate(0).unwrap_err(),
        f.fsync().unwrap_err(),
        f.close().unwrap_err(),
    ] {
        assert!(matches!(e, Error::Closed), "{e}");
        assert_eq!(e.raw_os_error(), 9);
    }
}

#[test]
fn missing_file_is_enoent() {
    let dir = tempdir();
    let e = PageCache::new().open(dir.path().join("nope")).unwrap_err();
    assert_eq!(e.raw_os_error(), 2);
}

/// A write, truncate or punch the disk's file system can never hold must
/// fail (or be cut short) at once, as the kernel's `generic_write_checks`
/// and `inode_newsize_ok` do against the file system's `s_maxbytes` —
/// never be cached and fail only at write-back. Differential: the same
/// calls on a twin file through the kernel give the reference. (ext4 with
/// 4 KiB blocks holds files up to 16 TiB − 4 KiB, one page short of
/// `MAX_FILE_SIZE`.)
#[test]
fn the_file_systems_largest_file_limits_writes_like_pwrite() {
    use std::os::unix::fs::FileExt;
    let dir = tempdir();
    let (kp, up) = (dir.path().join("kernel"), dir.path().join("upcache"));
    std::fs::write(&kp, b"x").unwrap();
    std::fs::write(&up, b"x").unwrap();
    let kernel = std::fs::OpenOptions::new().read(true).write(true).open(&kp).unwrap();
    let f = PageCache::new().open(&up).unwrap();
    let errno = |e: std::io::Error| e.raw_os_error().unwrap();
    // The kernel's limit for this file (`s_maxbytes`), which its
    // `lseek(2)` enforces: the largest seekable offset up to
    // `MAX_FILE_SIZE`.
    let seekable = |pos: u64| rustix::fs::seek(&kernel, rustix::fs::SeekFrom::Start(pos)).is_ok();
    let (mut lo, mut hi) = (0, MAX_FILE_SIZE + 1);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        *(if seekable(mid) { &mut lo } else { &mut hi }) = mid;
    }
    let limit = lo;
    eprintln!("this file system's largest file: {limit} (MAX_FILE_SIZE {MAX_FILE_SIZE})");
    for pos in [
        MAX_FILE_SIZE - 4096,
        MAX_FILE_SIZE - 4097,
        MAX_FILE_SIZE - 2,
        MAX_FILE_SIZE - 8193,
    ] {
        let k = kernel.write_at(b"ab", pos).map_err(errno);
        let u = f.write_at(b"ab", pos).map_err(|e| e.raw_os_error());
        assert_eq!(u, k, "write of 2 bytes at {pos}: upcache vs pwrite");
        kernel.set_len(1).unwrap();
        f.truncate(1).unwrap();
    }
    for size in [MAX_FILE_SIZE - 4096, MAX_FILE_SIZE - 4095, MAX_FILE_SIZE] {
        let k = kernel.set_len(size).map_err(errno);
        let u = f.truncate(size).map_err(|e| e.raw_os_error());
        assert_eq!(u, k, "truncate to {size}: upcache vs ftruncate");
        kernel.set_len(1).unwrap();
        f.truncate(1).unwrap();
    }
    for (off, len) in [
        (0, MAX_FILE_SIZE - 4096),
        (0, MAX_FILE_SIZE),
        (MAX_FILE_SIZE - 8192, 4096),
    ] {
        use rustix::fs::{fallocate, FallocateFlags};
        let k = fallocate(
            &kernel,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            off,
            len,
        )
        .map_err(|e| e.raw_os_error());
        let u = f.punch_hole(off, len).map_err(|e| e.raw_os_error());
        assert_eq!(u, k, "punch of [{off}, +{len}): upcache vs fallocate");
    }
    // Nothing the disk refuses is left in the cache.
    f.fsync().unwrap();
    assert_eq!(std::fs::metadata(&up).unwrap().len(), 1);
    // The limit survives the wrappers an engine puts around its store.
    let store = std::sync::Arc::new(upcache::FileStore::open(&kp).unwrap());
    let ops = std::sync::Arc::new(upcache::StoreOps::new(store));
    let wrapped = PageCache::new().open_with_ops("wrapped", Box::new(ops)).unwrap();
    assert_eq!(wrapped.max_file_size().unwrap(), f.max_file_size().unwrap());
    assert_eq!(f.max_file_size().unwrap(), limit);
    // From a descriptor the caller keeps using: the same limit, and its
    // shared offset where it was.
    use std::io::Seek;
    let mut mine = std::fs::OpenOptions::new().read(true).write(true).open(&kp).unwrap();
    mine.seek(std::io::SeekFrom::Start(5)).unwrap();
    let store = upcache::FileStore::from_file(mine.try_clone().unwrap());
    assert_eq!(upcache::BackingStore::max_file_size(&store), limit);
    assert_eq!(mine.stream_position().unwrap(), 5);
}
