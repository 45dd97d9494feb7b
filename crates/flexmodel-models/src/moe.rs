//! A sparse mixture-of-experts block (Mixtral's, Qwen MoE's): a router picks `top_k` experts per
//! token, each expert is a gated MLP run on the tokens routed to it, and their outputs are
//! summed with the routing weights; Qwen adds a shared expert scaled by a sigmoid gate.
//!
//! Sites besides transformers' modules (`mlp`, `mlp.gate`, `mlp.experts`,
//! `mlp.experts.act_fn` once per expert that has tokens, Qwen's `mlp.shared_expert*`):
//! `mlp.hook_router_probs` `[tokens, experts]` (softmax of the router logits, f32),
//! `mlp.hook_topk_experts` `[tokens, top_k]` (u32, the experts each token is routed to),
//! `mlp.hook_topk_weights` `[tokens, top_k]` (their weights) and `mlp.experts.hook_expert_out`
//! `[tokens, top_k, hidden]` (each chosen expert's output for the token, before its weight).
//! Editing the chosen experts or their weights re-routes the tokens.
//!
//! Under tensor parallelism the experts are dealt out whole over the ranks (expert parallel):
//! every rank routes every token (the router is replicated), runs the experts it holds on the
//! tokens routed to them, and one all-reduce combines the outputs. An expert's internal
//! activation (`experts.act_fn`) lives on its rank; when hooked, it is broadcast so that hooks
//! see it as in one process.

use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};
use flexmodel_core::layout::block;
use flexmodel_core::{Comm, Dim, Layout, Run, SiteId};

use crate::FwdResult;
use crate::decoder::{Mlp, Spec};
use crate::error::{Error, Result};
use crate::nn::{Activation, Linear, Parallel, TOKENS, all_reduce, shape_of, tp_copy};
use crate::stream::Param;
use crate::weights::Vb;

