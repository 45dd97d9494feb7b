//! Activation patching: from a clean run into a corrupted one, each (layer, position) or each
//! head, exactly (batched forward passes) or by the gradient approximation.

use candle_core::{D, DType, Device, Tensor};

use super::{attention_sites, expect, host_f32, is_root, mlp_sites, run_with};
use crate::{Error, FlexModel, HookCtx, HookFunction, Input, Model, Result};

/// The number a patching experiment watches, from the logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// The logit of `right` minus the logit of `wrong` at the last position, mean over rows.
    LogitDiff {
        /// The token the clean prompt predicts.
        right: u32,
        /// The token the corrupted prompt predicts.
        wrong: u32,
    },
    /// The mean next-token cross-entropy of each row's own tokens (padding excluded).
    Loss,
}

/// Which activations a sweep patches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SweepSite {
    /// Each decoder layer's output (the residual stream after it), per position.
    Resid,
    /// Each attention module's output, per position.
    Attn,
    /// Each MLP's output, per position.
    Mlp,
    /// Each attention head's output (`hook_head_out`), all positions at once.
    Heads,
}

impl SweepSite {
    /// The site patched in each layer.
    fn sites<M: Model>(self, fm: &FlexModel<M>) -> Result<Vec<String>> {
        Ok(match self {
            SweepSite::Resid => fm.model().info().decoder_layers.clone(),
            SweepSite::Attn => attention_sites(fm)?,
            SweepSite::Mlp => mlp_sites(fm)?,
            SweepSite::Heads => attention_sites(fm)?
                .into_iter()
                .map(|a| format!("{a}.hook_head_out"))
                .collect(),
        })
    }
}

/// The result of a sweep: one metric value per cell, `[layers, positions]` (or
/// `[layers, heads]` for [`SweepSite::Heads`]).
#[derive(Clone, Debug)]
pub struct Sweep {
    /// The patched site of each row of the grid.
    pub sites: Vec<String>,
    /// The metric with each cell patched (or its first-order estimate).
    pub values: Tensor,
    /// `(value - corrupted) / (clean - corrupted)`: 1 where the patch restores the clean
    /// metric, 0 where it changes nothing.
    pub normalized: Tensor,
    /// The metric on the clean input.
    pub clean: f32,
    /// The metric on the corrupted input.
    pub corrupted: f32,
}

/// Patches each cell of `site`'s grid from `clean` into `corrupted` (inputs of the same shape)
/// and evaluates `metric`, running `cells_per_pass` patched copies of the corrupted batch in
/// each forward pass. The clean activations are captured once. Every rank calls it; rank 0
/// gets the sweep, other ranks `None`.
///
/// # Errors
/// Inputs of different shapes, `cells_per_pass` of 0, token ids outside the vocabulary, errors
/// of the forward passes.
pub fn patching_sweep<M: Model>(
    fm: &mut FlexModel<M>,
    clean: &Input,
    corrupted: &Input,
    metric: Metric,
    site: SweepSite,
    cells_per_pass: usize,
) -> Result<Option<Sweep>> {
    check_pair(fm, clean, corrupted, metric)?;
    if cells_per_pass == 0 {
        return Err(Error::msg("cells_per_pass must be at least 1"));
    }
    let sites = site.sites(fm)?;
    let hooks = sites
        .iter()
        .map(|s| HookFunction::new(s.as_str()))
        .collect();
    let (batch, seq) = corrupted.dims()?;
    // Every data-parallel rank needs rows: a pass runs at least this many copies of the batch.
    let min_copies = fm.model().grid().dp.size().div_ceil(batch);
    // The clean and the corrupted run in one pass: [clean; corrupted] (repeated).
    let both = repeat_input(&stack_inputs(clean, corrupted)?, min_copies.div_ceil(2))?;
    let (logits, acts) = run_with(fm, &both, hooks, &sites)?;
    let root = is_root(fm);
    let (clean_value, corrupted_value, clean_acts) = if root {
        let groups = 2 * min_copies.div_ceil(2);
        let values = mean_metric(metric, &logits, &both, groups)?;
        let acts = acts
            .into_iter()
            .zip(&sites)
            .map(|(c, s)| Ok(expect(c, s)?.narrow(0, 0, batch)?))
            .collect::<Result<Vec<_>>>()?;
        (values[0], values[1], acts)
    } else {
        (0.0, 0.0, vec![])
    };
    let cols = match site {
        SweepSite::Heads => heads_of(fm, &sites[0])?,
        _ => seq,
    };
    let cells: Vec<(usize, usize)> = (0..sites.len())
        .flat_map(|l| (0..cols).map(move |c| (l, c)))
        .collect();
    let mut values = Vec::with_capacity(cells.len());
    for chunk in cells.chunks(cells_per_pass.max(min_copies)) {
        // the last pass may be padded with copies that patch nothing
        let copies = chunk.len().max(min_copies);
        let input = repeat_input(corrupted, copies)?;
        let mut hooks = Vec::new();
        for (l, name) in sites.iter().enumerate() {
            let mine: Vec<(usize, usize)> = chunk
                .iter()
                .enumerate()
                .filter(|(_, (cl, _))| *cl == l)
                .map(|(k, (_, c))| (k, *c))
                .collect();
            if mine.is_empty() {
                continue;
            }
            // Only rank 0 runs edits; other ranks register the same hooks without data.
            let source = clean_acts.get(l).cloned();
            let patch = Patch {
                cells: mine,
                batch,
                copies,
                heads: site == SweepSite::Heads,
            };
            hooks.push(HookFunction::new(name.as_str()).capture(false).edit(
                move |x: &Tensor, _: &mut HookCtx| match &source {
                    Some(src) => patch.apply(x, src),
                    None => Ok(x.clone()),
                },
            ));
        }
        let (logits, _) = run_with(fm, &input, hooks, &[])?;
        if root {
            let groups = mean_metric(metric, &logits, &input, copies)?;
            values.extend(&groups[..chunk.len()]);
        }
    }
    if !root {
        return Ok(None);
    }
    let rows = sites.len();
    finish(sites, values, (rows, cols), clean_value, corrupted_value)
}

