//! Statistics of each harvested site, kept while harvesting: the running mean and variance of
//! every unit (Chan et al.'s pairwise update, in f64), optionally the covariance between units,
//! and the top-k activating tokens of every unit with their context.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::Error;

/// What statistics to keep.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSettings {
    /// Activating tokens kept per unit.
    pub top_k: usize,
    /// Tokens of context stored with each top-k token: it and the `context - 1` before it in
    /// its row.
    pub context: usize,
    /// Also the covariance between units, for sites of at most [`MAX_COVARIANCE_WIDTH`] units.
    pub covariance: bool,
}

impl Default for StatsSettings {
    fn default() -> Self {
        Self {
            top_k: 10,
            context: 8,
            covariance: false,
        }
    }
}

/// Widest site whose covariance is kept (its matrix has this many squared entries, f64).
pub const MAX_COVARIANCE_WIDTH: usize = 4096;

/// One batch's tokens, for the top-k: where each kept token is and the tokens before it.
pub(crate) struct TokenInfo {
    /// Document index of each kept token.
    pub(crate) docs: Vec<i64>,
    /// Position in its document.
    pub(crate) positions: Vec<i64>,
    /// `context` token ids ending at the token (-1 before the row starts), row-major.
    pub(crate) contexts: Vec<i64>,
}

/// A unit's best tokens so far, best first; ties keep the earlier token first.
#[derive(Clone, Default)]
struct Top {
    values: Vec<f32>,
    docs: Vec<i64>,
    positions: Vec<i64>,
    contexts: Vec<i64>,
}

/// The running statistics of one site, `units` = product of its feature dims.
struct SiteStats {
    shape: Vec<usize>,
    count: u64,
    mean: Tensor,
    m2: Tensor,
    /// Co-moment matrix `sum (x - mean)(x - mean)^T`, when kept.
    comoment: Option<Tensor>,
    top: Vec<Top>,
}

/// Running statistics of every site of a harvest.
pub(crate) struct Stats {
    settings: StatsSettings,
    sites: Vec<(String, SiteStats)>,
}

impl Stats {
    pub(crate) fn new(settings: StatsSettings) -> Self {
        Self {
            settings,
            sites: Vec::new(),
        }
    }

    /// Adds one batch: `tensors` are the site activations `[tokens, ...]` of the tokens
    /// `info` describes.
    pub(crate) fn add(
        &mut self,
        tensors: &[(String, Tensor)],
        info: &TokenInfo,
    ) -> Result<(), Error> {
        if self.sites.is_empty() {
            for (name, t) in tensors {
                let shape = t.dims()[1..].to_vec();
                let units = shape.iter().product::<usize>();
                let comoment = (self.settings.covariance && units <= MAX_COVARIANCE_WIDTH)
                    .then(|| Tensor::zeros((units, units), DType::F64, &Device::Cpu))
                    .transpose()?;
                let site = SiteStats {
                    shape,
                    count: 0,
                    mean: Tensor::zeros(units, DType::F64, &Device::Cpu)?,
                    m2: Tensor::zeros(units, DType::F64, &Device::Cpu)?,
                    comoment,
                    top: vec![Top::default(); units],
                };
                self.sites.push((name.clone(), site));
            }
        }
        let (k, context) = (self.settings.top_k, self.settings.context);
        if self.sites.len() != tensors.len() {
            return Err(Error::Data(format!(
                "statistics of {} sites met a batch of {}",
                self.sites.len(),
                tensors.len()
            )));
        }
        for (name, t) in tensors {
            let site = self
                .sites
                .iter_mut()
                .find_map(|(n, s)| (n == name).then_some(s))
                .ok_or_else(|| Error::Data(format!("no statistics of `{name}` to add to")))?;
            let n = t.dim(0)?;
            if n == 0 {
                continue;
            }
            let x = t.to_dtype(DType::F64)?.reshape((n, ()))?;
            site.merge(&x)?;
            let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            site.add_top(&values, n, info, k, context);
        }
        Ok(())
    }

