//! The address kinds upcache juggles, kept apart by newtypes.
//!
//! A file byte offset (`u64`, `loff_t` in the kernel) is converted to a page
//! index ([`PgOff`], `pgoff_t`) and back only here. The cache's memfd holds
//! each file's bytes at its file offset inside the file's region
//! (`PageStore::memfd_offset` adds the region's base, only where the memfd
//! itself is addressed); a user virtual address is a different thing and
//! lives in the fault engine.

/// log2 of the page size upcache works in.
pub const PAGE_SHIFT: u32 = 12;
/// The page size (4 KiB, the base page of x86-64 and most arm64 kernels).
pub const PAGE_SIZE: usize = 1 << PAGE_SHIFT;

/// Largest folio order: a folio covers `2^order` pages, `order <= MAX_ORDER`
/// (2 MiB with 4 KiB pages, a PMD).
pub const MAX_ORDER: u8 = 9;

/// Bits of page index the page-cache index can address (see `xarray`).
#[cfg(not(loom))]
pub const INDEX_BITS: u32 = 32;
/// Under loom the index is tiny so that models stay small.
#[cfg(loom)]
pub const INDEX_BITS: u32 = 6;

/// Largest file size upcache caches: `2^INDEX_BITS` pages (16 TiB).
/// Writes or truncates beyond it fail with `EFBIG`.
pub const MAX_FILE_SIZE: u64 = 1u64 << (INDEX_BITS + PAGE_SHIFT);

/// A page index in a file (`pgoff_t`): byte offset `>> PAGE_SHIFT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PgOff(pub u64);

impl PgOff {
    /// The page containing byte `pos`.
    #[inline]
    pub const fn of_byte(pos: u64) -> PgOff {
        PgOff(pos >> PAGE_SHIFT)
    }

    /// First byte of this page.
    #[inline]
    pub const fn byte(self) -> u64 {
        self.0 << PAGE_SHIFT
    }

    /// `self + n` pages.
    #[inline]
    pub const fn add(self, n: u64) -> PgOff {
        PgOff(self.0 + n)
    }
}

/// Round `x` up to a multiple of the page size.
#[inline]
pub const fn page_align_up(x: u64) -> u64 {
    (x + PAGE_SIZE as u64 - 1) & !(PAGE_SIZE as u64 - 1)
}
