//! flexmodel-models: Hugging Face causal language models in candle, where every module is a
//! hook site.
//!
//! [`load`] reads a model directory as `transformers` writes it (`config.json`,
//! `model.safetensors` or an index with shards, `tokenizer.json`), reads this rank's slices of
//! the weights (or streams them: [`Offload`], FSDP) and returns a [`Model`] whose forward pass
//! matches transformers (checked against reference activations of every module). Families:
//! Llama, Mistral, Qwen2 and Gemma (`llama.rs`), Qwen 3, Gemma 2, Gemma 3, OLMo 2, Phi-3,
//! Mixtral, Qwen MoE and Qwen 3 MoE (each a short file of what it changes in the shared
//! decoder, `decoder.rs`), Phi, GPT-2, GPT-NeoX, Falcon, OPT.
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

mod alloc;
mod attention;
mod config;
mod decoder;
mod device;
mod error;
mod falcon;
mod gemma2;
mod gemma3;
mod gpt2;
mod gpt_neox;
mod hub;
mod kernels;
mod llama;
mod mixtral;
mod moe;
mod nn;
mod olmo2;
mod opt;
mod phi;
mod phi3;
mod qwen2_moe;
mod qwen3;
mod qwen3_moe;
pub mod random;
mod rope;
mod stream;
mod tokenizer;
mod weights;

use std::path::Path;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use flexmodel_core::{
    FinalNorm, Grid, Input, Model, ModelInfo, Parameters, Run, SiteId, SiteTable, Unembed,
};

use crate::attention::Pass;

pub use device::device;
pub use error::{Error, Result};
pub use hub::{hub_name, resolve};
pub use stream::Offload;
pub use tokenizer::{Tokenizer, generation_tokens, pad_left, pad_right};

use crate::config::RawConfig;
use crate::stream::{EMBED, HEAD, Mode, Streams, layer_unit};
use crate::weights::{Shard, Vb, Weights};

/// Result of code on the forward path (hook errors included).
pub(crate) type FwdResult<T> = flexmodel_core::Result<T>;

/// The `model_type`s flexmodel loads.
pub const SUPPORTED: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "olmo2",
    "phi",
    "phi3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "gpt2",
    "gpt_neox",
    "falcon",
    "opt",
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
    /// The ranks of a multi-process job and their layout; this rank loads only its part of the
    /// weights (its tensor-parallel slices of its pipeline stage's layers; under FSDP, a
    /// `1/fsdp` chunk of those).
    pub grid: Grid,
    /// Keep only the layers being computed resident, reading the rest from the checkpoint as
    /// the pass reaches them (see [`Offload`]).
    pub offload: Offload,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            requires_grad: false,
            grid: Grid::single(),
            offload: Offload::None,
        }
    }
}

/// How this rank keeps its weights under `options`.
fn mode(options: &LoadOptions) -> Result<Mode> {
    let fsdp = options.grid.degrees.fsdp > 1;
    Ok(match (fsdp, options.offload) {
        (false, Offload::None) => Mode::Resident,
        (false, offload) => Mode::Offload(offload),
        (true, offload) => Mode::Fsdp {
            comm: options.grid.fsdp.clone(),
            offload,
        },
    })
}

