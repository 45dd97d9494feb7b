//! Layers that fire their own site: linear, embedding, norms, activations.
//!
//! Normalisation and softmax use candle's fused kernels when no gradient is being tracked
//! and composed ops otherwise: the fused kernels have no backward and would cut gradients
//! silently (FACTS.md).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, D, DType, Layout as CLayout, Shape, Tensor};
use flexmodel_core::layout::{Part, block};
use flexmodel_core::{Comm, Dim, Layout, Run, SiteId};

use crate::FwdResult;
use crate::error::{Error, Result};
use crate::kernels;
use crate::stream::Param;
use crate::weights::Vb;

/// Leading dims of a per-token activation.
pub(crate) const BS: &[Dim] = &[Dim::Batch, Dim::Seq];
/// Leading dim of an activation on flattened tokens (OPT's MLP).
pub(crate) const TOKENS: &[Dim] = &[Dim::Tokens];

/// `lead` followed by `n`.
pub(crate) fn shape_of(lead: &[Dim], n: usize) -> Vec<Dim> {
    let mut s = lead.to_vec();
    s.push(Dim::Size(n));
    s
}

type CResult<T> = candle_core::Result<T>;

/// How a linear layer is split over tensor-parallel ranks (Megatron style).
#[derive(Clone, Debug)]
pub(crate) enum Parallel {
    /// Output columns split in `units` blocks (heads, or single columns): the output is split.
    Column(usize),
    /// A fused projection: the output is a concatenation of parts, each split or replicated.
    Fused(Vec<Part>),
    /// Input columns split in `units` blocks: each rank computes a partial sum that an
    /// all-reduce completes; the output is replicated.
    Row(usize),
    /// Every rank holds the whole weight.
    Replicated,
}

impl Parallel {
    /// The layout of the output, of `rank` dimensions.
    fn layout(&self, rank: usize) -> Layout {
        match self {
            Parallel::Column(units) => Layout::split_last(rank, *units),
            Parallel::Fused(parts) => Layout::Fused {
                dim: rank - 1,
                parts: parts.clone(),
            },
            Parallel::Row(_) | Parallel::Replicated => Layout::Replicated,
        }
    }
}

/// A linear layer, `x @ W^T + b`, whose output is a site.
pub(crate) struct Linear {
    /// The weight as `[in, out]` (this rank's block): a transposed view of a Hugging Face
    /// `Linear` weight, or a GPT-2 `Conv1D` weight as stored.
    wt: Param,
    bias: Option<Param>,
    /// Row-parallel: the group whose partial sums make the output.
    reduce: Option<Arc<dyn Comm>>,
    /// Column-parallel under gradients: the group that sums the input's gradient.
    copy: Option<Arc<dyn Comm>>,
    site: SiteId,
}

impl Linear {
    /// A Hugging Face `nn.Linear(d_in, d_out)` (weight `[out, in]`).
    pub(crate) fn new(
        vb: Vb,
        dims: (usize, usize),
        bias: bool,
        lead: &[Dim],
        parallel: Parallel,
    ) -> Result<Self> {
        Self::load(vb, dims, bias, lead, parallel, false)
    }

    /// A GPT-2 `Conv1D(d_out, d_in)` (weight `[in, out]`, always with a bias).
    pub(crate) fn conv1d(
        vb: Vb,
        dims: (usize, usize),
        lead: &[Dim],
        parallel: Parallel,
    ) -> Result<Self> {
        Self::load(vb, dims, true, lead, parallel, true)
    }

