//! What every attention layer shares: positions and masks for a forward pass, the attention
//! product with its internal sites, and grouped-query attention without copying keys.

use candle_core::{DType, Device, Tensor};
use flexmodel_core::layout::block;
use flexmodel_core::{Comm, Dim, Input, Layout, Run, SiteId};

use crate::FwdResult;
use crate::error::Result;
use crate::kernels;
use crate::nn::{self, Linear};
use crate::rope;
use crate::weights::Vb;

/// Facts about one forward pass that every layer needs.
pub(crate) struct Pass {
    pub(crate) batch: usize,
    pub(crate) seq: usize,
    /// Position of each token, `[pos_batch][seq]`: `0..seq` (one row) without a mask, else
    /// `cumsum(attention_mask) - 1` per row (padding gets 0), as transformers computes them
    /// for generation and OPT.
    pub(crate) positions: Vec<Vec<u32>>,
    /// The longest position of the batch (of the whole batch when this pass is one of its
    /// micro-batches): what length-dependent ropes pick their frequencies by.
    pub(crate) longest: u32,
    /// Additive mask `[batch|1, 1, seq, seq]` (0 or the f32 minimum): causal and padding.
    causal: Tensor,
    /// The same, also hiding keys `window` or more positions back.
    sliding: Option<Tensor>,
}

impl Pass {
    /// Reads the input once. `past` positions are already in the key/value cache (then the
    /// mask covers them too); `window` is the model's sliding window, if any layer uses one.
    pub(crate) fn new(
        input: &Input,
        past: usize,
        window: Option<usize>,
        device: &Device,
    ) -> FwdResult<Self> {
        let (batch, seq) = input.dims()?;
        let width = past + seq;
        let valid: Option<Vec<Vec<bool>>> = match &input.attention_mask {
            None => None,
            Some(mask) => {
                if mask.dim(1)? != width {
                    return Err(flexmodel_core::Error::Input(format!(
                        "attention_mask covers {} positions, expected {width} ({past} cached + {seq} new)",
                        mask.dim(1)?
                    )));
                }
                let rows = mask.to_dtype(DType::I64)?.to_vec2::<i64>()?;
                Some(
                    rows.into_iter()
                        .map(|row| row.into_iter().map(|m| m != 0).collect())
                        .collect(),
                )
            }
        };
        let positions = match &valid {
            None => vec![(past as u32..width as u32).collect()],
            Some(rows) => rows
                .iter()
                .map(|row| {
                    let mut next = 0;
                    let all: Vec<u32> = row
                        .iter()
                        .map(|&real| {
                            let p = if real { next } else { 0 };
                            next += u32::from(real);
                            p
                        })
                        .collect();
                    all[past..].to_vec()
                })
                .collect(),
        };
        let causal = additive_mask(valid.as_deref(), batch, (past, seq), None, device)?;
        let sliding = match window {
            Some(w) if w < width => Some(additive_mask(
                valid.as_deref(),
                batch,
                (past, seq),
                Some(w),
                device,
            )?),
            _ => None,
        };
        Ok(Self {
            batch,
            seq,
            longest: positions.iter().flatten().copied().max().unwrap_or(0),
            positions,
            causal,
            sliding,
        })
    }

    /// This pass as a micro-batch of `whole`: its ropes pick their frequencies by the whole
    /// batch's longest position.
    pub(crate) fn within(mut self, whole: &Pass) -> Self {
        self.longest = whole.longest;
        self
    }

    /// The mask for a layer with or without sliding-window attention.
    pub(crate) fn mask(&self, sliding: bool) -> &Tensor {
        match (&self.sliding, sliding) {
            (Some(m), true) => m,
            _ => &self.causal,
        }
    }

    /// Positions as a `[pos_batch, seq]` u32 tensor.
    pub(crate) fn position_ids(&self, device: &Device) -> FwdResult<Tensor> {
        let rows = self.positions.len();
        let flat: Vec<u32> = self.positions.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (rows, self.seq), device)?)
    }
}

