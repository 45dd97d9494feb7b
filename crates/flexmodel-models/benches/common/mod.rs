//! The benchmark checkpoints: random Llama-shaped models written once in HF layout, so that
//! flexmodel and transformers load identical weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub struct Shape {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub inter: usize,
    pub vocab: usize,
}

pub const LLAMA_125M: Shape = Shape {
    layers: 12,
    hidden: 768,
    heads: 12,
    kv_heads: 4,
    inter: 2048,
    vocab: 32000,
};
pub const SMOKE: Shape = Shape {
    layers: 2,
    hidden: 64,
    heads: 4,
    kv_heads: 2,
    inter: 128,
    vocab: 512,
};

/// Writes a random Llama checkpoint once (reused across runs).
pub fn checkpoint(s: &Shape, dir: &Path) -> PathBuf {
    if dir.join("model.safetensors").exists() {
        return dir.to_path_buf();
    }
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": s.vocab, "hidden_size": s.hidden, "intermediate_size": s.inter,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "hidden_act": "silu", "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let dev = Device::Cpu;
    let hd = s.hidden / s.heads;
    let mut w: HashMap<String, Tensor> = HashMap::new();
    let mut randn = |name: String, shape: (usize, usize)| {
        w.insert(name, Tensor::randn(0f32, 0.02, shape, &dev).unwrap());
    };
    randn("model.embed_tokens.weight".into(), (s.vocab, s.hidden));
    randn("lm_head.weight".into(), (s.vocab, s.hidden));
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        randn(
            format!("{p}.self_attn.q_proj.weight"),
            (s.heads * hd, s.hidden),
        );
        randn(
            format!("{p}.self_attn.k_proj.weight"),
            (s.kv_heads * hd, s.hidden),
        );
        randn(
            format!("{p}.self_attn.v_proj.weight"),
            (s.kv_heads * hd, s.hidden),
        );
        randn(
            format!("{p}.self_attn.o_proj.weight"),
            (s.hidden, s.heads * hd),
        );
        randn(format!("{p}.mlp.gate_proj.weight"), (s.inter, s.hidden));
        randn(format!("{p}.mlp.up_proj.weight"), (s.inter, s.hidden));
        randn(format!("{p}.mlp.down_proj.weight"), (s.hidden, s.inter));
    }
    let ones = Tensor::ones(s.hidden, DType::F32, &dev).unwrap();
    for i in 0..s.layers {
        w.insert(
            format!("model.layers.{i}.input_layernorm.weight"),
            ones.clone(),
        );
        w.insert(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            ones.clone(),
        );
    }
    w.insert("model.norm.weight".into(), ones);
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    dir.to_path_buf()
}

impl Shape {
    /// Number of parameters.
    pub fn params(&self) -> usize {
        let kv = self.kv_heads * (self.hidden / self.heads);
        self.vocab * self.hidden * 2
            + self.layers
                * (2 * self.hidden * self.hidden
                    + 2 * self.hidden * kv
                    + 3 * self.hidden * self.inter)
    }
}

/// Where a benchmark checkpoint lives (reused across runs).
pub fn checkpoint_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/flexmodel-bench")
        .join(name)
}

/// Deterministic token ids (a linear congruential generator), the same in every run.
pub fn token_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect()
}
