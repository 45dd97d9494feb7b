//! Where a model runs: `cpu` or `cuda:N`.
//!
//! A CUDA build (`scripts/build-cuda.sh`) loads the CUDA libraries when the first CUDA device
//! is opened, not when the program starts, so the same binary runs on machines without a GPU.
//! The loader it uses panics on a missing library; [`device`] looks for each library first and
//! returns an error that names it.

use candle_core::Device;

use crate::error::{Error, Result};

/// Opens the device `spec` names: `cpu`, `cuda` (the first GPU) or `cuda:N`.
///
/// # Errors
/// [`Error::Device`] for a malformed name, a binary built without CUDA, a missing CUDA library
/// or driver, or no GPU of that number.
pub fn device(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => spec
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::Device(format!(
                    "unknown device `{spec}`; accepted: cpu, cuda, cuda:N (N = 0, 1, ...)"
                ))
            })?,
    };
    cuda(ordinal)
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: usize) -> Result<Device> {
    Err(Error::Device(
        "this flexmodel was built without CUDA; build the CUDA binary with \
         scripts/build-cuda.sh (or `cargo build --features cuda` where CUDA is installed)"
            .into(),
    ))
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    // What opening a device loads: the driver, then cuBLAS(Lt) and cuRAND for its handles.
    for (lib, what) in [
        ("cuda", "the NVIDIA driver's libcuda"),
        ("cublas", "cuBLAS"),
        ("cublasLt", "cuBLASLt"),
        ("curand", "cuRAND"),
    ] {
        if !flexmodel_core::cuda_library_loadable(lib) {
            return Err(Error::Device(format!(
                "no CUDA device: {what} (lib{lib}.so) is not installed or not on \
                 LD_LIBRARY_PATH"
            )));
        }
    }
    let opened = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    match opened {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => Err(Error::Device(format!("no CUDA device {ordinal}: {e}"))),
        Err(_) => Err(Error::Device(format!(
            "no CUDA device {ordinal}: a CUDA library failed to load (see the message above)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_opens_and_bad_names_say_what_is_accepted() {
        assert!(device("cpu").is_ok_and(|d| d.is_cpu()));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda0", ""] {
            let e = device(bad).unwrap_err().to_string();
            assert!(e.contains("accepted: cpu, cuda, cuda:N"), "{bad}: {e}");
        }
    }

    /// Here (CI and this machine have no GPU) a CUDA device is an error that says why, never a
    /// panic: built without CUDA, or without the driver.
    #[test]
    fn cuda_without_a_gpu_is_a_clear_error() {
        if std::path::Path::new("/dev/nvidia0").exists() {
            return;
        }
        let e = device("cuda:0").unwrap_err().to_string();
        let expected = if cfg!(feature = "cuda") {
            "no CUDA device"
        } else {
            "built without CUDA"
        };
        assert!(e.contains(expected), "{e}");
    }
}