/// `[batch|1, 1, seq, past + seq]` with 0 where query `i` (sequence index `past + i`) may see
/// key `j` (`j <= past + i`, key not padding, `past + i - j < window`) and the f32 minimum
/// elsewhere. A query that sees nothing (left padding) gets a uniform row instead of NaN, like
/// transformers.
fn additive_mask(
    valid: Option<&[Vec<bool>]>,
    batch: usize,
    (past, seq): (usize, usize),
    window: Option<usize>,
    device: &Device,
) -> FwdResult<Tensor> {
    let rows = if valid.is_some() { batch } else { 1 };
    let width = past + seq;
    let mut data = Vec::with_capacity(rows * seq * width);
    for b in 0..rows {
        for i in past..width {
            for j in 0..width {
                let visible =
                    j <= i && valid.is_none_or(|v| v[b][j]) && window.is_none_or(|w| i - j < w);
                data.push(if visible { 0f32 } else { f32::MIN });
            }
        }
    }
    Ok(Tensor::from_vec(data, (rows, 1, seq, width), device)?)
}

/// Head counts of an attention layer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
}

impl Heads {
    /// The heads this rank computes under tensor parallelism: its block of query heads and of
    /// KV heads (one replicated KV head when there are fewer KV heads than ranks).
    pub(crate) fn local(self, tp: &dyn Comm) -> Result<Heads> {
        let (rank, world) = (tp.rank(), tp.size());
        Ok(Heads {
            heads: block(self.heads, self.heads, rank, world)?.1,
            kv_heads: block(self.kv_heads, self.kv_heads, rank, world)?.1,
            head_dim: self.head_dim,
        })
    }
}

/// The internal sites of one attention module (see the crate docs of flexmodel-core).
pub(crate) struct AttnSites {
    /// Index of this attention layer (its slot in the key/value cache).
    layer: usize,
    q: SiteId,
    k: SiteId,
    v: SiteId,
    probs: SiteId,
    head_out: SiteId,
    /// Gemma 2's `attn_logit_softcapping`: scores become `cap * tanh(scores / cap)`.
    softcap: Option<f64>,
}

impl AttnSites {
    /// Declares `<attn>.hook_q`, `hook_k`, `hook_v`, `hook_attn_probs`, `hook_head_out`.
    pub(crate) fn new(vb: &Vb, h: Heads) -> Result<Self> {
        let per_head = |n: usize| vec![Dim::Batch, Dim::Seq, Dim::Size(n), Dim::Size(h.head_dim)];
        let by_head = |n: usize| Layout::Split { dim: 2, units: n };
        Ok(Self {
            layer: vb.next_attention_layer(),
            q: vb.internal("hook_q", per_head(h.heads), by_head(h.heads))?,
            k: vb.internal("hook_k", per_head(h.kv_heads), by_head(h.kv_heads))?,
            v: vb.internal("hook_v", per_head(h.kv_heads), by_head(h.kv_heads))?,
            probs: vb.internal(
                "hook_attn_probs",
                vec![Dim::Batch, Dim::Size(h.heads), Dim::Seq, Dim::KeySeq],
                Layout::Split {
                    dim: 1,
                    units: h.heads,
                },
            )?,
            head_out: vb.internal("hook_head_out", per_head(h.heads), by_head(h.heads))?,
            softcap: None,
        })
    }

    /// Scores soft-capped at `cap` before the mask, when it is set.
    pub(crate) fn with_softcap(mut self, cap: Option<f64>) -> Self {
        self.softcap = cap;
        self
    }
}

