//! Gemma 2: `Gemma2ForCausalLM`, Gemma with a norm before and after each block (sandwich),
//! soft-capped attention scores and logits (`cap * tanh(x / cap)`), scores scaled by
//! `query_pre_attn_scalar^-0.5`, and sliding-window layers alternating with global ones.

use flexmodel_core::Model;

use crate::config::RawConfig;
use crate::decoder::{Blocks, Common, Decoder, Spec};
use crate::error::Result;
use crate::nn::RmsKind;
use crate::weights::Vb;

pub(crate) fn load(raw: &RawConfig, vb: Vb) -> Result<Box<dyn Model>> {
    let cfg = Common::read(raw)?;
    let mut spec = gemma(raw, &cfg)?;
    spec.attn_softcap = raw.f64_or("attn_logit_softcapping", Some(50.0))?;
    spec.final_softcap = raw.f64_or("final_logit_softcapping", Some(30.0))?;
    spec.sliding = cfg.sliding(|i| (i + 1) % 2 != 0)?;
    Decoder::load(raw, vb, &cfg, spec)
}

/// What Gemma 2 and Gemma 3 share: Gemma's `1 + w` norms, scaled embeddings and tied head,
/// the sandwich norms, `query_pre_attn_scalar`, biases where `attention_bias` says.
pub(crate) fn gemma(raw: &RawConfig, cfg: &Common) -> Result<Spec> {
    raw.require_false("use_bidirectional_attention")?;
    let mut spec = Spec::llama(raw, cfg)?;
    spec.norm = RmsKind::Gemma;
    spec.blocks = Blocks::SANDWICH;
    spec.embed_scale = Some((cfg.hidden_size as f64).sqrt());
    spec.tie = cfg.tie_word_embeddings.unwrap_or(true);
    let scalar = raw.f64_or("query_pre_attn_scalar", Some(256.0))?;
    spec.scale = scalar.unwrap_or(256.0).powf(-0.5);
    Ok(spec)
}
