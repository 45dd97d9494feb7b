//! Qwen 3 MoE: `Qwen3MoeForCausalLM` (Qwen3-30B-A3B, Qwen3-235B-A22B), Qwen MoE's routed
//! experts without the shared expert, with Qwen 3's per-head q/k norms.

use flexmodel_core::Model;

use crate::config::RawConfig;
use crate::decoder::{Common, Decoder, QkNorm, Spec};
use crate::error::Result;
use crate::llama::qwen_sliding;
use crate::qwen2_moe::experts;
use crate::weights::Vb;

pub(crate) fn load(raw: &RawConfig, vb: Vb) -> Result<Box<dyn Model>> {
    let cfg = Common::read(raw)?;
    let mut spec = Spec::llama(raw, &cfg)?;
    spec.qk_norm = QkNorm::PerHead;
    spec.sliding = qwen_sliding(raw, &cfg)?;
    spec.moe = Some(experts(raw, &cfg, false)?);
    Decoder::load(raw, vb, &cfg, spec)
}
