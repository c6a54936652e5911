//! The kernel's `userfaultfd` interface (`include/uapi/linux/userfaultfd.h`,
//! `mm/userfaultfd.c`), in one small module.
//!
//! Why not the `userfaultfd` crate: 0.9 lacks `UFFDIO_CONTINUE` with
//! `MODE_WP`, `UFFDIO_POISON`, `WP_ASYNC` and `MOVE`, pins an old nix and
//! builds its -sys crate with bindgen. The ABI below is a handful of
//! `#[repr(C)]` structs and ioctl numbers, defined here because Debian's
//! headers predate several of them.
//!
//! # What each errno means (the one place that interprets them)
//!
//! | errno | from | meaning | what we do |
//! |---|---|---|---|
//! | `EEXIST` | CONTINUE, COPY, POISON | a page of the range is already mapped (another handler thread, or the kernel, won) | `UffdError::Exists`: skip that page, wake the faulter |
//! | `EAGAIN` | any resolving ioctl | the mm is changing (a pending remove/remap event, mmap lock contention) | `UffdError::Again`: retry |
//! | `ENOENT` | CONTINUE | the range is not inside one VMA (`mfill_atomic`'s VMA check: the user split the mapping with `madvise`, `mprotect` or a partial `mlock`, or unmapped part of it) | `UffdError::NoPage`: `continue_range` goes on one granule at a time; a granule that still gets it has no VMA: skipped |
//! | `EFAULT` | CONTINUE | no page in the page cache at that offset (shmem's lookup found a hole; Linux 6.18 turns its ENOENT into EFAULT), or the range is not registered | `UffdError::Fault`: a hole in a folio the caller holds uptodate is given zeros and mapped (`AddressSpace::fill_hole_in_uptodate_folio`); otherwise as `Gone` |
//! | `EFAULT`, `EINVAL` on a range | any other | the range is not (or no longer) registered: the mapping is going away | `UffdError::Gone`: drop the fault; unregister woke the faulter |
//! | `ESRCH` | any | the target mm exited | `UffdError::Gone` |
//! | other | | a bug or an unsupported kernel | `UffdError::Os` |

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use thiserror::Error;

use crate::types::PAGE_SIZE;

/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}

/// Register modes (`UFFDIO_REGISTER_MODE_*`).
pub mod mode {
    /// Faults on pages absent from the page cache.
    pub const MISSING: u64 = 1 << 0;
    /// Write-protect faults.
    pub const WP: u64 = 1 << 1;
    /// Faults on pages present in the page cache but not mapped.
    pub const MINOR: u64 = 1 << 2;
}

/// API features (`UFFD_FEATURE_*`), including those newer than Debian's headers.
pub mod feature {
    /// Report WP faults.
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    /// MISSING faults on shmem.
    pub const MISSING_SHMEM: u64 = 1 << 5;
    /// Report the faulting thread id.
    pub const THREAD_ID: u64 = 1 << 8;
    /// MINOR faults on shmem.
    pub const MINOR_SHMEM: u64 = 1 << 10;
    /// Exact (not page-masked) fault address.
    pub const EXACT_ADDRESS: u64 = 1 << 11;
    /// WP on hugetlbfs and shmem.
    pub const WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    /// WP markers on unpopulated PTEs.
    pub const WP_UNPOPULATED: u64 = 1 << 13;
    /// `UFFDIO_POISON`.
    pub const POISON: u64 = 1 << 14;
    /// Asynchronous WP resolution by the kernel.
    pub const WP_ASYNC: u64 = 1 << 15;
    /// `UFFDIO_MOVE`.
    pub const MOVE: u64 = 1 << 16;
}

/// Fault flags in a message (`UFFD_PAGEFAULT_FLAG_*`).
pub mod fault_flag {
    /// The access was a write.
    pub const WRITE: u64 = 1 << 0;
    /// A write-protect fault.
    pub const WP: u64 = 1 << 1;
    /// A minor fault.
    pub const MINOR: u64 = 1 << 2;
}

const EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioPoison {
    range: UffdioRange,
    mode: u64,
    updated: i64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = ior(0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ior(0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, std::mem::size_of::<UffdioWriteprotect>());
const UFFDIO_CONTINUE: u64 = iowr(0x07, std::mem::size_of::<UffdioContinue>());
const UFFDIO_POISON: u64 = iowr(0x08, std::mem::size_of::<UffdioPoison>());
/// `UFFD_USER_MODE_ONLY` (not named by rustix).
const USER_MODE_ONLY: u32 = 1;
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;

const CONTINUE_MODE_WP: u64 = 1 << 1;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `struct uffd_msg`, 32 bytes, as read from the fd.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct RawMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// For page faults: flags, address, thread id.
    arg: [u64; 3],
}

/// A page fault read from the fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PageFault {
    /// `fault_flag::*`.
    pub flags: u64,
    /// The faulting address (page-aligned unless EXACT_ADDRESS).
    pub address: usize,
    /// The faulting thread's id (`ptid`: [`feature::THREAD_ID`] is
    /// required).
    pub tid: u32,
}

