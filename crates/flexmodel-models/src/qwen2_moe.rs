//! Qwen MoE: `Qwen2MoeForCausalLM` (Qwen1.5-MoE, Qwen2-57B-A14B), Qwen2 with a sparse mixture
//! of experts on the layers `decoder_sparse_step` and `mlp_only_layers` choose (a dense MLP on
//! the others), a shared expert beside the routed ones, scaled by `sigmoid(shared_expert_gate)`,
//! and top-k weights renormalised only if `norm_topk_prob`.

use flexmodel_core::Model;
use serde::Deserialize;

use crate::config::RawConfig;
use crate::decoder::{Common, Decoder, Spec};
use crate::error::Result;
use crate::llama::qwen_sliding;
use crate::moe::MoeSpec;
use crate::weights::Vb;

#[derive(Deserialize)]
struct Experts {
    /// (transformers 5 writes Qwen 3 MoE's as `num_local_experts`.)
    #[serde(alias = "num_local_experts")]
    num_experts: usize,
    num_experts_per_tok: usize,
    moe_intermediate_size: usize,
    shared_expert_intermediate_size: Option<usize>,
    #[serde(default)]
    norm_topk_prob: bool,
    #[serde(default = "one")]
    decoder_sparse_step: usize,
    #[serde(default)]
    mlp_only_layers: Vec<usize>,
}

fn one() -> usize {
    1
}

pub(crate) fn load(raw: &RawConfig, vb: Vb) -> Result<Box<dyn Model>> {
    let cfg = Common::read(raw)?;
    let mut spec = Spec::llama(raw, &cfg)?;
    (spec.qkv_bias, spec.o_bias) = (true, false);
    spec.sliding = qwen_sliding(raw, &cfg)?;
    spec.moe = Some(experts(raw, &cfg, true)?);
    Decoder::load(raw, vb, &cfg, spec)
}

/// Qwen's MoE blocks (with the shared expert when `shared`) and the layers that have them.
pub(crate) fn experts(raw: &RawConfig, cfg: &Common, shared: bool) -> Result<(MoeSpec, Vec<bool>)> {
    let e: Experts = raw.parse()?;
    let step = e.decoder_sparse_step.max(1);
    let sparse = (0..cfg.num_hidden_layers)
        .map(|i| !e.mlp_only_layers.contains(&i) && e.num_experts > 0 && (i + 1) % step == 0)
        .collect();
    let shared = match (shared, e.shared_expert_intermediate_size) {
        (false, _) => None,
        (true, Some(size)) => Some(size),
        (true, None) => return Err(raw.error("no `shared_expert_intermediate_size` field")),
    };
    let moe = MoeSpec {
        experts: e.num_experts,
        top_k: e.num_experts_per_tok,
        inter: e.moe_intermediate_size,
        norm_topk: e.norm_topk_prob,
        shared,
        names: ["gate_proj", "up_proj", "down_proj"],
        weights_at: None,
    };
    Ok((moe, sparse))
}
