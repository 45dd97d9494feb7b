//! The `flexmodel` binary, end to end, against the Hugging Face reference fixtures.
// Test helpers fail by panicking, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod analyze;
mod device;
mod generate;
mod harvest;
#[cfg(feature = "mpi")]
mod mpi;
mod offload;
mod run;
mod sites;

use std::process::{Command, Output};

pub use flexmodel_testkit::{
    ARCHS, FAMILIES, assert_close, load, model_dir, reference_json, rel_err,
};

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
