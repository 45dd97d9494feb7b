//! `--edit SITE=OP`: the edit operations of the command line.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use flexmodel::analysis::ablate::Ablation;
use flexmodel::rng::SplitMix64;
use flexmodel::{HookCtx, HookFunction, Tensor};

use crate::safetensors_io;

/// One `--edit`: a site name or pattern and what to do there.
pub struct EditSpec {
    pub site: String,
    pub op: Op,
}

/// What an edit does to the activation.
pub enum Op {
    /// Multiply by zero.
    Zero,
    /// Multiply by a constant.
    Scale(f64),
    /// Add a tensor, broadcast over batch and positions (a steering vector).
    Add(Tensor),
    /// Replace by a tensor of the same shape (patching from an earlier capture).
    Replace(Tensor),
    /// Add Gaussian noise of this standard deviation, from a seeded generator (the same noise
    /// in every run, and under any parallel layout: edits run once, on rank 0).
    Noise { std: f64, seed: u64 },
    /// Replace by the site's mean from a harvest's statistics (`<site>.mean` in
    /// `stats.safetensors`): mean ablation.
    Mean {
        means: HashMap<String, Tensor>,
        file: PathBuf,
    },
    /// Replace each row by a row (drawn with a seed) of other prompts' activations: resample
    /// ablation.
    Resample(Ablation),
}

const OPS: &str = "zero, scale:F, add:FILE.safetensors:KEY, replace:FILE.safetensors:KEY, \
                   noise:STD[:SEED], mean:STATS.safetensors (or a harvest directory), \
                   resample:FILE.safetensors:KEY[:SEED]";

impl EditSpec {
    /// Parses `SITE=OP`, reading any tensor the op names.
    pub fn parse(arg: &str) -> Result<Self> {
        let Some((site, op)) = arg.split_once('=') else {
            bail!("--edit {arg:?}: expected SITE=OP with OP one of {OPS}");
        };
        let op = Op::parse(op).with_context(|| format!("--edit {arg:?}"))?;
        Ok(Self {
            site: site.to_string(),
            op,
        })
    }

    /// The hook that applies this edit (without capturing).
    pub fn hook(self) -> HookFunction {
        let op = self.op;
        HookFunction::new(self.site)
            .capture(false)
            .edit(move |x: &Tensor, cx: &mut HookCtx| op.apply(x, cx.site()))
    }
}

impl Op {
    fn parse(op: &str) -> Result<Self> {
        let (name, arg) = op.split_once(':').unwrap_or((op, ""));
        match (name, arg) {
            ("zero", "") => Ok(Op::Zero),
            ("scale", f) => {
                let f: f64 = f
                    .parse()
                    .with_context(|| format!("scale factor {f:?} is not a number"))?;
                Ok(Op::Scale(f))
            }
            ("noise", arg) => {
                let (std, seed) = arg.split_once(':').unwrap_or((arg, "0"));
                let std: f64 = std
                    .parse()
                    .with_context(|| format!("noise std {std:?} is not a number"))?;
                let seed: u64 = seed
                    .parse()
                    .with_context(|| format!("noise seed {seed:?} is not an integer"))?;
                Ok(Op::Noise { std, seed })
            }
            ("add", source) => Ok(Op::Add(tensor_arg(source)?)),
            ("mean", path) if !path.is_empty() => {
                let mut file = PathBuf::from(path);
                if file.is_dir() {
                    file = file.join(flexmodel::harvest::STATS);
                }
                let means = safetensors_io::read(&file)?
                    .into_iter()
                    .filter(|(k, _)| k.ends_with(".mean"))
                    .collect::<HashMap<_, _>>();
                if means.is_empty() {
                    bail!(
                        "{} holds no `<site>.mean` tensors; give the stats.safetensors of a \
                         harvest run with --stats",
                        file.display()
                    );
                }
                Ok(Op::Mean { means, file })
            }
            ("resample", arg) => {
                let (source, seed) = match arg.rsplit_once(':') {
                    Some((s, seed)) if seed.parse::<u64>().is_ok() && s.contains(':') => {
                        (s, seed.parse()?)
                    }
                    _ => (arg, 0),
                };
                let source = tensor_arg(source)?;
                Ok(Op::Resample(Ablation::Resample { source, seed }))
            }
            ("replace", source) => Ok(Op::Replace(tensor_arg(source)?)),
            _ => bail!("unknown edit {op:?}; expected one of {OPS}"),
        }
    }

    fn apply(&self, x: &Tensor, site: &str) -> flexmodel::Result<Tensor> {
        Ok(match self {
            Op::Zero => x.zeros_like()?,
            Op::Scale(f) => (x * *f)?,
            Op::Add(v) => {
                let v = v.to_device(x.device())?.to_dtype(x.dtype())?;
                x.broadcast_add(&v).map_err(|_| {
                    flexmodel::Error::msg(format!(
                        "add: the vector of shape {:?} does not broadcast to the activation of \
                         `{site}`, shape {:?}; use its last dimension ({}) or the full shape",
                        v.dims(),
                        x.dims(),
                        x.dims().last().copied().unwrap_or(0)
                    ))
                })?
            }
            Op::Noise { std, seed } => {
                let mut rng = SplitMix64::new(*seed);
                let noise: Vec<f32> = (0..x.elem_count())
                    .map(|_| (rng.normal() * std) as f32)
                    .collect();
                let noise = Tensor::from_vec(noise, x.dims(), x.device())?.to_dtype(x.dtype())?;
                (x + noise)?
            }
            Op::Mean { means, file } => {
                let key = format!("{site}.mean");
                let mean = means.get(&key).ok_or_else(|| {
                    let mut have: Vec<&str> = means.keys().map(String::as_str).collect();
                    have.sort_unstable();
                    flexmodel::Error::msg(format!(
                        "{} has no mean of `{site}` (`{key}`); it has {}",
                        file.display(),
                        have.join(", ")
                    ))
                })?;
                Ablation::Mean(mean.clone()).apply(x, site)?
            }
            Op::Resample(ablation) => ablation.apply(x, site)?,
            Op::Replace(r) => {
                if r.dims() != x.dims() {
                    return Err(flexmodel::Error::ShapeMismatch {
                        site: site.to_string(),
                        expected: x.dims().iter().copied().map(Some).collect(),
                        got: r.dims().to_vec(),
                    });
                }
                r.to_device(x.device())?.to_dtype(x.dtype())?
            }
        })
    }
}

/// `FILE:KEY` → the tensor.
fn tensor_arg(source: &str) -> Result<Tensor> {
    let Some((file, key)) = source.rsplit_once(':') else {
        bail!("expected FILE.safetensors:KEY, got {source:?}");
    };
    safetensors_io::read_key(&PathBuf::from(file), key)
}
