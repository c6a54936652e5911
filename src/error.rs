//! The crate's error type.

use std::io;

use thiserror::Error;

/// Errors from upcache operations. Each maps to the errno a kernel would
/// return for the same mistake (see [`Error::raw_os_error`]).
#[derive(Debug, Error)]
pub enum Error {
    /// The backing store or the OS failed (`EIO`, `ENOSPC`, ...).
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// A write or size change would end beyond the largest cacheable file
    /// (`EFBIG`).
    #[error("offset {offset} + length {len} exceeds the maximum file size {max} (EFBIG)")]
    FileTooLarge {
        /// Requested start.
        offset: u64,
        /// Requested length.
        len: u64,
        /// `MAX_FILE_SIZE`.
        max: u64,
    },
    /// A zero-length, overflowing or otherwise malformed range (`EINVAL`).
    #[error("invalid argument: {what} (EINVAL)")]
    InvalidArgument {
        /// What was wrong.
        what: &'static str,
    },
    /// Opening the file at `path` failed (`ENOENT`, `EACCES`, `EINVAL` for
    /// a path with a NUL byte, ...).
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The path given to `open`.
        path: std::path::PathBuf,
        /// What `open(2)` (or the store) said.
        source: io::Error,
    },
    /// A page at or past end of file was asked for (`EINVAL`).
    #[error("page at offset {offset} is at or past end of file (size {size}) (EINVAL)")]
    BeyondEof {
        /// Byte offset of the page.
        offset: u64,
        /// File size.
        size: u64,
    },
    /// This thread holds a page guard ([`crate::PageRef`] /
    /// [`crate::PageMut`]) of a folio the operation would remove or change:
    /// it would wait for itself (`EDEADLK`). Nothing was changed.
    #[error("this thread holds a page guard of bytes {offset}..+{len} that the operation would wait for (EDEADLK)")]
    PageHeld {
        /// First byte of the held folio.
        offset: u64,
        /// Its size.
        len: u64,
    },
    /// Another thread's truncate, punch or write of this file
    /// waits for a page guard this thread holds, and holds a lock the call
    /// needs (`i_rwsem`, or `invalidate_lock` for a read miss): waiting
    /// would wait for a thread that waits for this one (`EDEADLK`). Drop
    /// the guard and retry, as a latch-coupling descent restarts. Nothing
    /// was done.
    #[error(
        "another thread's truncate, punch or write waits for this thread's page guard of bytes {offset}..+{len} \
         and holds a lock this call needs: drop the guard and retry (EDEADLK)"
    )]
    GuardWaited {
        /// First byte of the held folio.
        offset: u64,
        /// Its size.
        len: u64,
    },
    /// An engine callback (`AddressSpaceOps`, or the store under it) called
    /// the cache for the file it is serving, or a cache-wide operation
    /// (`sync_all`, `freeze`) of that file's cache: the call would wait for
    /// the folio, lock or write-back the callback is part of (`EDEADLK`).
    /// Callbacks do I/O on the store; they may call the cache for other
    /// files. Nothing was done.
    #[error(
        "{op} called from inside the engine's {callback} for a file it reaches: it would wait for itself (EDEADLK)"
    )]
    Reentrant {
        /// The cache operation called.
        op: &'static str,
        /// The engine callback it was called from.
        callback: &'static str,
    },
    /// The operation cannot work with how the cache was built
    /// (`EOPNOTSUPP`), e.g. `freeze` with `DirtyTracking::Async`.
    #[error("not supported: {what} (EOPNOTSUPP)")]
    Unsupported {
        /// What, and what to change.
        what: &'static str,
    },
    /// The handle was opened read-only and the operation writes (`EBADF`,
    /// as `write(2)` on an `O_RDONLY` descriptor).
    #[error("file handle is read-only (EBADF)")]
    ReadOnly,
    /// The file handle was closed (`EBADF`).
    #[error("file is closed (EBADF)")]
    Closed,
    /// userfaultfd cannot be used (permission, kernel features): mappings
    /// are unavailable; the message says what to change.
    #[error(transparent)]
    Userfaultfd(#[from] crate::uffd::OpenError),
    /// Writeback of earlier dirty data failed; the data is still cached and
    /// dirty and will be retried by the next sync.
    #[error("writeback failed: {0}")]
    Writeback(io::Error),
}

impl Error {
    /// The errno this error corresponds to.
    pub fn raw_os_error(&self) -> i32 {
        use rustix::io::Errno;
        match self {
            Error::Io(e) | Error::Writeback(e) | Error::Open { source: e, .. } => errno_of(e),
            Error::FileTooLarge { .. } => Errno::FBIG.raw_os_error(),
            Error::InvalidArgument { .. } | Error::BeyondEof { .. } => Errno::INVAL.raw_os_error(),
            Error::PageHeld { .. } | Error::GuardWaited { .. } | Error::Reentrant { .. } => {
                Errno::DEADLK.raw_os_error()
            }
            Error::Unsupported { .. } => Errno::OPNOTSUPP.raw_os_error(),
            Error::Closed | Error::ReadOnly => Errno::BADF.raw_os_error(),
            Error::Userfaultfd(crate::uffd::OpenError::NotPermitted { .. }) => Errno::PERM.raw_os_error(),
            Error::Userfaultfd(_) => Errno::NOSYS.raw_os_error(),
        }
    }
}

/// The errno of an `io::Error`; errors made without one map by kind:
/// invalid input (a NUL byte in a path) to `EINVAL`, busy (a second
/// `freeze`) to `EBUSY`, would-block (a write barrier's refusal in an
/// integrity sync) to `EAGAIN`, permission denied (a writable open of a
/// file cached read-only) to `EACCES`, out of memory (an empty hugetlb
/// pool) to `ENOMEM`, the rest (a store's invalid data) to `EIO`.
fn errno_of(e: &io::Error) -> i32 {
    use rustix::io::Errno;
    e.raw_os_error().unwrap_or(match e.kind() {
        io::ErrorKind::InvalidInput => Errno::INVAL.raw_os_error(),
        io::ErrorKind::PermissionDenied => Errno::ACCESS.raw_os_error(),
        io::ErrorKind::OutOfMemory => Errno::NOMEM.raw_os_error(),
        io::ErrorKind::ResourceBusy => Errno::BUSY.raw_os_error(),
        io::ErrorKind::WouldBlock => Errno::AGAIN.raw_os_error(),
        _ => Errno::IO.raw_os_error(),
    })
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e {
            Error::Io(e) => e,
            Error::Open { path, source } => io::Error::new(source.kind(), format!("{}: {source}", path.display())),
            other => io::Error::from_raw_os_error(other.raw_os_error()),
        }
    }
}

/// `Result` with [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
