//! The allocator policy the refinement engine runs best under.
//!
//! candle allocates a fresh buffer for every operation's output. Above its mmap threshold (128
//! KiB at first) glibc's malloc takes each such buffer from a fresh `mmap` and gives it back to
//! the kernel on free, so every UNet call page-faults in, zeroes and unmaps gigabytes of memory.
//! Raising the threshold to its 32 MiB maximum and the trim threshold to 1 GiB keeps freed
//! buffers in the heap for the next call: a tiny-fixture UNet call measured 10-15% faster
//! (docs/benchmarks.md). Buffers above 32 MiB (the VAE decoder's activations at 512 px are 134
//! to 268 MB) would still get a fresh mmap each, so mmap is also turned off (`M_MMAP_MAX` 0)
//! and all threads share the main arena (`M_ARENA_MAX` 1; another thread's arena would fall
//! back to mmap for a buffer larger than its 64 MiB heaps): a 512 px decode spent 13% of its
//! time zeroing fresh pages before. The kiosk's systemd unit sets the thresholds through glibc's
//! `MALLOC_*_` variables; `gatewayd` and `bench-gateway` set all four at start-up with
//! [`keep_freed_buffers`].
//!
//! The only `unsafe` of the gateway lives here: the `mallopt` calls.
#![allow(unsafe_code)]

/// What [`keep_freed_buffers`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatorPolicy {
    /// The thresholds were raised.
    Raised,
    /// `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_` is set: the operator's values stand.
    FromEnvironment,
    /// Not glibc, or glibc refused: the allocator's defaults stand.
    Unsupported,
}

/// The mmap threshold set: glibc's maximum on 64-bit targets.
pub const MMAP_THRESHOLD: usize = 32 << 20;
/// The trim threshold set: free heap memory up to this is kept rather than returned.
pub const TRIM_THRESHOLD: usize = 1 << 30;

/// Makes glibc keep freed buffers in the heap for reuse (an mmap threshold of
/// [`MMAP_THRESHOLD`], no mmap at all, one arena, a trim threshold of [`TRIM_THRESHOLD`]),
/// unless the environment already configures the thresholds. Call once at start-up, before the
/// model loads and before other threads start.
pub fn keep_freed_buffers() -> AllocatorPolicy {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
        || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some()
    {
        return AllocatorPolicy::FromEnvironment;
    }
    raise()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn raise() -> AllocatorPolicy {
    // SAFETY: mallopt only adjusts malloc's tuning parameters; every value is in range (32 MiB is
    // HEAP_MAX/2, the documented maximum of M_MMAP_THRESHOLD on 64-bit targets; M_MMAP_MAX 0
    // and M_ARENA_MAX 1 are documented settings).
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
            && libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
    };
    if ok {
        AllocatorPolicy::Raised
    } else {
        AllocatorPolicy::Unsupported
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn raise() -> AllocatorPolicy {
    AllocatorPolicy::Unsupported
}
