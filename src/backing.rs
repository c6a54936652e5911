//! The storage below the cache (the kernel's block device / filesystem
//! disk): [`BackingStore`], the real-file [`FileStore`], and [`StoreOps`],
//! the generic [`AddressSpaceOps`] built on any store.

use std::fs;
use std::io::{self, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::address_space::AddressSpace;
use crate::aops::{AddressSpaceOps, ReadaheadControl, WritebackControl};
use crate::folio::FolioGuard;
use crate::sync::{AtomicU64, Ordering};

/// Byte-addressed storage for one file.
///
/// Implementations must be thread-safe: reads of different ranges run
/// concurrently, and a write may run concurrently with reads of other
/// folios.
///
/// An in-memory store, cached through [`StoreOps`]:
///
/// ```
/// use std::io;
/// use std::sync::Mutex;
///
/// struct Mem(Mutex<Vec<u8>>);
///
/// impl upcache::BackingStore for Mem {
///     fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
///         let v = self.0.lock().unwrap();
///         let start = (off as usize).min(v.len());
///         let n = buf.len().min(v.len() - start);
///         buf[..n].copy_from_slice(&v[start..start + n]);
///         Ok(n)
///     }
///     fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
///         let mut v = self.0.lock().unwrap();
///         let end = off as usize + buf.len();
///         if v.len() < end {
///             v.resize(end, 0);
///         }
///         v[off as usize..end].copy_from_slice(buf);
///         Ok(())
///     }
///     fn sync_data(&self) -> io::Result<()> {
///         Ok(())
///     }
///     fn len(&self) -> io::Result<u64> {
///         Ok(self.0.lock().unwrap().len() as u64)
///     }
///     fn set_len(&self, size: u64) -> io::Result<()> {
///         self.0.lock().unwrap().resize(size as usize, 0);
///         Ok(())
///     }
/// }
///
/// # fn main() -> upcache::Result<()> {
/// let store = std::sync::Arc::new(Mem(Mutex::new(b"stored bytes".to_vec())));
/// let cache = upcache::PageCache::new();
/// let file = cache.open_with_ops("mem", upcache::StoreOps::new(store.clone()))?;
/// file.write_at(b"STORED", 0)?;
/// file.fsync()?;
/// assert_eq!(&store.0.lock().unwrap()[..], b"STORED bytes");
/// # Ok(()) }
/// ```
pub trait BackingStore: Send + Sync + 'static {
    /// Read up to `buf.len()` bytes at `off`; fewer only at end of file
    /// (0 at or past it). A short read before EOF is allowed: the caller
    /// retries the rest.
    ///
    /// # Errors
    /// Any I/O error.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;

    /// Read into several buffers from consecutive offsets starting at `off`
    /// (`preadv(2)`); returns the bytes read, fewer only at end of file (or
    /// on a short read: the caller retries the rest). The default reads
    /// each buffer in turn.
    ///
    /// # Errors
    /// Any I/O error.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], off: u64) -> io::Result<usize> {
        let mut done = 0usize;
        for b in bufs.iter_mut() {
            let n = read_full(self, b, off + done as u64)?;
            done += n;
            if n < b.len() {
                break;
            }
        }
        Ok(done)
    }

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

    /// Called before a dirty folio is written to this store, with the
    /// folio's private word (`PageMut::set_lsn`; 0 if never set): a WAL
    /// engine makes its log durable up to that LSN and returns `Ok(true)`,
    /// or returns `Ok(false)` to keep the folio dirty for now (refused in
    /// an integrity sync, which then fails with `EAGAIN`). See
    /// [`crate::aops::AddressSpaceOps::write_barrier`].
    ///
    /// # Errors
    /// The engine's error; the folio stays dirty.
    fn write_barrier(&self, _private: u64, _mode: crate::aops::SyncMode) -> io::Result<bool> {
        Ok(true)
    }

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

    /// The largest size the store can hold (the file system's
    /// `s_maxbytes`; see
    /// [`AddressSpaceOps::max_file_size`](crate::aops::AddressSpaceOps::max_file_size)).
    /// The default is [`MAX_FILE_SIZE`](crate::MAX_FILE_SIZE); the file
    /// stores ask the file system (`lseek(2)` refuses offsets past it).
    fn max_file_size(&self) -> u64 {
        crate::types::MAX_FILE_SIZE
    }

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

    /// Should readahead read each run of consecutive folios with one
    /// vectored read? Worth it when nothing below reads ahead (`O_DIRECT`);
    /// a buffered file does better with one read per folio, which lets the
    /// copy overlap the kernel's own readahead (BENCHMARKS.md).
    fn batch_readahead(&self) -> bool {
        false
    }

    /// Requests a direct-I/O store served with buffered I/O instead (an
    /// unaligned tail): [`StoreOps`] adds them to `Stats::direct_fallbacks`.
    /// 0 for stores that have no direct path.
    fn direct_fallbacks(&self) -> u64 {
        0
    }
}

