//! flexmodel: read and edit any activation of a language model.
//!
//! The pipeline: [`load`] a Hugging Face model directory → wrap it in a [`FlexModel`] →
//! [`register`](FlexModel::register) [`HookFunction`]s by site name or glob pattern → call
//! [`forward`](FlexModel::forward) as on the plain model → read the [`OutputMap`] (captures on
//! the host, taken before any edit) → [`restore`](FlexModel::restore) the untouched model.
//!
//! ```no_run
//! use flexmodel::{FlexModel, HookFunction, LoadOptions, Tokenizer, load};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = "models/tiny-llama";
//! let mut fm = FlexModel::new(load(dir, &LoadOptions::default())?);
//! // Capture every layer's residual stream; zero layer 1's MLP.
//! fm.register(HookFunction::new("model.layers.0").expected_shape(&[1, 7, 64]))?;
//! fm.register(HookFunction::new("model.layers.1").expected_shape(&[1, 7, 64]))?;
//! fm.register(HookFunction::new("model.layers.1.mlp").edit(|x: &flexmodel::Tensor, _: &mut flexmodel::HookCtx| {
//!     Ok(x.zeros_like()?)
//! }))?;
//! let ids = Tokenizer::from_dir(dir)?.encode("The capital of France")?;
//! let ids = flexmodel::Tensor::new(ids.as_slice(), &flexmodel::Device::Cpu)?.unsqueeze(0)?;
//! let logits = fm.forward(&ids)?;
//! let layer0 = fm.output().last("model.layers.0");
//! let model = fm.restore();
//! # Ok(()) }
//! ```
//!
//! Site names are Hugging Face module paths plus attention internals; see
//! [`flexmodel_core`] for the list and [`Layout`] for how sites are split over ranks.

pub mod analysis;
pub mod harvest;
pub mod plot;
pub mod sae;

pub use candle_core::{D, DType, Device, Tensor};
pub use flexmodel_core::{
    Comm, Dim, Edit, Error, FinalNorm, FlexModel, GenerateOptions, Generation, Grid, Groups, Guard,
    HookCtx, HookFunction, HookHandle, Input, KvCache, Layout, Local, Model, ModelInfo, Modules,
    OutputMap, Parallelism, Parameters, PassInfo, Point, Result, Run, Sampling, SaveContext,
    SiteId, SiteInfo, SiteKind, SiteTable, Steps, Unembed, causal_lm_loss, copy_of,
};
pub use flexmodel_core::{rng, site};
pub use flexmodel_models::{
    Error as LoadError, LoadOptions, Offload, SUPPORTED, Tokenizer, device, generation_tokens,
    hub_name, load, pad_left, pad_right, resolve, sites,
};

/// The README's Rust examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
