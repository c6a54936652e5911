//! Where folio bytes live: one sparse `memfd` per address space, each byte at
//! its file offset, written through the engine's own unregistered
//! `MAP_SHARED` view of it.
//!
//! The view is mapped lazily in 1 GiB chunks (virtual address space only,
//! `MAP_NORESERVE`); a folio never straddles a chunk because folios are
//! naturally aligned and at most 2 MiB. The fault engine maps the very same
//! memfd pages into user mappings, so a mapped page *is* the cached folio.
//! Dropping folios punches the memfd (`FALLOC_FL_PUNCH_HOLE`), which frees the
//! memory and zaps the page from every mapping.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{fallocate, fstat, ftruncate, memfd_create, FallocateFlags, MemfdFlags};
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};

use crate::sync::Mutex;
use crate::types::MAX_FILE_SIZE;

#[cfg(not(loom))]
const CHUNK_SHIFT: u32 = 30;
#[cfg(loom)]
const CHUNK_SHIFT: u32 = 18;
const CHUNK_SIZE: u64 = 1 << CHUNK_SHIFT;

/// The memfd holding one address space's folios, and the engine's view.
pub(crate) struct PageStore {
    memfd: OwnedFd,
    /// chunk number → base address of its view. Touched only when a folio
    /// is created; folios cache their data pointer.
    chunks: Mutex<HashMap<u64, usize>>,
    /// Loom models' page table: told of every punch (which zaps the range
    /// from every user mapping), after the memory is freed.
    #[cfg(loom)]
    pub(crate) on_punch: std::sync::OnceLock<PteHook>,
    /// Loom models' page table: told of every `page_mkclean` (which, for
    /// real, write-protects the folio in every shared-writable mapping).
    #[cfg(loom)]
    pub(crate) on_mkclean: std::sync::OnceLock<PteHook>,
}

/// A loom model's page-table hook: `(pos, len)` of the file range.
#[cfg(loom)]
pub(crate) type PteHook = std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Call a loom model's hook, if it set one (once, before its threads).
#[cfg(loom)]
pub(crate) fn call_pte_hook(hook: &std::sync::OnceLock<PteHook>, pos: u64, len: u64) {
    if let Some(hook) = hook.get() {
        hook(pos, len);
    }
}

/// Could the kernel give this memfd large (THP or mTHP) shmem folios? Read
/// from `/sys/kernel/mm/transparent_hugepage/shmem_enabled` and the
/// per-size `hugepages-*/shmem_enabled`: `always`, `within_size` and
/// `force` do (a memfd is sized to the largest file, so every offset is
/// "within size"); `never`, `advise` (no VMA asks: fills use `pwrite` and
/// an unadvised view) and `deny` do not. Unreadable files count as off.
pub(crate) fn shmem_thp_possible() -> bool {
    let dir = std::path::Path::new("/sys/kernel/mm/transparent_hugepage");
    let top = std::fs::read_to_string(dir.join("shmem_enabled")).unwrap_or_default();
    let top_on = thp_setting_enables(&top);
    if top_on {
        return true;
    }
    let Ok(sizes) = std::fs::read_dir(dir) else {
        return false;
    };
    sizes.flatten().any(|e| {
        let s = std::fs::read_to_string(e.path().join("shmem_enabled")).unwrap_or_default();
        thp_setting_enables(&s)
    })
}

/// Does a `shmem_enabled` file's selected (bracketed) value give a memfd
/// large folios without a `MADV_HUGEPAGE` VMA?
pub(crate) fn thp_setting_enables(s: &str) -> bool {
    let selected = s.split('[').nth(1).and_then(|r| r.split(']').next()).unwrap_or("");
    matches!(selected, "always" | "within_size" | "force")
}

impl PageStore {
    /// Create the memfd, sized to the largest file (sparse, no memory).
    pub(crate) fn new(name: &str) -> io::Result<PageStore> {
        let memfd = memfd_create(format!("upcache:{name}"), MemfdFlags::CLOEXEC)?;
        ftruncate(&memfd, MAX_FILE_SIZE)?;
        Ok(PageStore {
            memfd,
            chunks: Mutex::new(HashMap::new()),
            #[cfg(loom)]
            on_punch: std::sync::OnceLock::new(),
            #[cfg(loom)]
            on_mkclean: std::sync::OnceLock::new(),
        })
    }

