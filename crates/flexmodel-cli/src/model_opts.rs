//! Options every subcommand that loads a model shares.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use flexmodel::DType;

/// Which model to load.
#[derive(clap::Args)]
pub struct ModelOpts {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    /// Default: the tiny Llama bundled in the repository.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
}

impl ModelOpts {
    /// The model directory, checked to exist.
    pub fn dir(&self) -> Result<PathBuf> {
        let dir = match &self.model {
            Some(dir) => dir.clone(),
            None => bundled_model()?,
        };
        if !dir.join("config.json").exists() {
            bail!(
                "{} is not a model directory (no config.json); pass --model DIR with a Hugging Face \
                 checkpoint (config.json + model.safetensors)",
                dir.display()
            );
        }
        Ok(dir)
    }
}

/// The model shipped in the repository, found from where the binary was built.
fn bundled_model() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
    dir.canonicalize().with_context(|| {
        format!(
            "no --model given and the bundled model is not at {} (it ships with the source \
             tree); pass --model DIR",
            dir.display()
        )
    })
}

/// A floating-point dtype on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FloatType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
}

impl From<FloatType> for DType {
    fn from(t: FloatType) -> Self {
        match t {
            FloatType::F32 => DType::F32,
            FloatType::F16 => DType::F16,
            FloatType::Bf16 => DType::BF16,
        }
    }
}