impl RawMsg {
    /// The page fault this message reports, if it is one.
    pub fn page_fault(&self) -> Option<PageFault> {
        (self.event == EVENT_PAGEFAULT).then(|| PageFault {
            flags: self.arg[0],
            address: self.arg[1] as usize,
            // `feat.ptid`: the first 4 bytes of the union after `address`.
            tid: {
                let b = self.arg[2].to_ne_bytes();
                u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
            },
        })
    }
}

/// Errors of the resolving ioctls, classified (see the module table).
#[derive(Debug, Error)]
pub enum UffdError {
    /// EEXIST: a page of the range is already mapped; `done` bytes before
    /// it were resolved.
    #[error("page already mapped after {done} bytes (EEXIST)")]
    Exists {
        /// Bytes resolved before the mapped page.
        done: usize,
    },
    /// EAGAIN: retry.
    #[error("retry (EAGAIN)")]
    Again {
        /// Bytes resolved before the error.
        done: usize,
    },
    /// ENOENT: the range is not inside one VMA (split or partly
    /// unmapped).
    #[error("the range is not inside one VMA (ENOENT)")]
    NoPage {
        /// Bytes resolved before the error.
        done: usize,
    },
    /// EFAULT from CONTINUE: no page in the page cache there, or the
    /// range is no longer registered.
    #[error("no page in the page cache, or range not registered (EFAULT)")]
    Fault {
        /// Bytes resolved before the error.
        done: usize,
    },
    /// The range is no longer registered (EFAULT, EINVAL, ESRCH).
    #[error("range no longer registered ({0})")]
    Gone(io::Error),
    /// Anything else.
    #[error("userfaultfd ioctl failed: {0}")]
    Os(io::Error),
}

/// Why userfaultfd cannot be used, with what to do about it.
#[derive(Debug, Error)]
pub enum OpenError {
    /// Neither the syscall nor /dev/userfaultfd was allowed.
    #[error(
        "userfaultfd is not available to this process: the syscall failed ({syscall}) and \
         /dev/userfaultfd could not be used ({dev}). Run as root, grant CAP_SYS_PTRACE, \
         set the sysctl vm.unprivileged_userfaultfd=1, or give this user read-write access \
         to /dev/userfaultfd"
    )]
    NotPermitted {
        /// The syscall's error.
        syscall: io::Error,
        /// The device's error.
        dev: io::Error,
    },
    /// The kernel lacks features upcache needs.
    #[error(
        "this kernel's userfaultfd lacks required features {missing:#x} ({names}); \
         upcache needs Linux 6.6 or newer (MINOR_SHMEM, WP on shmem, POISON)"
    )]
    MissingFeatures {
        /// Bitmask of missing `feature::*` bits.
        missing: u64,
        /// Their names.
        names: String,
    },
    /// The API handshake failed.
    #[error("UFFDIO_API handshake failed: {0}")]
    Handshake(io::Error),
    /// The fault handler threads could not be started.
    #[error("starting the fault handler threads failed: {0}")]
    Threads(io::Error),
}

/// The features upcache requires.
pub const REQUIRED_FEATURES: u64 = feature::PAGEFAULT_FLAG_WP
    | feature::MISSING_SHMEM
    | feature::MINOR_SHMEM
    | feature::WP_HUGETLBFS_SHMEM
    | feature::POISON
    | feature::THREAD_ID;

