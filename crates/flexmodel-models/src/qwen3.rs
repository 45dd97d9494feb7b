//! Qwen 3: `Qwen3ForCausalLM`, Qwen2 with an RMS norm over each head of the queries and keys
//! (`q_norm`, `k_norm`) and biases only where `attention_bias` asks for them.

use flexmodel_core::Model;

use crate::config::RawConfig;
use crate::decoder::{Common, Decoder, QkNorm, Spec};
use crate::error::Result;
use crate::llama::qwen_sliding;
use crate::weights::Vb;

pub(crate) fn load(raw: &RawConfig, vb: Vb) -> Result<Box<dyn Model>> {
    let cfg = Common::read(raw)?;
    let mut spec = Spec::llama(raw, &cfg)?;
    spec.qk_norm = QkNorm::PerHead;
    spec.sliding = qwen_sliding(raw, &cfg)?;
    Decoder::load(raw, vb, &cfg, spec)
}