/// The sizes and options of one model's MoE blocks.
#[derive(Clone)]
pub(crate) struct MoeSpec {
    pub(crate) experts: usize,
    pub(crate) top_k: usize,
    /// Each expert's intermediate size.
    pub(crate) inter: usize,
    /// Renormalise the top-k probabilities to sum to 1 (Mixtral always; Qwen by config).
    pub(crate) norm_topk: bool,
    /// Qwen's shared expert, of this intermediate size.
    pub(crate) shared: Option<usize>,
    /// How the checkpoint names an expert's three matrices: gate, up, down.
    pub(crate) names: [&'static str; 3],
    /// Where the checkpoint keeps the block under a decoder layer, when not at `mlp`
    /// (Mixtral's `block_sparse_moe`).
    pub(crate) weights_at: Option<&'static str>,
}

/// One expert this rank holds.
struct Expert {
    index: usize,
    /// `[inter, hidden]`, `[inter, hidden]`, `[hidden, inter]`.
    gate: Param,
    up: Param,
    down: Param,
}

/// Qwen's shared expert (a gated MLP with its own sites) and the gate that scales it.
struct Shared {
    mlp: Mlp,
    expert_gate: Linear,
}

pub(crate) struct Moe {
    router: Linear,
    experts: Vec<Expert>,
    shared: Option<Shared>,
    act: Activation,
    spec: MoeSpec,
    /// The expert-parallel group (the tensor-parallel ranks), when there are several.
    ep: Option<Arc<dyn Comm>>,
    /// The ranks holding the batch's other rows.
    dp: Arc<dyn Comm>,
    probs: SiteId,
    topk_experts: SiteId,
    topk_weights: SiteId,
    expert_out: SiteId,
    act_site: SiteId,
    experts_site: SiteId,
    site: SiteId,
}

impl Moe {
    /// The block at `vb` (`model.layers.<i>.mlp`) of a model described by `model` (its
    /// activation; the shared expert's MLP).
    pub(crate) fn new(vb: Vb, layer: &Vb, h: usize, model: &Spec, spec: &MoeSpec) -> Result<Self> {
        let n = spec.experts;
        if spec.top_k == 0 || spec.top_k > n {
            return Err(Error::unsupported(
                "num_experts_per_tok",
                spec.top_k,
                format!("between 1 and the number of experts ({n})"),
            ));
        }
        let site = vb.site(shape_of(&[Dim::Batch, Dim::Seq], h), Layout::Replicated)?;
        let weights = match spec.weights_at {
            Some(at) if !vb.contains("gate.weight") => {
                vb.weights_at(&format!("{}.{at}", layer.name()))
            }
            _ => vb.clone(),
        };
        if weights.contains("experts.gate_up_proj") {
            return Err(Error::unsupported(
                "expert weights",
                "`experts.gate_up_proj` (fused 3-D tensors)",
                "one tensor per expert (`experts.<e>.<matrix>.weight`), as the Hub's checkpoints store them",
            ));
        }
        let router = Linear::new(
            weights.pp("gate"),
            (h, n),
            false,
            TOKENS,
            Parallel::Replicated,
        )?;
        let tokens = |d: usize| shape_of(TOKENS, d);
        let probs = vb.internal("hook_router_probs", tokens(n), Layout::Replicated)?;
        let topk_experts =
            vb.internal("hook_topk_experts", tokens(spec.top_k), Layout::Replicated)?;
        let topk_weights =
            vb.internal("hook_topk_weights", tokens(spec.top_k), Layout::Replicated)?;
        let experts_vb = vb.pp("experts");
        let experts_site = experts_vb.site(tokens(h), Layout::Replicated)?;
        let expert_out = experts_vb.internal(
            "hook_expert_out",
            vec![Dim::Tokens, Dim::Size(spec.top_k), Dim::Size(h)],
            Layout::Replicated,
        )?;
        // Once per expert that has tokens, on its tokens.
        let act_site = experts_vb
            .pp("act_fn")
            .site(vec![Dim::Routed, Dim::Size(spec.inter)], Layout::Replicated)?;
        let tp = vb.shard().tp.clone();
        let (first, count) = block(n, n, tp.rank(), tp.size())?;
        let ew = weights.pp("experts");
        let [gate_name, up_name, down_name] = spec.names;
        // Every expert is a parameter everywhere; only its rank reads it.
        let mut experts = Vec::with_capacity(count);
        for index in 0..n {
            let e = ew.pp(index);
            let held = (first..first + count).contains(&index);
            let gate = e.pp(gate_name).get_held("weight", (spec.inter, h), held)?;
            let up = e.pp(up_name).get_held("weight", (spec.inter, h), held)?;
            let down = e.pp(down_name).get_held("weight", (h, spec.inter), held)?;
            if let (Some(gate), Some(up), Some(down)) = (gate, up, down) {
                experts.push(Expert {
                    index,
                    gate,
                    up,
                    down,
                });
            }
        }
        let shared = match spec.shared {
            None => None,
            Some(inter) => Some(Shared {
                mlp: Mlp::new(vb.pp("shared_expert"), TOKENS, (h, inter), model)?,
                expert_gate: Linear::new(
                    vb.pp("shared_expert_gate"),
                    (h, 1),
                    false,
                    TOKENS,
                    Parallel::Replicated,
                )?,
            }),
        };
        Ok(Self {
            router,
            experts,
            shared,
            act: model.act,
            spec: spec.clone(),
            ep: (tp.size() > 1).then_some(tp),
            dp: vb.shard().grid.dp.clone(),
            probs,
            topk_experts,
            topk_weights,
            expert_out,
            act_site,
            experts_site,
            site,
        })
    }

