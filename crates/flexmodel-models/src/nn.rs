//! Layers that fire their own site: linear, embedding, norms, activations.
//!
//! Normalisation and softmax use candle's fused kernels when no gradient is being tracked
//! and composed ops otherwise: the fused kernels have no backward and would cut gradients
//! silently (FACTS.md).

use candle_core::{D, DType, Tensor};
use flexmodel_core::{Dim, Layout, Run, SiteId};

use crate::FwdResult;
use crate::error::{Error, Result};
use crate::kernels;
use crate::weights::Vb;

/// Leading dims of a per-token activation.
pub(crate) const BS: &[Dim] = &[Dim::Batch, Dim::Seq];
/// Leading dim of an activation on flattened tokens (OPT's MLP).
pub(crate) const TOKENS: &[Dim] = &[Dim::Tokens];

/// `lead` followed by `n`.
pub(crate) fn shape(lead: &[Dim], n: usize) -> Vec<Dim> {
    let mut s = lead.to_vec();
    s.push(Dim::Size(n));
    s
}

type CResult<T> = candle_core::Result<T>;

/// A linear layer, `x @ W^T + b`, whose output is a site.
pub(crate) struct Linear {
    /// The weight as `[in, out]`: a transposed view of a Hugging Face `Linear` weight, or a
    /// GPT-2 `Conv1D` weight as stored.
    wt: Tensor,
    bias: Option<Tensor>,
    site: SiteId,
}

impl Linear {
    /// A Hugging Face `nn.Linear(d_in, d_out)` (weight `[out, in]`).
    pub(crate) fn new(
        vb: Vb,
        (d_in, d_out): (usize, usize),
        bias: bool,
        lead: &[Dim],
        layout: Layout,
    ) -> Result<Self> {
        let wt = vb.get("weight", (d_out, d_in))?.t()?;
        Self::with_weight(vb, wt, bias, lead, layout)
    }

    /// A GPT-2 `Conv1D(d_out, d_in)` (weight `[in, out]`).
    pub(crate) fn conv1d(
        vb: Vb,
        (d_in, d_out): (usize, usize),
        lead: &[Dim],
        layout: Layout,
    ) -> Result<Self> {
        let wt = vb.get("weight", (d_in, d_out))?;
        Self::with_weight(vb, wt, true, lead, layout)
    }

    /// The output head (`lm_head`): the embedding's weight when `tied`, else its own
    /// `[vocab, in]` weight. Split over ranks by vocabulary.
    pub(crate) fn head(vb: Vb, embed: &Embedding, tied: bool, bias: bool) -> Result<Self> {
        let (vocab, d_in) = embed.weight.dims2()?;
        let layout = Layout::split_last(3, vocab);
        if tied {
            vb.record("weight", &embed.weight);
            Self::with_weight(vb, embed.weight.t()?, bias, BS, layout)
        } else {
            Self::new(vb, (d_in, vocab), bias, BS, layout)
        }
    }

    fn with_weight(vb: Vb, wt: Tensor, bias: bool, lead: &[Dim], layout: Layout) -> Result<Self> {
        let d_out = wt.dim(1)?;
        let bias = if bias {
            Some(vb.get("bias", d_out)?)
        } else {
            None
        };
        let site = vb.site(shape(lead, d_out), layout)?;
        Ok(Self { wt, bias, site })
    }

    /// # Shapes
    /// `x`: `[..., in]` → `[..., out]`.
    pub(crate) fn forward(&self, x: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = run.input(self.site, x)?;
        let y = self.apply(&x)?;
        run.site(self.site, y)
    }

    /// Whether the few-rows kernel applies: a decode step's handful of rows on the CPU, f32,
    /// no gradient, and a weight stored `[out, in]`.
    fn skinny(&self, x: &Tensor) -> bool {
        x.dim(0).is_ok_and(|rows| rows <= kernels::MAX_ROWS)
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.wt.dtype() == DType::F32
            && !x.track_op()
            && !self.wt.track_op()
            && self.wt.t().is_ok_and(|w| w.is_contiguous())
    }

