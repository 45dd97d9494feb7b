//! Fixture access and comparisons shared by the tests.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// The fixture architectures, each a directory under `fixtures/models`.
pub const ARCHS: &[&str] = &[
    "llama", "mistral", "qwen2", "gemma", "phi", "gpt2", "gpt_neox", "falcon", "opt",
];

/// `shared/fixtures/models`, beside the repository (or `$FLEXMODEL_FIXTURES`).
pub fn fixtures() -> PathBuf {
    let dir = match std::env::var_os("FLEXMODEL_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/models"),
    };
    assert!(
        dir.join("llama/config.json").exists(),
        "fixtures not found at {} (set FLEXMODEL_FIXTURES)",
        dir.display()
    );
    dir
}

/// The directory of a fixture: a base architecture from `shared/fixtures`, or a variant
/// (an architecture with other config options) from this repository's `fixtures/variants`.
pub fn model_dir(name: &str) -> PathBuf {
    let variant = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/variants/models")
        .join(name);
    if variant.exists() {
        variant
    } else {
        fixtures().join(name)
    }
}

/// The reference tensors of a fixture.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(model_dir(name).join("reference.safetensors"), &Device::Cpu)
        .expect("reference.safetensors")
}

/// `reference.json` of a fixture.
pub fn reference_json(name: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(model_dir(name).join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("valid json")
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let norm = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (diff / norm.max(1e-30)).sqrt()
}

/// Asserts `rel_err(got, want) <= tol` with a message naming `what`.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}