    /// # Shapes
    /// `x`: `[batch, seq, hidden]` → the same.
    pub(crate) fn forward(&self, x: &Tensor, run: &mut Run) -> FwdResult<Tensor> {
        let x = run.input(self.site, x)?;
        let (b, s, h) = x.dims3()?;
        let xt = x.reshape((b * s, h))?;
        let shared = match &self.shared {
            Some(sh) => Some(sh.mlp.forward(&xt, run)?),
            None => None,
        };
        let logits = self.router.forward(&xt, run)?;
        let probs = crate::nn::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
        let probs = run.site(self.probs, probs)?;
        let chosen = top_k(&probs, self.spec.top_k)?;
        let chosen = run.site(self.topk_experts, chosen)?;
        // An edit may have chosen other experts: they must exist.
        let n = self.spec.experts as u32;
        let ids: Vec<Vec<u32>> = chosen.to_dtype(DType::U32)?.to_vec2()?;
        if let Some(bad) = ids.iter().flatten().find(|&&e| e >= n) {
            return Err(flexmodel_core::Error::Input(format!(
                "expert {bad} chosen, the model has {n} (0..{n})"
            )));
        }
        let mut weights = probs
            .contiguous()?
            .gather(&chosen.contiguous()?, D::Minus1)?;
        if self.spec.norm_topk {
            weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
        }
        let weights = run.site(self.topk_weights, weights.to_dtype(x.dtype())?)?;
        let mut out = self.experts(&xt, &ids, &weights, run)?;
        if let (Some(sh), Some(shared)) = (&self.shared, shared) {
            let scale = candle_nn::ops::sigmoid(&sh.expert_gate.forward(&xt, run)?)?;
            out = (out + shared.broadcast_mul(&scale)?)?;
        }
        run.site(self.site, out.reshape((b, s, h))?)
    }