/// The first-order estimate of [`patching_sweep`] (attribution patching): one clean forward
/// pass, one corrupted forward and backward pass; each cell's change of the metric is
/// `(clean - corrupted) · ∂metric/∂activation`, summed over the cell. One process only: the
/// metric's backward pass needs the logits where the loss is (use the exact sweep under a
/// multi-rank layout).
///
/// # Errors
/// As [`patching_sweep`]; a multi-rank model.
pub fn attribution_patching<M: Model>(
    fm: &mut FlexModel<M>,
    clean: &Input,
    corrupted: &Input,
    metric: Metric,
    site: SweepSite,
) -> Result<Sweep> {
    check_pair(fm, clean, corrupted, metric)?;
    if fm.model().grid().is_distributed() {
        return Err(Error::msg(
            "attribution patching runs in one process (its metric's backward pass needs the \
             logits); run patching_sweep under a multi-rank layout",
        ));
    }
    let sites = site.sites(fm)?;
    let hooks = sites
        .iter()
        .map(|s| HookFunction::new(s.as_str()))
        .collect();
    let (clean_logits, clean_acts) = run_with(fm, clean, hooks, &sites)?;
    let clean_value = mean_metric(metric, &clean_logits, clean, 1)?[0];

    let mut handles = Vec::new();
    for s in &sites {
        handles.push(fm.register(HookFunction::new(s.as_str()))?);
        handles.push(fm.register(HookFunction::backward(s.as_str()))?);
    }
    let result = (|| -> Result<f32> {
        let logits = fm.forward_input(corrupted)?;
        let m = metric_tensor(metric, &logits, corrupted)?;
        let value = m.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        fm.backward(&m)?;
        Ok(value)
    })();
    for h in handles {
        fm.remove(h)?;
    }
    let corrupted_value = result?;
    let mut rows = Vec::with_capacity(sites.len());
    for (s, clean) in sites.iter().zip(clean_acts) {
        let clean = expect(clean, s)?;
        let take = |k: String, fm: &mut FlexModel<M>| -> Result<Tensor> {
            let t = fm.take_captures(&k).and_then(|mut v| v.pop());
            host_f32(expect(t, &k)?)
        };
        let corrupt = take(s.clone(), fm)?;
        let grad = take(format!("grad.{s}"), fm)?;
        let product = ((clean - corrupt)? * grad)?; // [batch, seq, ...]
        rows.push(match site {
            // [batch, seq, heads, d] → per head
            SweepSite::Heads => product.sum(D::Minus1)?.sum(1)?.sum(0)?,
            _ => product.flatten_from(2)?.sum(D::Minus1)?.sum(0)?,
        });
    }
    let values = Tensor::stack(&rows, 0)?;
    let values = (values + f64::from(corrupted_value))?;
    let dims = values.dims2()?;
    let sweep = finish(
        sites,
        values.flatten_all()?.to_vec1()?,
        dims,
        clean_value,
        corrupted_value,
    )?;
    sweep.ok_or_else(|| Error::msg("no sweep"))
}

fn finish(
    sites: Vec<String>,
    values: Vec<f32>,
    dims: (usize, usize),
    clean: f32,
    corrupted: f32,
) -> Result<Option<Sweep>> {
    let values = Tensor::from_vec(values, dims, &Device::Cpu)?;
    let normalized = ((&values - f64::from(corrupted))? / f64::from(clean - corrupted))?;
    Ok(Some(Sweep {
        sites,
        values,
        normalized,
        clean,
        corrupted,
    }))
}

/// Which cells of a forward pass's copies patch this site: `(copy, position or head)`.
struct Patch {
    cells: Vec<(usize, usize)>,
    batch: usize,
    copies: usize,
    heads: bool,
}

