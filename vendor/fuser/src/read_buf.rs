use std::mem::align_of;

use crate::ll::fuse_abi as abi;
use crate::session::MAX_WRITE_SIZE;

/// Size of the buffer for reading a request from the kernel. Since the kernel may send
/// up to `MAX_WRITE_SIZE` bytes in a write request, we use that value plus some extra space.
const BUFFER_SIZE: usize = MAX_WRITE_SIZE + 4096;

/// A buffer that provides an aligned sub-slice for FUSE operations.
///
/// lazylayer patch: the buffer is an anonymous mapping of its own, not a
/// heap allocation. A zeroed 16 MiB heap buffer is memset by calloc once the
/// allocator serves it from a thread arena, so each session thread kept
/// 16 MiB resident, and the arena kept it after the session ended; a mapping
/// holds only the pages a request touched and goes back whole on drop.
#[derive(Debug)]
pub(crate) struct FuseReadBuf {
    ptr: *mut u8,
    len: usize,
}

// The mapping is owned by the buffer alone.
unsafe impl Send for FuseReadBuf {}

impl FuseReadBuf {
    /// Creates a new `FuseReadBuf` with the default buffer size.
    pub(crate) fn new() -> Self {
        // SAFETY: a fresh private anonymous mapping, owned by the value.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BUFFER_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert!(
            ptr != libc::MAP_FAILED,
            "mapping a FUSE read buffer: {}",
            std::io::Error::last_os_error()
        );
        Self {
            ptr: ptr.cast(),
            len: BUFFER_SIZE,
        }
    }

    /// Returns a mutable reference to the buffer (page-aligned, so aligned
    /// for `fuse_in_header`).
    pub(crate) fn as_mut(&mut self) -> &mut [u8] {
        debug_assert_eq!(self.ptr as usize % align_of::<abi::fuse_in_header>(), 0);
        // SAFETY: ptr..ptr+len is a live read-write mapping owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for FuseReadBuf {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new(), unmapped once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}
