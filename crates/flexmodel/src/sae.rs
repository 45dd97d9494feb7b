//! Sparse autoencoders in the SAELens format, attached at any site.
//!
//! A directory holds `cfg.json` (`architecture`: `standard`, `jumprelu` or `topk`; `d_in`,
//! `d_sae`, `apply_b_dec_to_input`, `normalize_activations`, `k` for top-k, and the site as
//! `hook_name`, top-level or under `metadata`) and `sae_weights.safetensors` (`W_enc`
//! `[d_in, d_sae]`, `b_enc`, `W_dec` `[d_sae, d_in]`, `b_dec`, and `threshold` for JumpReLU).
//!
//! [`attach`] puts an SAE at a site: the site's activation `x` becomes
//! `decode(edit(encode(x))) + (x - decode(encode(x)))`, so with no feature edits the model's
//! output is unchanged (the reconstruction error is added back), and the feature activations
//! land in the output map as `<site>.sae`.
//!
//! ```no_run
//! use flexmodel::sae::{self, FeatureEdit, Sae};
//! use flexmodel::{FlexModel, LoadOptions, load};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut fm = FlexModel::new(load("models/stdlib-llama", &LoadOptions::default())?);
//! let sae = Sae::load("models/stdlib-llama/saes/model.layers.1")?;
//! let site = sae.hook_name().unwrap_or("model.layers.1").to_string();
//! sae::attach(&mut fm, &site, sae, vec![FeatureEdit::Scale { feature: 7, factor: 4.0 }])?;
//! # Ok(()) }
//! ```

use std::path::Path;
use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};
use serde::Deserialize;

use crate::{Error, FlexModel, HookCtx, HookFunction, HookHandle, Model, Result};

/// The activation function between encoder and decoder.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Architecture {
    /// `relu(pre)`.
    Standard,
    /// `pre` where `pre > threshold`, else 0.
    JumpRelu,
    /// The `k` largest of `pre` (through a ReLU), the rest 0.
    TopK {
        /// Features kept per token.
        k: usize,
    },
}

/// A sparse autoencoder, on the host in f32.
#[derive(Clone, Debug)]
pub struct Sae {
    architecture: Architecture,
    hook_name: Option<String>,
    apply_b_dec_to_input: bool,
    w_enc: Tensor,
    b_enc: Tensor,
    w_dec: Tensor,
    b_dec: Tensor,
    threshold: Option<Tensor>,
}

#[derive(Deserialize)]
struct Cfg {
    #[serde(default)]
    architecture: Option<String>,
    d_in: usize,
    d_sae: usize,
    #[serde(default)]
    apply_b_dec_to_input: Option<bool>,
    #[serde(default)]
    normalize_activations: Option<String>,
    #[serde(default)]
    k: Option<usize>,
    #[serde(default)]
    hook_name: Option<String>,
    #[serde(default)]
    metadata: Option<Metadata>,
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    hook_name: Option<String>,
}

