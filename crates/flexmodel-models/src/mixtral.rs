//! Mixtral: `MixtralForCausalLM`, Mistral with a sparse mixture of experts in place of each
//! MLP (`num_local_experts` experts, `num_experts_per_tok` per token, weights renormalised
//! over the chosen ones). Checkpoints keep the block's weights under `block_sparse_moe`
//! (experts' `w1` gate, `w3` up, `w2` down); its sites are transformers 5's `mlp`.

use flexmodel_core::Model;
use serde::Deserialize;

use crate::config::RawConfig;
use crate::decoder::{Common, Decoder, Spec};
use crate::error::Result;
use crate::moe::MoeSpec;
use crate::weights::Vb;

#[derive(Deserialize)]
struct Experts {
    #[serde(default = "eight")]
    num_local_experts: usize,
    #[serde(default = "two")]
    num_experts_per_tok: usize,
}

fn eight() -> usize {
    8
}
fn two() -> usize {
    2
}

pub(crate) fn load(raw: &RawConfig, vb: Vb) -> Result<Box<dyn Model>> {
    let cfg = Common::read(raw)?;
    let experts: Experts = raw.parse()?;
    let mut spec = Spec::llama(raw, &cfg)?;
    (spec.qkv_bias, spec.o_bias) = (false, false);
    spec.sliding = cfg.sliding(|_| true)?;
    let moe = MoeSpec {
        experts: experts.num_local_experts,
        top_k: experts.num_experts_per_tok,
        inter: cfg.intermediate_size,
        norm_topk: true,
        shared: None,
        names: ["w1", "w3", "w2"],
        weights_at: Some("block_sparse_moe"),
    };
    spec.moe = Some((moe, vec![true; cfg.num_hidden_layers]));
    Decoder::load(raw, vb, &cfg, spec)
}