/// A shared store: an engine keeps an `Arc` of its store (to inspect or
/// steer it) and gives the cache a clone. Every method delegates, defaults
/// included, so nothing the store overrides is lost.
impl<T: BackingStore + ?Sized> BackingStore for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        (**self).read_at(buf, off)
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], off: u64) -> io::Result<usize> {
        (**self).read_vectored_at(bufs, off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        (**self).write_all_at(buf, off)
    }
    fn sync_data(&self) -> io::Result<()> {
        (**self).sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn is_empty(&self) -> io::Result<bool> {
        (**self).is_empty()
    }
    fn set_len(&self, size: u64) -> io::Result<()> {
        (**self).set_len(size)
    }
    fn max_file_size(&self) -> u64 {
        (**self).max_file_size()
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(off, len)
    }
    fn stable_writes(&self) -> bool {
        (**self).stable_writes()
    }
    fn batch_readahead(&self) -> bool {
        (**self).batch_readahead()
    }
    fn direct_fallbacks(&self) -> u64 {
        (**self).direct_fallbacks()
    }
    fn write_barrier(&self, private: u64, mode: crate::aops::SyncMode) -> io::Result<bool> {
        (**self).write_barrier(private, mode)
    }
}

/// A real file, through `pread(2)` / `pwrite(2)` / `fdatasync(2)`.
#[derive(Debug)]
pub struct FileStore {
    file: fs::File,
    /// The descriptor was opened `O_APPEND`: `pwrite(2)` would ignore the
    /// offset and append (Linux), so writes are refused.
    append: bool,
    /// The file system's largest file (`probe_max_file_size`).
    max_file_size: u64,
}

impl FileStore {
    /// Open `path` read-write (it must exist).
    ///
    /// # Errors
    /// `open(2)`'s error.
    pub fn open(path: impl AsRef<Path>) -> io::Result<FileStore> {
        let file = fs::OpenOptions::new().read(true).write(true).open(path)?;
        // Our own open file description: probing it moves no one's offset.
        let max_file_size = probe_max_file_size(&file);
        Ok(FileStore {
            file,
            append: false,
            max_file_size,
        })
    }

    /// Use an already open file (it must be open for reading and writing).
    /// A descriptor opened `O_APPEND` reads, but its writes fail with
    /// `EINVAL`: `pwrite(2)` on it ignores the offset and appends.
    ///
    /// The file system's largest file is found with `lseek(2)`
    /// ([`BackingStore::max_file_size`]) on a second open file description
    /// of the same file (`/proc/self/fd`), never on this one: its offset
    /// may be shared with descriptors the caller still reads or writes
    /// through (`try_clone`, `dup`). Where that reopen fails, the limit is
    /// [`MAX_FILE_SIZE`](crate::MAX_FILE_SIZE).
    pub fn from_file(file: fs::File) -> FileStore {
        let append = rustix::fs::fcntl_getfl(&file).is_ok_and(|f| f.contains(rustix::fs::OFlags::APPEND));
        let max_file_size = {
            use std::os::fd::AsRawFd;
            fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
                .map_or(crate::types::MAX_FILE_SIZE, |own| probe_max_file_size(&own))
        };
        FileStore {
            file,
            append,
            max_file_size,
        }
    }

    /// The underlying file.
    pub fn file(&self) -> &fs::File {
        &self.file
    }
}

impl BackingStore for FileStore {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        pread_retry(&self.file, buf, off)
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], off: u64) -> io::Result<usize> {
        preadv_retry(&self.file, bufs, off)
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if self.append {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "FileStore over an O_APPEND descriptor: pwrite would append instead of writing at the offset (EINVAL)",
            ));
        }
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

    fn max_file_size(&self) -> u64 {
        self.max_file_size
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        punch_file(self, &self.file, off, len)
    }
}