impl Patch {
    /// `x` (`[copies * batch, seq, ...]`) with each cell's slice replaced by the clean one.
    fn apply(&self, x: &Tensor, clean: &Tensor) -> Result<Tensor> {
        let mut grouped = vec![self.copies, self.batch];
        grouped.extend(&x.dims()[1..]);
        let axis = if self.heads { 3 } else { 2 };
        let cols = grouped[axis];
        let mut mask = vec![0f32; self.copies * cols];
        for &(k, c) in &self.cells {
            mask[k * cols + c] = 1.0;
        }
        let mut shape = vec![1; grouped.len()];
        shape[0] = self.copies;
        shape[axis] = cols;
        let mask = Tensor::from_vec(mask, shape, x.device())?.to_dtype(x.dtype())?;
        let clean = clean
            .to_device(x.device())?
            .to_dtype(x.dtype())?
            .unsqueeze(0)?;
        let patched =
            (x.reshape(grouped)?.broadcast_mul(&(1.0 - &mask)?)? + clean.broadcast_mul(&mask)?)?;
        Ok(patched.reshape(x.dims())?)
    }
}

/// `a` and `b` (of the same shape) as one batch, `a`'s rows first.
fn stack_inputs(a: &Input, b: &Input) -> Result<Input> {
    let ids = Tensor::cat(&[&a.input_ids, &b.input_ids], 0)?;
    Ok(match (&a.attention_mask, &b.attention_mask) {
        (None, None) => Input::new(ids),
        (ma, mb) => {
            let ones = |i: &Input| i.input_ids.ones_like();
            let ma = ma.clone().map_or_else(|| ones(a), Ok)?;
            let mb = mb.clone().map_or_else(|| ones(b), Ok)?;
            Input::with_mask(ids, Tensor::cat(&[&ma, &mb.to_dtype(ma.dtype())?], 0)?)
        }
    })
}

/// The corrupted input repeated `copies` times along the batch.
fn repeat_input(input: &Input, copies: usize) -> Result<Input> {
    let rep = |t: &Tensor| -> Result<Tensor> {
        let v = vec![t.clone(); copies];
        Ok(Tensor::cat(&v, 0)?)
    };
    Ok(match &input.attention_mask {
        Some(mask) => Input::with_mask(rep(&input.input_ids)?, rep(mask)?),
        None => Input::new(rep(&input.input_ids)?),
    })
}

/// The metric of each group of rows (`groups` equal groups, in order), on the host.
fn mean_metric(metric: Metric, logits: &Tensor, input: &Input, groups: usize) -> Result<Vec<f32>> {
    let per_row = per_row_metric(metric, &host_f32(logits.clone())?, input)?; // [rows]
    let rows = per_row.dim(0)?;
    Ok(per_row
        .reshape((groups, rows / groups))?
        .mean(1)?
        .to_vec1()?)
}

/// The metric of each row, `[rows]`, differentiable.
fn per_row_metric(metric: Metric, logits: &Tensor, input: &Input) -> Result<Tensor> {
    let seq = logits.dim(1)?;
    match metric {
        Metric::LogitDiff { right, wrong } => {
            let last = logits.narrow(1, seq - 1, 1)?.squeeze(1)?; // [rows, vocab]
            Ok((last.narrow(D::Minus1, right as usize, 1)?
                - last.narrow(D::Minus1, wrong as usize, 1)?)?
            .squeeze(D::Minus1)?)
        }
        Metric::Loss => {
            let rows = logits.dim(0)?;
            let mut out = Vec::with_capacity(rows);
            for r in 0..rows {
                let row = Input::new(input.input_ids.narrow(0, r, 1)?);
                let row = match &input.attention_mask {
                    Some(m) => Input::with_mask(row.input_ids, m.narrow(0, r, 1)?),
                    None => row,
                };
                out.push(crate::causal_lm_loss(&logits.narrow(0, r, 1)?, &row)?);
            }
            Ok(Tensor::stack(&out, 0)?)
        }
    }
}

/// The metric of the whole batch (the mean over rows), a differentiable scalar.
fn metric_tensor(metric: Metric, logits: &Tensor, input: &Input) -> Result<Tensor> {
    Ok(per_row_metric(metric, logits, input)?.mean_all()?)
}

fn check_pair<M: Model>(
    fm: &FlexModel<M>,
    clean: &Input,
    corrupted: &Input,
    metric: Metric,
) -> Result<()> {
    if clean.dims()? != corrupted.dims()? {
        return Err(Error::msg(format!(
            "clean and corrupted inputs must have the same shape (patching is position by \
             position): got {:?} and {:?}",
            clean.dims()?,
            corrupted.dims()?
        )));
    }
    match metric {
        Metric::LogitDiff { right, wrong } => super::check_tokens(fm, &[right, wrong]),
        Metric::Loss => Ok(()),
    }
}

/// The number of heads of a `hook_head_out` site (`[batch, seq, heads, head_dim]`).
fn heads_of<M: Model>(fm: &FlexModel<M>, site: &str) -> Result<usize> {
    let sites = fm.model().sites();
    let shape = sites.id(site).map(|id| &sites.get(id).shape);
    match shape.map(|s| s.as_slice()) {
        Some([_, _, crate::Dim::Size(n), _]) => Ok(*n),
        _ => Err(Error::msg(format!(
            "{site} is not a [batch, seq, heads, head_dim] site"
        ))),
    }
}
