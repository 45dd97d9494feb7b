//! What flexmodel's test suites share: the Hugging Face reference fixtures, the relative error
//! the tests compare by, and the `mpirun` command of the multi-process tests. Its functions fail
//! by panicking, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};

/// The fixture architectures, each a directory of [`fixtures`].
pub const ARCHS: &[&str] = &[
    "llama", "mistral", "qwen2", "gemma", "phi", "gpt2", "gpt_neox", "falcon", "opt",
];

/// The later families, each a directory of the repository's `fixtures/families`.
pub const FAMILIES: &[&str] = &[
    "qwen3",
    "gemma2",
    "gemma3_text",
    "olmo2",
    "phi3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
];

/// The repository's `fixtures/base/models`, or `$FLEXMODEL_FIXTURES`.
pub fn fixtures() -> PathBuf {
    let dir = match std::env::var_os("FLEXMODEL_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/base/models"),
    };
    assert!(
        dir.join("llama/config.json").exists(),
        "fixtures not found at {} (set FLEXMODEL_FIXTURES)",
        dir.display()
    );
    dir
}

/// The directory of a fixture: a base architecture of [`fixtures`], or one of this
/// repository's `fixtures/variants` (an architecture with other config options) or
/// `fixtures/families` (the later families and their variants).
pub fn model_dir(name: &str) -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    ["variants", "families"]
        .iter()
        .map(|set| repo.join(set).join("models").join(name))
        .find(|dir| dir.exists())
        .unwrap_or_else(|| fixtures().join(name))
}

/// Every tensor of a safetensors file, on the CPU.
pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The reference tensors of a fixture.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    load(&model_dir(name).join("reference.safetensors"))
}

/// `reference.json` of a fixture: what its reference tensors hold.
pub fn reference_json(name: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(model_dir(name).join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("valid json")
}

/// ‖a − b‖ / ‖b‖, in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let squared_norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    (squared_norm(&(&a - &b).unwrap()) / squared_norm(&b).max(1e-30)).sqrt()
}

/// Asserts `rel_err(got, want) <= tol` with a message naming `what`.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

/// `mpirun -n ranks`, ready for the program and its arguments: as root, on more ranks than
/// cores, without the shared-memory transport's single-copy mechanism (containers refuse
/// it), one compute thread per rank.
pub fn mpirun(ranks: usize) -> Command {
    let mut command = Command::new("mpirun");
    command
        .args(["--oversubscribe", "-n", &ranks.to_string()])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("RAYON_NUM_THREADS", "1");
    command
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// An error and its sources, joined by `: ` (what a test looks for may be a cause).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    std::iter::successors(Some(err), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}
