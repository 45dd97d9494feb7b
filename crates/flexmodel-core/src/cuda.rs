//! CUDA libraries, loaded when first used.

/// Whether one of the names cudarc tries for the CUDA library `lib` (`cuda`, `cublas`, `nccl`,
/// ...) opens. A CUDA build loads its libraries on first use and panics on a missing one:
/// callers check first and return an error that names the library.
pub fn cuda_library_loadable(lib: &str) -> bool {
    use candle_core::cuda::cudarc;
    cudarc::get_lib_name_candidates(lib).iter().any(|name| {
        let Ok(name) = std::ffi::CString::new(name.as_str()) else {
            return false;
        };
        // SAFETY: dlopen with a valid C string; the handle is closed at once. Opening runs the
        // library's initialisers, as cudarc's own loading moments later would.
        #[allow(unsafe_code)]
        unsafe {
            let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
            if handle.is_null() {
                return false;
            }
            libc::dlclose(handle);
        }
        true
    })
}
