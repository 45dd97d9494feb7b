//! Ablations as hooks: replace a site's activation (or chosen heads of it) by zero, by its mean
//! over a dataset, or by its value on other prompts (resampling).

use candle_core::{DType, Tensor};

use crate::rng::SplitMix64;
use crate::{Error, FlexModel, HookCtx, HookFunction, Input, Model, Result};

/// What an ablated activation becomes.
#[derive(Clone, Debug)]
pub enum Ablation {
    /// Zero.
    Zero,
    /// A mean activation, broadcast over batch and positions: `[features...]` (the trailing
    /// dimensions of the site, e.g. from a harvest's `--stats` means) or `[seq, features...]`
    /// (a mean per position).
    Mean(Tensor),
    /// Activations of the same site on other prompts, `[rows, seq, features...]`: each row of
    /// the batch takes a row drawn from these (seeded), as resample ablation does.
    Resample {
        /// The other prompts' activations.
        source: Tensor,
        /// Seed of the row draws.
        seed: u64,
    },
}

/// A hook that ablates the whole activation of `site` (a name or pattern).
pub fn site(site: &str, ablation: Ablation) -> HookFunction {
    HookFunction::new(site)
        .capture(false)
        .edit(move |x: &Tensor, cx: &mut HookCtx| ablation.apply(x, cx.site()))
}

/// A hook that ablates only `heads` of a `[batch, seq, heads, head_dim]` site such as
/// `model.layers.1.self_attn.hook_head_out`; the other heads pass unchanged. A mean is then
/// `[heads, head_dim]` (or `[seq, heads, head_dim]`).
pub fn heads(site: &str, heads: &[usize], ablation: Ablation) -> HookFunction {
    let heads = heads.to_vec();
    HookFunction::new(site)
        .capture(false)
        .edit(move |x: &Tensor, cx: &mut HookCtx| {
            let n = match x.dims() {
                [_, _, n, _] => *n,
                other => {
                    return Err(Error::msg(format!(
                        "head ablation needs a [batch, seq, heads, head_dim] site; `{}` is \
                         {other:?}",
                        cx.site()
                    )));
                }
            };
            if let Some(h) = heads.iter().find(|&&h| h >= n) {
                return Err(Error::msg(format!(
                    "head {h} does not exist at `{}`, which has {n} heads",
                    cx.site()
                )));
            }
            let mask: Vec<f32> = (0..n).map(|h| f32::from(heads.contains(&h))).collect();
            let mask = Tensor::from_vec(mask, (1, 1, n, 1), x.device())?.to_dtype(x.dtype())?;
            let new = ablation.apply(x, cx.site())?;
            Ok((x.broadcast_mul(&(1.0 - &mask)?)? + new.broadcast_mul(&mask)?)?)
        })
}

/// The mean activation of `site` over `inputs` (every position of every row that the mask
/// keeps), `[features...]`: the argument of [`Ablation::Mean`]. Runs one forward pass per
/// input; every rank calls it; rank 0 gets the mean, other ranks `None`.
///
/// # Errors
/// No inputs, a site that is not per token, errors of the forward passes.
pub fn mean_of<M: Model>(
    fm: &mut FlexModel<M>,
    site: &str,
    inputs: &[Input],
) -> Result<Option<Tensor>> {
    if inputs.is_empty() {
        return Err(Error::msg("the mean of a site needs at least one input"));
    }
    let mut sum: Option<Tensor> = None;
    let mut count = 0f64;
    for input in inputs {
        let (_, captures) = super::run_with(
            fm,
            input,
            vec![HookFunction::new(site)],
            &[site.to_string()],
        )?;
        let Some(x) = captures.into_iter().next().flatten() else {
            continue;
        };
        let (rows, seq) = (x.dim(0)?, x.dim(1)?);
        let keep = match &input.attention_mask {
            Some(m) => super::host_f32(m.clone())?,
            None => Tensor::ones((rows, seq), DType::F32, x.device())?,
        };
        let mut shape = vec![rows, seq];
        shape.resize(x.rank(), 1);
        let weighted = x.broadcast_mul(&keep.reshape(shape)?)?;
        let s = weighted.sum(0)?.sum(0)?;
        count += f64::from(keep.sum_all()?.to_scalar::<f32>()?);
        sum = Some(match sum {
            Some(acc) => (acc + s)?,
            None => s,
        });
    }
    match sum {
        Some(s) => Ok(Some((s / count)?)),
        None => Ok(None),
    }
}

impl Ablation {
    /// What the activation `x` of `site` becomes.
    ///
    /// # Errors
    /// A mean that does not broadcast to `x`, other prompts' activations of another shape.
    pub fn apply(&self, x: &Tensor, site: &str) -> Result<Tensor> {
        match self {
            Ablation::Zero => Ok(x.zeros_like()?),
            Ablation::Mean(mean) => {
                let mean = mean.to_device(x.device())?.to_dtype(x.dtype())?;
                x.zeros_like()?.broadcast_add(&mean).map_err(|_| {
                    Error::msg(format!(
                        "the mean of shape {:?} does not broadcast to `{site}`'s activation {:?}; \
                     give the site's trailing dimensions {:?}",
                        mean.dims(),
                        x.dims(),
                        &x.dims()[2..]
                    ))
                })
            }
            Ablation::Resample { source, seed } => {
                let rows = x.dim(0)?;
                if source.rank() != x.rank() || source.dims()[1..] != x.dims()[1..] {
                    return Err(Error::msg(format!(
                        "resample ablation of `{site}` needs other prompts' activations of shape \
                     [rows, {}]; got {:?}",
                        x.dims()[1..]
                            .iter()
                            .map(usize::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                        source.dims()
                    )));
                }
                let mut rng = SplitMix64::new(*seed);
                let n = source.dim(0)? as u64;
                let picks: Vec<u32> = (0..rows).map(|_| (rng.next_u64() % n) as u32).collect();
                let picks = Tensor::new(picks.as_slice(), source.device())?;
                Ok(source
                    .index_select(&picks, 0)?
                    .to_device(x.device())?
                    .to_dtype(x.dtype())?)
            }
        }
    }
}