impl Sae {
    /// Reads an SAE directory in SAELens's format.
    ///
    /// # Errors
    /// Missing or malformed files, an architecture or normalisation other than those supported,
    /// weights whose shapes disagree with `d_in` and `d_sae`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join("cfg.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            Error::msg(format!(
                "{}: {e} (an SAELens SAE directory has cfg.json and sae_weights.safetensors)",
                cfg_path.display()
            ))
        })?;
        let cfg: Cfg = serde_json::from_str(&text)
            .map_err(|e| Error::msg(format!("{}: {e}", cfg_path.display())))?;
        let bad = |what: String| Error::msg(format!("{}: {what}", cfg_path.display()));
        match cfg.normalize_activations.as_deref() {
            None | Some("none") => {}
            Some(other) => {
                return Err(bad(format!(
                    "normalize_activations {other:?} is not supported (only \"none\")"
                )));
            }
        }
        let architecture = match cfg.architecture.as_deref().unwrap_or("standard") {
            "standard" | "relu" => Architecture::Standard,
            "jumprelu" => Architecture::JumpRelu,
            "topk" => Architecture::TopK {
                k: cfg
                    .k
                    .filter(|&k| k > 0 && k <= cfg.d_sae)
                    .ok_or_else(|| bad(format!("a topk SAE needs k in 1..={}", cfg.d_sae)))?,
            },
            other => {
                return Err(bad(format!(
                    "architecture {other:?} is not supported; expected standard, jumprelu or topk"
                )));
            }
        };
        let weights_path = dir.join("sae_weights.safetensors");
        let mut w = candle_core::safetensors::load(&weights_path, &Device::Cpu)
            .map_err(|e| Error::msg(format!("{}: {e}", weights_path.display())))?;
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = w
                .remove(name)
                .ok_or_else(|| Error::msg(format!("{} has no `{name}`", weights_path.display())))?;
            if t.dims() != shape {
                return Err(Error::msg(format!(
                    "{}: `{name}` is {:?}, expected {shape:?} (d_in {}, d_sae {})",
                    weights_path.display(),
                    t.dims(),
                    cfg.d_in,
                    cfg.d_sae
                )));
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        let (d_in, d_sae) = (cfg.d_in, cfg.d_sae);
        let w_enc = take("W_enc", &[d_in, d_sae])?;
        let b_enc = take("b_enc", &[d_sae])?;
        let w_dec = take("W_dec", &[d_sae, d_in])?;
        let b_dec = take("b_dec", &[d_in])?;
        let threshold = match architecture {
            Architecture::JumpRelu => Some(take("threshold", &[d_sae])?),
            _ => None,
        };
        Ok(Self {
            architecture,
            hook_name: cfg.hook_name.or(cfg.metadata.and_then(|m| m.hook_name)),
            apply_b_dec_to_input: cfg.apply_b_dec_to_input.unwrap_or(true),
            w_enc,
            b_enc,
            w_dec,
            b_dec,
            threshold,
        })
    }

    /// The site the SAE was trained on, as its `cfg.json` names it.
    pub fn hook_name(&self) -> Option<&str> {
        self.hook_name.as_deref()
    }

    /// Width of the activations it reads.
    pub fn d_in(&self) -> usize {
        self.b_dec.dims()[0]
    }

    /// Number of features.
    pub fn d_sae(&self) -> usize {
        self.b_enc.dims()[0]
    }

    /// The architecture.
    pub fn architecture(&self) -> Architecture {
        self.architecture
    }

    /// Feature activations of `x` (`[..., d_in]` → `[..., d_sae]`).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let x = match self.apply_b_dec_to_input {
            true => x.broadcast_sub(&self.b_dec)?,
            false => x,
        };
        let pre = x
            .broadcast_matmul(&self.w_enc)?
            .broadcast_add(&self.b_enc)?;
        Ok(match (&self.architecture, &self.threshold) {
            (Architecture::JumpRelu, Some(t)) => {
                let on = pre.broadcast_gt(t)?.to_dtype(DType::F32)?;
                (pre.relu()? * on)?
            }
            (Architecture::TopK { k }, _) => top_k(&pre.relu()?, *k)?,
            _ => pre.relu()?,
        })
    }

    /// The reconstruction from feature activations (`[..., d_sae]` → `[..., d_in]`).
    pub fn decode(&self, features: &Tensor) -> Result<Tensor> {
        Ok(features
            .broadcast_matmul(&self.w_dec)?
            .broadcast_add(&self.b_dec)?)
    }

    /// The decoder's direction of `feature`, `[d_in]` (for steering with an `add` edit).
    pub fn direction(&self, feature: usize) -> Result<Tensor> {
        self.check_feature(feature)?;
        Ok(self.w_dec.get(feature)?)
    }

    fn check_feature(&self, feature: usize) -> Result<()> {
        if feature >= self.d_sae() {
            return Err(Error::msg(format!(
                "feature {feature} does not exist: the SAE has {} features",
                self.d_sae()
            )));
        }
        Ok(())
    }
}