    fn load(
        vb: Vb,
        (d_in, d_out): (usize, usize),
        bias: bool,
        lead: &[Dim],
        parallel: Parallel,
        in_out: bool,
    ) -> Result<Self> {
        // Dimension of the stored weight that holds the outputs, and the one for the inputs.
        let (shape, out_dim, in_dim) = if in_out {
            ((d_in, d_out), 1, 0)
        } else {
            ((d_out, d_in), 0, 1)
        };
        let w = match &parallel {
            Parallel::Column(units) => vb.get_split("weight", shape, out_dim, *units)?,
            Parallel::Fused(parts) => vb.get_parts("weight", shape, out_dim, parts)?,
            Parallel::Row(units) => vb.get_split("weight", shape, in_dim, *units)?,
            Parallel::Replicated => vb.get("weight", shape)?,
        };
        let wt = if in_out { w } else { w.map(|w| w.t())? };
        let bias = match (bias, &parallel) {
            (false, _) => None,
            (true, Parallel::Column(units)) => Some(vb.get_split("bias", d_out, 0, *units)?),
            (true, Parallel::Fused(parts)) => Some(vb.get_parts("bias", d_out, 0, parts)?),
            (true, Parallel::Row(_) | Parallel::Replicated) => Some(vb.get("bias", d_out)?),
        };
        let tp = &vb.shard().tp;
        let split = tp.size() > 1;
        let reduce = (split && matches!(parallel, Parallel::Row(_))).then(|| tp.clone());
        let copy = (split && matches!(parallel, Parallel::Column(_) | Parallel::Fused(_)))
            .then(|| tp.clone());
        let site = vb.site(shape_of(lead, d_out), parallel.layout(lead.len() + 1))?;
        Ok(Self {
            wt,
            bias,
            reduce,
            copy,
            site,
        })
    }

    /// The output head (`lm_head`), split over ranks by vocabulary: the embedding's weight when
    /// `tied` (this rank's rows of it), else its own `[vocab, in]` weight.
    pub(crate) fn head(vb: Vb, embed: &Embedding, tied: bool, bias: bool) -> Result<Self> {
        let (vocab, d_in) = (embed.vocab, embed.weight.stored_dims()[1]);
        if !tied {
            return Self::new(
                vb.by_rows(),
                (d_in, vocab),
                bias,
                BS,
                Parallel::Column(vocab),
            );
        }
        let rows = Layout::Split {
            dim: 0,
            units: vocab,
        };
        vb.record("weight", &embed.weight, rows);
        let bias = if bias {
            Some(vb.get_split("bias", vocab, 0, vocab)?)
        } else {
            None
        };
        let tp = &vb.shard().tp;
        let copy = (tp.size() > 1).then(|| tp.clone());
        let site = vb.site(shape_of(BS, vocab), Layout::split_last(3, vocab))?;
        Ok(Self {
            wt: embed.weight.clone().map(|w| w.t())?,
            bias,
            reduce: None,
            copy,
            site,
        })
    }

    /// # Shapes
    /// `x`: `[..., in]` → `[..., out]` (this rank's block of `out` when column-parallel).
    pub(crate) fn forward(&self, x: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let mut x = run.input(self.site, x)?;
        if let (Some(tp), true) = (&self.copy, x.track_op()) {
            // The input is replicated: its gradient is the sum of every rank's.
            x = tp_copy(&x, tp)?;
        }
        // One product, but by blocks of the output's columns for a head kept by rows (FSDP).
        let mut blocks = Vec::with_capacity(1);
        self.wt.blocks(|_, wt| {
            blocks.push(self.apply(&x, &wt)?);
            Ok(())
        })?;
        let mut y = match blocks.len() {
            1 => blocks.remove(0),
            _ => Tensor::cat(&blocks, D::Minus1)?,
        };
        if let Some(tp) = &self.reduce {
            y = all_reduce(&y, tp.as_ref())?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.get()?)?;
        }
        run.site(self.site, y)
    }

    /// Whether the few-rows kernel applies: a decode step's handful of rows on the CPU, f32,
    /// no gradient, and a weight stored `[out, in]`.
    fn skinny(x: &Tensor, wt: &Tensor) -> bool {
        x.dim(0).is_ok_and(|rows| rows <= kernels::MAX_ROWS)
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && wt.dtype() == DType::F32
            && !x.track_op()
            && !wt.track_op()
            && wt.t().is_ok_and(|w| w.is_contiguous())
    }

    /// `x @ wt` (the weight as `[in, out]`), without the bias.
    fn apply(&self, x: &Tensor, wt: &Tensor) -> CResult<Tensor> {
        let (d_in, d_out) = wt.dims2()?;
        let mut out_dims = x.dims().to_vec();
        let rows = x.elem_count() / d_in;
        if let Some(last) = out_dims.last_mut() {
            *last = d_out;
        }
        let x = x.reshape((rows, d_in))?;
        let y = if Self::skinny(&x, wt) {
            kernels::skinny_matmul(&x.contiguous()?, &wt.t()?)?
        } else {
            x.matmul(wt)?
        };
        y.reshape(out_dims)
    }
}

