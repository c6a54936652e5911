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
        f.write_at(b"x", u64::MAX).unwrap_err(),
        f.truncate(MAX_FILE_SIZE + 1).unwrap_err(),
        f.punch_hole(1, u64::MAX).unwrap_err(),
    ] {
        assert!(matches!(e, Error::FileTooLarge { .. }), "{e}");
        assert_eq!(e.raw_os_error(), 27, "EFBIG");
    }
    // Nothing changed.
    assert_eq!(f.len().unwrap(), 10_000);
}

/// As the kernel's `generic_write_check_limits`: a write that starts below
/// the largest file and crosses it is cut short at it; an empty write
/// succeeds wherever it points (the length is checked first).
#[test]
fn a_write_crossing_the_largest_file_is_short() {
    let (_d, f) = open();
    assert_eq!(f.write_at(&[], u64::MAX).unwrap(), 0);
    assert_eq!(f.write_at(&[], MAX_FILE_SIZE + 1).unwrap(), 0);
    assert_eq!(f.write_at(b"xy", MAX_FILE_SIZE - 1).unwrap(), 1);
    assert_eq!(f.len().unwrap(), MAX_FILE_SIZE);
    let mut b = [0u8; 4];
    assert_eq!(f.read_at(&mut b, MAX_FILE_SIZE - 2).unwrap(), 2);
    assert_eq!(&b[..2], &[0, b'x']);
    // Drop the far byte again before the handle's flush (the disk's file
    // system may refuse a file this large).
    f.truncate(10_000).unwrap();
}

#[test]
fn reads_past_eof_and_huge_lengths_are_clamped() {
    let (_d, f) = open();
    let mut big = vec![0u8; 1 << 20];
    assert_eq!(f.read_at(&mut big, 0).unwrap(), 10_000);
    assert_eq!(f.read_at(&mut big, 10_000).unwrap(), 0);
    assert_eq!(f.read_at(&mut big, u64::MAX - 3).unwrap(), 0);
    assert_eq!(f.read_at(&mut big, MAX_FILE_SIZE * 2).unwrap(), 0);
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