/// The largest file `f`'s file system holds for it (`s_maxbytes`; ext4
/// with 4 KiB blocks: 16 TiB − 4 KiB), at most
/// [`MAX_FILE_SIZE`](crate::MAX_FILE_SIZE). The kernel's `lseek(2)`
/// refuses an offset past that limit with `EINVAL` (`vfs_setpos`) and
/// accepts any below it, so bisection finds it in at most 44 calls (one
/// where the file system holds `MAX_FILE_SIZE`). `f` must be an open file
/// description nobody else uses: its offset moves (and is put back). A
/// descriptor that cannot seek gets `MAX_FILE_SIZE`.
fn probe_max_file_size(f: &fs::File) -> u64 {
    use rustix::fs::{seek, SeekFrom};
    let max = crate::types::MAX_FILE_SIZE;
    let Ok(saved) = seek(f, SeekFrom::Current(0)) else {
        return max;
    };
    let seekable = |pos: u64| seek(f, SeekFrom::Start(pos)).is_ok();
    let limit = if seekable(max) {
        max
    } else {
        // Invariant: `lo` is seekable (the current offset is), `hi` not.
        let (mut lo, mut hi) = (saved, max);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if seekable(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    };
    // Best effort: the offset was seekable before.
    let _ = seek(f, SeekFrom::Start(saved));
    limit
}

/// `pread(2)`, retrying EINTR.
fn pread_retry(f: &fs::File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    loop {
        match f.read_at(buf, off) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)` on `f`, or zeros written through
/// `store` where the filesystem cannot punch holes.
fn punch_file<S: BackingStore>(store: &S, f: &fs::File, off: u64, len: u64) -> io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    match fallocate(f, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, off, len) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => write_zeros(store, off, len),
        Err(e) => Err(e.into()),
    }
}

/// `preadv(2)`, retrying EINTR.
fn preadv_retry(f: &fs::File, bufs: &mut [IoSliceMut<'_>], off: u64) -> io::Result<usize> {
    loop {
        match rustix::io::preadv(f, bufs, off) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(Into::into),
        }
    }
}

/// A real file opened with `O_DIRECT`, so that upcache is the only cache:
/// reads go from the disk into the folios without passing through the
/// kernel's page cache, writes straight from them.
///
/// `O_DIRECT` needs offsets, lengths and buffers aligned to the device's
/// logical block (4 KiB assumed). Every request at an aligned offset goes
/// through `O_DIRECT`: a caller buffer that is not aligned, or a length
/// that is not a multiple of the block (a read at end of file), is bounced
/// through an aligned buffer. Only two cases use the second, buffered
/// descriptor of the same file (the kernel keeps the two coherent): a
/// request at an unaligned offset, and the partial block at the end of a
/// write (the file's tail, which `O_DIRECT` cannot write without growing
/// the file). Each is counted in [`direct_fallbacks`](Self::direct_fallbacks),
/// so a benchmark can check that its side really bypassed the kernel cache.
#[derive(Debug)]
pub struct DirectFileStore {
    direct: fs::File,
    buffered: fs::File,
    align: usize,
    fallbacks: AtomicU64,
    /// The file system's largest file (`probe_max_file_size`).
    max_file_size: u64,
}

/// A zeroed heap buffer aligned for `O_DIRECT` (a bounce buffer).
pub(crate) struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    /// `len` rounded up to `align` (at least one block), aligned to `align`.
    pub(crate) fn new(len: usize, align: usize) -> AlignedBuf {
        let size = len.max(1).next_multiple_of(align);
        let layout = std::alloc::Layout::from_size_align(size, align).expect("bounce buffer layout");
        // SAFETY: `layout` has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, layout }
    }
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` owns `layout.size()` initialized bytes; `&self`
        // excludes writers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `layout.size()` initialized (zeroed) bytes,
        // and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl DirectFileStore {
    /// Open `path` read-write with `O_DIRECT`.
    ///
    /// # Errors
    /// `open(2)`'s error; for a filesystem that refuses `O_DIRECT` (tmpfs,
    /// some FUSE), an `Unsupported` error saying so — use [`FileStore`]
    /// there.
    pub fn open(path: impl AsRef<Path>) -> io::Result<DirectFileStore> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = path.as_ref();
        let direct = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!(
                            "{}: the filesystem refuses O_DIRECT (tmpfs?); use FileStore instead",
                            path.display()
                        ),
                    )
                } else {
                    e
                }
            })?;
        let buffered = fs::OpenOptions::new().read(true).write(true).open(path)?;
        let max_file_size = probe_max_file_size(&buffered);
        Ok(DirectFileStore {
            direct,
            buffered,
            align: 4096,
            fallbacks: AtomicU64::new(0),
            max_file_size,
        })
    }

    /// Requests served through the buffered descriptor (an unaligned
    /// offset, or the partial block at the end of a write). 0 on an
    /// aligned workload whose file size is a multiple of 4 KiB.
    pub fn direct_fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    fn fallback(&self) -> &fs::File {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        &self.buffered
    }

    fn aligned(&self, ptr: *const u8, len: usize, off: u64) -> bool {
        let a = self.align;
        (ptr as usize) % a == 0 && len % a == 0 && off % a as u64 == 0
    }
}