/// The sum of every tensor-parallel rank's `y`, on every rank; the gradient passes through
/// unchanged (each rank's output is the same tensor). Megatron's `g`.
pub(crate) fn all_reduce(y: &Tensor, tp: &dyn Comm) -> FwdResult<Tensor> {
    let summed = tp.all_reduce_sum(&y.detach())?;
    if y.track_op() {
        // The value of the sum, the gradient of the identity.
        Ok((y + (summed - y)?.detach())?)
    } else {
        Ok(summed)
    }
}

/// The identity, whose gradient is summed over the tensor-parallel ranks. Megatron's `f`.
pub(crate) fn tp_copy(x: &Tensor, tp: &Arc<dyn Comm>) -> CResult<Tensor> {
    x.apply_op1_arc(Arc::new(Box::new(TpCopy(tp.clone()))))
}

struct TpCopy(Arc<dyn Comm>);

impl CustomOp1 for TpCopy {
    fn name(&self) -> &'static str {
        "flexmodel-tp-copy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &CLayout) -> CResult<(CpuStorage, Shape)> {
        flexmodel_core::copy_of(storage, layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &CLayout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        flexmodel_core::copy_of(storage, layout)
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let summed = self
            .0
            .all_reduce_sum(grad)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(Some(summed))
    }
}

/// A token embedding table whose output is a site. Under tensor parallelism each rank holds
/// a block of the vocabulary's rows and the lookups are summed (vocabulary-parallel).
pub(crate) struct Embedding {
    /// This rank's rows.
    weight: Param,
    /// Rows of the whole table.
    vocab: usize,
    /// First row this rank holds, when the table is split.
    split: Option<(usize, Arc<dyn Comm>)>,
    /// Gemma multiplies embeddings by `sqrt(hidden)`.
    scale: Option<f64>,
    site: SiteId,
}

impl Embedding {
    /// A token embedding, split over tensor-parallel ranks by vocabulary.
    pub(crate) fn new(vb: Vb, rows: usize, dim: usize) -> Result<Self> {
        let tp = vb.shard().tp.clone();
        let weight = vb.by_rows().get_split("weight", (rows, dim), 0, rows)?;
        let split =
            (tp.size() > 1).then(|| (block(rows, rows, tp.rank(), tp.size()).map(|b| b.0), tp));
        let split = match split {
            Some((start, tp)) => Some((start?, tp)),
            None => None,
        };
        let site = vb.site(shape_of(BS, dim), Layout::Replicated)?;
        Ok(Self {
            weight,
            vocab: rows,
            split,
            scale: None,
            site,
        })
    }

    /// A table every rank holds whole (position embeddings), whose site has other leading dims
    /// (`PosBatch`, or `Batch` for OPT).
    pub(crate) fn replicated(vb: Vb, rows: usize, dim: usize, lead: &[Dim]) -> Result<Self> {
        let weight = vb.get("weight", (rows, dim))?;
        let site = vb.site(shape_of(lead, dim), Layout::Replicated)?;
        Ok(Self {
            weight,
            vocab: rows,
            split: None,
            scale: None,
            site,
        })
    }

