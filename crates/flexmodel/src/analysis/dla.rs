//! Direct logit attribution: each component's share of a logit, through the frozen final norm.

use candle_core::{D, Tensor};

use super::{Unembedder, attention_sites, expect, mlp_sites, run_with};
use crate::{Error, FlexModel, HookFunction, Input, Model, Result};

/// The logit direction to attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The logit of one token.
    Token(u32),
    /// The logit of the first token minus the logit of the second.
    Diff(u32, u32),
}

/// The direct logit attribution of the last position of each row.
///
/// The residual stream before the final norm is the sum of the embeddings, every attention
/// head's output (through its slice of the output projection), the attention output's bias and
/// every MLP's output. Freezing the final norm's scale (as TransformerLens does) makes the
/// logit linear in that sum, so `values` summed over components plus `bias` equals `logit`
/// (before any soft cap) up to float rounding.
#[derive(Clone, Debug)]
pub struct Attribution {
    /// Component names: `embed`, `<attention>.head.<h>`, `<attention>.bias` (where the output
    /// projection has a bias), `<layer>.mlp`.
    pub components: Vec<String>,
    /// Each component's contribution, `[batch, components]`.
    pub values: Tensor,
    /// The part that no component carries (the norm's and the head's biases), `[batch]`.
    pub bias: Tensor,
    /// The logit (difference) the model computes, before any soft cap, `[batch]`.
    pub logit: Tensor,
}

