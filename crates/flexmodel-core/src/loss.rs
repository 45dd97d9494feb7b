//! The causal language-modelling loss, as transformers computes it for `labels=input_ids`.

use candle_core::{D, DType, Tensor};

use crate::model::Input;
use crate::{Error, Result};

/// Mean cross-entropy of `logits[:, :-1]` against `input_ids[:, 1:]`, in f32, over the
/// positions whose label is not padding (all of them without an attention mask). Differentiable
/// (composed ops only).
///
/// # Shapes
/// `logits`: `[batch, seq, vocab]`; returns a scalar.
///
/// # Errors
/// Fewer than two positions, mismatched shapes, or no position to score.
pub fn causal_lm_loss(logits: &Tensor, input: &Input) -> Result<Tensor> {
    let (sum, count) = lm_loss_sum(logits, input)?;
    if count == 0.0 {
        return Err(Error::Input(
            "no position to score: the attention mask is all padding".into(),
        ));
    }
    Ok((sum * (1.0 / count))?)
}

/// Positions whose label is scored: `seq - 1` per row, minus padded labels.
pub(crate) fn scored_positions(input: &Input) -> Result<f64> {
    let (b, s) = input.dims()?;
    Ok(match &input.attention_mask {
        Some(mask) => f64::from(
            mask.narrow(1, 1, s.saturating_sub(1))?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?,
        ),
        None => (b * s.saturating_sub(1)) as f64,
    })
}

/// The summed cross-entropy of the scored positions, and how many there are.
pub(crate) fn lm_loss_sum(logits: &Tensor, input: &Input) -> Result<(Tensor, f64)> {
    let (b, s, v) = logits.dims3()?;
    let (ib, is) = input.dims()?;
    if (b, s) != (ib, is) {
        return Err(Error::Input(format!(
            "logits {:?} do not match input_ids [{ib}, {is}]",
            logits.dims()
        )));
    }
    if s < 2 {
        return Err(Error::Input(
            "the causal LM loss needs at least 2 positions".into(),
        ));
    }
    let log_probs = log_softmax(&logits.narrow(1, 0, s - 1)?.to_dtype(DType::F32)?)?;
    let targets = input
        .input_ids
        .narrow(1, 1, s - 1)?
        .to_dtype(DType::U32)?
        .contiguous()?;
    if targets.max_all()?.to_scalar::<u32>()? as usize >= v {
        return Err(Error::Input(format!(
            "a token id is not below the vocabulary size {v}"
        )));
    }
    // The input lives on the host, the logits on the model's device.
    let device = logits.device();
    let targets = targets.to_device(device)?.unsqueeze(2)?;
    let picked = log_probs.gather(&targets, 2)?.squeeze(2)?; // [b, s-1]
    let weights = match &input.attention_mask {
        Some(mask) => mask
            .narrow(1, 1, s - 1)?
            .to_dtype(DType::F32)?
            .to_device(device)?,
        None => Tensor::ones((b, s - 1), DType::F32, device)?,
    };
    let count = f64::from(weights.sum_all()?.to_scalar::<f32>()?);
    Ok(((picked * weights)?.sum_all()?.neg()?, count))
}

/// `x - logsumexp(x)` over the last dimension, composed so that gradients flow.
fn log_softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// Token ids come as u32 (tokenizers, the Python package) or i64 (transformers' files):
    /// the narrowed targets of u32 ids are a strided view that gather must not see.
    #[test]
    fn u32_ids_give_the_loss_of_i64_ids() {
        let cpu = &Device::Cpu;
        let logits = Tensor::arange(0f32, 2.0 * 4.0 * 8.0, cpu)
            .unwrap()
            .reshape((2, 4, 8))
            .unwrap()
            .sin()
            .unwrap();
        let ids = [[1u32, 7, 3, 0], [5, 2, 6, 4]];
        let wide = ids.map(|row| row.map(i64::from));
        let narrow = causal_lm_loss(&logits, &Input::new(Tensor::new(&ids, cpu).unwrap()));
        let wide = causal_lm_loss(&logits, &Input::new(Tensor::new(&wide, cpu).unwrap()));
        let (a, b) = (narrow.unwrap(), wide.unwrap());
        assert_eq!(a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
    }
}
