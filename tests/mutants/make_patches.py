#!/usr/bin/env python3
"""Regenerate tests/mutants/*.patch from the table below.

Each mutant is one planted bug: (name, file, old text, new text, kill
command). The old text must occur exactly once in the current src/. Run
from the repository root with a clean src/; it edits src/, records
`git diff`, and restores the file. Kill commands run in the scratch copy
`run.sh` makes; a mutant is killed when its command fails.
"""
import os
import subprocess
import sys

LOOM = ('env RUSTFLAGS="--cfg loom --cfg crossbeam_loom" LOOM_MAX_PREEMPTIONS=2 '
        'cargo test --release --target-dir "$MUTANT_TARGET/loom" --test')

MUTANTS = [
    ("01-put-wake-ignores-detached-bit", "src/folio.rs",
     "} else if old == REF_DETACHED | 2 {", "} else if old == 2 {",
     f"{LOOM} loom_folio put_vs_removal"),
    ("02-unlock-skips-waiter-wakeup", "src/folio.rs",
     "        if old & LOCK_WAITERS != 0 {\n            self.unlock_slow();",
     "        if false && old & LOCK_WAITERS != 0 {\n            self.unlock_slow();",
     f"{LOOM} loom_folio folio_lock_excludes"),
    ("03-writeback-end-relaxed-ordering", "src/folio.rs",
     "let old = self.flags.fetch_and(!WRITEBACK, Ordering::AcqRel);",
     "let old = self.flags.fetch_and(!WRITEBACK, Ordering::Relaxed);",
     f"{LOOM} loom_folio writeback_end_wakes"),
    ("04-trylock-always-succeeds", "src/folio.rs",
     "        self.flags.fetch_or(LOCKED, Ordering::Acquire) & LOCKED == 0\n",
     "        self.flags.fetch_or(LOCKED, Ordering::Acquire);\n        true\n",
     f"{LOOM} loom_folio trylock_never_blocks"),
    ("05-lockless-lookup-skips-recheck", "src/address_space.rs",
     "        if xa.load(index) != p {\n            // Removed (and maybe replaced) between load and try_get.",
     "        if false && xa.load(index) != p {\n            // Removed (and maybe replaced) between load and try_get.",
     f"{LOOM} loom_lookup"),
    ("06-freeze-ignores-expected-count", "src/folio.rs",
     "            .compare_exchange(expected, 0, Ordering::Acquire, Ordering::Relaxed)\n            .is_ok()",
     "            .swap(0, Ordering::Acquire)\n            .min(expected)\n            < u32::MAX",
     f"{LOOM} loom_reclaim"),
    ("07-reclaim-waits-on-its-own-frozen-folio", "src/vmscan.rs",
     "                crate::address_space::Lookup::Busy => return Outcome::Gone,\n            }\n        };\n        if f.index().0 != index || &*f as *const _ as usize != ident {",
     "                crate::address_space::Lookup::Busy => match m.filemap_get_folio(PgOff(index)) {\n                    Some(f) => f,\n                    None => return Outcome::Gone,\n                },\n            }\n        };\n        if f.index().0 != index {",
     "cargo test --test liveness reclaim_with_a_duplicate_queue_entry"),
    ("08-throttle-without-credit", "src/fault.rs",
     "if wb.over_dirty_limit() && !replaying_throttled() && !vma.take_throttle_credit() {",
     "if wb.over_dirty_limit() && !replaying_throttled() {",
     "cargo test --test liveness throttled_mapped_write"),
    ("09-write-at-copies-under-folio-lock", "src/mmap.rs",
     "        if len == 0 || NR_USER_MAPPINGS.load(Ordering::Acquire) == 0 {\n            return false;",
     "        if len == 0 || NR_USER_MAPPINGS.load(Ordering::Acquire) < usize::MAX {\n            return false;",
     "cargo test --test liveness write_at_and_read_at_through_a_mapping"),
    ("10-ranged-writeback-starts-at-range", "src/page_writeback.rs",
     "        .map_or(start, |f| f.index().0.min(start));",
     "        .map_or(start, |_| start);",
     "cargo test --test integrity"),
    ("11-punch-store-before-writeback", "src/truncate.rs",
     "        self.write_and_wait_range(off, end - 1).map_err(Error::Writeback)?;\n",
     "",
     "cargo test --test integrity"),
    ("12-sync-range-skips-writeback", "src/cache.rs",
     "        let written = m.write_and_wait_range(start, end);\n        let synced = m.ops.fsync();",
     "        let written: std::io::Result<()> = Ok(());\n        let synced = m.ops.fsync();",
     "cargo test --test crash"),
    ("13-fault-panic-kills-handler", "src/fault.rs",
     "let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle_fault(sh, pf)));",
     "let r: Result<(), ()> = Ok(handle_fault(sh, pf));",
     "cargo test --test soundness panicking_store"),
    ("14-last-user-drops-dirty-data", "src/address_space.rs",
     "        if self.nr_dirty_folios() > 0 || self.has_wp_async() {\n            let r = self.write_and_wait_range(0, u64::MAX)",
     "        if self.nr_dirty_folios() > usize::MAX / 2 {\n            let r = self.write_and_wait_range(0, u64::MAX)",
     "cargo test --test soundness mapping_outlives"),
    ("15-poison-gives-up-on-wp-marker", "src/fault.rs",
     "                // Clears a wp marker on a none PTE (then POISON works).\n                let _ = sh.uffd.writeprotect(page, PAGE_SIZE, false);",
     "                // Clears a wp marker on a none PTE (then POISON works).\n                break;",
     "cargo test --test liveness shrinking_truncate"),
    ("16-reclaim-skips-refcount-check", "src/vmscan.rs",
     "        if !g.freeze_refs(2) {",
     "        if !g.freeze_refs(g.ref_count()) {",
     f"{LOOM} loom_filemap real_evict_vs_read"),
    ("17-direct-store-silent-buffered-fallback", "src/backing.rs",
     "        let mut b = AlignedBuf::new(buf.len(), self.align);\n        let got = pread_retry(&self.direct, b.as_mut_slice(), off)?.min(buf.len());\n        buf[..got].copy_from_slice(&b.as_mut_slice()[..got]);\n        Ok(got)",
     "        pread_retry(&self.buffered, buf, off)",
     "cargo test --test direct_io"),
    ("18-fault-skips-mapping-recheck", "src/vm_ops.rs",
     "            if g.mapping_id() != m.id() || !g.is_uptodate() {",
     "            if !g.is_uptodate() {",
     f"{LOOM} loom_filemap real_fault_vs_punch_hole"),
    ("19-truncate-punches-under-references", "src/truncate.rs",
     "        for f in &removed {\n            f.wait_refs_drained();\n        }",
     "        for f in &removed {\n            let _ = f;\n        }",
     f"{LOOM} loom_filemap real_read_vs_truncate"),
    ("20-map-pages-blocking-folio-lock", "src/vm_ops.rs",
     "                let g = f.trylock().ok()?;",
     "                let g = f.lock();",
     f"{LOOM} loom_filemap real_map_pages_never_blocks"),
    ("21-clear-dirty-for-io-skips-mkclean", "src/address_space.rs",
     "            self.page_mkclean(folio);\n            true",
     "            let _ = folio;\n            true",
     f"{LOOM} loom_filemap real_page_mkwrite_vs_writeback"),
    ("22-writeback-without-wb-lock", "src/page_writeback.rs",
     "        let r = {\n            let _wb = self.wb_lock.read();\n            self.ops.writepages(self, &mut wbc)",
     "        let r = {\n            self.ops.writepages(self, &mut wbc)",
     f"{LOOM} loom_filemap real_writeback_vs_truncate"),
    ("23-truncate-punches-tail-of-kept-folio", "src/truncate.rs",
     "                // A folio with whole pages past the new end: remove it whole.\n                if let Some(g) = self.write_back_locked(g) {",
     "                // A folio with whole pages past the new end: remove it whole.\n                let tail = crate::types::page_align_up(start);\n                g.zero_raw((start - fstart) as usize, (tail - start) as usize);\n                let _ = self.punch_memory(tail, fend - tail);\n                if let Some(g) = None::<FolioGuard> {",
     "cargo test --test liveness mapped_access_after_truncate_down_and_up"),
    ("24-copy-in-ignores-page-pins", "src/folio.rs",
     "        debug_assert!(self.is_locked());\n        // A `PageRef` may be reading these bytes as `&[u8]`.\n        self.wait_pins_drained();\n        // Loom: a scheduling point",
     "        debug_assert!(self.is_locked());\n        // Loom: a scheduling point",
     f"{LOOM} loom_filemap real_page_ref_vs_write_at"),
    ("25-unpin-skips-writer-wakeup", "src/folio.rs",
     "        if old == PIN_WAITERS | 1 {",
     "        if old == 1 {",
     f"{LOOM} loom_filemap real_page_ref_vs_write_at"),
    ("26-writeback-skips-write-barrier", "src/page_writeback.rs",
     "            match mapping.write_barrier(&g, wbc.sync_mode) {",
     "            match Ok::<bool, io::Error>(true) {",
     "cargo test --test page_ref writeback_waits_for_the_log"),
    ("27-new-folio-not-write-protected", "src/address_space.rs",
     "        if split > index.0 && self.nr_wp_armed.load(Ordering::Relaxed) != 0 {",
     "        if false && split > index.0 && self.nr_wp_armed.load(Ordering::Relaxed) != 0 {",
     "cargo test --test mmap shared_writes_reach_read_at_other_mappings_and_the_file"),
    ("28-mmap-skips-cached-folios", "src/mmap.rs",
     "        vma.arm_cached(vma.pgoff(), vma.pgoff().add((plen >> PAGE_SHIFT) as u64));",
     "",
     "cargo test --test mmap first_writes_to_pages_cached"),
    ("29-read-marks-accessed-every-copy", "src/filemap.rs",
     "            if !(folio.pos() <= last && last - folio.pos() < folio.size() as u64) {",
     "            if true {",
     "cargo test --test reclaim sequential_read_under_a_small_limit"),
    ("30-readahead-window-uncapped", "src/filemap.rs",
     "        let max = self.ra.max_pages.max(init).min(chunk).max(init);",
     "        let max = self.ra.max_pages.max(init);",
     "cargo test --test reclaim sequential_read_under_a_small_limit"),
    ("31-lockless-pin-skips-lock-check", "src/folio.rs",
     "        if self.flags.fetch_or(0, Ordering::AcqRel) & LOCKED == 0 {",
     "        if true || self.flags.fetch_or(0, Ordering::AcqRel) & LOCKED == 0 {",
     f"{LOOM} loom_filemap real_page_ref"),
    ("32-lockless-pin-loads-lock-bit", "src/folio.rs",
     "        if self.flags.fetch_or(0, Ordering::AcqRel) & LOCKED == 0 {",
     "        if self.flags.load(Ordering::Relaxed) & LOCKED == 0 {",
     f"{LOOM} loom_filemap real_page_ref"),
    ("33-integrity-harvest-skips-busy-folios", "src/wp_async.rs",
     "            let (HarvestMode::Integrity, Some(f)) = (mode, busy) else {",
     "            let (HarvestMode::Background, Some(f)) = (mode, busy) else {",
     f"{LOOM} loom_wp_async real_fsync_holding_a_page_mut"),
    ("34-evict-skips-compare-after-zap", "src/wp_async.rs",
     "            written = snapshot(g) != before;",
     "            written = snapshot(g).is_empty() && !before.is_empty();",
     f"{LOOM} loom_wp_async real_evict_vs_mapped_store"),
    ("35-evict-ignores-async-mappings", "src/wp_async.rs",
     "        if !self.has_wp_async() {\n            return true;\n        }\n        let Some(mut st) = self.harvest_lock.try_lock() else {",
     "        if self.has_wp_async() {\n            return true;\n        }\n        let Some(mut st) = self.harvest_lock.try_lock() else {",
     "cargo test --test wp_async reclaim_never_drops"),
    ("36-munmap-skips-last-scan", "src/wp_async.rs",
     "        if let Err(e) = scan_into(vma, first, end, &mut st) {\n            eprintln!(\"upcache: the last harvest of an unmapped mapping failed: {e}\");\n        }\n        unpublish();",
     "        unpublish();",
     "cargo test --test wp_async mapped_writes_reach_the_file"),
    ("37-writeback-skips-harvest", "src/page_writeback.rs",
     "        let harvested = self.harvest_wbc_range(&wbc);\n        let r = {",
     "        let harvested = Ok(());\n        let r = {",
     "cargo test --test wp_async"),
    ("38-truncate-drops-straddling-folio-with-async-mappings", "src/truncate.rs",
     "                    if g.is_dirty() || self.has_wp_async() {",
     "                    if g.is_dirty() {",
     "cargo test --test wp_async truncate_inside_a_large_folio"),
    ("39-harvest-waits-for-folio-lock-under-harvest-lock", "src/wp_async.rs",
     "                    match f.trylock() {",
     "                    match Ok::<_, crate::folio::FolioRef>(f.lock()) {",
     f"{LOOM} loom_wp_async real_fsync_holding_a_page_mut"),
    ("40-evict-ignores-pending-pages", "src/wp_async.rs",
     "        if st.remove_range(first.0..end.0) {",
     "        if st.remove_range(first.0..end.0) && false {",
     f"{LOOM} loom_wp_async real_evict_keeps_a_page"),
    ("41-harvest-scan-protects-holes", "src/uffd.rs",
     "                category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,",
     "                category_anyof_mask: 0,",
     "cargo test --test page_tables"),
    ("42-evict-ignores-failed-zap", "src/wp_async.rs",
     "                all_zapped &= p.zap(first, end);",
     "                all_zapped &= p.zap(first, end) || true;",
     "cargo test --test wp_async eviction_keeps_folios_an_mlocked"),
    ("43-munmap-drain-waits-for-folio-locks", "src/wp_async.rs",
     "        self.drain_pending(st, first, end, HarvestMode::Background);\n        self.nr_wp_async.fetch_sub(1, Ordering::Release);",
     "        self.drain_pending(st, first, end, HarvestMode::Integrity);\n        self.nr_wp_async.fetch_sub(1, Ordering::Release);",
     "cargo test --test wp_async dropping_a_mapping_never_waits"),
    ("45-poison-past-eof-without-second-size-read", "src/mmap.rs",
     "        let eof = self.size().div_ceil(PAGE_SIZE as u64);\n        if eof > first.0 {\n            self.zap_mappings(first, PgOff(eof.min(end.0)), true);",
     "        let eof = self.size().div_ceil(PAGE_SIZE as u64);\n        if false && eof > first.0 {\n            self.zap_mappings(first, PgOff(eof.min(end.0)), true);",
     f"{LOOM} loom_large_folios growth_racing"),
    ("46-new-large-folio-not-poisoned-past-eof", "src/address_space.rs",
     "        if split < index.0 + n {\n            self.poison_past_eof(",
     "        if false && split < index.0 + n {\n            self.poison_past_eof(",
     "cargo test --test sigbus page_beyond_eof_inside_a_large_folio_raises_sigbus"),
    ("47-mmap-skips-poison-of-cached-eof-folio", "src/mmap.rs",
     "    if mode == UffdMode::Missing && mapping.ra.min_order > 0 {",
     "    if false && mode == UffdMode::Missing && mapping.ra.min_order > 0 {",
     "cargo test --test sigbus page_beyond_eof_inside_a_large_folio_cached_before_mmap"),
    ("48-large-folios-smaller-than-shmem-folios", "src/cache.rs",
     "            (MAX_ORDER, MAX_ORDER)\n",
     "            (4, 4)\n",
     "cargo test --test large_folios"),
]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    # A patch is `git diff` against the index: uncommitted edits in src/
    # would end up in every patch, which then no longer applies.
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], check=True,
                           capture_output=True, text=True).stdout
    if dirty:
        sys.exit("src/ has uncommitted changes; commit them first:\n" + dirty)
    names = set(sys.argv[1:])
    for name, path, old, new, cmd in MUTANTS:
        if names and name not in names:
            continue
        src = open(path).read()
        n = src.count(old)
        if n != 1:
            sys.exit(f"{name}: expected the text once in {path}, found {n}")
        open(path, "w").write(src.replace(old, new))
        try:
            diff = subprocess.run(["git", "diff", "--", path], check=True, capture_output=True, text=True).stdout
        finally:
            open(path, "w").write(src)
        with open(os.path.join(here, name + ".patch"), "w") as f:
            f.write(f"# kill: {cmd}\n{diff}")
        print("wrote", name)


if __name__ == "__main__":
    main()
