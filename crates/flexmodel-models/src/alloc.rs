//! The C allocator's settings for model runs.
//!
//! A forward pass frees and allocates the same large activation buffers layer after layer.
//! glibc serves allocations above its mmap threshold (128 KiB at first) with fresh mappings,
//! which the kernel zero-fills page by page on first touch, and returns freed memory at the top
//! of the heap past its trim threshold; so every layer pays page faults for memory it has just
//! freed (6-8% of the random 125M Llama's forward pass in `perf`). Keeping blocks up to 32 MiB
//! in the heap, and the heap's free memory in the process, lets the next layer reuse them
//! (BENCHMARKS.md has the before and after).

/// Applies the settings once per process, unless the environment sets either
/// (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`), which then wins.
pub(crate) fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let set = |name| std::env::var_os(name).is_some();
            if set("MALLOC_MMAP_THRESHOLD_") || set("MALLOC_TRIM_THRESHOLD_") {
                return;
            }
            // SAFETY: mallopt changes two of glibc's tuning parameters, under its own lock;
            // no memory is touched. 32 MiB is the largest mmap threshold glibc accepts on
            // 64-bit targets. A refused setting (return value 0) leaves glibc's default.
            #[allow(unsafe_code)]
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        });
    }
}