/// Runs `input` once and attributes `direction` at each row's last position to the embeddings,
/// every attention head and every MLP (put the prompt's last token last: pad on the left).
/// Every rank calls it; rank 0 gets the attribution, other ranks `None`.
///
/// # Errors
/// A family without a described unembedding or whose layers do not add their attention and MLP
/// outputs to the residual stream (norms after the blocks, as in Gemma 2), token ids outside
/// the vocabulary, errors of the forward pass.
pub fn direct_logit_attribution<M: Model>(
    fm: &mut FlexModel<M>,
    input: &Input,
    direction: Direction,
) -> Result<Option<Attribution>> {
    let tokens: Vec<u32> = match direction {
        Direction::Token(t) => vec![t],
        Direction::Diff(a, b) => vec![a, b],
    };
    super::check_tokens(fm, &tokens)?;
    let unembed = Unembedder::new(fm)?;
    let layers = fm.model().info().decoder_layers.clone();
    let family = fm.model().info().model_type.clone();
    let attns = attention_sites(fm)?;
    let mlps = mlp_sites(fm)?;
    let w_o = attns
        .iter()
        .map(|a| output_projection(fm, a))
        .collect::<Result<Vec<_>>>()?;
    let (first, last) = match (layers.first(), layers.last()) {
        (Some(f), Some(l)) => (f.clone(), l.clone()),
        _ => return Err(Error::msg("the model has no decoder layers")),
    };
    let mut keys = vec![format!("input.{first}"), last.clone()];
    let mut hooks = vec![
        HookFunction::pre(first.as_str()),
        HookFunction::new(last.as_str()),
    ];
    for (a, m) in attns.iter().zip(&mlps) {
        keys.extend([format!("{a}.hook_head_out"), a.clone(), m.clone()]);
        hooks.extend([
            HookFunction::new(format!("{a}.hook_head_out")),
            HookFunction::new(a.as_str()),
            HookFunction::new(m.as_str()),
        ]);
    }
    let (_, captures) = run_with(fm, input, hooks, &keys)?;
    let Some(unembed) = unembed else {
        return Ok(None);
    };
    let rows = unembed.directions(&tokens)?;
    let dir = match direction {
        Direction::Token(_) => rows.get(0)?,
        Direction::Diff(..) => (rows.get(0)? - rows.get(1)?)?,
    };
    // Everything at the last position: [batch, ...].
    let mut at_last = captures
        .into_iter()
        .zip(&keys)
        .map(|(c, k)| {
            let c = expect(c, k)?;
            Ok(c.narrow(1, c.dim(1)? - 1, 1)?.squeeze(1)?)
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter();
    let mut next = || at_last.next().ok_or_else(|| Error::msg("missing capture"));
    let embed = next()?;
    let resid = next()?;
    let scale = unembed.scale(&resid)?; // [batch, 1]
    let direction_of = |x: &Tensor| -> Result<Tensor> {
        // [batch, (n,) hidden] → [batch, (n)]: the frozen norm's linear part, then the head row.
        let y = unembed.linear(x)?;
        let y = y.broadcast_mul(&dir)?.sum(D::Minus1)?;
        let scale = if y.rank() == 2 {
            scale.clone()
        } else {
            scale.squeeze(1)?
        };
        Ok(y.broadcast_div(&scale)?)
    };
    let mut components = vec!["embed".to_string()];
    let mut values = vec![direction_of(&embed)?.unsqueeze(1)?];
    let mut sum = embed;
    for ((attn, mlp), (w, b)) in attns.iter().zip(&mlps).zip(&w_o) {
        let heads_out = next()?; // [batch, heads, head_dim]
        let attn_out = next()?; // [batch, hidden]
        let mlp_out = next()?;
        let (batch, heads, head_dim) = heads_out.dims3()?;
        // Head h's output in the residual: head_out[h] @ W_O[:, h*d..(h+1)*d]^T.
        let w = w.reshape((w.dim(0)?, heads, head_dim))?; // [hidden, heads, head_dim]
        let per_head = heads_out
            .unsqueeze(1)?
            .broadcast_mul(&w.unsqueeze(0)?)?
            .sum(D::Minus1)?
            .transpose(1, 2)?; // [batch, heads, hidden]
        let mut from_heads = per_head.sum(1)?;
        if let Some(b) = b {
            from_heads = from_heads.broadcast_add(b)?;
        }
        check_close(
            &from_heads,
            &attn_out,
            &format!("the heads of {attn}"),
            &family,
        )?;
        values.push(direction_of(&per_head)?);
        components.extend((0..heads).map(|h| format!("{attn}.head.{h}")));
        if let Some(b) = b {
            let b = b.unsqueeze(0)?.broadcast_as((batch, b.dim(0)?))?;
            values.push(direction_of(&b.contiguous()?)?.unsqueeze(1)?);
            components.push(format!("{attn}.bias"));
        }
        values.push(direction_of(&mlp_out)?.unsqueeze(1)?);
        components.push(mlp.clone());
        sum = ((sum + attn_out)? + mlp_out)?;
    }
    check_close(
        &sum,
        &resid,
        "the embeddings and every attention and MLP output",
        &family,
    )?;
    let bias = unembed.bias()?;
    let bias = match direction {
        Direction::Token(t) => bias.get(t as usize)?,
        Direction::Diff(a, b) => (bias.get(a as usize)? - bias.get(b as usize)?)?,
    };
    let values = Tensor::cat(&values, 1)?;
    let batch = values.dim(0)?;
    let bias = bias.broadcast_as(batch)?.contiguous()?;
    let logit = (direction_of(&resid)? + &bias)?;
    Ok(Some(Attribution {
        components,
        values,
        bias,
        logit,
    }))
}

/// The output projection of attention module `attn` as `[hidden, heads * head_dim]` and its
/// bias: `o_proj` (Llama-shaped decoders), `dense` (GPT-NeoX, Phi, Falcon) or `c_proj` (GPT-2's
/// transposed Conv1D).
fn output_projection<M: Model>(fm: &FlexModel<M>, attn: &str) -> Result<(Tensor, Option<Tensor>)> {
    let params = fm.model().parameters();
    for (name, transposed) in [("o_proj", false), ("dense", false), ("c_proj", true)] {
        let weight = format!("{attn}.{name}.weight");
        if params.get(&weight).is_none() {
            continue;
        }
        let w = super::host_f32(fm.parameter(&weight)?)?;
        let w = if transposed { w.t()?.contiguous()? } else { w };
        let bias = format!("{attn}.{name}.bias");
        let b = match params.get(&bias) {
            Some(_) => Some(super::host_f32(fm.parameter(&bias)?)?),
            None => None,
        };
        return Ok((w, b));
    }
    Err(Error::msg(format!(
        "no output projection found under {attn} (looked for o_proj, dense, c_proj); per-head \
         attribution needs it"
    )))
}

/// Fails unless `parts` sums to `whole` (relative to its size): the decomposition the
/// attribution rests on.
fn check_close(parts: &Tensor, whole: &Tensor, what: &str, family: &str) -> Result<()> {
    let err = (parts - whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let size = whole.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
    if err > 1e-3 * size {
        return Err(Error::msg(format!(
            "{what} do not add up to the residual stream (off by {err:.3e}): {family} layers are \
             not a plain sum of attention and MLP outputs (norms after the blocks?), so direct \
             logit attribution is not defined for them"
        )));
    }
    Ok(())
}
