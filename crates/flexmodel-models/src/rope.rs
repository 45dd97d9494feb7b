//! Rotary position embeddings as transformers computes them: the `default`, `linear`,
//! `dynamic`, `llama3`, `yarn` and `longrope` rope types, partial rotary, `rotate_half`
//! pairing.

use std::f64::consts::PI;

use candle_core::{D, DType, Device, Tensor};
use serde_json::Value;

use flexmodel_core::{Dim, Layout, Run, SiteId};

use crate::FwdResult;
use std::sync::Arc;

use flexmodel_core::Comm;

use crate::Tables;
use crate::attention::Pass;
use crate::config::RawConfig;
use crate::error::{Error, Result};
use crate::nn::tp_copy;
use crate::weights::Vb;

/// How the inverse frequencies are derived.
#[derive(Clone, Debug, PartialEq)]
enum Scaling {
    Default,
    Linear {
        factor: f64,
    },
    Dynamic {
        factor: f64,
        original_max: f64,
    },
    Llama3 {
        factor: f64,
        low: f64,
        high: f64,
        original_max: f64,
    },
    Yarn {
        factor: f64,
        original_max: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
    /// Phi-3's LongRoPE (`su`): per-frequency divisors, the long set once a pass reaches
    /// past the pretrained length.
    LongRope {
        short: Vec<f64>,
        long: Vec<f64>,
        original_max: f64,
        attention_factor: f64,
    },
}

/// Rotary embedding of one model: the rotated width and the frequencies.
#[derive(Clone, Debug)]
pub(crate) struct Rope {
    /// Number of leading features of each head that rotate (`head_dim` times the partial
    /// rotary factor).
    pub(crate) dim: usize,
    theta: f64,
    scaling: Scaling,
    inv_freq: Vec<f64>,
    attention_factor: f64,
}

/// Supported `rope_type` values, for error messages.
const ROPE_TYPES: &str = "default, linear, dynamic, llama3, yarn, longrope";

impl Rope {
    /// Reads the rope settings of `cfg` (5.x `rope_parameters`, or 4.x `rope_theta`,
    /// `rope_scaling`, `partial_rotary_factor`, GPT-NeoX's `rotary_pct`/`rotary_emb_base`).
    pub(crate) fn from_config(
        cfg: &RawConfig,
        head_dim: usize,
        max_positions: usize,
    ) -> Result<Self> {
        let params = cfg
            .get("rope_parameters")
            .or_else(|| cfg.get("rope_scaling"))
            .cloned()
            .unwrap_or(Value::Null);
        Self::from_params(cfg, &params, head_dim, max_positions)
    }

