//! Anonymous memory mapped by the page, for buffers whose pages go back to the kernel when
//! they hold nothing: the routing mesh's TCP buffers (`ingress::proxy::tcp`). A mapping's
//! untouched pages cost no memory; [`Pages::discard`] returns the touched ones (reads then
//! see zeros, and a later write faults a fresh page in). The allocator cannot do this for a
//! block it owns: its header shares the block's first page.

use std::io;
use std::ptr::NonNull;

/// A private anonymous mapping, unmapped on drop.
pub struct Pages {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value alone; moving it to another
// thread moves that ownership.
unsafe impl Send for Pages {}

impl Pages {
    /// Maps `len` bytes (rounded up to whole pages by the kernel), zeroed and not yet
    /// resident.
    pub fn map(len: usize) -> io::Result<Pages> {
        // SAFETY: a new private anonymous mapping at an address the kernel picks: no
        // existing memory is affected; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Pages { ptr, len })
    }

    /// No mapping: a placeholder that owns nothing.
    pub fn none() -> Pages {
        Pages {
            ptr: NonNull::dangling(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapping as two halves, for a consumer (a smoltcp socket) that wants borrowed
    /// buffers and outlives any borrow checker can express.
    ///
    /// # Safety
    /// The caller drops both slices before this `Pages` is dropped, and calls this once.
    pub unsafe fn halves(&mut self) -> (&'static mut [u8], &'static mut [u8]) {
        let half = self.len / 2;
        // SAFETY: the mapping is `len` bytes, readable and writable, and lives until drop;
        // the two ranges do not overlap; the caller's contract keeps them unique and ends
        // them before the unmap.
        unsafe {
            (
                std::slice::from_raw_parts_mut(self.ptr.as_ptr(), half),
                std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(half), self.len - half),
            )
        }
    }

    /// Returns every resident page to the kernel; the memory then reads as zeros. Its
    /// content must be dead: the caller knows that nothing in it is still wanted.
    pub fn discard(&self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: the range is exactly this mapping (page-aligned: mmap's result);
        // MADV_DONTNEED on private anonymous memory only replaces its content by zeros, it
        // never unmaps, so every slice over it stays valid.
        unsafe {
            libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_DONTNEED);
        }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: the mapping made in `map`, unmapped once; `halves`' contract ended every
        // slice over it.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident bytes of this process (statm's second field, in pages).
    fn resident() -> usize {
        let s = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: usize = s.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    #[test]
    fn discarded_pages_read_zero_and_leave() {
        let mut p = Pages::map(8 << 20).unwrap();
        // SAFETY: both slices end before `p` does; called once.
        let (a, b) = unsafe { p.halves() };
        assert_eq!(a.len() + b.len(), 8 << 20);
        let before = resident();
        a.fill(7);
        b.fill(9);
        let touched = resident();
        p.discard();
        let after = resident();
        assert!(a.iter().chain(b.iter()).all(|&x| x == 0));
        // Other threads allocate meanwhile: compare with slack, not exactly.
        assert!(touched >= before + (6 << 20), "{before} {touched}");
        assert!(after + (6 << 20) <= touched, "{touched} {after}");
    }
}
