//! The Llama family: `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` and
//! `GemmaForCausalLM`: the [`Decoder`] as it is, with sliding windows (Mistral, Qwen2), q/k/v
//! biases (Qwen2), and Gemma's scaled embeddings, `1 + w` norms and tied head.

use flexmodel_core::Model;

use crate::config::RawConfig;
use crate::decoder::{Common, Decoder, Spec};
use crate::error::Result;
use crate::nn::RmsKind;
use crate::weights::Vb;

/// Qwen2 (4.x configs): sliding windows only when this is set, from layer `max_window_layers`
/// on.
#[derive(serde::Deserialize)]
struct Qwen2Window {
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
}

/// Qwen's sliding layers: `layer_types`, or (4.x) from `max_window_layers` on when
/// `use_sliding_window` is set.
pub(crate) fn qwen_sliding(raw: &RawConfig, cfg: &Common) -> Result<Vec<bool>> {
    let w: Qwen2Window = raw.parse()?;
    let from = w.max_window_layers.unwrap_or(0);
    cfg.sliding(|i| w.use_sliding_window == Some(true) && i >= from)
}

pub(crate) fn load(raw: &RawConfig, vb: Vb) -> Result<Box<dyn Model>> {
    let cfg = Common::read(raw)?;
    let mut spec = Spec::llama(raw, &cfg)?;
    match raw.model_type()? {
        "mistral" => {
            spec.sliding = cfg.sliding(|_| true)?;
            (spec.qkv_bias, spec.o_bias) = (false, false);
        }
        "qwen2" => {
            spec.sliding = qwen_sliding(raw, &cfg)?;
            (spec.qkv_bias, spec.o_bias) = (true, false);
        }
        "gemma" => {
            spec.norm = RmsKind::Gemma;
            spec.embed_scale = Some((cfg.hidden_size as f64).sqrt());
            spec.tie = cfg.tie_word_embeddings.unwrap_or(true);
            (spec.qkv_bias, spec.o_bias) = (false, false);
            spec.sliding = cfg.sliding(|_| false)?;
        }
        _ => spec.sliding = cfg.sliding(|_| false)?,
    }
    Decoder::load(raw, vb, &cfg, spec)
}