/// Loads the model in `dir`: a Hugging Face model directory, or a Hub name (`org/name`,
/// `org/name@revision`) already in the local Hub cache (see [`resolve`]).
///
/// On Linux with glibc, the first call also tunes the C allocator for model runs: blocks up
/// to 32 MiB stay in the heap once freed (`M_MMAP_THRESHOLD`), and so does up to 1 GiB of free
/// heap (`M_TRIM_THRESHOLD`), so that each layer reuses the buffers of the last instead of
/// faulting in fresh zeroed pages. Setting `MALLOC_MMAP_THRESHOLD_` or
/// `MALLOC_TRIM_THRESHOLD_` in the environment turns this off.
///
/// # Errors
/// A missing or malformed file, an unsupported architecture or config option, a tensor missing
/// from the checkpoint or of the wrong shape; each error names the offending value.
pub fn load(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Box<dyn Model>> {
    let dir = &resolve(dir)?;
    let cfg = RawConfig::read(dir)?;
    check_dtype(options.dtype)?;
    alloc::keep_freed_buffers();
    let mode = mode(options)?;
    let shard = || Shard::of(&cfg, &options.grid);
    // A layout that cannot work fails here, before any weight is read: the model is built
    // once without reading (every split is checked), then for real.
    let meta = Weights::open(dir, options.dtype, &options.device, true, false)?;
    build(&cfg, Vb::root(meta, shard()?, Mode::Resident))?;
    let weights = Weights::open(
        dir,
        options.dtype,
        &options.device,
        false,
        options.requires_grad,
    )?;
    build(&cfg, Vb::root(weights, shard()?, mode))
}

/// The sites of the model in `dir`, without reading any weight.
///
/// # Errors
/// As [`load`], except for the weights' contents.
pub fn sites(dir: impl AsRef<Path>) -> Result<SiteTable> {
    let dir = &resolve(dir)?;
    let cfg = RawConfig::read(dir)?;
    let weights = Weights::open(dir, DType::F32, &Device::Cpu, true, false)?;
    let shard = Shard::of(&cfg, &Grid::single())?;
    let model = build(&cfg, Vb::root(weights, shard, Mode::Resident))?;
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
    let gemma2_options: &[&str] = &[
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "query_pre_attn_scalar",
    ];
    let own = match model_type {
        "gemma2" | "gemma3_text" => gemma2_options,
        _ => &[],
    };
    cfg.reject_foreign_options(own)?;
    match model_type {
        "llama" | "mistral" | "qwen2" | "gemma" => llama::load(cfg, vb),
        "qwen3" => qwen3::load(cfg, vb),
        "gemma2" => gemma2::load(cfg, vb),
        "gemma3_text" => gemma3::load(cfg, vb),
        "olmo2" => olmo2::load(cfg, vb),
        "phi3" => phi3::load(cfg, vb),
        "mixtral" => mixtral::load(cfg, vb),
        "qwen2_moe" => qwen2_moe::load(cfg, vb),
        "qwen3_moe" => qwen3_moe::load(cfg, vb),
        "phi" => phi::Phi::load(cfg, vb),
        "gpt2" => gpt2::Gpt2::load(cfg, vb),
        "gpt_neox" => gpt_neox::GptNeox::load(cfg, vb),
        "falcon" => falcon::Falcon::load(cfg, vb),
        "opt" => opt::Opt::load(cfg, vb),
        _ => Err(unknown()),
    }
}

/// The forward pass of one family in the pieces a pipeline stage runs; [`Loaded`] drives them
/// and adds what every model has.
pub(crate) trait Family: Send + Sync + 'static {
    /// The base model's site, whose input (the token ids) the first stage passes to pre-hooks.
    fn base_site(&self) -> SiteId;

    /// The sliding window, if any layer uses one.
    fn window(&self) -> Option<usize> {
        None
    }

    /// First stage: the embeddings, `[batch, seq, hidden]`.
    fn embed(&self, ids: &Tensor, pass: &Pass, run: &mut Run) -> FwdResult<Tensor>;

    /// First stage: the per-pass tables every layer reads (rotary cosines and sines).
    fn tables(&self, x: &Tensor, pass: &Pass, run: &mut Run) -> FwdResult<Tables>;

    /// Decoder layer `i`.
    fn layer(
        &self,
        i: usize,
        x: &Tensor,
        tables: &Tables,
        pass: &Pass,
        run: &mut Run,
    ) -> FwdResult<Tensor>;

    /// Last stage: final norm, the base model's output, the LM head.
    fn head(&self, x: Tensor, run: &mut Run) -> FwdResult<Tensor>;
}

/// What [`Family::tables`] computes once per pass.
pub(crate) enum Tables {
    /// No per-pass table (learned positions).
    None,
    /// Rotary `(cos, sin)`, each `[pos_batch, seq, rot]`: one pair per rope of the model.
    Rotary(Vec<(Tensor, Tensor)>),
}

impl Tables {
    /// The tensors to send to the next pipeline stage.
    fn into_parts(self) -> Vec<Tensor> {
        match self {
            Tables::None => Vec::new(),
            Tables::Rotary(pairs) => pairs.into_iter().flat_map(|(c, s)| [c, s]).collect(),
        }
    }