    /// The memfd (the fault engine maps it into user mappings).
    pub(crate) fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// Engine-view address of file offset `pos`; maps its chunk on first use.
    pub(crate) fn view_ptr(&self, pos: u64) -> io::Result<*mut u8> {
        debug_assert!(pos < MAX_FILE_SIZE);
        let chunk = pos >> CHUNK_SHIFT;
        let mut chunks = self.chunks.lock();
        let base = match chunks.get(&chunk) {
            Some(&b) => b,
            None => {
                // SAFETY: a fresh mapping (null hint, no MAP_FIXED) cannot
                // alias any Rust object; the memfd is at least
                // MAX_FILE_SIZE long, so the chunk is backed; it stays
                // mapped until `Drop`, after every folio is gone.
                let p = unsafe {
                    mmap(
                        std::ptr::null_mut(),
                        CHUNK_SIZE as usize,
                        ProtFlags::READ | ProtFlags::WRITE,
                        MapFlags::SHARED | MapFlags::NORESERVE,
                        &self.memfd,
                        chunk << CHUNK_SHIFT,
                    )
                }?;
                // A forked child must not inherit the engine view: it
                // could write cached folios behind the parent's back.
                // SAFETY: our own fresh mapping; DONTFORK changes only
                // fork(2)'s treatment of it.
                unsafe { libc::madvise(p, CHUNK_SIZE as usize, libc::MADV_DONTFORK) };
                chunks.insert(chunk, p as usize);
                p as usize
            }
        };
        Ok((base + (pos & (CHUNK_SIZE - 1)) as usize) as *mut u8)
    }

    /// Write `data` at `pos` with `pwrite(2)`: the kernel fills each memfd
    /// page under its own page lock and marks it uptodate only when full,
    /// so a kernel fault on a user mapping never maps a half-filled page.
    pub(crate) fn pwrite(&self, mut pos: u64, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match rustix::io::pwrite(&self.memfd, data, pos) {
                Ok(n) => {
                    data = &data[n..];
                    pos += n as u64;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Free the memory of `[pos, pos + len)` (`FALLOC_FL_PUNCH_HOLE`), which
    /// also unmaps it from every user mapping of the memfd.
    pub(crate) fn punch(&self, pos: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        fallocate(
            &self.memfd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            pos,
            len,
        )?;
        #[cfg(loom)]
        call_pte_hook(&self.on_punch, pos, len);
        Ok(())
    }

    /// Bytes of memory the memfd holds (its allocated blocks).
    pub(crate) fn allocated_bytes(&self) -> u64 {
        fstat(&self.memfd).map(|st| st.st_blocks as u64 * 512).unwrap_or(0)
    }
}

impl Drop for PageStore {
    fn drop(&mut self) {
        for (_, base) in self.chunks.lock().drain() {
            // SAFETY: `base` came from our `mmap` of CHUNK_SIZE bytes; the
            // store is being dropped after every folio (and so every pointer
            // into the view) is gone.
            let _ = unsafe { munmap(base as *mut _, CHUNK_SIZE as usize) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::thp_setting_enables;

    #[test]
    fn shmem_thp_settings_that_give_a_memfd_large_folios() {
        assert!(!thp_setting_enables("always within_size advise [never] deny force\n"));
        assert!(!thp_setting_enables("always within_size [advise] never deny force\n"));
        assert!(!thp_setting_enables("always within_size advise never [deny] force\n"));
        assert!(thp_setting_enables("[always] within_size advise never deny force\n"));
        assert!(thp_setting_enables("always [within_size] advise never deny force\n"));
        assert!(thp_setting_enables("always within_size advise never deny [force]\n"));
        // Per-size files: `inherit` follows the top-level value, read there.
        assert!(!thp_setting_enables("always [inherit] within_size advise never\n"));
        assert!(!thp_setting_enables(""));
    }
}