impl BackingStore for DirectFileStore {
    fn batch_readahead(&self) -> bool {
        true
    }
    fn direct_fallbacks(&self) -> u64 {
        DirectFileStore::direct_fallbacks(self)
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if off % self.align as u64 != 0 {
            // A caller retrying after a short read at end of file lands
            // here: nothing to read, and no reason to touch the other fd.
            if off >= self.len()? {
                return Ok(0);
            }
            return pread_retry(self.fallback(), buf, off);
        }
        if self.aligned(buf.as_ptr(), buf.len(), off) {
            return pread_retry(&self.direct, buf, off);
        }
        let mut b = AlignedBuf::new(buf.len(), self.align);
        let got = pread_retry(&self.direct, b.as_mut_slice(), off)?.min(buf.len());
        buf[..got].copy_from_slice(&b.as_mut_slice()[..got]);
        Ok(got)
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], off: u64) -> io::Result<usize> {
        let mut pos = off;
        let aligned = bufs.iter().all(|b| {
            let ok = self.aligned(b.as_ptr(), b.len(), pos);
            pos += b.len() as u64;
            ok
        });
        if aligned {
            return preadv_retry(&self.direct, bufs, off);
        }
        if off % self.align as u64 != 0 {
            return preadv_retry(self.fallback(), bufs, off);
        }
        // One aligned bounce for the whole run, then scatter.
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut b = AlignedBuf::new(total, self.align);
        let got = pread_retry(&self.direct, b.as_mut_slice(), off)?.min(total);
        let src = &b.as_mut_slice()[..got];
        let mut done = 0;
        for dst in bufs.iter_mut() {
            if done == got {
                break;
            }
            let n = dst.len().min(got - done);
            dst[..n].copy_from_slice(&src[done..done + n]);
            done += n;
        }
        Ok(got)
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let a = self.align;
        if off % a as u64 != 0 {
            return self.fallback().write_all_at(buf, off);
        }
        let head = buf.len() & !(a - 1);
        if head > 0 {
            if (buf.as_ptr() as usize) % a == 0 {
                self.direct.write_all_at(&buf[..head], off)?;
            } else {
                let mut b = AlignedBuf::new(head, a);
                b.as_mut_slice()[..head].copy_from_slice(&buf[..head]);
                self.direct.write_all_at(&b.as_mut_slice()[..head], off)?;
            }
        }
        if head < buf.len() {
            // The partial block at end of file.
            self.fallback().write_all_at(&buf[head..], off + head as u64)?;
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        // One inode, but each descriptor has its own error cursor: both
        // are synced even when the first fails, so that a kernel write-back
        // error is consumed by both and reported once, not again by the
        // second descriptor at the next sync.
        let b = self.buffered.sync_data();
        let d = self.direct.sync_data();
        b.and(d)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.direct.metadata()?.len())
    }

    fn set_len(&self, size: u64) -> io::Result<()> {
        self.direct.set_len(size)
    }

    fn max_file_size(&self) -> u64 {
        self.max_file_size
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        punch_file(self, &self.direct, off, len)
    }
}

/// Overwrite `[off, off + len)` (clamped to the store's size) with zeros.
pub(crate) fn write_zeros<S: BackingStore + ?Sized>(store: &S, off: u64, len: u64) -> io::Result<()> {
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
            Ok(n) if n > buf.len() - done => return Err(more_than_asked(n, buf.len() - done)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(done)
}

/// A store's read reported more bytes than its buffer holds (a bug in the
/// store): an error, never a slice past the buffer.
fn more_than_asked(n: usize, asked: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the store's read returned {n} bytes for a {asked}-byte buffer"),
    )
}

/// The generic [`AddressSpaceOps`] over a [`BackingStore`] (the kernel's
/// `mpage_*` / `iomap` helpers in one place).
#[derive(Debug)]
pub struct StoreOps<S> {
    store: S,
    /// The store's `direct_fallbacks` already added to the file's stats.
    fallbacks_seen: AtomicU64,
}

