//! Where the benchmark checkpoints live.

use std::path::PathBuf;

/// `target/flexmodel-bench/<name>`, reused across runs.
pub fn checkpoint_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/flexmodel-bench")
        .join(name)
}