    /// An embedding whose output is multiplied by `scale` (Gemma's `sqrt(hidden)`), rounded to
    /// the compute dtype first as transformers does.
    pub(crate) fn scaled(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// # Shapes
    /// `ids`: `[b, s]` → `[b, s, dim]`.
    pub(crate) fn forward(&self, ids: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let ids = run.input(self.site, ids)?;
        let (b, s) = ids.dims2()?;
        let ids = ids.flatten_all()?;
        let tp_start = self.split.as_ref().map_or(0, |(start, _)| *start);
        // The table in blocks of rows (one, but the group's under FSDP), each looking up the
        // ids it holds.
        let mut x: Option<Tensor> = None;
        self.weight.blocks(|first, block| {
            let part = lookup(&ids, &block, tp_start + first, self.vocab)?;
            x = Some(match x.take() {
                Some(x) => (x + part)?,
                None => part,
            });
            Ok(())
        })?;
        let mut x = x.ok_or_else(|| flexmodel_core::Error::msg("an embedding with no rows"))?;
        if let Some((_, tp)) = &self.split {
            // Each rank looked up the rows it holds: the sum holds every row once.
            x = all_reduce(&x, tp.as_ref())?;
        }
        let dim = x.dim(1)?;
        x = x.reshape((b, s, dim))?;
        if let Some(scale) = self.scale {
            let scale = Tensor::new(scale as f32, x.device())?.to_dtype(x.dtype())?;
            x = x.broadcast_mul(&scale)?;
        }
        run.site(self.site, x)
    }
}

/// The rows of `table` for `ids`, where `table` holds rows `first..` of a table of `vocab`
/// rows; an id outside them looks up its first row, zeroed.
fn lookup(ids: &Tensor, table: &Tensor, first: usize, vocab: usize) -> CResult<Tensor> {
    let rows = table.dim(0)?;
    if first == 0 && rows == vocab {
        return table.index_select(ids, 0);
    }
    let local = ids.to_dtype(DType::I64)?.affine(1.0, -(first as f64))?;
    let inside = local.ge(0i64)?.mul(&local.lt(rows as i64)?)?;
    let safe = inside.where_cond(&local, &local.zeros_like()?)?;
    let found = table.index_select(&safe, 0)?;
    let keep = inside.to_dtype(found.dtype())?.unsqueeze(1)?;
    found.broadcast_mul(&keep)
}

/// RMS normalisation, Llama style (`w * x / rms(x)`) or Gemma style (`(1 + w) * ...`),
/// computed in f32 like transformers.
pub(crate) struct RmsNorm {
    /// Effective scale, f32 (`1 + w` for Gemma): this rank's block when the input is split.
    scale: Param,
    eps: f64,
    /// The input's last dimension is split over these ranks (OLMo 2's q/k norm over a whole
    /// projection): the mean of squares is summed over them, of `.1` features in all.
    split: Option<(Arc<dyn Comm>, usize)>,
    site: SiteId,
}

/// Where an [`RmsNorm`]'s weight is applied: `w` or Gemma's `1 + w`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum RmsKind {
    Plain,
    Gemma,
}

impl RmsNorm {
    /// A norm over the whole last dimension of a per-token activation.
    pub(crate) fn of_kind(
        vb: Vb,
        kind: RmsKind,
        dim: usize,
        eps: f64,
        lead: &[Dim],
    ) -> Result<Self> {
        let scale = Self::scale(kind, vb.get_f32("weight", dim)?)?;
        let site = vb.site(shape_of(lead, dim), Layout::Replicated)?;
        Ok(Self {
            scale,
            eps,
            split: None,
            site,
        })
    }

    /// A norm over each head, `[batch, seq, heads, head_dim]` (Qwen 3's q/k norms) or with
    /// `heads_first` `[batch, heads, seq, head_dim]` (Gemma 3's), split over ranks by head.
    pub(crate) fn per_head(
        vb: Vb,
        kind: RmsKind,
        heads: usize,
        head_dim: usize,
        eps: f64,
        heads_first: bool,
    ) -> Result<Self> {
        let scale = Self::scale(kind, vb.get_f32("weight", head_dim)?)?;
        let (shape, dim) = if heads_first {
            (vec![Dim::Batch, Dim::Size(heads), Dim::Seq], 1)
        } else {
            (vec![Dim::Batch, Dim::Seq, Dim::Size(heads)], 2)
        };
        let layout = Layout::Split { dim, units: heads };
        let site = vb.site(shape_of(&shape, head_dim), layout.clone())?;
        vb.set_input_layout(site, layout);
        Ok(Self {
            scale,
            eps,
            split: None,
            site,
        })
    }

    /// A norm over a whole projection `[batch, seq, heads * head_dim]` whose last dimension
    /// is split over tensor-parallel ranks by head (OLMo 2's q/k norms).
    pub(crate) fn over_heads(vb: Vb, heads: usize, head_dim: usize, eps: f64) -> Result<Self> {
        let dim = heads * head_dim;
        let layout = Layout::split_last(3, heads);
        let weight = vb.get_split("weight", dim, 0, heads)?;
        let scale = weight.map(|w| w.to_dtype(DType::F32))?;
        let site = vb.site(shape_of(BS, dim), layout.clone())?;
        vb.set_input_layout(site, layout);
        let tp = vb.shard().tp.clone();
        let split = (tp.size() > 1).then_some((tp, dim));
        Ok(Self {
            scale,
            eps,
            split,
            site,
        })
    }

