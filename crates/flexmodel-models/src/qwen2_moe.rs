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
    num_experts: usize,
    num_experts_per_tok: usize,
    moe_intermediate_size: usize,
    shared_expert_intermediate_size: usize,
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
    let e: Experts = raw.parse()?;
    let mut spec = Spec::llama(raw, &cfg)?;
    (spec.qkv_bias, spec.o_bias) = (true, false);
    spec.sliding = qwen_sliding(raw, &cfg)?;
    let step = e.decoder_sparse_step.max(1);
    let sparse = (0..cfg.num_hidden_layers)
        .map(|i| !e.mlp_only_layers.contains(&i) && e.num_experts > 0 && (i + 1) % step == 0)
        .collect();
    let moe = MoeSpec {
        experts: e.num_experts,
        top_k: e.num_experts_per_tok,
        inter: e.moe_intermediate_size,
        norm_topk: e.norm_topk_prob,
        shared: Some(e.shared_expert_intermediate_size),
        names: ["gate_proj", "up_proj", "down_proj"],
        weights_at: None,
    };
    spec.moe = Some((moe, sparse));
    Decoder::load(raw, vb, &cfg, spec)
}
