//! The logit lens: every layer's residual stream decoded as if it were the last.

use candle_core::{D, DType, Tensor};

use super::{Unembedder, expect, run_with};
use crate::{FlexModel, HookFunction, Input, Model, Result};

/// What the logit lens reports.
#[derive(Clone, Debug)]
pub struct LensOptions {
    /// How many of the most likely tokens to keep per layer and position.
    pub top_k: usize,
    /// A token whose probability and rank to report at every layer and position.
    pub target: Option<u32>,
}

impl Default for LensOptions {
    fn default() -> Self {
        Self {
            top_k: 5,
            target: None,
        }
    }
}

/// The logit lens of one forward pass: for each residual point (the embeddings, then each
/// decoder layer's output), the next-token distribution that the final norm and head read from
/// it. The last point's distribution is the model's own.
#[derive(Clone, Debug)]
pub struct LogitLens {
    /// The points: `embed` (the first layer's input), then each decoder layer's site.
    pub points: Vec<String>,
    /// Most likely tokens, `[points, batch, seq, top_k]` (u32), most likely first.
    pub top_ids: Tensor,
    /// Their probabilities, `[points, batch, seq, top_k]` (f32).
    pub top_probs: Tensor,
    /// The target's probability, `[points, batch, seq]`.
    pub target_probs: Option<Tensor>,
    /// The target's rank (0: the most likely token), `[points, batch, seq]` (u32).
    pub target_ranks: Option<Tensor>,
    /// The probability of the model's final prediction (the last point's most likely token at
    /// each position), `[points, batch, seq]`: how early each layer reads the answer.
    pub final_token_probs: Tensor,
}

/// Runs `input` once and decodes every layer's residual stream through the final norm and
/// head. Every rank calls it; rank 0 gets the lens, other ranks `None`.
///
/// # Errors
/// A family without a described unembedding, a target outside the vocabulary, `top_k` of 0 or
/// above the vocabulary, errors of the forward pass.
pub fn logit_lens<M: Model>(
    fm: &mut FlexModel<M>,
    input: &Input,
    options: &LensOptions,
) -> Result<Option<LogitLens>> {
    let unembed = Unembedder::new(fm)?;
    let layers = fm.model().info().decoder_layers.clone();
    let vocab = fm.model().info().vocab_size;
    if options.top_k == 0 || options.top_k > vocab {
        return Err(crate::Error::msg(format!(
            "top_k must be between 1 and the vocabulary size ({vocab}), got {}",
            options.top_k
        )));
    }
    super::check_tokens(fm, options.target.as_slice())?;
    let first = layers
        .first()
        .ok_or_else(|| crate::Error::msg("the model has no decoder layers"))?;
    let mut keys = vec![format!("input.{first}")];
    keys.extend(layers.iter().cloned());
    let mut hooks = vec![HookFunction::pre(first.as_str())];
    hooks.extend(layers.iter().map(|l| HookFunction::new(l.as_str())));
    let (_, captures) = run_with(fm, input, hooks, &keys)?;
    let Some(unembed) = unembed else {
        return Ok(None);
    };
    let mut points = vec!["embed".to_string()];
    points.extend(layers);
    let residuals = captures
        .into_iter()
        .zip(&keys)
        .map(|(c, k)| expect(c, k))
        .collect::<Result<Vec<_>>>()?;
    let Some((last, earlier)) = residuals.split_last() else {
        return Err(crate::Error::msg("no residual captured"));
    };
    // The last point first, for its predictions; the others decoded one at a time.
    let final_logits = unembed.logits(last)?;
    let final_ids = final_logits.argmax_keepdim(D::Minus1)?; // [batch, seq, 1]
    let all_logits = earlier
        .iter()
        .map(|r| unembed.logits(r))
        .chain(std::iter::once(Ok(final_logits)));
    let (mut ids, mut probs, mut t_probs, mut t_ranks) = (vec![], vec![], vec![], vec![]);
    let mut finals = vec![];
    for logits in all_logits {
        let logits = logits?;
        let p = candle_nn::ops::softmax_last_dim(&logits)?;
        finals.push(p.gather(&final_ids, D::Minus1)?.squeeze(D::Minus1)?);
        let order = p
            .arg_sort_last_dim(false)?
            .narrow(D::Minus1, 0, options.top_k)?
            .contiguous()?;
        probs.push(p.contiguous()?.gather(&order, D::Minus1)?);
        ids.push(order);
        if let Some(t) = options.target {
            let tp = p.narrow(D::Minus1, t as usize, 1)?;
            let above = p.broadcast_gt(&tp)?.to_dtype(DType::U32)?.sum(D::Minus1)?;
            t_probs.push(tp.squeeze(D::Minus1)?);
            t_ranks.push(above);
        }
    }
    let stack = |v: Vec<Tensor>| -> Result<Option<Tensor>> {
        Ok(if v.is_empty() {
            None
        } else {
            Some(Tensor::stack(&v, 0)?)
        })
    };
    Ok(Some(LogitLens {
        points,
        top_ids: Tensor::stack(&ids, 0)?,
        top_probs: Tensor::stack(&probs, 0)?,
        target_probs: stack(t_probs)?,
        target_ranks: stack(t_ranks)?,
        final_token_probs: Tensor::stack(&finals, 0)?,
    }))
}