impl<S: BackingStore> StoreOps<S> {
    /// Wrap a store.
    pub fn new(store: S) -> Self {
        StoreOps {
            store,
            fallbacks_seen: AtomicU64::new(0),
        }
    }

    /// Add the store's new direct-I/O fallbacks to `mapping`'s stats (after
    /// each call that may have done I/O). `fetch_max`: concurrent callers
    /// count each fallback once.
    fn note_fallbacks(&self, mapping: &AddressSpace) {
        let now = self.store.direct_fallbacks();
        let was = self.fallbacks_seen.fetch_max(now, Ordering::Relaxed);
        if now > was {
            mapping.stats.direct_fallbacks(now - was);
        }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }
}

impl<S: BackingStore> StoreOps<S> {
    /// Fill consecutive folios with one vectored read; each is marked
    /// uptodate (zero-filled past the store's end) or errored, and unlocked.
    /// `read_run` for a file whose fills must be page-atomic (`Missing`
    /// mappings exist): one read of the whole run into a page-aligned
    /// bounce buffer (O_DIRECT-ready), then each folio installed with
    /// `fill_folio`. Before, each folio of a 2 MiB window was its own
    /// synchronous read: `scan_seq_cold/upcache_direct` went from 1.87 s
    /// to 1.08 s (BENCHMARKS.md). Splitting the one read into concurrent
    /// pieces was measured too and gave no clear gain on this disk.
    fn read_run_atomic(&self, mapping: &AddressSpace, run: Vec<FolioGuard>, isize: u64) {
        let Some(first) = run.first() else { return };
        let pos = first.pos();
        let total: usize = run.iter().map(|f| f.size()).sum();
        let want = total.min(isize.saturating_sub(pos) as usize);
        let mut bounce = AlignedBuf::new(total, crate::types::PAGE_SIZE);
        let buf = bounce.as_mut_slice();
        match read_full(&self.store, &mut buf[..want], pos) {
            Ok(_) => {
                let mut at = 0usize;
                for mut f in run {
                    let sz = f.size();
                    match mapping.fill_folio(&mut f, &buf[at..at + sz]) {
                        Ok(()) => f.mark_uptodate(),
                        Err(_) => f.set_error(),
                    }
                    at += sz;
                }
            }
            Err(_) => {
                for f in run {
                    f.set_error();
                }
            }
        }
    }

    fn read_run(&self, mut run: Vec<FolioGuard>, isize: u64) {
        let Some(first) = run.first() else { return };
        let pos = first.pos();
        // Whole folios: aligned for O_DIRECT; bytes past EOF come back short
        // and are zero-filled below.
        let total: usize = run.iter().map(|f| f.size()).sum();
        let res = {
            let mut bufs: Vec<IoSliceMut<'_>> = run.iter_mut().map(|f| IoSliceMut::new(f.data_mut())).collect();
            let mut done = 0usize;
            loop {
                // Retry short reads below EOF by reading the remainder.
                match self.read_remaining(&mut bufs, pos, done) {
                    Ok(0) => break Ok(done),
                    Ok(n) if n > total - done => break Err(more_than_asked(n, total - done)),
                    Ok(n) => {
                        done += n;
                        if done >= total || pos + done as u64 >= isize {
                            break Ok(done);
                        }
                    }
                    Err(e) => break Err(e),
                }
            }
        };
        match res {
            Ok(done) => {
                let valid = (done as u64).min(isize.saturating_sub(pos)) as usize;
                let mut at = 0usize;
                for mut f in run {
                    let sz = f.size();
                    let keep = valid.saturating_sub(at).min(sz);
                    f.data_mut()[keep..].fill(0);
                    f.mark_uptodate();
                    at += sz;
                }
            }
            Err(_) => {
                for f in run {
                    f.set_error();
                }
            }
        }
    }

