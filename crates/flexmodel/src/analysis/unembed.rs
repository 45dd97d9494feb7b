//! The final norm and head, on the host, applied to any residual stream.

use candle_core::{D, Tensor};

use super::host_f32;
use crate::{Error, FinalNorm, FlexModel, Model, Result, Unembed};

/// The model's final norm and head, gathered from any layout onto rank 0's host in f32.
/// Decodes any residual stream (`[..., hidden]`) into logits, and splits the final norm into
/// its scale and its linear part for attributions.
pub struct Unembedder {
    kind: NormKind,
    /// The norm's weight (with Gemma's offset added), `[hidden]`.
    weight: Tensor,
    /// The norm's bias, `[hidden]`.
    norm_bias: Option<Tensor>,
    /// The head, `[vocab, hidden]`.
    head: Tensor,
    head_bias: Option<Tensor>,
    softcap: Option<f64>,
}

#[derive(Clone, Copy)]
enum NormKind {
    Rms { eps: f64 },
    Layer { eps: f64 },
}

impl Unembedder {
    /// Gathers the final norm and head of `fm`'s model. Every rank calls it; rank 0 gets them,
    /// other ranks `None`.
    ///
    /// # Errors
    /// A family that does not describe its unembedding (OPT), a communication error.
    pub fn new<M: Model>(fm: &FlexModel<M>) -> Result<Option<Self>> {
        let info = fm.model().info();
        let Some(u) = info.unembed.clone() else {
            return Err(Error::msg(format!(
                "{} models do not describe their final norm and head, which the logit lens and \
                 direct logit attribution need; use a decoder family such as llama, gpt2 or \
                 gpt_neox",
                info.model_type
            )));
        };
        let Unembed {
            norm,
            head_weight,
            head_bias,
            softcap,
            ..
        } = u;
        let param = |name: &str| -> Result<Tensor> { host_f32(fm.parameter(name)?) };
        let (kind, weight, norm_bias) = match norm {
            FinalNorm::Rms {
                weight,
                eps,
                offset,
            } => (NormKind::Rms { eps }, (param(&weight)? + offset)?, None),
            FinalNorm::Layer { weight, bias, eps } => (
                NormKind::Layer { eps },
                param(&weight)?,
                bias.as_deref().map(param).transpose()?,
            ),
        };
        let head = param(&head_weight)?;
        let head_bias = head_bias.as_deref().map(param).transpose()?;
        Ok(fm.model().grid().is_root().then_some(Self {
            kind,
            weight,
            norm_bias,
            head,
            head_bias,
            softcap,
        }))
    }

    /// Logits of a residual stream `[..., hidden]` → `[..., vocab]`, as the model's head
    /// computes them from its last residual (the soft cap included).
    pub fn logits(&self, resid: &Tensor) -> Result<Tensor> {
        let scale = self.scale(resid)?;
        let x = self.linear(resid)?.broadcast_div(&scale)?;
        let x = match &self.norm_bias {
            Some(b) => x.broadcast_add(b)?,
            None => x,
        };
        let logits = self.project(&x)?;
        Ok(match self.softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }

    /// The head without the soft cap: `x @ W_U^T + b_U`.
    pub(crate) fn project(&self, x: &Tensor) -> Result<Tensor> {
        let out = x.broadcast_matmul(&self.head.t()?)?;
        Ok(match &self.head_bias {
            Some(b) => out.broadcast_add(b)?,
            None => out,
        })
    }

    /// The norm's scale of each residual vector, `[..., 1]`: the root mean square (RMS norm)
    /// or the standard deviation (layer norm), `eps` included.
    pub fn scale(&self, resid: &Tensor) -> Result<Tensor> {
        Ok(match self.kind {
            NormKind::Rms { eps } => (resid.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?,
            NormKind::Layer { eps } => {
                let centered = resid.broadcast_sub(&resid.mean_keepdim(D::Minus1)?)?;
                (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?
            }
        })
    }

    /// The norm's linear part, before the division by the scale: the weight times `x`
    /// (centered first for a layer norm). Linear in `x`, so it splits over a sum of components.
    pub fn linear(&self, x: &Tensor) -> Result<Tensor> {
        let x = match self.kind {
            NormKind::Rms { .. } => x.clone(),
            NormKind::Layer { .. } => x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?,
        };
        Ok(x.broadcast_mul(&self.weight)?)
    }

    /// The part of every logit that does not depend on the residual: the norm's bias through
    /// the head, plus the head's bias, `[vocab]`.
    pub fn bias(&self) -> Result<Tensor> {
        let vocab = self.head.dim(0)?;
        let from_norm = match &self.norm_bias {
            Some(b) => b.unsqueeze(0)?.matmul(&self.head.t()?)?.squeeze(0)?,
            None => Tensor::zeros(vocab, self.head.dtype(), self.head.device())?,
        };
        Ok(match &self.head_bias {
            Some(b) => (from_norm + b)?,
            None => from_norm,
        })
    }

    /// The head's rows for `tokens`, `[tokens, hidden]` (unembedding directions).
    pub fn directions(&self, tokens: &[u32]) -> Result<Tensor> {
        let vocab = self.head.dim(0)?;
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::msg(format!(
                "token id {t} is outside the vocabulary (0..{vocab})"
            )));
        }
        let ids = Tensor::new(tokens, self.head.device())?;
        Ok(self.head.index_select(&ids, 0)?)
    }

    /// Whether the logits pass through a soft cap (attributions are of the logits before it).
    pub fn softcap(&self) -> Option<f64> {
        self.softcap
    }
}