    /// The routed experts' weighted sum `[tokens, hidden]` (the `experts` module's output).
    /// `ids` `[tokens][top_k]` are the chosen experts, `weights` `[tokens, top_k]` theirs.
    fn experts(
        &self,
        xt: &Tensor,
        ids: &[Vec<u32>],
        weights: &Tensor,
        run: &mut Run,
    ) -> FwdResult<Tensor> {
        let (tokens, h) = xt.dims2()?;
        let k = self.spec.top_k;
        let dense = run.is_hooked(self.expert_out);
        // Under expert parallelism each rank's experts see the replicated tokens (and, unless
        // the experts' outputs are assembled before weighting, the routing weights): their
        // gradients are each rank's part, summed over the ranks in one collective.
        let (xt, weights) = match &self.ep {
            Some(ep) if dense && xt.track_op() => (tp_copy(xt, ep)?, weights.clone()),
            Some(ep) if !dense && (xt.track_op() || weights.track_op()) => {
                let joined = Tensor::cat(&[xt, &weights.to_dtype(xt.dtype())?], 1)?;
                let joined = tp_copy(&joined, ep)?;
                (
                    joined.narrow(1, 0, h)?.contiguous()?,
                    joined.narrow(1, h, k)?.to_dtype(weights.dtype())?,
                )
            }
            _ => (xt.clone(), weights.clone()),
        };
        let act_hooked = run.is_hooked(self.act_site);
        let device = xt.device();
        // Each expert's rows of `[tokens * k]` (token t's j-th choice is row t * k + j) and
        // tokens, in token order (a token chooses an expert at most once).
        let mut routed = vec![(Vec::new(), Vec::new()); self.spec.experts];
        for (t, chosen) in ids.iter().enumerate() {
            for (j, &e) in chosen.iter().enumerate() {
                routed[e as usize].0.push((t * k + j) as u32);
                routed[e as usize].1.push(t as u32);
            }
        }
        // The site fires once per expert that any of the batch's tokens chose, on every rank.
        let mut hits: Vec<f32> = routed.iter().map(|(_, toks)| toks.len() as f32).collect();
        if act_hooked && self.dp.size() > 1 {
            let hits_t = Tensor::new(hits.as_slice(), &Device::Cpu)?;
            hits = self.dp.all_reduce_sum(&hits_t)?.to_vec1()?;
        }
        // A hooked activation under expert parallelism with gradients: ranks run the experts
        // they do not hold with zero weights, so that every rank's backward meets the site's
        // collectives in the same order.
        let symmetric = self.ep.is_some() && act_hooked && xt.track_op();
        let (inter, dtype) = (self.spec.inter, xt.dtype());
        // Each chosen expert's output, in its row of `[tokens * k]`.
        let mut flat = Tensor::zeros((tokens * k, h), dtype, device)?;
        for (e, (slots, toks)) in routed.into_iter().enumerate() {
            if hits[e] == 0.0 {
                continue;
            }
            // None of this rank's rows may have chosen e where others' did (data parallel):
            // the same ops on no rows keep every rank's passes, forward and back, in step.
            let n = toks.len();
            let matrices = match self.experts.iter().find(|x| x.index == e) {
                Some(ex) => Some((ex.gate.get()?, ex.up.get()?, ex.down.get()?)),
                None if symmetric => Some((
                    Tensor::zeros((inter, h), dtype, device)?,
                    Tensor::zeros((inter, h), dtype, device)?,
                    Tensor::zeros((h, inter), dtype, device)?,
                )),
                None => None,
            };
            let toks = Tensor::from_vec(toks, n, device)?;
            let gated = match &matrices {
                Some((gate, up, _)) => {
                    let xe = xt.index_select(&toks, 0)?;
                    Some((xe.matmul(&gate.t()?)?, xe.matmul(&up.t()?)?))
                }
                None => None,
            };
            let act = match (&self.ep, act_hooked) {
                // Hooked under expert parallelism: the owner's activation, everywhere.
                (Some(ep), true) => {
                    let mine = match &gated {
                        Some((g, _)) => self.act.apply(g)?,
                        None => Tensor::zeros((n, inter), dtype, device)?,
                    };
                    let y = run.site(self.act_site, all_reduce(&mine, ep.as_ref())?)?;
                    if y.track_op() { tp_copy(&y, ep)? } else { y }
                }
                _ => match &gated {
                    Some((g, _)) => run.site(self.act_site, self.act.apply(g)?)?,
                    None => continue,
                },
            };
            let (Some((_, _, down)), Some((_, up))) = (matrices, gated) else {
                continue;
            };
            let y = (act * up)?.matmul(&down.t()?)?;
            flat = flat.index_add(&Tensor::from_vec(slots, n, device)?, &y, 0)?;
        }
        let flat = flat.reshape((tokens, k, h))?;
        let out = if dense {
            // Every chosen expert's output, assembled on every rank, then weighted.
            let full = match &self.ep {
                Some(ep) => all_reduce(&flat, ep.as_ref())?,
                None => flat,
            };
            let full = run.site(self.expert_out, full)?;
            full.broadcast_mul(&weights.unsqueeze(2)?)?.sum(1)?
        } else {
            let out = flat.broadcast_mul(&weights.unsqueeze(2)?)?.sum(1)?;
            match &self.ep {
                Some(ep) => all_reduce(&out, ep.as_ref())?,
                None => out,
            }
        };
        run.site(self.experts_site, out)
    }
}

/// The indices of the `k` largest values of each row of `probs` `[tokens, experts]`, as u32
/// `[tokens, k]`, largest first; ties go to the lower index, as `torch.topk` on the CPU.
fn top_k(probs: &Tensor, k: usize) -> FwdResult<Tensor> {
    let rows: Vec<Vec<f32>> = probs.to_dtype(DType::F32)?.to_vec2()?;
    let tokens = rows.len();
    let mut chosen = Vec::with_capacity(tokens * k);
    for row in &rows {
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        chosen.extend_from_slice(&order[..k]);
    }
    Ok(Tensor::from_vec(chosen, (tokens, k), &Device::Cpu)?.to_device(probs.device())?)
}
