//! Generation with hooks: a key/value cache, greedy or sampled decoding, per-step hooks.

use candle_core::{DType, Device, Tensor};

use crate::cache::KvCache;
use crate::hook::PassInfo;
use crate::model::{Input, Model};
use crate::rng::SplitMix64;
use crate::run::Groups;
use crate::wrapper::FlexModel;
use crate::{Error, Result};

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (argmax of the logits).
    Greedy,
    /// A random token from the distribution after temperature, top-k and top-p (nucleus)
    /// filtering, drawn from a generator seeded with `seed` (the same seed gives the same
    /// tokens).
    Sample {
        /// Divides the logits; above 0.
        temperature: f64,
        /// Keep the `k` most likely tokens (`None`: all).
        top_k: Option<usize>,
        /// Keep the smallest set of most likely tokens whose probability reaches `p`.
        top_p: Option<f64>,
        /// Seed of the generator.
        seed: u64,
    },
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Number of new tokens per row at most.
    pub max_new_tokens: usize,
    /// How each token is chosen.
    pub sampling: Sampling,
    /// Tokens that end a row (its later positions are `pad_token_id`).
    pub eos_token_ids: Vec<u32>,
    /// Token that fills finished rows.
    pub pad_token_id: u32,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 16,
            sampling: Sampling::Greedy,
            eos_token_ids: Vec::new(),
            pad_token_id: 0,
        }
    }
}

/// The result of a generation.
#[derive(Clone, Debug)]
pub struct Generation {
    /// The prompts followed by the new tokens, `[batch, prompt + new]` (I64, as transformers).
    pub sequences: Tensor,
    /// Number of forward passes run: the prefill and the decode steps.
    pub steps: usize,
}

impl<M: Model> FlexModel<M> {
    /// Generates up to `options.max_new_tokens` tokens after each prompt, with a key/value
    /// cache. Hooks fire at the prefill (step 0, every prompt position) and at every decode step
    /// (one position each); [`HookFunction::steps`](crate::HookFunction::steps) limits a hook to
    /// some steps, and `cx.step()`/`cx.positions()` tell a hook where it is. Captures append one
    /// entry per step. `on_token(row, token)` sees each new token as it is chosen and returns
    /// `true` to end that row (a stop string); a row also ends at an EOS token. In a multi-rank
    /// job rank 0 chooses the tokens (and calls `on_token`), every rank runs the same steps,
    /// and every rank returns the sequences. Positions and
    /// masks follow transformers' `generate`: a left-padded batch (`input.attention_mask`)
    /// generates what each prompt generates alone.
    ///
    /// # Errors
    /// As [`FlexModel::forward_input`]; a temperature that is not positive.
    pub fn generate(
        &mut self,
        input: &Input,
        options: &GenerateOptions,
        mut on_token: impl FnMut(usize, u32) -> bool,
    ) -> Result<Generation> {
        let (batch, prompt) = input.dims()?;
        let grid = self.model().grid().clone();
        if let Sampling::Sample { temperature, .. } = options.sampling {
            if temperature <= 0.0 || temperature.is_nan() {
                return Err(Error::Input(format!(
                    "temperature must be above 0, got {temperature}"
                )));
            }
        }
        let device = input.input_ids.device().clone();
        let mut rows: Vec<Vec<u32>> = input.input_ids.to_dtype(DType::U32)?.to_vec2()?;
        let mut mask: Vec<Vec<u32>> = match &input.attention_mask {
            Some(m) => m.to_dtype(DType::U32)?.to_vec2()?,
            None => vec![vec![1; prompt]; batch],
        };
        let mut rng = SplitMix64::new(match options.sampling {
            Sampling::Sample { seed, .. } => seed,
            Sampling::Greedy => 0,
        });
        let mut cache = KvCache::new();
        let mut finished = vec![false; batch];
        let mut step_input = input.clone();
        let mut steps = 0;
        for step in 0..options.max_new_tokens {
            let logits = self.forward_cached(&step_input, &mut cache, step)?; // [batch, 1, vocab]
            steps += 1;
            // Rank 0 holds the logits and chooses; in a multi-rank job it tells every rank the
            // tokens and which rows ended, so that all take the same next step.
            let mut next = Vec::with_capacity(batch);
            if grid.is_root() {
                let last: Vec<Vec<f32>> = logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec2()?;
                for (row, scores) in last.iter().enumerate() {
                    let token = if finished[row] {
                        options.pad_token_id
                    } else {
                        let token = pick(scores, &options.sampling, &mut rng);
                        if options.eos_token_ids.contains(&token) | on_token(row, token) {
                            finished[row] = true;
                        }
                        token
                    };
                    next.push(token);
                }
            }
            if grid.is_distributed() {
                let decided = if grid.is_root() {
                    let flags = finished.iter().map(|&f| u32::from(f));
                    let data: Vec<u32> = next.iter().copied().chain(flags).collect();
                    Some(Tensor::from_vec(data, 2 * batch, &Device::Cpu)?)
                } else {
                    None
                };
                let decided: Vec<u32> = grid.world.broadcast(decided.as_ref(), 0)?.to_vec1()?;
                next = decided[..batch].to_vec();
                finished = decided[batch..].iter().map(|&f| f == 1).collect();
            }
            for (row, &token) in next.iter().enumerate() {
                rows[row].push(token);
                mask[row].push(1);
            }
            if finished.iter().all(|&f| f) {
                break;
            }
            let ids = Tensor::from_vec(next, (batch, 1), &device)?;
            let width = mask[0].len();
            let flat: Vec<u32> = mask.iter().flatten().copied().collect();
            step_input = Input::with_mask(ids, Tensor::from_vec(flat, (batch, width), &device)?);
        }
        let width = rows[0].len();
        let flat: Vec<i64> = rows.iter().flatten().map(|&t| i64::from(t)).collect();
        Ok(Generation {
            sequences: Tensor::from_vec(flat, (batch, width), &device)?,
            steps,
        })
    }

    /// One pass of a generation: the prompt at step 0, then one token per step.
    fn forward_cached(
        &mut self,
        input: &Input,
        cache: &mut KvCache,
        step: usize,
    ) -> Result<Tensor> {
        let (_, seq) = input.dims()?;
        let pass = PassInfo {
            step,
            start: cache.len(),
            len: seq,
        };
        let logits = self.pass(input, &Groups::All, pass, Some(&mut *cache))?;
        cache.advance(seq);
        Ok(logits)
    }
}

/// The next token from one row's logits.
fn pick(logits: &[f32], sampling: &Sampling, rng: &mut SplitMix64) -> u32 {
    let Sampling::Sample {
        temperature,
        top_k,
        top_p,
        ..
    } = *sampling
    else {
        return argmax(logits);
    };
    let mut ranked: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, f64::from(l) / temperature))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    if let Some(k) = top_k {
        ranked.truncate(k.max(1));
    }
    let max = ranked[0].1;
    let mut probs: Vec<f64> = ranked.iter().map(|(_, l)| (l - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = top_p {
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .position(|&q| {
                mass += q;
                mass >= p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        ranked.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut r = rng.next_f64() * total;
    for (i, q) in probs.iter().enumerate() {
        r -= q;
        if r <= 0.0 {
            return ranked[i].0;
        }
    }
    ranked[ranked.len() - 1].0
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}
