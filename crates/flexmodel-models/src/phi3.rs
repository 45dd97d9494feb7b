//! Phi-3: `Phi3ForCausalLM`, Llama with fused projections (`qkv_proj`: queries, keys, values;
//! `gate_up_proj`: gate, up; tensor parallelism splits each part by heads or columns),
//! residual dropouts that are sites, LongRoPE scaling, and a sliding window on every layer
//! when the config sets one.

use flexmodel_core::Model;

use crate::config::RawConfig;
use crate::decoder::{Blocks, Common, Decoder, GateUp, Qkv, Spec};
use crate::error::Result;
use crate::weights::Vb;

pub(crate) fn load(raw: &RawConfig, vb: Vb) -> Result<Box<dyn Model>> {
    let cfg = Common::read(raw)?;
    let mut spec = Spec::llama(raw, &cfg)?;
    spec.qkv = Qkv::Fused;
    spec.gate_up = GateUp::Fused;
    (spec.qkv_bias, spec.o_bias, spec.mlp_bias) = (false, false, false);
    spec.act_name = "activation_fn";
    spec.blocks = Blocks {
        dropouts: Some(("resid_attn_dropout", "resid_mlp_dropout")),
        ..Blocks::PRE_NORM
    };
    spec.sliding = vec![cfg.sliding_window.is_some(); cfg.num_hidden_layers];
    Decoder::load(raw, vb, &cfg, spec)
}