    fn apply(&self, x: &Tensor) -> CResult<Tensor> {
        let (d_in, d_out) = self.wt.dims2()?;
        let mut out_dims = x.dims().to_vec();
        let rows = x.elem_count() / d_in;
        if let Some(last) = out_dims.last_mut() {
            *last = d_out;
        }
        let x = x.reshape((rows, d_in))?;
        let y = if self.skinny(&x) {
            kernels::skinny_matmul(&x.contiguous()?, &self.wt.t()?)?
        } else {
            x.matmul(&self.wt)?
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        y.reshape(out_dims)
    }
}

/// A token embedding table whose output is a site.
pub(crate) struct Embedding {
    weight: Tensor,
    /// Gemma multiplies embeddings by `sqrt(hidden)`.
    scale: Option<f64>,
    site: SiteId,
}

impl Embedding {
    pub(crate) fn new(vb: Vb, rows: usize, dim: usize, layout: Layout) -> Result<Self> {
        Self::with_lead(vb, rows, dim, BS, layout)
    }

    /// An embedding whose site has other leading dims (position embeddings: `PosBatch`).
    pub(crate) fn with_lead(
        vb: Vb,
        rows: usize,
        dim: usize,
        lead: &[Dim],
        layout: Layout,
    ) -> Result<Self> {
        let weight = vb.get("weight", (rows, dim))?;
        let site = vb.site(shape(lead, dim), layout)?;
        Ok(Self {
            weight,
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
        let dim = self.weight.dim(1)?;
        let mut x = self
            .weight
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, s, dim))?;
        if let Some(scale) = self.scale {
            let scale = Tensor::new(scale as f32, x.device())?.to_dtype(x.dtype())?;
            x = x.broadcast_mul(&scale)?;
        }
        run.site(self.site, x)
    }

    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// RMS normalisation, Llama style (`w * x / rms(x)`) or Gemma style (`(1 + w) * ...`),
/// computed in f32 like transformers.
pub(crate) struct RmsNorm {
    /// Effective scale, f32 (`1 + w` for Gemma).
    scale: Tensor,
    eps: f64,
    site: SiteId,
}

impl RmsNorm {
    pub(crate) fn new(vb: Vb, dim: usize, eps: f64, lead: &[Dim]) -> Result<Self> {
        let scale = vb.get_f32("weight", dim)?;
        Self::with_scale(vb, scale, eps, lead)
    }

    /// Gemma's norm: the stored weight is an offset from 1.
    pub(crate) fn gemma(vb: Vb, dim: usize, eps: f64, lead: &[Dim]) -> Result<Self> {
        let scale = (vb.get_f32("weight", dim)? + 1.0)?;
        Self::with_scale(vb, scale, eps, lead)
    }

    fn with_scale(vb: Vb, scale: Tensor, eps: f64, lead: &[Dim]) -> Result<Self> {
        let site = vb.site(shape(lead, scale.dim(0)?), Layout::Replicated)?;
        Ok(Self { scale, eps, site })
    }

    pub(crate) fn forward(&self, x: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = run.input(self.site, x)?;
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let y = if x32.track_op() || self.scale.track_op() {
            let rms = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
            x32.broadcast_div(&rms)?.broadcast_mul(&self.scale)?
        } else {
            candle_nn::ops::rms_norm(&x32.contiguous()?, &self.scale, self.eps as f32)?
        };
        run.site(self.site, y.to_dtype(dtype)?)
    }
}

/// Layer normalisation, computed in f32, with optional affine parameters.
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
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
                Tensor::ones(dim, DType::F32, &device)?,
                Tensor::zeros(dim, DType::F32, &device)?,
            )
        };
        let site = vb.site(shape(lead, dim), layout)?;
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
        let y = if x32.track_op() || self.weight.track_op() || self.bias.track_op() {
            let mean = x32.mean_keepdim(D::Minus1)?;
            let centered = x32.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
            let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
            normed
                .broadcast_mul(&self.weight)?
                .broadcast_add(&self.bias)?
        } else {
            candle_nn::ops::layer_norm(
                &x32.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            )?
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
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
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
        let site = vb.site(shape(lead, dim), layout)?;
        Ok(Self { act, site })
    }

    pub(crate) fn forward(&self, x: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = run.input(self.site, x)?;
        let y = self.act.apply(&x)?;
        run.site(self.site, y)
    }
}

/// A module that is the identity at inference (`Dropout`), kept as a site because
/// transformers lists and calls it.
pub(crate) struct Identity {
    site: SiteId,
}

impl Identity {
    pub(crate) fn new(vb: Vb, lead: &[Dim], dim: usize) -> Result<Self> {
        let site = vb.site(shape(lead, dim), Layout::Replicated)?;
        Ok(Self { site })
    }

    pub(crate) fn forward(&self, x: Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = run.input(self.site, &x)?;
        run.site(self.site, x)
    }
}
