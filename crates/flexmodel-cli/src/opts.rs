//! Option groups the subcommands share: the model, the input, the hooks.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use flexmodel::{
    DType, Device, FlexModel, Grid, HookFunction, Input, LoadOptions, Model, Offload, Tokenizer,
};

use flexmodel::sae::{FeatureEdit, Sae};

use crate::edit::EditSpec;
use crate::safetensors_io;

/// Which model to load.
#[derive(clap::Args)]
pub struct ModelOpts {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json), or a Hub
    /// name (`gpt2`, `org/name@revision`) in the local Hugging Face cache (`hf download`).
    /// Default: the model bundled in the repository, a small Llama trained on Python's
    /// standard library (models/stdlib-llama).
    #[arg(long, value_name = "DIR|NAME")]
    pub model: Option<PathBuf>,
}

impl ModelOpts {
    /// The model directory (a Hub name's snapshot in the cache), checked to exist.
    pub fn dir(&self) -> Result<PathBuf> {
        let dir = match &self.model {
            Some(model) => flexmodel::resolve(model)?,
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
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/stdlib-llama");
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

    /// Keep only the layers being computed in memory, reading each from the checkpoint as the
    /// pass reaches it: `cpu` leaves the weights in the page cache, `disk` drops them from
    /// it too (for models larger than memory). Peak memory: about two layers plus the
    /// embeddings, head and activations. With `--fsdp`, each rank reads its shard of a layer
    /// just before the layer is gathered and keeps none.
    #[arg(long, value_enum, value_name = "WHERE")]
    pub offload: Option<OffloadTo>,
}

/// Where offloaded weights wait.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OffloadTo {
    /// Host memory (the checkpoint's pages in the page cache).
    Cpu,
    /// The disk: pages dropped from the page cache once read.
    Disk,
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
            offload: match self.offload {
                None => Offload::None,
                Some(OffloadTo::Cpu) => Offload::Cpu,
                Some(OffloadTo::Disk) => Offload::Disk,
            },
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

    /// Attach a sparse autoencoder in SAELens's format (a directory with cfg.json and
    /// sae_weights.safetensors) at the site its cfg names, or at SITE with DIR@SITE: its
    /// feature activations are written as `<site>.sae`, and the site's value is unchanged
    /// unless --sae-edit changes features (the reconstruction error is added back).
    #[arg(long, value_name = "DIR[@SITE]")]
    pub sae: Option<String>,

    /// Edit a feature of the --sae: zero:F, clamp:F:VALUE, scale:F:FACTOR; repeatable.
    #[arg(long, value_name = "OP:FEATURE[:VALUE]", requires = "sae")]
    pub sae_edit: Vec<String>,
}

impl HookOpts {
    /// The edits, parsed and with their tensors read (before any weight is loaded).
    pub fn edits(&self) -> Result<Vec<EditSpec>> {
        self.edit.iter().map(|e| EditSpec::parse(e)).collect()
    }

    /// Registers the captures, then the SAE, then `edits`: hooks fire in registration order,
    /// so captures see the value before the SAE and the edits.
    pub fn register(&self, fm: &mut FlexModel, edits: Vec<EditSpec>) -> Result<()> {
        for pattern in &self.capture {
            fm.register(HookFunction::new(pattern.as_str()))?;
        }
        if let Some(arg) = &self.sae {
            let (dir, site) = match arg.rsplit_once('@') {
                Some((dir, site)) => (dir, Some(site.to_string())),
                None => (arg.as_str(), None),
            };
            let sae = Sae::load(dir).with_context(|| format!("--sae {arg}"))?;
            let Some(site) = site.or_else(|| sae.hook_name().map(str::to_string)) else {
                bail!("--sae {arg}: its cfg.json names no hook_name; give the site as DIR@SITE");
            };
            let feature_edits = self
                .sae_edit
                .iter()
                .map(|e| parse_feature_edit(e))
                .collect::<Result<Vec<_>>>()?;
            flexmodel::sae::attach(fm, &site, sae, feature_edits)?;
        }
        for edit in edits {
            fm.register(edit.hook())?;
        }
        Ok(())
    }
}

/// `zero:F`, `clamp:F:VALUE` or `scale:F:FACTOR`.
fn parse_feature_edit(arg: &str) -> Result<FeatureEdit> {
    let parts: Vec<&str> = arg.split(':').collect();
    let usage = || {
        anyhow::anyhow!(
            "--sae-edit {arg:?}: expected zero:FEATURE, clamp:FEATURE:VALUE or scale:FEATURE:FACTOR"
        )
    };
    let feature = |s: &str| s.parse::<usize>().map_err(|_| usage());
    let value = |s: &str| s.parse::<f32>().map_err(|_| usage());
    Ok(match parts.as_slice() {
        ["zero", f] => FeatureEdit::Zero(feature(f)?),
        ["clamp", f, v] => FeatureEdit::Clamp {
            feature: feature(f)?,
            value: value(v)?,
        },
        ["scale", f, v] => FeatureEdit::Scale {
            feature: feature(f)?,
            factor: value(v)?,
        },
        _ => return Err(usage()),
    })
}
