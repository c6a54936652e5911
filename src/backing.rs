//! The storage below the cache (the kernel's block device / filesystem
//! disk): [`BackingStore`], the real-file [`FileStore`], and [`StoreOps`],
//! the generic [`AddressSpaceOps`] built on any store.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::address_space::AddressSpace;
use crate::aops::{AddressSpaceOps, WritebackControl};
use crate::folio::FolioGuard;

/// Byte-addressed storage for one file.
///
/// Implementations must be thread-safe: reads of different ranges run
/// concurrently, and a write may run concurrently with reads of other
/// folios.
pub trait BackingStore: Send + Sync + 'static {
    /// Read up to `buf.len()` bytes at `off`; fewer only at end of file
    /// (0 at or past it). A short read before EOF is allowed: the caller
    /// retries the rest.
    ///
    /// # Errors
    /// Any I/O error.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;

    /// Write all of `buf` at `off`, extending the store if needed.
    ///
    /// # Errors
    /// Any I/O error (`EIO`, `ENOSPC`, ...).
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()>;

    /// Make written data durable.
    ///
    /// # Errors
    /// Any I/O error.
    fn sync_data(&self) -> io::Result<()>;

    /// Current size in bytes.
    ///
    /// # Errors
    /// Any I/O error.
    fn len(&self) -> io::Result<u64>;

    /// Is the store empty?
    ///
    /// # Errors
    /// Any I/O error.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncate or extend to `size`.
    ///
    /// # Errors
    /// Any I/O error.
    fn set_len(&self, size: u64) -> io::Result<()>;

    /// Deallocate `[off, off + len)`, which must then read as zeros. The
    /// default writes zeros.
    ///
    /// # Errors
    /// Any I/O error.
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        write_zeros(self, off, len)
    }

    /// Must pages stay stable while being written (checksumming stores)?
    fn stable_writes(&self) -> bool {
        false
    }
}

/// A real file, through `pread(2)` / `pwrite(2)` / `fdatasync(2)`.
#[derive(Debug)]
pub struct FileStore {
    file: fs::File,
}

impl FileStore {
    /// Open `path` read-write (it must exist).
    ///
    /// # Errors
    /// `open(2)`'s error.
    pub fn open(path: impl AsRef<Path>) -> io::Result<FileStore> {
        let file = fs::OpenOptions::new().read(true).write(true).open(path)?;
        Ok(FileStore { file })
    }

    /// Use an already open file (it must be open for reading and writing).
    pub fn from_file(file: fs::File) -> FileStore {
        FileStore { file }
    }

    /// The underlying file.
    pub fn file(&self) -> &fs::File {
        &self.file
    }
}

impl BackingStore for FileStore {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        loop {
            match self.file.read_at(buf, off) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        // std's write_all_at retries short writes and EINTR.
        self.file.write_all_at(buf, off)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, size: u64) -> io::Result<()> {
        self.file.set_len(size)
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        match fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            off,
            len,
        ) {
            Ok(()) => Ok(()),
            // A filesystem without hole punching: write zeros instead.
            Err(rustix::io::Errno::OPNOTSUPP) => write_zeros(self, off, len),
            Err(e) => Err(e.into()),
        }
    }
}

/// Overwrite `[off, off + len)` (clamped to the store's size) with zeros.
fn write_zeros<S: BackingStore + ?Sized>(store: &S, off: u64, len: u64) -> io::Result<()> {
    let end = off.saturating_add(len).min(store.len()?);
    let zeros = vec![0u8; 1 << 16];
    let mut pos = off;
    while pos < end {
        let n = ((end - pos) as usize).min(zeros.len());
        store.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Read `buf.len()` bytes at `off`, retrying short reads; zero-fill past the
/// store's end of file. Returns the bytes that came from the store.
///
/// # Errors
/// The store's error.
pub fn read_full<S: BackingStore + ?Sized>(store: &S, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match store.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(done)
}

/// The generic [`AddressSpaceOps`] over a [`BackingStore`] (the kernel's
/// `mpage_*` / `iomap` helpers in one place).
#[derive(Debug)]
pub struct StoreOps<S> {
    store: S,
}

impl<S: BackingStore> StoreOps<S> {
    /// Wrap a store.
    pub fn new(store: S) -> Self {
        StoreOps { store }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }
}

impl<S: BackingStore> AddressSpaceOps for StoreOps<S> {
    fn read_folio(&self, mapping: &AddressSpace, mut folio: FolioGuard) -> io::Result<()> {
        let pos = folio.pos();
        // Bytes past i_size read as zeros (the EOF invariant: the tail of
        // the last folio is zero in the cache).
        let isize = mapping.size();
        let want = folio.size().min(isize.saturating_sub(pos) as usize);
        let data = folio.data_mut();
        let r = read_full(&self.store, &mut data[..want], pos);
        match r {
            Ok(_) => {
                data[want..].fill(0);
                folio.mark_uptodate();
                Ok(())
            }
            Err(e) => {
                folio.set_error();
                Err(e)
            }
        }
    }

    fn writepage(&self, mapping: &AddressSpace, folio: FolioGuard, _wbc: &mut WritebackControl) -> io::Result<()> {
        let pos = folio.pos();
        let isize = mapping.size();
        // Only the part below i_size is written: the store's length is
        // i_size, never a folio multiple.
        let len = folio.size().min(isize.saturating_sub(pos) as usize);
        let wb = mapping.folio_start_writeback(folio);
        if len == 0 {
            wb.end();
            return Ok(());
        }
        match self.store.write_all_at(&wb.data()[..len], pos) {
            Ok(()) => {
                wb.end();
                Ok(())
            }
            Err(e) => {
                let errno = e.raw_os_error();
                wb.end_with_error(errno.unwrap_or(rustix::io::Errno::IO.raw_os_error()));
                Err(e)
            }
        }
    }

    fn launder_folio(&self, mapping: &AddressSpace, folio: &mut FolioGuard) -> io::Result<()> {
        let pos = folio.pos();
        let len = folio.size().min(mapping.size().saturating_sub(pos) as usize);
        self.store.write_all_at(&folio.data()[..len], pos)
    }

    fn initial_size(&self) -> io::Result<u64> {
        self.store.len()
    }

    fn set_size(&self, size: u64) -> io::Result<()> {
        self.store.set_len(size)
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.store.punch_hole(off, len)
    }

    fn fsync(&self) -> io::Result<()> {
        self.store.sync_data()
    }

    fn stable_writes(&self) -> bool {
        self.store.stable_writes()
    }
}
