//! The allocator's one setting overlayd changes: large blocks always come straight from
//! `mmap`, so that their untouched pages cost no memory. glibc otherwise raises its mmap
//! threshold after the first such block is freed and serves later ones from the heap,
//! where `calloc` must zero (touch) every page: with the routing mesh's 256 KiB TCP buffers
//! once allocated here, 256 KiB and more of RSS per idle mesh connection
//! (docs/BENCHMARKS.md). Those buffers are now mapped by the proxy itself (`sys::pages`).

/// Blocks of this size and more are mapped (glibc's default start; fixed, no longer
/// raised).
const MMAP_THRESHOLD: i32 = 128 << 10;

/// Fixes the mmap threshold. Call once, early in `main`.
pub fn map_large_blocks() {
    // SAFETY: mallopt only changes a glibc tunable; any value is valid for M_MMAP_THRESHOLD
    // up to its maximum (32 MiB on 64-bit), which 128 KiB is well below.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}