    /// One vectored read of the bytes of `bufs` after the first `skip`.
    fn read_remaining(&self, bufs: &mut [IoSliceMut<'_>], pos: u64, skip: usize) -> io::Result<usize> {
        if skip == 0 {
            return self.store.read_vectored_at(bufs, pos);
        }
        // Rare (short read): fall back to plain reads of the remainder.
        let mut at = 0usize;
        let mut n = 0usize;
        for b in bufs.iter_mut() {
            let len = b.len();
            if at + len > skip {
                let from = skip.max(at) - at;
                let got = read_full(&self.store, &mut b[from..], pos + (at + from) as u64)?;
                n += got;
                if got < len - from {
                    return Ok(n);
                }
            }
            at += len;
        }
        Ok(n)
    }
}

impl<S: BackingStore> StoreOps<S> {
    fn do_read_folio(&self, mapping: &AddressSpace, mut folio: FolioGuard) -> io::Result<()> {
        let pos = folio.pos();
        // Bytes past i_size read as zeros (the EOF invariant: the tail of
        // the last folio is zero in the cache).
        let isize = mapping.size();
        let want = folio.size().min(isize.saturating_sub(pos) as usize);
        if mapping.needs_atomic_fill() {
            // Read into a bounce buffer and install it page-atomically.
            let mut bounce = vec![0u8; folio.size()];
            let r =
                read_full(&self.store, &mut bounce[..want], pos).and_then(|_| mapping.fill_folio(&mut folio, &bounce));
            return match r {
                Ok(()) => {
                    folio.mark_uptodate();
                    Ok(())
                }
                Err(e) => {
                    folio.set_error();
                    Err(e)
                }
            };
        }
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

    fn do_readahead(&self, mapping: &AddressSpace, rac: &mut ReadaheadControl) {
        if !self.store.batch_readahead() {
            while let Some(f) = rac.next_folio() {
                let _ = self.do_read_folio(mapping, f);
            }
            return;
        }
        let atomic = mapping.needs_atomic_fill();
        let isize = mapping.size();
        let mut run: Vec<FolioGuard> = Vec::new();
        let flush = |run: Vec<FolioGuard>| {
            if atomic {
                self.read_run_atomic(mapping, run, isize);
            } else {
                self.read_run(run, isize);
            }
        };
        while let Some(f) = rac.next_folio() {
            let contiguous = run.last().is_none_or(|l| l.pos() + l.size() as u64 == f.pos());
            if !contiguous || run.len() == 64 {
                flush(std::mem::take(&mut run));
            }
            run.push(f);
        }
        flush(run);
    }

    fn do_writepage(&self, mapping: &AddressSpace, folio: FolioGuard, _wbc: &mut WritebackControl) -> io::Result<()> {
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

    fn do_launder_folio(&self, mapping: &AddressSpace, folio: &mut FolioGuard) -> io::Result<()> {
        // The engine's write barrier first, as for `writepage`: a WAL
        // engine's log must be durable up to the folio's LSN. Laundering
        // must clean the folio, so it asks as an integrity write.
        if !self.store.write_barrier(folio.private(), crate::aops::SyncMode::All)? {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "launder_folio: the engine's write barrier refused the write (EAGAIN)",
            ));
        }
        let pos = folio.pos();
        let len = folio.size().min(mapping.size().saturating_sub(pos) as usize);
        // A copy: the folio's bytes stay shared with user mappings.
        let mut buf = vec![0u8; len];
        folio.copy_out(0, &mut buf);
        self.store.write_all_at(&buf, pos)
    }
}

impl<S: BackingStore> AddressSpaceOps for StoreOps<S> {
    fn write_barrier(
        &self,
        _mapping: &AddressSpace,
        folio: &FolioGuard,
        mode: crate::aops::SyncMode,
    ) -> io::Result<bool> {
        self.store.write_barrier(folio.private(), mode)
    }

    fn read_folio(&self, mapping: &AddressSpace, folio: FolioGuard) -> io::Result<()> {
        let r = self.do_read_folio(mapping, folio);
        self.note_fallbacks(mapping);
        r
    }

    /// With a store that asks for it ([`BackingStore::batch_readahead`]),
    /// reads each run of consecutive folios with one `preadv(2)` (a 2 MiB
    /// window is one I/O); otherwise one read per folio.
    fn readahead(&self, mapping: &AddressSpace, rac: &mut ReadaheadControl) {
        self.do_readahead(mapping, rac);
        self.note_fallbacks(mapping);
    }

    fn writepage(&self, mapping: &AddressSpace, folio: FolioGuard, wbc: &mut WritebackControl) -> io::Result<()> {
        let r = self.do_writepage(mapping, folio, wbc);
        self.note_fallbacks(mapping);
        r
    }

    fn launder_folio(&self, mapping: &AddressSpace, folio: &mut FolioGuard) -> io::Result<()> {
        let r = self.do_launder_folio(mapping, folio);
        self.note_fallbacks(mapping);
        r
    }

    fn initial_size(&self) -> io::Result<u64> {
        self.store.len()
    }

    fn max_file_size(&self) -> u64 {
        self.store.max_file_size()
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