fn feature_names(bits: u64) -> String {
    let names = [
        (feature::PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
        (feature::MISSING_SHMEM, "MISSING_SHMEM"),
        (feature::MINOR_SHMEM, "MINOR_SHMEM"),
        (feature::WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
        (feature::POISON, "POISON"),
        (feature::THREAD_ID, "THREAD_ID"),
    ];
    names
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// An open, handshaken userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
    /// Opened with `UFFD_USER_MODE_ONLY` (kernel-mode accesses, like a
    /// `read(2)` into a mapping, then fail with EFAULT instead of faulting).
    user_mode_only: bool,
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

impl Uffd {
    /// Open a userfaultfd (non-blocking, close-on-exec) and negotiate
    /// `REQUIRED_FEATURES` (plus `extra` if available).
    ///
    /// Tries the syscall with kernel faults allowed, then `/dev/userfaultfd`
    /// (whose permission is a file mode, not a capability), then the
    /// syscall with `UFFD_USER_MODE_ONLY` (allowed to unprivileged users
    /// even when the sysctl forbids kernel faults; then `read(2)` from a
    /// mapping into the kernel gets EFAULT — documented in the README).
    ///
    /// # Errors
    /// [`OpenError`] naming the missing permission or feature.
    pub fn open(extra: u64) -> Result<Uffd, OpenError> {
        use rustix::mm::{userfaultfd, UserfaultfdFlags};
        let flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
        // SAFETY: creating the fd is safe; what it can do to our memory is
        // confined to ranges we register explicitly.
        let (fd, user_mode_only) = match unsafe { userfaultfd(flags) } {
            Ok(fd) => (fd, false),
            Err(sys_err) => match Self::open_dev() {
                Ok(fd) => (fd, false),
                Err(dev) => {
                    // SAFETY: as above.
                    match unsafe { userfaultfd(flags | UserfaultfdFlags::from_bits_retain(USER_MODE_ONLY)) } {
                        Ok(fd) => (fd, true),
                        Err(_) => {
                            return Err(OpenError::NotPermitted {
                                syscall: sys_err.into(),
                                dev,
                            })
                        }
                    }
                }
            },
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // First ask with no features to learn what the kernel offers...
        // SAFETY: UFFDIO_API reads and writes a `UffdioApi` we own.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) } != 0 {
            return Err(OpenError::Handshake(errno()));
        }
        let offered = api.features;
        let missing = REQUIRED_FEATURES & !offered;
        if missing != 0 {
            return Err(OpenError::MissingFeatures {
                missing,
                names: feature_names(missing),
            });
        }
        // ... then enable them on a fresh fd (the API ioctl works once).
        drop(fd);
        let fd = if user_mode_only {
            // SAFETY: as above.
            unsafe { userfaultfd(flags | UserfaultfdFlags::from_bits_retain(USER_MODE_ONLY)) }
                .map_err(|e| OpenError::Handshake(e.into()))?
        } else {
            // SAFETY: as above.
            match unsafe { userfaultfd(flags) } {
                Ok(fd) => fd,
                Err(_) => Self::open_dev().map_err(OpenError::Handshake)?,
            }
        };
        let want = REQUIRED_FEATURES | (extra & offered);
        let mut api = UffdioApi {
            api: UFFD_API,
            features: want,
            ioctls: 0,
        };
        // SAFETY: as above.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) } != 0 {
            return Err(OpenError::Handshake(errno()));
        }
        Ok(Uffd {
            fd,
            features: api.features,
            user_mode_only,
        })
    }

    fn open_dev() -> io::Result<OwnedFd> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")?;
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags by value and
        // returns a new fd or -1.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: the ioctl returned a fresh fd that nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Features the handshake enabled.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Opened in user-mode-only mode?
    pub fn user_mode_only(&self) -> bool {
        self.user_mode_only
    }

    /// The raw fd, for poll.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// `UFFDIO_REGISTER` `[start, start + len)` with `modes`.
    ///
    /// # Errors
    /// The ioctl's error (EINVAL for an unsupported mode/memory type).
    pub(crate) fn register(&self, start: usize, len: usize, modes: u64) -> io::Result<()> {
        let mut r = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: modes,
            ioctls: 0,
        };
        // SAFETY: the struct is ours; registering a range we mapped only
        // routes its faults to this fd.
        if unsafe { libc::ioctl(self.raw_fd(), UFFDIO_REGISTER as _, &mut r) } != 0 {
            return Err(errno());
        }
        Ok(())
    }

    /// [`register`](Self::register) for the reference engines in
    /// `benches/fault.rs` (the crate registers only ranges it mapped).
    ///
    /// # Errors
    /// As `UFFDIO_REGISTER`.
    ///
    /// # Safety
    /// `[start, start + len)` must be an anonymous or shmem mapping the
    /// caller owns and nothing else uses: once registered, an access to a
    /// missing page there sleeps until this userfaultfd resolves it, and
    /// the caller's handler then decides what memory the address shows.
    pub unsafe fn register_owned(&self, start: usize, len: usize, modes: u64) -> io::Result<()> {
        self.register(start, len, modes)
    }

    /// `UFFDIO_UNREGISTER`; wakes threads blocked on faults in the range.
    ///
    /// # Errors
    /// The ioctl's error.
    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: the struct is ours.
        if unsafe { libc::ioctl(self.raw_fd(), UFFDIO_UNREGISTER as _, &mut r) } != 0 {
            return Err(errno());
        }
        Ok(())
    }

    /// Read up to `msgs.len()` messages; 0 when none is pending or a
    /// signal interrupted the read.
    ///
    /// # Errors
    /// `read(2)`'s error other than EAGAIN and EINTR.
    pub fn read_msgs(&self, msgs: &mut [RawMsg]) -> io::Result<usize> {
        let sz = std::mem::size_of::<RawMsg>();
        // SAFETY: `msgs` is a buffer of plain-old-data structs of the
        // kernel's `uffd_msg` layout; the kernel writes whole messages.
        let n = unsafe { libc::read(self.raw_fd(), msgs.as_mut_ptr().cast(), std::mem::size_of_val(msgs)) };
        if n < 0 {
            let e = errno();
            return match e.raw_os_error() {
                // EINTR: a signal for this thread arrived during the read
                // (a handler installed without SA_RESTART, a profiler's);
                // nothing was consumed, the caller reads again.
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(e),
            };
        }
        Ok(n as usize / sz)
    }

    fn classify(done: i64, err: io::Error) -> UffdError {
        let done = done.max(0) as usize;
        match err.raw_os_error() {
            Some(libc::EEXIST) => UffdError::Exists { done },
            Some(libc::EAGAIN) => UffdError::Again { done },
            Some(libc::ENOENT) => UffdError::NoPage { done },
            Some(libc::EFAULT) | Some(libc::EINVAL) | Some(libc::ESRCH) => UffdError::Gone(err),
            _ => UffdError::Os(err),
        }
    }

    /// `UFFDIO_CONTINUE`: map the page-cache pages behind `[start, start +
    /// len)`, write-protected if `wp`; wakes the faulting threads.
    ///
    /// # Errors
    /// Classified per the module table.
    pub(crate) fn continue_range(&self, start: usize, len: usize, wp: bool) -> Result<(), UffdError> {
        let mut c = UffdioContinue {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: if wp { CONTINUE_MODE_WP } else { 0 },
            mapped: 0,
        };
        // SAFETY: the struct is ours; CONTINUE only installs PTEs for pages
        // of the registered VMA's own file.
        if unsafe { libc::ioctl(self.raw_fd(), UFFDIO_CONTINUE as _, &mut c) } != 0 {
            return Err(match Self::classify(c.mapped, errno()) {
                UffdError::Gone(e) if e.raw_os_error() == Some(libc::EFAULT) => UffdError::Fault {
                    done: c.mapped.max(0) as usize,
                },
                other => other,
            });
        }
        Ok(())
    }

    /// `UFFDIO_WRITEPROTECT`: protect (`wp`) or unprotect `[start, start +
    /// len)`; unprotecting wakes threads blocked on WP faults there.
    ///
    /// # Errors
    /// Classified per the module table.
    pub(crate) fn writeprotect(&self, start: usize, len: usize, wp: bool) -> Result<(), UffdError> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: if wp { WRITEPROTECT_MODE_WP } else { 0 },
        };
        // SAFETY: the struct is ours.
        if unsafe { libc::ioctl(self.raw_fd(), UFFDIO_WRITEPROTECT as _, &mut w) } != 0 {
            return Err(Self::classify(0, errno()));
        }
        Ok(())
    }

    /// `UFFDIO_POISON`: the next access to the range raises SIGBUS; wakes.
    ///
    /// # Errors
    /// Classified per the module table.
    pub(crate) fn poison(&self, start: usize, len: usize) -> Result<(), UffdError> {
        let mut p = UffdioPoison {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: 0,
            updated: 0,
        };
        // SAFETY: the struct is ours.
        if unsafe { libc::ioctl(self.raw_fd(), UFFDIO_POISON as _, &mut p) } != 0 {
            return Err(Self::classify(p.updated, errno()));
        }
        Ok(())
    }

    /// `UFFDIO_WAKE` the threads faulting in the range.
    ///
    /// # Errors
    /// Classified per the module table.
    pub fn wake(&self, start: usize, len: usize) -> Result<(), UffdError> {
        let mut r = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: the struct is ours.
        if unsafe { libc::ioctl(self.raw_fd(), UFFDIO_WAKE as _, &mut r) } != 0 {
            return Err(Self::classify(0, errno()));
        }
        Ok(())
    }

    /// `UFFDIO_COPY` `len` bytes from `src` to the registered `dst` (the
    /// UMap-style anonymous engine in the benchmarks uses it).
    ///
    /// # Safety
    /// `src..src+len` must be readable memory of this process.
    ///
    /// # Errors
    /// Classified per the module table.
    pub unsafe fn copy(&self, dst: usize, src: *const u8, len: usize) -> Result<(), UffdError> {
        let mut c = UffdioCopy {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: the caller guarantees `src` is readable for `len` bytes;
        // the struct is ours.
        if unsafe { libc::ioctl(self.raw_fd(), UFFDIO_COPY as _, &mut c) } != 0 {
            return Err(Self::classify(c.copy, errno()));
        }
        Ok(())
    }
}

