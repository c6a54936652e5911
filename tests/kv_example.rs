//! The storage-engine example (`examples/kv.rs`) at small size: a hash KV
//! on pinned pages with a write-ahead log and WAL-ordered writeback, under
//! a memory limit below the data size, verified after reopen.

#[path = "../examples/kv.rs"]
#[allow(dead_code, unreachable_pub)]
mod kv;

mod common;

#[test]
fn kv_example_verifies_after_reopen() {
    common::watchdog("kv example", 120, || {
        let dir = tempfile::tempdir().unwrap();
        let report = kv::run(dir.path(), 20_000).unwrap();
        println!("{report}");
        assert!(report.contains("verified after reopen"));
    });
}