/// Scaled dot-product attention with its sites, softmax in f32.
///
/// # Shapes
/// `q`: `[b, s, heads, d]`; `k`, `v`: `[b, s, kv_heads, d]` (rotary applied);
/// `mask`: `[b|1, 1, s, s]`; returns `[b, s, heads * d]`.
pub(crate) fn attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: &Tensor,
    scale: f64,
    sites: &AttnSites,
    run: &mut Run,
) -> FwdResult<Tensor> {
    let q = run.site(sites.q, q)?;
    let k = run.site(sites.k, k)?;
    let v = run.site(sites.v, v)?;
    let (b, s, heads, d) = q.dims4()?;
    let kv_heads = k.dim(2)?;
    let dtype = q.dtype();
    // Heads of one KV group are adjacent, so [b, heads, s, d] regroups as
    // [b, kv_heads, n_rep * s, d] and meets its keys in one matmul without repeating them.
    let n_rep = heads / kv_heads;
    // The scale goes on the queries (s × d values) rather than on the scores (s × s), in the
    // copy that makes them contiguous anyway.
    let qg = q
        .transpose(1, 2)?
        .affine(scale, 0.0)?
        .reshape((b, kv_heads, n_rep * s, d))?;
    let kt = k.transpose(1, 2)?.contiguous()?;
    let vt = v.transpose(1, 2)?.contiguous()?;
    // With a cache, the keys and values of earlier positions come first.
    let (kt, vt) = run.keys_values(sites.layer, kt, vt)?;
    let kv_len = kt.dim(2)?;
    // Without padding (one mask for every row) each query sees at least itself, so keys past
    // a chunk's last position have zero weight; a padding query sees nothing, and like
    // transformers takes the mean of every value, which needs all keys.
    let unpadded = mask.dim(0)? == 1;
    // Chunks save products for more, smaller kernels: measured worth it on the CPU only (a GPU
    // at these sizes is bound by kernel launches).
    let chunked = s > QUERY_CHUNK && unpadded && q.device().is_cpu();
    let out = if chunked && !run.is_hooked(sites.probs) {
        // Nobody reads the probabilities: queries in chunks, each against the keys up to its
        // last position only, skipping most of the masked half of the scores.
        let qg = qg.reshape((b, kv_heads, n_rep, s, d))?;
        let mut outs = Vec::with_capacity(s.div_ceil(QUERY_CHUNK));
        for start in (0..s).step_by(QUERY_CHUNK) {
            let rows = QUERY_CHUNK.min(s - start);
            let keys = kv_len - s + start + rows;
            let q =
                qg.narrow(3, start, rows)?
                    .contiguous()?
                    .reshape((b, kv_heads, n_rep * rows, d))?;
            let mask = mask
                .narrow(2, start, rows)?
                .narrow(3, 0, keys)?
                .contiguous()?;
            let probs = probabilities(
                &q,
                &kt.narrow(2, 0, keys)?,
                &mask,
                (heads, rows),
                sites.softcap,
            )?;
            let out = probs
                .to_dtype(dtype)?
                .reshape((b, kv_heads, n_rep * rows, keys))?
                .matmul(&vt.narrow(2, 0, keys)?.contiguous()?)?;
            outs.push(out.reshape((b, kv_heads, n_rep, rows, d))?);
        }
        Tensor::cat(&outs, 3)?
    } else {
        let probs = probabilities(&qg, &kt, mask, (heads, s), sites.softcap)?.to_dtype(dtype)?;
        let probs = run.site(sites.probs, probs)?;
        probs
            .reshape((b, kv_heads, n_rep * s, kv_len))?
            .matmul(&vt)?
    };
    let out = out.reshape((b, heads, s, d))?.transpose(1, 2)?;
    let out = run.site(sites.head_out, out)?;
    Ok(out.reshape((b, s, heads * d))?)
}

/// The rest of a rotary attention module once its projections are split into heads: rotary
/// embeddings on the queries and keys, [`attend`] with its sites, the output projection.
///
/// # Shapes
/// `q`: `[b, s, heads, d]`; `k`, `v`: `[b, s, kv_heads, d]`; returns `[b, s, hidden]`.
pub(crate) fn rotary_attend(
    (q, k, v): (Tensor, Tensor, Tensor),
    (cos, sin): (&Tensor, &Tensor),
    mask: &Tensor,
    scale: f64,
    sites: &AttnSites,
    out: &Linear,
    run: &mut Run,
) -> FwdResult<Tensor> {
    let q = rope::apply(&q, cos, sin)?;
    let k = rope::apply(&k, cos, sin)?;
    let heads = attend(q, k, v, mask, scale, sites, run)?;
    out.forward(&heads, run)
}

/// Query positions per chunk of [`attend`] when the probabilities are not hooked.
const QUERY_CHUNK: usize = 128;

/// `softmax(q k^T + mask)` in f32, `[b, heads, rows, keys]`, for grouped queries `q`
/// `[b, kv_heads, n_rep * rows, d]` (already scaled) and keys `[b, kv_heads, keys, d]`; with
/// `softcap`, the scores are `cap * tanh(scores / cap)` before the mask.
fn probabilities(
    q: &Tensor,
    k: &Tensor,
    mask: &Tensor,
    (heads, rows): (usize, usize),
    softcap: Option<f64>,
) -> FwdResult<Tensor> {
    let (b, _, _, _) = q.dims4()?;
    let keys = k.dim(2)?;
    let scores = q
        .matmul(&k.t()?)?
        .reshape((b, heads, rows, keys))?
        .to_dtype(DType::F32)?;
    let scores = match softcap {
        Some(cap) => nn::softcap(&scores, cap)?,
        None => scores,
    };
    Ok(kernels::masked_softmax(&scores, mask)?)
}
