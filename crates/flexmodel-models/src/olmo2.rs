//! OLMo 2: `Olmo2ForCausalLM`, Llama with its norms after the blocks instead of before
//! (`post_attention_layernorm`, `post_feedforward_layernorm` on each block's output) and an
//! RMS norm over the whole query and key projections (`q_norm`, `k_norm`), before the heads
//! are split out (under tensor parallelism the sum of squares is summed over ranks).

use flexmodel_core::Model;

use crate::config::RawConfig;
use crate::decoder::{Blocks, Common, Decoder, QkNorm, Spec};
use crate::error::Result;
use crate::weights::Vb;

pub(crate) fn load(raw: &RawConfig, vb: Vb) -> Result<Box<dyn Model>> {
    let cfg = Common::read(raw)?;
    let mut spec = Spec::llama(raw, &cfg)?;
    spec.qk_norm = QkNorm::Whole;
    spec.blocks = Blocks {
        input: None,
        post_attention: Some("post_attention_layernorm"),
        pre_mlp: None,
        post_mlp: Some("post_feedforward_layernorm"),
        dropouts: None,
    };
    spec.sliding = cfg.sliding(|_| false)?;
    Decoder::load(raw, vb, &cfg, spec)
}
