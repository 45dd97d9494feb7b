//! Head scores from attention patterns: previous-token, induction, duplicate-token.

use candle_core::{D, DType, Device, Tensor};

use super::{attention_sites, expect, is_root, run_with};
use crate::rng::SplitMix64;
use crate::{Error, FlexModel, HookFunction, Input, Model, Result};

/// Scores of every head, `[layers, heads]` each, in `[0, 1]`: the mean attention probability
/// that each head puts where the pattern says.
#[derive(Clone, Debug)]
pub struct HeadScores {
    /// The attention modules, one per decoder layer.
    pub layers: Vec<String>,
    /// Attention from each position to the one before it (all positions after the first).
    pub previous_token: Tensor,
    /// Attention from each token of the second copy to the token after its first occurrence
    /// (the induction pattern `[A][B] ... [A] → [B]`).
    pub induction: Tensor,
    /// Attention from each token of the second copy to its first occurrence.
    pub duplicate_token: Tensor,
}

/// `batch` rows of `[prefix?] r r` with `r` a sequence of `half` token ids drawn uniformly from
/// `low..vocab` (seeded): the inputs on which induction heads show. Returns `[batch, seq]` u32.
pub fn repeated_tokens(
    vocab: u32,
    low: u32,
    half: usize,
    batch: usize,
    seed: u64,
    prefix: Option<u32>,
) -> Result<Tensor> {
    if low >= vocab || half == 0 {
        return Err(Error::msg(format!(
            "repeated tokens need a non-empty range of ids and a length: got ids {low}..{vocab}, \
             length {half}"
        )));
    }
    let mut rng = SplitMix64::new(seed);
    let mut ids = Vec::with_capacity(batch * (2 * half + 1));
    for _ in 0..batch {
        ids.extend(prefix);
        let r: Vec<u32> = (0..half)
            .map(|_| low + (rng.next_u64() % u64::from(vocab - low)) as u32)
            .collect();
        ids.extend(&r);
        ids.extend(&r);
    }
    let seq = 2 * half + usize::from(prefix.is_some());
    Ok(Tensor::from_vec(ids, (batch, seq), &Device::Cpu)?)
}

/// Runs `input`, which must be repeated sequences as [`repeated_tokens`] makes (`half` tokens,
/// twice, after a prefix of `seq - 2 * half` tokens), and scores every head from its attention
/// probabilities. Every rank calls it; rank 0 gets the scores, other ranks `None`.
///
/// # Errors
/// A sequence shorter than `2 * half`, a family without per-head attention sites, errors of
/// the forward pass.
pub fn head_scores<M: Model>(
    fm: &mut FlexModel<M>,
    input: &Input,
    half: usize,
) -> Result<Option<HeadScores>> {
    let (_, seq) = input.dims()?;
    if half == 0 || seq < 2 * half {
        return Err(Error::msg(format!(
            "head scores need rows of a prefix and two copies of `half` tokens: half is {half}, \
             rows have {seq} tokens"
        )));
    }
    let attns = attention_sites(fm)?;
    let keys: Vec<String> = attns
        .iter()
        .map(|a| format!("{a}.hook_attn_probs"))
        .collect();
    let hooks = keys.iter().map(|k| HookFunction::new(k.as_str())).collect();
    let (_, captures) = run_with(fm, input, hooks, &keys)?;
    if !is_root(fm) {
        return Ok(None);
    }
    let start = seq - half; // first position of the second copy
    let (mut prev, mut ind, mut dup) = (vec![], vec![], vec![]);
    for (capture, key) in captures.into_iter().zip(&keys) {
        let probs = expect(capture, key)?; // [batch, heads, seq, key_seq]
        prev.push(diagonal_score(&probs, 1, 1..seq)?);
        ind.push(diagonal_score(&probs, half - 1, start..seq)?);
        dup.push(diagonal_score(&probs, half, start..seq)?);
    }
    Ok(Some(HeadScores {
        layers: attns,
        previous_token: Tensor::stack(&prev, 0)?,
        induction: Tensor::stack(&ind, 0)?,
        duplicate_token: Tensor::stack(&dup, 0)?,
    }))
}

/// Mean over rows and over query positions `queries` of the probability at key `q - offset`,
/// per head: `[heads]`.
fn diagonal_score(
    probs: &Tensor,
    offset: usize,
    queries: std::ops::Range<usize>,
) -> Result<Tensor> {
    let (batch, heads, _, keys) = probs.dims4()?;
    let picks: Vec<u32> = queries.clone().map(|q| (q - offset) as u32).collect();
    let n = picks.len();
    let rows = probs.narrow(2, queries.start, n)?; // [batch, heads, n, keys]
    let idx = Tensor::from_vec(picks, (1, 1, n, 1), probs.device())?
        .broadcast_as((batch, heads, n, 1))?
        .contiguous()?;
    debug_assert!(keys >= queries.end - offset);
    let picked = rows.contiguous()?.gather(&idx, D::Minus1)?; // [batch, heads, n, 1]
    Ok(picked
        .to_dtype(DType::F32)?
        .squeeze(D::Minus1)?
        .mean(2)?
        .mean(0)?)
}