    /// The statistics as tensors, per site `<site>.<what>`: `count` (I64 scalar), `mean`,
    /// `var` (unbiased), `m2` (the sum of squared deviations, for resuming), `covariance` and
    /// `comoment` when kept, all F64 in the site's feature shape (`[units, units]` for the
    /// covariance); `top.values` (F32 `[..., k]`), `top.doc`, `top.position` (I64 `[..., k]`)
    /// and `top.context` (I64 `[..., k, context]`), -1 where fewer than k tokens were seen.
    pub(crate) fn tensors(&self) -> Result<Vec<(String, Tensor)>, Error> {
        let (k, context) = (self.settings.top_k, self.settings.context);
        let mut out = Vec::new();
        for (name, s) in &self.sites {
            let shape = s.shape.as_slice();
            let units = s.mean.dim(0)?;
            let with = |last: &[usize]| [shape, last].concat();
            let n = s.count as f64;
            out.push((
                format!("{name}.count"),
                Tensor::new(s.count as i64, &Device::Cpu)?,
            ));
            out.push((format!("{name}.mean"), s.mean.reshape(shape)?));
            out.push((format!("{name}.m2"), s.m2.reshape(shape)?));
            out.push((
                format!("{name}.var"),
                (&s.m2 / (n - 1.0).max(1.0))?.reshape(shape)?,
            ));
            if let Some(c) = &s.comoment {
                out.push((format!("{name}.comoment"), c.clone()));
                out.push((format!("{name}.covariance"), (c / (n - 1.0).max(1.0))?));
            }
            let (mut values, mut docs, mut positions, mut contexts) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for top in &s.top {
                let missing = k - top.values.len();
                values.extend(&top.values);
                values.extend(std::iter::repeat_n(f32::NAN, missing));
                docs.extend(&top.docs);
                docs.extend(std::iter::repeat_n(-1, missing));
                positions.extend(&top.positions);
                positions.extend(std::iter::repeat_n(-1, missing));
                contexts.extend(&top.contexts);
                contexts.extend(std::iter::repeat_n(-1, missing * context));
            }
            let cpu = &Device::Cpu;
            debug_assert_eq!(values.len(), units * k);
            out.push((
                format!("{name}.top.values"),
                Tensor::from_vec(values, with(&[k]), cpu)?,
            ));
            out.push((
                format!("{name}.top.doc"),
                Tensor::from_vec(docs, with(&[k]), cpu)?,
            ));
            out.push((
                format!("{name}.top.position"),
                Tensor::from_vec(positions, with(&[k]), cpu)?,
            ));
            out.push((
                format!("{name}.top.context"),
                Tensor::from_vec(contexts, with(&[k, context]), cpu)?,
            ));
        }
        Ok(out)
    }

    /// Statistics saved by [`Stats::tensors`], to continue from.
    pub(crate) fn restore(
        settings: StatsSettings,
        saved: &HashMap<String, Tensor>,
        sites: &[(String, Vec<usize>)],
    ) -> Result<Self, Error> {
        let get = |key: String| {
            saved
                .get(&key)
                .cloned()
                .ok_or_else(|| Error::Data(format!("the saved statistics lack `{key}`")))
        };
        let (k, context) = (settings.top_k, settings.context);
        let mut out = Self::new(settings);
        for (name, shape) in sites {
            let units = shape.iter().product::<usize>();
            let count = get(format!("{name}.count"))?.to_scalar::<i64>()? as u64;
            let values: Vec<f32> = get(format!("{name}.top.values"))?
                .flatten_all()?
                .to_vec1()?;
            let docs: Vec<i64> = get(format!("{name}.top.doc"))?.flatten_all()?.to_vec1()?;
            let positions: Vec<i64> = get(format!("{name}.top.position"))?
                .flatten_all()?
                .to_vec1()?;
            let contexts: Vec<i64> = get(format!("{name}.top.context"))?
                .flatten_all()?
                .to_vec1()?;
            let top = (0..units)
                .map(|u| {
                    let filled = (0..k).take_while(|&i| !values[u * k + i].is_nan()).count();
                    let span = u * k..u * k + filled;
                    Top {
                        values: values[span.clone()].to_vec(),
                        docs: docs[span.clone()].to_vec(),
                        positions: positions[span].to_vec(),
                        contexts: contexts[u * k * context..(u * k + filled) * context].to_vec(),
                    }
                })
                .collect();
            let comoment = saved.get(&format!("{name}.comoment")).cloned();
            let site = SiteStats {
                shape: shape.clone(),
                count,
                mean: get(format!("{name}.mean"))?.flatten_all()?,
                m2: get(format!("{name}.m2"))?.flatten_all()?,
                comoment,
                top,
            };
            out.sites.push((name.clone(), site));
        }
        Ok(out)
    }
}