    fn scale(kind: RmsKind, weight: Param) -> Result<Param> {
        Ok(match kind {
            RmsKind::Plain => weight,
            RmsKind::Gemma => weight.map(|w| w + 1.0)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = run.input(self.site, x)?;
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let scale = self.scale.get()?;
        let y = match &self.split {
            None if !x32.track_op() && !scale.track_op() => {
                candle_nn::ops::rms_norm(&x32.contiguous()?, &scale, self.eps as f32)?
            }
            split => {
                let mean_sq = match split {
                    // Every rank's sum of squares: the sum's gradient reaches every rank's
                    // features (tp_copy), its value is the total (all_reduce).
                    Some((tp, dim)) => {
                        let sum = all_reduce(&x32.sqr()?.sum_keepdim(D::Minus1)?, tp.as_ref())?;
                        let sum = if sum.track_op() {
                            tp_copy(&sum, tp)?
                        } else {
                            sum
                        };
                        (sum / *dim as f64)?
                    }
                    None => x32.sqr()?.mean_keepdim(D::Minus1)?,
                };
                let rms = (mean_sq + self.eps)?.sqrt()?;
                x32.broadcast_div(&rms)?.broadcast_mul(&scale)?
            }
        };
        run.site(self.site, y.to_dtype(dtype)?)
    }
}

/// Layer normalisation, computed in f32, with optional affine parameters.
pub(crate) struct LayerNorm {
    weight: Param,
    bias: Param,
    eps: f64,
    site: SiteId,
}

impl LayerNorm {
    /// A `LayerNorm(dim)` with weight and bias.
    pub(crate) fn new(vb: Vb, dim: usize, eps: f64, lead: &[Dim]) -> Result<Self> {
        Self::with_affine(vb, dim, eps, lead, true)
    }

    /// A `LayerNorm(dim)` on a tensor split over ranks by `layout` (per-head norms).
    pub(crate) fn with_layout(
        vb: Vb,
        dim: usize,
        eps: f64,
        lead: &[Dim],
        layout: Layout,
    ) -> Result<Self> {
        Self::build(vb, dim, eps, lead, layout, true)
    }

    /// A `LayerNorm` without weight and bias when `affine` is false (OPT's
    /// `layer_norm_elementwise_affine`).
    pub(crate) fn with_affine(
        vb: Vb,
        dim: usize,
        eps: f64,
        lead: &[Dim],
        affine: bool,
    ) -> Result<Self> {
        Self::build(vb, dim, eps, lead, Layout::Replicated, affine)
    }

    fn build(
        vb: Vb,
        dim: usize,
        eps: f64,
        lead: &[Dim],
        layout: Layout,
        affine: bool,
    ) -> Result<Self> {
        let device = vb.device().clone();
        let (weight, bias) = if affine {
            (vb.get_f32("weight", dim)?, vb.get_f32("bias", dim)?)
        } else {
            (
                Param::Resident(Tensor::ones(dim, DType::F32, &device)?),
                Param::Resident(Tensor::zeros(dim, DType::F32, &device)?),
            )
        };
        let site = vb.site(shape_of(lead, dim), layout)?;
        Ok(Self {
            weight,
            bias,
            eps,
            site,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = run.input(self.site, x)?;
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let (weight, bias) = (self.weight.get()?, self.bias.get()?);
        let y = if x32.track_op() || weight.track_op() || bias.track_op() {
            let mean = x32.mean_keepdim(D::Minus1)?;
            let centered = x32.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
            let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
            normed.broadcast_mul(&weight)?.broadcast_add(&bias)?
        } else {
            candle_nn::ops::layer_norm(&x32.contiguous()?, &weight, &bias, self.eps as f32)?
        };
        run.site(self.site, y.to_dtype(dtype)?)
    }
}

/// The last position of `x` `[batch, seq, hidden]` when only the next token's logits are
/// needed (generation), else `x`.
pub(crate) fn head_input(x: Tensor, run: &Run) -> CResult<Tensor> {
    if run.last_position_only() {
        let seq = x.dim(1)?;
        x.narrow(1, seq - 1, 1)
    } else {
        Ok(x)
    }
}

/// `cap * tanh(x / cap)`: Gemma 2's soft cap of attention scores and logits.
pub(crate) fn softcap(x: &Tensor, cap: f64) -> CResult<Tensor> {
    (x / cap)?.tanh()? * cap
}

/// Softmax over the last dimension (fused unless gradients are tracked).
pub(crate) fn softmax_last_dim(x: &Tensor) -> CResult<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// An activation function, by its transformers name.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Activation {
    Silu,
    /// Exact GELU (`gelu`).
    Gelu,
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// `x * sigmoid(1.702 x)`.
    QuickGelu,
    Relu,
}

impl Activation {
    /// Parses the name found in `config.json` under `option`.
    pub(crate) fn from_name(option: &str, name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            other => {
                return Err(Error::unsupported(
                    option,
                    format!("{other:?}"),
                    "supported activations: silu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, quick_gelu, relu",
                ));
            }
        })
    }

    pub(crate) fn apply(self, x: &Tensor) -> CResult<Tensor> {
        match self {
            Self::Silu => kernels::activation(x, kernels::Fast::Silu),
            Self::Gelu => kernels::activation(x, kernels::Fast::GeluErf),
            Self::GeluTanh => kernels::activation(x, kernels::Fast::GeluTanh),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Relu => x.relu(),
        }
    }
}

/// An activation module (`mlp.act_fn`, ...) whose output is a site.
pub(crate) struct Act {
    act: Activation,
    site: SiteId,
}

impl Act {
    pub(crate) fn new(
        vb: Vb,
        act: Activation,
        lead: &[Dim],
        dim: usize,
        layout: Layout,
    ) -> Result<Self> {
        // Elementwise: the input is split as the output is.
        let site = vb.site(shape_of(lead, dim), layout.clone())?;
        vb.set_input_layout(site, layout);
        Ok(Self { act, site })
    }

