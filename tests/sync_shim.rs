//! Every atomic, lock and parking call in `src/` goes through `src/sync.rs`,
//! so that the loom build models all of it. This test is the enforcement.

use std::path::Path;

const FORBIDDEN: &[&str] = &[
    "std::sync::atomic",
    "core::sync::atomic",
    "std::sync::Mutex",
    "std::sync::RwLock",
    "std::sync::Condvar",
    "parking_lot::",
    "parking_lot_core::",
    "crossbeam_epoch::",
    // Yields and spins are scheduling points for loom: a retry loop that
    // bypasses the shim is invisible to the models (and can spin for ever
    // under loom's scheduler).
    "std::thread::yield_now",
    "std::hint::spin_loop",
    "std::thread_local!",
    "loom::",
    // Not listed: `std::thread::{spawn, park, park_timeout}` wake the
    // flusher and reclaim worker threads, which no model builds (the
    // models drive the paths those threads call; ARCHITECTURE.md).
];

fn scan(dir: &Path, bad: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            scan(&path, bad);
        } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("src/sync.rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                for f in FORBIDDEN {
                    if line.contains(f) {
                        bad.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                    }
                }
            }
        }
    }
}

#[test]
fn only_the_sync_shim_touches_atomics_and_locks() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut bad = Vec::new();
    scan(&src, &mut bad);
    assert!(bad.is_empty(), "bypassing crate::sync:\n{}", bad.join("\n"));
}
