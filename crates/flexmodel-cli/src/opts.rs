//! Option groups the subcommands share: the model, the input, the hooks.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use flexmodel::{
    DType, Device, FlexModel, Grid, HookFunction, Input, LoadOptions, Model, Tokenizer,
};

use crate::edit::EditSpec;
use crate::safetensors_io;

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

/// Where and in which dtype the model computes.
#[derive(clap::Args)]
pub struct ComputeOpts {
    /// Dtype the model computes in (on the CPU f32 is the fast choice; on a GPU bf16).
    #[arg(long, value_enum, default_value_t = FloatType::F32)]
    pub compute_dtype: FloatType,

    #[command(flatten)]
    pub device: DeviceOpts,
}

impl ComputeOpts {
    /// The device, opened.
    pub fn device(&self) -> Result<Device> {
        self.device.open()
    }

    /// The model in `dir`: this rank's part of it under `grid`, on `device`.
    pub fn load(&self, dir: &Path, device: Device, grid: &Grid) -> Result<Box<dyn Model>> {
        let options = LoadOptions {
            dtype: self.compute_dtype.into(),
            device,
            grid: grid.clone(),
            ..LoadOptions::default()
        };
        flexmodel::load(dir, &options).with_context(|| format!("loading {}", dir.display()))
    }
}

/// Where the model runs.
#[derive(clap::Args)]
pub struct DeviceOpts {
    /// Device: cpu, cuda:N, or cuda (under an MPI launcher each rank's local rank, else GPU
    /// 0). GPUs need the CUDA binary (scripts/build-cuda.sh). Captures land on the host
    /// either way.
    #[arg(long = "device", default_value = "cpu", value_name = "DEVICE")]
    pub name: String,
}

impl DeviceOpts {
    /// The device, opened.
    pub fn open(&self) -> Result<Device> {
        let spec = match self.name.as_str() {
            "cuda" => format!("cuda:{}", flexmodel_dist::local_rank().unwrap_or(0)),
            other => other.to_string(),
        };
        flexmodel::device(&spec).context("--device")
    }
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

/// What the model reads: text prompts or token ids.
#[derive(clap::Args)]
pub struct InputOpts {
    /// Text prompts; several form one padded batch (each row computes what the prompt
    /// computes alone).
    #[arg(long, num_args = 1.., required_unless_present = "input_ids", conflicts_with = "input_ids")]
    pub prompt: Vec<String>,

    /// Token ids instead of text: a safetensors file with an integer `input_ids` [batch, seq]
    /// and optionally `attention_mask` [batch, seq] (1 real, 0 padding).
    #[arg(long, value_name = "FILE")]
    pub input_ids: Option<PathBuf>,
}

/// Where a batch of prompts of different lengths is padded.
#[derive(Clone, Copy)]
pub enum Padding {
    /// Padding after the prompt (a forward pass).
    Right,
    /// Padding before the prompt (generation).
    Left,
}

impl InputOpts {
    /// The model input, and the tokenizer when the directory has one (required for prompts).
    pub fn load(
        &self,
        dir: &std::path::Path,
        padding: Padding,
    ) -> Result<(Input, Option<Tokenizer>)> {
        let Some(path) = &self.input_ids else {
            let tok = Tokenizer::from_dir(dir)?;
            let rows = self
                .prompt
                .iter()
                .map(|p| tok.encode(p))
                .collect::<Result<Vec<_>, _>>()?;
            let input = match padding {
                Padding::Right => flexmodel::pad_right(&rows, 0, &Device::Cpu)?,
                Padding::Left => flexmodel::pad_left(&rows, 0, &Device::Cpu)?,
            };
            return Ok((input, Some(tok)));
        };
        let mut tensors = safetensors_io::read(path)?;
        let ids = tensors.remove("input_ids").with_context(|| {
            format!(
                "{} has no `input_ids` tensor (an integer [batch, seq])",
                path.display()
            )
        })?;
        if !ids.dtype().is_int() || ids.rank() != 2 {
            bail!(
                "{}: `input_ids` must be an integer [batch, seq] tensor, got {:?} {:?}",
                path.display(),
                ids.dtype(),
                ids.dims()
            );
        }
        let input = match tensors.remove("attention_mask") {
            Some(mask) => Input::with_mask(ids, mask),
            None => Input::new(ids),
        };
        Ok((input, Tokenizer::from_dir(dir).ok()))
    }
}

/// Hooks from the command line: captures and edits.
#[derive(clap::Args)]
pub struct HookOpts {
    /// Capture the sites a name or pattern selects (`*` matches any characters, dots
    /// included); repeatable.
    #[arg(long, value_name = "PATTERN")]
    pub capture: Vec<String>,

    /// Edit a site (or pattern): SITE=zero, SITE=scale:F, SITE=add:FILE.safetensors:KEY
    /// (broadcast over batch and positions), SITE=replace:FILE.safetensors:KEY; repeatable.
    /// Captures record the value before edits.
    #[arg(long, value_name = "SITE=OP")]
    pub edit: Vec<String>,
}

impl HookOpts {
    /// The edits, parsed and with their tensors read (before any weight is loaded).
    pub fn edits(&self) -> Result<Vec<EditSpec>> {
        self.edit.iter().map(|e| EditSpec::parse(e)).collect()
    }

    /// Registers the captures, then `edits`: hooks fire in registration order, so captures see
    /// the value before the edits.
    pub fn register(&self, fm: &mut FlexModel, edits: Vec<EditSpec>) -> Result<()> {
        for pattern in &self.capture {
            fm.register(HookFunction::new(pattern.as_str()))?;
        }
        for edit in edits {
            fm.register(edit.hook())?;
        }
        Ok(())
    }
}
