//! Gemma 3 (text): `Gemma3ForCausalLM`, Gemma 2 with per-head q/k norms, no soft-capping
//! unless the config sets it, five local (sliding-window) layers per global one, and a rope
//! per layer type: the global layers' (`rope_theta`, with its scaling) and the local layers'
//! (`rope_local_base_freq`).

use flexmodel_core::Model;
use serde_json::{Value, json};

use crate::config::RawConfig;
use crate::decoder::{Common, Decoder, QkNorm};
use crate::error::Result;
use crate::gemma2::gemma;
use crate::rope::Rope;
use crate::weights::Vb;

pub(crate) fn load(raw: &RawConfig, vb: Vb) -> Result<Box<dyn Model>> {
    let cfg = Common::read(raw)?;
    let mut spec = gemma(raw, &cfg)?;
    spec.qk_norm = QkNorm::PerHeadTransposed;
    spec.attn_softcap = raw.f64_or("attn_logit_softcapping", None)?;
    spec.final_softcap = raw.f64_or("final_logit_softcapping", None)?;
    let pattern = raw
        .f64_or("sliding_window_pattern", Some(6.0))?
        .unwrap_or(6.0) as usize;
    spec.sliding = cfg.sliding(|i| (i + 1) % pattern.max(1) != 0)?;
    // transformers computes the ropes in the order of a set of the layer types; the
    // fixtures were made where that is full, then sliding (fixtures/families.py).
    let (full, local) = rope_parameters(raw);
    let (head_dim, max) = (spec.heads.head_dim, cfg.max_position_embeddings);
    let global = Rope::from_params(raw, &full, head_dim, max)?;
    let local = Rope::from_params(raw, &local, head_dim, max)?;
    let used = |sliding: bool| spec.sliding.contains(&sliding);
    spec.ropes.clear();
    if used(false) {
        spec.ropes.push(global);
    }
    if used(true) {
        spec.ropes.push(local);
    }
    let local_index = spec.ropes.len() - 1;
    spec.rope_of_layer = spec
        .sliding
        .iter()
        .map(|&s| if s { local_index } else { 0 })
        .collect();
    Decoder::load(raw, vb, &cfg, spec)
}

/// The global and the local rope settings: transformers 5's `rope_parameters` per layer type,
/// or 4.x's `rope_theta` (default 1e6) + `rope_scaling` and `rope_local_base_freq` (1e4).
fn rope_parameters(raw: &RawConfig) -> (Value, Value) {
    let per_type = raw
        .get("rope_parameters")
        .filter(|p| p.get("full_attention").is_some());
    if let Some(p) = per_type {
        return (p["full_attention"].clone(), p["sliding_attention"].clone());
    }
    let theta = |key: &str, default: f64| raw.get(key).and_then(Value::as_f64).unwrap_or(default);
    let mut full = raw
        .get("rope_scaling")
        .cloned()
        .unwrap_or_else(|| json!({}));
    if let Some(map) = full.as_object_mut() {
        map.entry("rope_theta")
            .or_insert(json!(theta("rope_theta", 1e6)));
    }
    let local = json!({"rope_type": "default", "rope_theta": theta("rope_local_base_freq", 1e4)});
    (full, local)
}
