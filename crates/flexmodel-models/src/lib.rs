//! flexmodel-models: Hugging Face causal language models in candle, where every module is a
//! hook site.
//!
//! [`load`] reads a model directory as `transformers` writes it (`config.json`,
//! `model.safetensors` or an index with shards, `tokenizer.json`), memory-maps the weights and
//! returns a [`Model`] whose forward pass matches transformers (checked against reference
//! activations of every module). Families: Llama, Mistral, Qwen2 and Gemma (`llama.rs`), Phi,
//! GPT-2, GPT-NeoX, Falcon, OPT.
//!
//! ```no_run
//! use flexmodel_core::{FlexModel, HookFunction};
//! use flexmodel_models::{LoadOptions, load};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = load("models/tiny-llama", &LoadOptions::default())?;
//! let mut fm = FlexModel::new(model);
//! fm.register(HookFunction::new("model.layers.*.mlp"))?;
//! let ids = candle_core::Tensor::new(&[[1u32, 2, 3]], &candle_core::Device::Cpu)?;
//! let logits = fm.forward(&ids)?;
//! # Ok(()) }
//! ```

mod attention;
mod config;
mod error;
mod falcon;
mod gpt2;
mod gpt_neox;
mod kernels;
mod llama;
mod nn;
mod opt;
mod phi;
mod rope;
mod tokenizer;
mod weights;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use flexmodel_core::{Input, Model, ModelInfo, Parameters, Run, SiteTable};

pub use error::{Error, Result};
pub use tokenizer::{Tokenizer, generation_tokens, pad_left, pad_right};

use crate::config::RawConfig;
use crate::weights::{Vb, Weights};

/// Result of code on the forward path (hook errors included).
pub(crate) type FwdResult<T> = flexmodel_core::Result<T>;

/// The `model_type`s flexmodel loads.
pub const SUPPORTED: &[&str] = &[
    "llama", "mistral", "qwen2", "gemma", "phi", "gpt2", "gpt_neox", "falcon", "opt",
];

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Dtype to compute in; weights stored in another dtype are converted once at load.
    /// On the CPU, f32 is the fast choice.
    pub dtype: DType,
    /// Where the weights go.
    pub device: Device,
    /// Load the weights as variables so that [`FlexModel::backward`] also returns their
    /// gradients. Off by default: gradients then reach activations (backward hooks) and
    /// trainable modules only, and the weights stay frozen.
    ///
    /// [`FlexModel::backward`]: flexmodel_core::FlexModel::backward
    pub requires_grad: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            requires_grad: false,
        }
    }
}

/// Loads the model in `dir`.
///
/// # Errors
/// A missing or malformed file, an unsupported architecture or config option, a tensor missing
/// from the checkpoint or of the wrong shape; each error names the offending value.
pub fn load(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Box<dyn Model>> {
    let dir = dir.as_ref();
    let cfg = RawConfig::read(dir)?;
    check_dtype(options.dtype)?;
    let weights = Weights::open(
        dir,
        options.dtype,
        &options.device,
        false,
        options.requires_grad,
    )?;
    build(&cfg, Vb::root(weights))
}

/// The sites of the model in `dir`, without reading any weight.
///
/// # Errors
/// As [`load`], except for the weights' contents.
pub fn sites(dir: impl AsRef<Path>) -> Result<SiteTable> {
    let dir = dir.as_ref();
    let cfg = RawConfig::read(dir)?;
    let weights = Weights::open(dir, DType::F32, &Device::Cpu, true, false)?;
    let model = build(&cfg, Vb::root(weights))?;
    Ok(model.sites().clone())
}

fn check_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => Ok(()),
        other => Err(Error::unsupported(
            "compute dtype",
            other.as_str(),
            "use f32, f16 or bf16",
        )),
    }
}

fn build(cfg: &RawConfig, vb: Vb) -> Result<Box<dyn Model>> {
    let model_type = cfg.model_type()?;
    let unknown = || Error::UnknownArchitecture {
        model_type: model_type.to_string(),
        supported: SUPPORTED.to_vec(),
    };
    if !SUPPORTED.contains(&model_type) {
        return Err(unknown());
    }
    cfg.reject_foreign_options()?;
    match model_type {
        "llama" | "mistral" | "qwen2" | "gemma" => llama::Llama::load(cfg, vb),
        "phi" => phi::Phi::load(cfg, vb),
        "gpt2" => gpt2::Gpt2::load(cfg, vb),
        "gpt_neox" => gpt_neox::GptNeox::load(cfg, vb),
        "falcon" => falcon::Falcon::load(cfg, vb),
        "opt" => opt::Opt::load(cfg, vb),
        _ => Err(unknown()),
    }
}

/// The forward pass of one family; [`Loaded`] adds what every model has.
pub(crate) trait Family: Send + Sync + 'static {
    fn forward(&self, input: &Input, run: &mut Run) -> FwdResult<Tensor>;
}

/// A family's layers plus its sites, facts and device.
pub(crate) struct Loaded<F> {
    body: F,
    info: ModelInfo,
    sites: SiteTable,
    params: Parameters,
    device: Device,
}

impl<F: Family> Loaded<F> {
    /// Finishes loading: takes the sites and parameters `vb` collected.
    pub(crate) fn boxed(body: F, info: ModelInfo, vb: &Vb) -> Box<dyn Model> {
        Box::new(Self {
            body,
            info,
            sites: vb.take_sites(),
            params: vb.take_parameters(),
            device: vb.device().clone(),
        })
    }
}

impl<F: Family> Model for Loaded<F> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn sites(&self) -> &SiteTable {
        &self.sites
    }

    fn parameters(&self) -> &Parameters {
        &self.params
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn forward_with(&self, input: &Input, run: &mut Run<'_>) -> FwdResult<Tensor> {
        self.body.forward(input, run)
    }
}

/// Facts every family reports.
pub(crate) fn info(
    cfg: &RawConfig,
    vb: &Vb,
    vocab: usize,
    hidden: usize,
    layers: &Vb,
    n: usize,
) -> Result<ModelInfo> {
    Ok(ModelInfo {
        model_type: cfg.model_type()?.to_string(),
        vocab_size: vocab,
        hidden_size: hidden,
        decoder_layers: (0..n).map(|i| layers.pp(i).name().to_string()).collect(),
        dtype: vb.dtype(),
    })
}