/// Keeps the `k` largest entries of the last dimension, zeroing the rest.
fn top_k(x: &Tensor, k: usize) -> Result<Tensor> {
    let order = x.arg_sort_last_dim(false)?;
    let kth = order.narrow(D::Minus1, k - 1, 1)?.contiguous()?;
    let threshold = x.contiguous()?.gather(&kth, D::Minus1)?;
    let keep = x.broadcast_ge(&threshold)?.to_dtype(DType::F32)?;
    Ok((x * keep)?)
}

/// An edit of feature activations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FeatureEdit {
    /// Set the feature to zero (ablate it).
    Zero(usize),
    /// Set the feature to a value at every position (clamp it on).
    Clamp {
        /// The feature.
        feature: usize,
        /// Its value.
        value: f32,
    },
    /// Multiply the feature.
    Scale {
        /// The feature.
        feature: usize,
        /// The factor.
        factor: f32,
    },
}

impl FeatureEdit {
    fn feature(self) -> usize {
        match self {
            FeatureEdit::Zero(f) => f,
            FeatureEdit::Clamp { feature, .. } | FeatureEdit::Scale { feature, .. } => feature,
        }
    }
}

/// Attaches `sae` at `site`: its features are recorded as `<site>.sae` on every pass,
/// `edits` change them, and the reconstruction error is added back, so the site's value is
/// unchanged where no feature is edited. Remove it with [`FlexModel::remove`].
///
/// Under tensor parallelism the SAE runs on the full activation on rank 0, like every edit.
///
/// # Errors
/// A feature outside the SAE, a site that does not exist; at run time, an activation whose
/// last dimension is not the SAE's `d_in`.
pub fn attach<M: Model>(
    fm: &mut FlexModel<M>,
    site: &str,
    sae: Sae,
    edits: Vec<FeatureEdit>,
) -> Result<HookHandle> {
    for e in &edits {
        sae.check_feature(e.feature())?;
    }
    let sae = Arc::new(sae);
    let key = format!("{site}.sae");
    fm.register(HookFunction::new(site).capture(false).edit(
        move |x: &Tensor, cx: &mut HookCtx| -> Result<Tensor> {
            if x.dims().last() != Some(&sae.d_in()) {
                return Err(Error::msg(format!(
                    "the SAE reads [..., {}] and `{}` is {:?}",
                    sae.d_in(),
                    cx.site(),
                    x.dims()
                )));
            }
            let host = x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            let features = sae.encode(&host)?;
            cx.record(key.clone(), &features);
            if edits.is_empty() {
                return Ok(x.clone());
            }
            let error = (&host - sae.decode(&features)?)?;
            let edited = apply_edits(&features, &edits)?;
            let out = (sae.decode(&edited)? + error)?;
            Ok(out.to_device(x.device())?.to_dtype(x.dtype())?)
        },
    ))
}

fn apply_edits(features: &Tensor, edits: &[FeatureEdit]) -> Result<Tensor> {
    let d_sae = features.dims()[features.rank() - 1];
    let mut scale = vec![1f32; d_sae];
    let mut set = vec![0f32; d_sae];
    for e in edits {
        match *e {
            FeatureEdit::Zero(f) => scale[f] = 0.0,
            FeatureEdit::Clamp { feature, value } => {
                scale[feature] = 0.0;
                set[feature] = value;
            }
            FeatureEdit::Scale { feature, factor } => scale[feature] *= factor,
        }
    }
    let scale = Tensor::new(scale.as_slice(), features.device())?;
    let set = Tensor::new(set.as_slice(), features.device())?;
    Ok(features.broadcast_mul(&scale)?.broadcast_add(&set)?)
}