    /// The rope of `params` (one set of `rope_parameters`, for models with one rope per layer
    /// type); what `params` lacks comes from the top level of `cfg`.
    pub(crate) fn from_params(
        cfg: &RawConfig,
        params: &Value,
        head_dim: usize,
        max_positions: usize,
    ) -> Result<Self> {
        if !params.is_null() && !params.is_object() {
            return Err(cfg.error("`rope_parameters` must be an object"));
        }
        let num = |key: &str| params.get(key).and_then(Value::as_f64);
        let top = |key: &str| cfg.get(key).and_then(Value::as_f64);
        let theta = num("rope_theta")
            .or_else(|| top("rope_theta"))
            .or_else(|| top("rotary_emb_base"))
            .unwrap_or(10_000.0);
        let partial = num("partial_rotary_factor")
            .or_else(|| top("partial_rotary_factor"))
            .or_else(|| top("rotary_pct"))
            .unwrap_or(1.0);
        let dim = (head_dim as f64 * partial) as usize;
        if dim == 0 || dim % 2 != 0 || dim > head_dim {
            return Err(Error::unsupported(
                "partial_rotary_factor",
                partial,
                format!(
                    "the rotary width (head_dim {head_dim} x factor) must be even and positive"
                ),
            ));
        }
        let rope_type = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let factor = || {
            num("factor")
                .ok_or_else(|| cfg.error(format!("rope type `{rope_type}` needs a `factor`")))
        };
        let original_max = num("original_max_position_embeddings")
            .or_else(|| top("original_max_position_embeddings"))
            .unwrap_or(max_positions as f64);
        let scaling = match rope_type {
            "default" => Scaling::Default,
            "linear" => Scaling::Linear { factor: factor()? },
            "dynamic" => Scaling::Dynamic {
                factor: factor()?,
                original_max: max_positions as f64,
            },
            "llama3" => Scaling::Llama3 {
                factor: factor()?,
                low: num("low_freq_factor")
                    .ok_or_else(|| cfg.error("llama3 rope needs `low_freq_factor`"))?,
                high: num("high_freq_factor")
                    .ok_or_else(|| cfg.error("llama3 rope needs `high_freq_factor`"))?,
                original_max: num("original_max_position_embeddings").ok_or_else(|| {
                    cfg.error("llama3 rope needs `original_max_position_embeddings`")
                })?,
            },
            "yarn" => Scaling::Yarn {
                factor: factor()?,
                original_max,
                beta_fast: num("beta_fast").unwrap_or(32.0),
                beta_slow: num("beta_slow").unwrap_or(1.0),
                attention_factor: num("attention_factor"),
                mscale: num("mscale"),
                mscale_all_dim: num("mscale_all_dim"),
                truncate: params
                    .get("truncate")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            },
            "longrope" | "su" => {
                let factors = |key: &str| -> Result<Vec<f64>> {
                    let list = params.get(key).and_then(Value::as_array);
                    let list: Option<Vec<f64>> =
                        list.map(|l| l.iter().filter_map(Value::as_f64).collect());
                    match list {
                        Some(l) if l.len() == dim / 2 => Ok(l),
                        _ => Err(cfg.error(format!(
                            "longrope needs `{key}`: a list of {} numbers (rotary width / 2)",
                            dim / 2
                        ))),
                    }
                };
                // Phi-3 derives the factor from the extended and the pretrained lengths.
                let factor = num("factor").unwrap_or(max_positions as f64 / original_max);
                let attention_factor = num("attention_factor").unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / original_max.ln()).sqrt()
                });
                Scaling::LongRope {
                    short: factors("short_factor")?,
                    long: factors("long_factor")?,
                    original_max,
                    attention_factor,
                }
            }
            other => {
                return Err(Error::unsupported(
                    "rope_parameters.rope_type",
                    format!("{other:?}"),
                    format!("supported rope types: {ROPE_TYPES}"),
                ));
            }
        };
        let (inv_freq, attention_factor) = frequencies(theta, dim, &scaling, None);
        Ok(Self {
            dim,
            theta,
            scaling,
            inv_freq,
            attention_factor,
        })
    }

    /// Whether the frequencies depend on how long the sequence is (dynamic NTK, LongRoPE).
    fn length_dependent(&self) -> bool {
        matches!(
            self.scaling,
            Scaling::Dynamic { .. } | Scaling::LongRope { .. }
        )
    }

    /// `(cos, sin)`, each `[pos_batch, seq, dim]`, for integer `positions` `[pos_batch, seq]`,
    /// as Hugging Face's rotary module returns them (`cat(freqs, freqs)`, times the attention
    /// factor); length-dependent ropes pick their frequencies by `max_position`, the batch's.
    fn cos_sin(
        &self,
        positions: &[Vec<u32>],
        max_position: u32,
        dtype: DType,
        device: &Device,
    ) -> FwdResult<(Tensor, Tensor)> {
        let max_pos = max_position as f64;
        let dynamic;
        let inv_freq = match self.scaling {
            // Dynamic NTK grows the base once the sequence passes the trained length.
            Scaling::Dynamic { original_max, .. } | Scaling::LongRope { original_max, .. }
                if max_pos + 1.0 > original_max =>
            {
                dynamic = frequencies(self.theta, self.dim, &self.scaling, Some(max_pos + 1.0)).0;
                &dynamic
            }
            _ => &self.inv_freq,
        };
        let (rows, seq) = (positions.len(), positions.first().map_or(0, Vec::len));
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(rows * seq * self.dim);
        let mut sin = Vec::with_capacity(rows * seq * self.dim);
        for &p in positions.iter().flatten() {
            for _ in 0..2 {
                for &f in inv_freq {
                    // f32 like torch: positions and frequencies are f32 there.
                    let angle = (p as f32) * (f as f32);
                    cos.push(angle.cos() * self.attention_factor as f32);
                    sin.push(angle.sin() * self.attention_factor as f32);
                }
            }
        }
        debug_assert_eq!(cos.len(), rows * seq * 2 * half);
        let cos = Tensor::from_vec(cos, (rows, seq, self.dim), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (rows, seq, self.dim), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// A rotary module (`model.rotary_emb`, ...): computes the tables once per forward pass; its
/// site fires with the cosine table, element 0 of what transformers' module returns. A model
/// with one rope per layer type (Gemma 3) calls it once per rope, in the order given.
pub(crate) struct RotaryEmb {
    ropes: Vec<Rope>,
    site: SiteId,
    /// Under tensor parallelism: every rank's heads read the same tables, so their gradient is
    /// summed over the ranks.
    tp: Option<Arc<dyn Comm>>,
    /// Under data parallelism, when a rope depends on the sequence's length: the ranks holding
    /// the batch's other rows, whose longest position counts too.
    dp: Option<Arc<dyn Comm>>,
}

impl RotaryEmb {
    pub(crate) fn new(vb: Vb, rope: Rope) -> Result<Self> {
        Self::several(vb, vec![rope])
    }

    /// One module computing several ropes of the same width.
    pub(crate) fn several(vb: Vb, ropes: Vec<Rope>) -> Result<Self> {
        let dim = ropes.first().map_or(0, |r| r.dim);
        let site = vb.site(
            vec![Dim::PosBatch, Dim::Seq, Dim::Size(dim)],
            Layout::Replicated,
        )?;
        let tp = vb.shard().tp.clone();
        let tp = (tp.size() > 1).then_some(tp);
        let dp = vb.shard().grid.dp.clone();
        let length_dependent = ropes.iter().any(Rope::length_dependent);
        let dp = (dp.size() > 1 && length_dependent).then_some(dp);
        Ok(Self {
            ropes,
            site,
            tp,
            dp,
        })
    }

    /// The longest position of the whole batch (as transformers picks a length-dependent
    /// rope's frequencies per batch), every data-parallel rank's rows included.
    fn max_position(&self, pass: &Pass) -> FwdResult<u32> {
        let mut max = pass.longest;
        if let Some(dp) = &self.dp {
            let mine = Tensor::new(&[max as f32], &Device::Cpu)?;
            for other in dp.all_gather(&mine)? {
                max = max.max(other.to_vec1::<f32>()?[0] as u32);
            }
        }
        Ok(max)
    }

    /// `(cos, sin)` of each rope, each `[pos_batch, seq, rot]`, in `x`'s dtype. `x` (the
    /// hidden states) is the module's input, as in transformers.
    pub(crate) fn tables(&self, x: &Tensor, pass: &Pass, run: &mut Run) -> FwdResult<Tables> {
        let max_position = self.max_position(pass)?;
        let mut tables = Vec::with_capacity(self.ropes.len());
        for rope in &self.ropes {
            let x = run.input(self.site, x)?;
            let (cos, sin) = rope.cos_sin(&pass.positions, max_position, x.dtype(), x.device())?;
            let cos = run.site(self.site, cos)?;
            tables.push(match &self.tp {
                Some(tp) if cos.track_op() || sin.track_op() => {
                    (tp_copy(&cos, tp)?, tp_copy(&sin, tp)?)
                }
                _ => (cos, sin),
            });
        }
        Ok(Tables::Rotary(tables))
    }
}

/// Rotates the first `cos.dim(-1)` features of each head; the rest pass through.
///
/// # Shapes
/// `x`: `[batch, seq, heads, head_dim]`; `cos`, `sin`: `[pos_batch, seq, rot]` with
/// `pos_batch` 1 or `batch`.
pub(crate) fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let rot = cos.dim(D::Minus1)?;
    let head_dim = x.dim(D::Minus1)?;
    let tracked = x.track_op() || cos.track_op() || sin.track_op();
    if rot == head_dim && !tracked && x.is_contiguous() && cos.dtype() == x.dtype() {
        // candle's fused kernel (one pass, no backward) reads each half of the tables.
        let half = |t: &Tensor| -> candle_core::Result<Tensor> {
            let t = t.narrow(D::Minus1, 0, rot / 2)?;
            let t = if t.dim(0)? == 1 { t.squeeze(0)? } else { t };
            t.contiguous()
        };
        return candle_nn::rotary_emb::rope_thd(x, &half(cos)?, &half(sin)?);
    }
    let cos = cos.unsqueeze(2)?;
    let sin = sin.unsqueeze(2)?;
    let (x_rot, x_pass) = if rot == head_dim {
        (x.clone(), None)
    } else {
        (
            x.narrow(D::Minus1, 0, rot)?,
            Some(x.narrow(D::Minus1, rot, head_dim - rot)?),
        )
    };
    let half = rot / 2;
    let x1 = x_rot.narrow(D::Minus1, 0, half)?;
    let x2 = x_rot.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let out = (x_rot.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
    match x_pass {
        None => Ok(out),
        Some(pass) => Tensor::cat(&[&out, &pass], D::Minus1),
    }
}

/// Inverse frequencies (f64, converted to f32 where torch would) and the attention factor.
fn frequencies(theta: f64, dim: usize, scaling: &Scaling, seq_len: Option<f64>) -> (Vec<f64>, f64) {
    let exponents = (0..dim).step_by(2).map(|i| i as f64 / dim as f64);
    let base_freq =
        |base: f64| -> Vec<f64> { exponents.clone().map(|e| 1.0 / base.powf(e)).collect() };
    match *scaling {
        Scaling::Default => (base_freq(theta), 1.0),
        Scaling::Linear { factor } => (
            base_freq(theta).into_iter().map(|f| f / factor).collect(),
            1.0,
        ),
        Scaling::Dynamic {
            factor,
            original_max,
        } => {
            let seq = seq_len.unwrap_or(original_max).max(original_max);
            let d = dim as f64;
            let base = theta * ((factor * seq / original_max) - (factor - 1.0)).powf(d / (d - 2.0));
            (base_freq(base), 1.0)
        }
        Scaling::Llama3 {
            factor,
            low,
            high,
            original_max,
        } => {
            let low_wavelen = original_max / low;
            let high_wavelen = original_max / high;
            let freqs = base_freq(theta)
                .into_iter()
                .map(|f| {
                    let wavelen = 2.0 * PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (original_max / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect();
            (freqs, 1.0)
        }
        Scaling::Yarn {
            factor,
            original_max,
            beta_fast,
            beta_slow,
            attention_factor,
            mscale,
            mscale_all_dim,
            truncate,
        } => {
            let get_mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention = attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                    get_mscale(factor, m) / get_mscale(factor, a)
                }
                _ => get_mscale(factor, 1.0),
            });
            let d = dim as f64;
            let correction = |rotations: f64| {
                d * (original_max / (rotations * 2.0 * PI)).ln() / (2.0 * theta.ln())
            };
            let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
            if truncate {
                low = low.floor();
                high = high.ceil();
            }
            let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
            if low == high {
                high += 0.001;
            }
            let freqs = base_freq(theta)
                .into_iter()
                .enumerate()
                .map(|(i, extrapolation)| {
                    let interpolation = extrapolation / factor;
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation_factor = 1.0 - ramp;
                    interpolation * (1.0 - extrapolation_factor)
                        + extrapolation * extrapolation_factor
                })
                .collect();
            (freqs, attention)
        }
        Scaling::LongRope {
            ref short,
            ref long,
            original_max,
            attention_factor,
        } => {
            let factors = match seq_len {
                Some(len) if len > original_max => long,
                _ => short,
            };
            let freqs = base_freq(theta)
                .into_iter()
                .zip(factors)
                .map(|(f, ext)| f / ext)
                .collect();
            (freqs, attention_factor)
        }
    }
}