impl SiteStats {
    /// Merges a batch `x` `[n, units]` (f64) into the running moments.
    fn merge(&mut self, x: &Tensor) -> Result<(), Error> {
        let n_b = x.dim(0)? as f64;
        let n_a = self.count as f64;
        let n = n_a + n_b;
        let mean_b = x.mean(0)?;
        let centered = x.broadcast_sub(&mean_b)?;
        let m2_b = centered.sqr()?.sum(0)?;
        let delta = (&mean_b - &self.mean)?;
        self.mean = (&self.mean + (&delta * (n_b / n))?)?;
        self.m2 = ((&self.m2 + m2_b)? + (delta.sqr()? * (n_a * n_b / n))?)?;
        if let Some(c) = &self.comoment {
            let c_b = centered.t()?.matmul(&centered)?;
            let d = delta.unsqueeze(1)?;
            let outer = (d.matmul(&d.t()?)? * (n_a * n_b / n))?;
            self.comoment = Some(((c + c_b)? + outer)?);
        }
        self.count += n_b as u64;
        Ok(())
    }

    /// Offers a batch's values (`[n, units]`, row-major) to every unit's top-k.
    fn add_top(&mut self, values: &[f32], n: usize, info: &TokenInfo, k: usize, context: usize) {
        let units = self.top.len();
        for t in 0..n {
            for (u, top) in self.top.iter_mut().enumerate() {
                let v = values[t * units + u];
                if v.is_nan() || (top.values.len() == k && v <= top.values[k - 1]) {
                    continue;
                }
                // After every equal value: earlier tokens win ties.
                let at = top.values.partition_point(|&w| w >= v);
                top.values.insert(at, v);
                top.docs.insert(at, info.docs[t]);
                top.positions.insert(at, info.positions[t]);
                let ctx = &info.contexts[t * context..(t + 1) * context];
                top.contexts
                    .splice(at * context..at * context, ctx.iter().copied());
                if top.values.len() > k {
                    top.values.pop();
                    top.docs.pop();
                    top.positions.pop();
                    top.contexts.truncate(k * context);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(n: usize, context: usize) -> TokenInfo {
        TokenInfo {
            docs: (0..n as i64).collect(),
            positions: (0..n as i64).map(|p| p * 10).collect(),
            contexts: (0..(n * context) as i64).collect(),
        }
    }

    #[test]
    fn batches_merge_to_the_whole_data_moments() {
        let settings = StatsSettings {
            top_k: 2,
            context: 1,
            covariance: true,
        };
        let data: Vec<f32> = (0..30).map(|i| ((i * 7) % 11) as f32 - 3.0).collect();
        let x = Tensor::from_vec(data.clone(), (10, 3), &Device::Cpu).unwrap();
        let mut stats = Stats::new(settings);
        for (start, len) in [(0, 4), (4, 1), (5, 5)] {
            let part = x.narrow(0, start, len).unwrap();
            let mut i = info(10, 1);
            i.docs.drain(..start);
            i.positions.drain(..start);
            i.contexts.drain(..start);
            stats.add(&[("s".into(), part)], &i).unwrap();
        }
        let out: HashMap<String, Tensor> = stats.tensors().unwrap().into_iter().collect();
        let x = x.to_dtype(DType::F64).unwrap();
        let mean = x.mean(0).unwrap();
        let centered = x.broadcast_sub(&mean).unwrap();
        let var = (centered.sqr().unwrap().sum(0).unwrap() / 9.0).unwrap();
        let cov = (centered.t().unwrap().matmul(&centered).unwrap() / 9.0).unwrap();
        let close = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f64>().unwrap() < 1e-12);
        };
        close(&out["s.mean"], &mean);
        close(&out["s.var"], &var);
        close(&out["s.covariance"], &cov);
        // Column 0 is 0-3, 7-3, 3-3, ... : its two largest, earliest first on ties.
        let col: Vec<f32> = (0..10).map(|t| data[t * 3]).collect();
        let mut order: Vec<usize> = (0..10).collect();
        order.sort_by(|&a, &b| col[b].total_cmp(&col[a]).then(a.cmp(&b)));
        let top = out["s.top.doc"].to_vec2::<i64>().unwrap();
        assert_eq!(top[0], [order[0] as i64, order[1] as i64]);
        // Restored statistics go on as if never saved.
        let saved: HashMap<String, Tensor> = stats.tensors().unwrap().into_iter().collect();
        let back =
            Stats::restore(stats.settings.clone(), &saved, &[("s".into(), vec![3])]).unwrap();
        let again: HashMap<String, Tensor> = back.tensors().unwrap().into_iter().collect();
        for (name, t) in &out {
            let same = (t.to_dtype(DType::F64).unwrap()
                - again[name].to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .into_iter()
            .all(|d| d == 0.0 || d.is_nan());
            assert!(same, "{name}");
        }
    }
}