    /// The tables a stage received.
    fn from_parts(parts: Vec<Tensor>) -> Self {
        if parts.is_empty() {
            return Tables::None;
        }
        let mut parts = parts.into_iter();
        let mut pairs = Vec::new();
        while let (Some(cos), Some(sin)) = (parts.next(), parts.next()) {
            pairs.push((cos, sin));
        }
        Tables::Rotary(pairs)
    }

    /// The rotary tables of the model's only (or first) rope.
    pub(crate) fn rotary(&self) -> FwdResult<(&Tensor, &Tensor)> {
        self.rotary_at(0)
    }

    /// The rotary tables of rope `i`.
    pub(crate) fn rotary_at(&self, i: usize) -> FwdResult<(&Tensor, &Tensor)> {
        match self {
            Tables::Rotary(pairs) if i < pairs.len() => Ok((&pairs[i].0, &pairs[i].1)),
            _ => Err(flexmodel_core::Error::msg("rotary tables missing")),
        }
    }
}

/// This rank's pipeline stage.
#[derive(Clone, Debug)]
struct Stage {
    layers: std::ops::Range<usize>,
    first: bool,
    last: bool,
}

/// A family's layers plus its sites, parameters, facts, stage and device.
pub(crate) struct Loaded<F> {
    body: F,
    info: ModelInfo,
    sites: SiteTable,
    params: Parameters,
    stage: Stage,
    grid: Grid,
    device: Device,
    /// Weights streamed by unit (offload, FSDP); empty when every weight is resident.
    streams: Arc<OnceLock<Streams>>,
}

impl<F: Family> Loaded<F> {
    /// Finishes loading: takes the sites, parameters and streamed weights `vb` collected.
    pub(crate) fn boxed(body: F, info: ModelInfo, vb: &Vb) -> Result<Box<dyn Model>> {
        let shard = vb.shard();
        Ok(Box::new(Self {
            streams: vb.take_streams()?,
            body,
            info,
            sites: vb.take_sites(),
            params: vb.take_parameters(),
            stage: Stage {
                layers: shard.layers.clone(),
                first: shard.first,
                last: shard.last,
            },
            grid: shard.grid.clone(),
            device: vb.device().clone(),
        }))
    }

    /// Makes `unit`'s streamed weights resident until the guard drops (asking for `next`'s
    /// ahead); nothing when every weight is resident.
    fn resident(
        &self,
        unit: usize,
        next: Option<usize>,
    ) -> FwdResult<Option<stream::Resident<'_>>> {
        match self.streams.get() {
            Some(streams) => streams.resident(unit, next).map(Some),
            None => Ok(None),
        }
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

    fn grid(&self) -> &Grid {
        &self.grid
    }

    fn weight_gradients(&self, grads: &mut candle_core::backprop::GradStore) -> FwdResult<()> {
        match self.streams.get() {
            Some(streams) => streams.weight_gradients(grads),
            None => Ok(()),
        }
    }

    /// Runs this rank's stage on the whole batch, or micro-batch after micro-batch (GPipe:
    /// while this stage computes the next, the following stage computes the last); the last
    /// stage returns the logits of every row, in order.
    fn forward_with(&self, input: &Input, run: &mut Run<'_>) -> FwdResult<Tensor> {
        let pass = Pass::new(input, run.past_len(), self.body.window(), &self.device)?;
        if let Some(streams) = self.streams.get() {
            streams.begin_pass()?;
        }
        let micro = run.micro_batches();
        if micro <= 1 {
            return self.forward_stage(input, pass, run);
        }
        let (batch, _) = input.dims()?;
        let mut outputs = Vec::with_capacity(micro);
        for (start, rows) in flexmodel_core::comm::even_split(batch, micro) {
            let chunk = Input {
                input_ids: input.input_ids.narrow(0, start, rows)?,
                attention_mask: match &input.attention_mask {
                    Some(m) => Some(m.narrow(0, start, rows)?),
                    None => None,
                },
            };
            let chunk_pass = Pass::new(&chunk, run.past_len(), self.body.window(), &self.device)?;
            outputs.push(self.forward_stage(&chunk, chunk_pass.within(&pass), run)?);
        }
        if self.stage.last {
            Ok(Tensor::cat(&outputs, 0)?)
        } else {
            Ok(outputs.swap_remove(0))
        }
    }
}

