//! The allocator policy, in a process of its own (it changes malloc for the whole process).
#![cfg(all(target_os = "linux", target_env = "gnu"))]
#![allow(unsafe_code)] // mallinfo2, to read what malloc did.

use diffusionx_refine::allocator::{AllocatorPolicy, keep_freed_buffers};

/// Blocks glibc's malloc currently holds as separate mmaps.
fn mmapped_blocks() -> usize {
    // SAFETY: mallinfo2 only reads malloc's statistics.
    unsafe { libc::mallinfo2() }.hblks
}

#[test]
fn a_16_mib_buffer_comes_from_the_heap_once_the_thresholds_are_raised() {
    // Before: glibc's default threshold (128 KiB) gives a 16 MiB buffer its own mmap. It is kept
    // alive: freeing it would raise glibc's dynamic threshold and hide the difference.
    let before = mmapped_blocks();
    let control = std::hint::black_box(vec![1u8; 16 << 20]);
    assert_eq!(
        mmapped_blocks(),
        before + 1,
        "the default policy mmaps 16 MiB"
    );

    assert_eq!(keep_freed_buffers(), AllocatorPolicy::Raised);
    let buffer = std::hint::black_box(vec![1u8; 16 << 20]);
    assert_eq!(
        mmapped_blocks(),
        before + 1,
        "16 MiB still got its own mmap"
    );
    drop((control, buffer));
}