    pub(crate) fn forward(&self, x: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = run.input(self.site, x)?;
        let y = self.act.apply(&x)?;
        run.site(self.site, y)
    }
}

/// GPT-NeoX's and Falcon's MLP module names.
pub(crate) const NEOX_MLP: [&str; 3] = ["dense_h_to_4h", "act", "dense_4h_to_h"];

/// A two-layer MLP, `down(act(up(x)))`, whose three modules and itself are sites: Phi's
/// `fc1`, `activation_fn`, `fc2`; GPT-NeoX's and Falcon's `dense_h_to_4h`, `act`,
/// `dense_4h_to_h`. Tensor parallel: `up` by column, `down` by row.
pub(crate) struct PlainMlp {
    up: Linear,
    act: Act,
    down: Linear,
    site: SiteId,
}

impl PlainMlp {
    /// The MLP at `vb`, its modules named `names` (up, activation, down).
    pub(crate) fn new(
        vb: Vb,
        names: [&str; 3],
        (h, inter): (usize, usize),
        bias: bool,
        act: Activation,
    ) -> Result<Self> {
        let site = vb.site(shape_of(BS, h), Layout::Replicated)?;
        let [up, act_name, down] = names;
        Ok(Self {
            up: Linear::new(vb.pp(up), (h, inter), bias, BS, Parallel::Column(inter))?,
            act: Act::new(
                vb.pp(act_name),
                act,
                BS,
                inter,
                Layout::split_last(3, inter),
            )?,
            down: Linear::new(vb.pp(down), (inter, h), bias, BS, Parallel::Row(inter))?,
            site,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = &run.input(self.site, x)?;
        let h = self.up.forward(x, run)?;
        let h = self.act.forward(&h, run)?;
        let out = self.down.forward(&h, run)?;
        run.site(self.site, out)
    }
}

/// A module that is the identity at inference (`Dropout`), kept as a site because
/// transformers lists and calls it.
pub(crate) struct Identity {
    site: SiteId,
}

impl Identity {
    pub(crate) fn new(vb: Vb, lead: &[Dim], dim: usize) -> Result<Self> {
        let site = vb.site(shape_of(lead, dim), Layout::Replicated)?;
        Ok(Self { site })
    }

    pub(crate) fn forward(&self, x: Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = run.input(self.site, &x)?;
        run.site(self.site, x)
    }
}