/// `PAGEMAP_SCAN` on `/proc/self/pagemap` (`fs/proc/task_mmu.c`), for the
/// one query asynchronous dirty tracking needs: which pages of a range
/// registered with `UFFD_FEATURE_WP_ASYNC` were written since they were
/// last write-protected, write-protecting them again in the same walk
/// (`PM_SCAN_WP_MATCHING`).
pub(crate) struct Pagemap {
    fd: OwnedFd,
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | (0x66 << 8) | 16;
/// Write-protect the pages that match.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail (`EPERM`) on any VMA of the range not registered for async WP.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// `PAGE_IS_WRITTEN`: the uffd-wp bit is clear (written since protected).
const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_PRESENT`: a page is mapped.
const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGE_IS_SWAPPED`: a swap-type entry (a page under migration, a PTE
/// marker).
const PAGE_IS_SWAPPED: u64 = 1 << 4;

impl Pagemap {
    /// Open `/proc/self/pagemap`.
    ///
    /// # Errors
    /// The open error.
    pub(crate) fn open() -> io::Result<Pagemap> {
        let f = std::fs::File::open("/proc/self/pagemap")?;
        Ok(Pagemap { fd: f.into() })
    }

    /// Report every run of pages in `[start, end)` written since it was
    /// last write-protected, write-protecting each again as it is
    /// reported; `f` gets each run (page-aligned user addresses). A page
    /// written after the walk passed it is reported by the next call.
    ///
    /// # Errors
    /// `EPERM` if part of the range is not registered with a `WP_ASYNC`
    /// userfaultfd; other errors of the ioctl.
    pub(crate) fn scan_written_and_protect(
        &self,
        start: usize,
        end: usize,
        mut f: impl FnMut(std::ops::Range<usize>),
    ) -> io::Result<()> {
        let mut at = start as u64;
        while at < end as u64 {
            // Fresh each call: on an error the kernel still copies out the
            // regions it found (and protected) without saying how many, so
            // the valid ones are those it filled in.
            let mut regions = [PageRegion::default(); 32];
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: at,
                end: end as u64,
                walk_end: 0,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: PAGE_IS_WRITTEN,
                // Only entries that exist: the walk reports holes (no page
                // table, or none PTEs) as written and would write-protect
                // them, allocating page tables (and PTE markers) for the
                // whole range — 128 MiB for a 64 GiB reservation, and a
                // "written" run per hole. A page under migration is a swap
                // entry: still reported.
                category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                return_mask: PAGE_IS_WRITTEN,
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len`
            // regions into `regions`, which we own and which outlive the
            // call; it changes only page-table uffd-wp bits of our own
            // registered ranges.
            let n = unsafe { libc::ioctl(self.fd.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
            if n < 0 {
                let e = errno();
                // Whatever it reported was protected again: hand it on
                // before failing, or the record of those writes is lost.
                for r in regions.iter().take_while(|r| r.end > r.start) {
                    f(r.start as usize..r.end as usize);
                }
                if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EAGAIN) {
                    if arg.walk_end > at {
                        at = arg.walk_end;
                    }
                    continue;
                }
                return Err(e);
            }
            for r in &regions[..n as usize] {
                f(r.start as usize..r.end as usize);
            }
            if arg.walk_end <= at {
                // No progress: never spin (the kernel always advances).
                return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
            }
            at = arg.walk_end;
        }
        Ok(())
    }
}

/// Page-align an address down.
#[inline]
pub fn page_down(addr: usize) -> usize {
    addr & !(PAGE_SIZE - 1)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes_match_the_kernel() {
        assert_eq!(std::mem::size_of::<RawMsg>(), 32);
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioContinue>(), 32);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(UFFDIO_API, 0xc018aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010aa02);
        assert_eq!(UFFDIO_COPY, 0xc028aa03);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018aa06);
        assert_eq!(UFFDIO_CONTINUE, 0xc020aa07);
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
        assert_eq!(PAGEMAP_SCAN, 0xc0606610);
    }
}
