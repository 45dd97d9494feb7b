//! flexmodel-core: hooks on named sites of a language model.
//!
//! The pipeline: load a model (`flexmodel-models`) → wrap it in a [`FlexModel`] → register
//! [`HookFunction`]s by site name or glob pattern → run the usual forward pass → read the
//! [`OutputMap`] (captures, on the host, taken before any edit) → [`FlexModel::restore`] the
//! untouched model.
//!
//! # Sites
//! Every module Hugging Face's `named_modules()` lists and the forward pass calls is a site
//! with exactly that name, firing with the module's output (element 0 where the module returns
//! a tuple). A module called twice per forward (Phi's `resid_dropout`) fires twice. Each
//! attention module `<attn>` has five more sites:
//!
//! | site | shape | what |
//! | --- | --- | --- |
//! | `<attn>.hook_q` | `[batch, seq, heads, head_dim]` | queries after rotary, before scaling |
//! | `<attn>.hook_k` | `[batch, seq, kv_heads, head_dim]` | keys after rotary |
//! | `<attn>.hook_v` | `[batch, seq, kv_heads, head_dim]` | values |
//! | `<attn>.hook_attn_probs` | `[batch, heads, seq, key_seq]` | attention probabilities |
//! | `<attn>.hook_head_out` | `[batch, seq, heads, head_dim]` | per-head output before the output projection |
//!
//! Every site carries a [`Layout`]: how its tensor is split over tensor-parallel ranks.

mod cache;
pub mod comm;
#[cfg(feature = "cuda")]
mod cuda;
mod dist;
mod error;
mod generate;
mod hook;
mod host;
pub mod layout;
mod loss;
mod model;
mod output;
pub mod rng;
mod run;
pub mod site;
pub mod wire;
mod wrapper;

pub use cache::KvCache;
pub use comm::{Comm, Grid, Local, Parallelism};
#[cfg(feature = "cuda")]
pub use cuda::cuda_library_loadable;
pub use dist::CommStats;
pub use error::{Error, Result};
pub use generate::{GenerateOptions, Generation, Sampling};
pub use hook::{Edit, HookCtx, HookFunction, Modules, PassInfo, Point, SaveContext, Steps};
pub use layout::Layout;
pub use loss::causal_lm_loss;
pub use model::{Fetch, FinalNorm, Input, Model, ModelInfo, Parameters, Unembed};
pub use output::OutputMap;
pub use run::{Groups, HookHandle, Run, copy_of};
pub use site::{Dim, SiteId, SiteInfo, SiteKind, SiteTable};
pub use wrapper::{FlexModel, Guard, LmBackward};
