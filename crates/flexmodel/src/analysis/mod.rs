//! The analyses researchers otherwise write by hand on every project, built on hooks so that
//! they run on any layout (every rank calls them, as it calls `forward`; the results are on
//! rank 0, and empty elsewhere):
//!
//! - [`logit_lens`]: every layer's residual stream decoded through the final norm and head.
//! - [`direct_logit_attribution`]: each head's, MLP's and the embeddings' share of a logit or a
//!   logit difference, with the final norm's scale frozen; the shares sum to the logit.
//! - [`patching_sweep`] and [`attribution_patching`]: patch each (layer, position) or head from
//!   a clean run into a corrupted one, exactly or by the gradient approximation.
//! - [`head_scores`]: previous-token, induction and duplicate-token scores of every head.
//! - [`ablate`]: zero, mean and resample ablation as hooks, of whole sites or chosen heads.
//!
//! Each analysis registers its own hooks and removes them before it returns, and takes its
//! captures out of the output map; hooks the user registered stay and run as usual.
//!
//! ```no_run
//! use flexmodel::analysis::{self, Direction, LensOptions};
//! use flexmodel::{FlexModel, Input, LoadOptions, Tokenizer, load};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = "models/stdlib-llama";
//! let mut fm = FlexModel::new(load(dir, &LoadOptions::default())?);
//! let tok = Tokenizer::from_dir(dir)?;
//! let ids = tok.encode("for i in range(len(")?;
//! let input = Input::new(flexmodel::Tensor::new(ids.as_slice(), &flexmodel::Device::Cpu)?.unsqueeze(0)?);
//! let lens = analysis::logit_lens(&mut fm, &input, &LensOptions::default())?;
//! let dla = analysis::direct_logit_attribution(&mut fm, &input, Direction::Token(ids[1]))?;
//! # Ok(()) }
//! ```

pub mod ablate;
mod dla;
mod heads;
mod lens;
mod patching;
mod unembed;

pub use dla::{Attribution, Direction, direct_logit_attribution};
pub use heads::{HeadScores, head_scores, repeated_tokens};
pub use lens::{LensOptions, LogitLens, logit_lens};
pub use patching::{Metric, Sweep, SweepSite, attribution_patching, patching_sweep};
pub use unembed::Unembedder;

use candle_core::{DType, Device, Tensor};

use crate::{Error, FlexModel, HookFunction, Input, Model, Result};

/// Runs one forward pass of `input` with `hooks` registered, removes them (also on error) and
/// takes their captures (under `keys`) out of the output map. Returns the logits and, per key,
/// the capture on the host in f32 (`None` on ranks other than 0).
fn run_with<M: Model>(
    fm: &mut FlexModel<M>,
    input: &Input,
    hooks: Vec<HookFunction>,
    keys: &[String],
) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    let mut handles = Vec::with_capacity(hooks.len());
    let mut registered = Ok(());
    for hook in hooks {
        match fm.register(hook) {
            Ok(h) => handles.push(h),
            Err(e) => {
                registered = Err(e);
                break;
            }
        }
    }
    let logits = registered.and_then(|()| fm.forward_input(input));
    for handle in handles {
        fm.remove(handle)?;
    }
    let logits = logits?;
    let captures = keys
        .iter()
        .map(|k| {
            fm.take_captures(k)
                .and_then(|mut v| v.pop())
                .map(host_f32)
                .transpose()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((host_f32(logits)?, captures))
}

/// `t` on the host in f32.
fn host_f32(t: Tensor) -> Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
}

/// The capture of `key`, which every analysis on rank 0 expects to find.
fn expect(capture: Option<Tensor>, key: &str) -> Result<Tensor> {
    capture.ok_or_else(|| {
        Error::msg(format!(
            "no capture of `{key}` came back from the forward pass"
        ))
    })
}

/// The attention module of each decoder layer: the parent of its `hook_head_out` site (and of
/// `hook_attn_probs`, `hook_q`, ...).
///
/// # Errors
/// A family whose attention does not expose heads.
pub fn attention_sites<M: Model>(fm: &FlexModel<M>) -> Result<Vec<String>> {
    let info = fm.model().info();
    let sites = fm.model().sites();
    info.decoder_layers
        .iter()
        .map(|layer| {
            sites
                .iter()
                .map(|(_, s)| &*s.name)
                .find(|n| n.starts_with(&format!("{layer}.")) && n.ends_with(".hook_head_out"))
                .map(|n| n.trim_end_matches(".hook_head_out").to_string())
                .ok_or_else(|| {
                    Error::msg(format!(
                        "{layer} has no attention head site (`*.hook_head_out`); {} models do not \
                         expose heads",
                        info.model_type
                    ))
                })
        })
        .collect()
}

/// The MLP (or mixture of experts) of each decoder layer, `<layer>.mlp`.
fn mlp_sites<M: Model>(fm: &FlexModel<M>) -> Result<Vec<String>> {
    let info = fm.model().info();
    info.decoder_layers
        .iter()
        .map(|layer| {
            let name = format!("{layer}.mlp");
            match fm.model().sites().id(&name) {
                Some(_) => Ok(name),
                None => Err(Error::msg(format!(
                    "{layer} has no `mlp` site; {} models are not supported by this analysis",
                    info.model_type
                ))),
            }
        })
        .collect()
}

/// Fails (on every rank alike) on token ids outside the vocabulary.
fn check_tokens<M: Model>(fm: &FlexModel<M>, tokens: &[u32]) -> Result<()> {
    let vocab = fm.model().info().vocab_size;
    match tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => Err(Error::msg(format!(
            "token id {t} is outside the vocabulary (0..{vocab})"
        ))),
        None => Ok(()),
    }
}

/// Whether this rank holds the results (rank 0 of the job).
fn is_root<M: Model>(fm: &FlexModel<M>) -> bool {
    fm.model().grid().is_root()
}
