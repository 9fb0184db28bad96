//! The allocator policy, in a process of its own (it changes malloc for the whole process), and
//! without the test harness: the policy must be set before any other thread allocates (as
//! `gatewayd` does), and the harness runs tests on threads of its own.
#![allow(unsafe_code)] // mallinfo2, to read what malloc did.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
use diffusionx_refine::allocator::{AllocatorPolicy, keep_freed_buffers};

/// Elsewhere the policy is `Unsupported`: nothing to measure.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {}

/// Blocks glibc's malloc currently holds as separate mmaps.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn mmapped_blocks() -> usize {
    // SAFETY: mallinfo2 only reads malloc's statistics.
    unsafe { libc::mallinfo2() }.hblks
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    a_16_mib_buffer_comes_from_the_heap_once_the_thresholds_are_raised();
    #[allow(clippy::print_stdout)] // The harness's report line, which this test has no harness for.
    {
        println!("test a_16_mib_buffer_comes_from_the_heap_once_the_thresholds_are_raised ... ok");
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
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
    // Larger than the threshold, here and on a thread started after the policy: from the one
    // heap too.
    let large = std::thread::spawn(|| std::hint::black_box(vec![1u8; 96 << 20]).len())
        .join()
        .expect("the thread ran");
    assert_eq!(large, 96 << 20);
    let large_here = std::hint::black_box(vec![1u8; 200 << 20]);
    assert_eq!(
        mmapped_blocks(),
        before + 1,
        "a buffer over the threshold got its own mmap"
    );
    drop((control, buffer, large_here));
}
