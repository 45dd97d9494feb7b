//! The `flexmodel` binary, end to end, against the Hugging Face reference fixtures.
// Test helpers fail by panicking, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod device;
mod generate;
mod harvest;
#[cfg(feature = "mpi")]
mod mpi;
mod run;
mod sites;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

/// The fixture architectures.
pub const ARCHS: &[&str] = &[
    "llama", "mistral", "qwen2", "gemma", "phi", "gpt2", "gpt_neox", "falcon", "opt",
];

/// `shared/fixtures/models/<arch>` (or under `$FLEXMODEL_FIXTURES`).
pub fn model_dir(arch: &str) -> PathBuf {
    let root = match std::env::var_os("FLEXMODEL_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/models"),
    };
    assert!(
        root.join("llama/config.json").exists(),
        "fixtures not found at {}",
        root.display()
    );
    root.join(arch)
}

/// `reference.json` of `arch`.
pub fn reference_json(arch: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(model_dir(arch).join("reference.json")).unwrap())
        .unwrap()
}

/// Runs `flexmodel` with `args`.
pub fn flexmodel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flexmodel"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("run flexmodel")
}

/// Runs `flexmodel` and checks it succeeded; returns stdout.
pub fn flexmodel_ok(args: &[&str]) -> String {
    let out = flexmodel(args);
    assert!(
        out.status.success(),
        "flexmodel {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `flexmodel`, checks it failed with exit code 1 and no panic; returns stderr.
pub fn flexmodel_err(args: &[&str]) -> String {
    let out = flexmodel(args);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "flexmodel {args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Every tensor of a safetensors file.
pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let d = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let n = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (d / n.max(1e-30)).sqrt()
}

/// Asserts `rel_err(got, want) <= tol`.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}