impl<F: Family> Loaded<F> {
    /// Runs this rank's stage: the embeddings on the first stage, the activations of the
    /// previous stage elsewhere; its layers; the head on the last, else the activations go on
    /// to the next stage and an empty tensor comes back.
    fn forward_stage(&self, input: &Input, pass: Pass, run: &mut Run<'_>) -> FwdResult<Tensor> {
        let stage = &self.stage;
        // Streamed weights (offload, FSDP) are resident while their unit computes: the
        // embeddings, each layer, the head; the next unit's are asked for ahead.
        let first_layer = stage.layers.clone().next().map(layer_unit);
        // The hidden states and the per-pass tables travel from stage to stage together: later
        // stages see any edit of the tables, and send their gradient back.
        let (mut x, tables) = if stage.first {
            let _embeddings = self.resident(EMBED, first_layer)?;
            let ids = input.input_ids.to_device(&self.device)?;
            let ids = run.input(self.body.base_site(), &ids)?;
            let x = self.body.embed(&ids, &pass, run)?;
            let tables = self.body.tables(&x, &pass, run)?;
            (x, tables)
        } else {
            let prev = self.grid.stage() - 1;
            let count = self.grid.pp.recv(prev)?.to_scalar::<u32>()? as usize;
            let mut parts = Vec::with_capacity(count);
            for _ in 0..count {
                parts.push(self.grid.pp.recv(prev)?.to_device(&self.device)?);
            }
            let mut parts = run.stage_inputs(parts)?.into_iter();
            let x = parts.next().ok_or_else(|| {
                flexmodel_core::Error::msg("no activations from the previous stage")
            })?;
            (x, Tables::from_parts(parts.collect()))
        };
        for i in stage.layers.clone() {
            let next = if i + 1 < stage.layers.end {
                Some(layer_unit(i + 1))
            } else {
                stage.last.then_some(HEAD)
            };
            let _layer = self.resident(layer_unit(i), next)?;
            x = self.body.layer(i, &x, &tables, &pass, run)?;
            if run.stop_after(i) {
                return Ok(x);
            }
        }
        if stage.last {
            let _head = self.resident(HEAD, None)?;
            return self.body.head(x, run);
        }
        let mut parts = vec![x];
        parts.extend(tables.into_parts());
        run.stage_outputs(&parts);
        let next = self.grid.stage() + 1;
        self.grid
            .pp
            .send(&Tensor::new(parts.len() as u32, &Device::Cpu)?, next)?;
        for part in &parts {
            self.grid.pp.send(part, next)?;
        }
        Ok(Tensor::zeros(0, parts[0].dtype(), &self.device)?)
    }
}

/// Facts every family reports (a family that describes its unembedding sets it after).
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
        unembed: None,
    })
}

/// The unembedding of a model whose final norm is `norm` (at its `vb`) and whose head is at
/// `head` (a bias where `head_bias`).
pub(crate) fn unembed(norm: (&Vb, FinalNormKind), head: &Vb, head_bias: bool) -> Unembed {
    let (vb, kind) = norm;
    let weight = format!("{}.weight", vb.name());
    let norm = match kind {
        FinalNormKind::Rms { eps, offset } => FinalNorm::Rms {
            weight,
            eps,
            offset,
        },
        FinalNormKind::Layer { eps, bias } => FinalNorm::Layer {
            weight,
            bias: bias.then(|| format!("{}.bias", vb.name())),
            eps,
        },
    };
    Unembed {
        norm_site: vb.name().to_string(),
        norm,
        head_weight: format!("{}.weight", head.name()),
        head_bias: head_bias.then(|| format!("{}.bias", head.name())),
        softcap: None,
    }
}

/// A final norm's kind and constants (its parameters' names come from where it loads).
#[derive(Clone, Copy)]
pub(crate) enum FinalNormKind {
    Rms { eps: f64, offset: f64 },
    Layer { eps: f64, bias: bool },
}
