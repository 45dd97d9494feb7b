//! Random Llama-shaped checkpoints in Hugging Face layout, written once: what the benchmarks
//! load (flexmodel and transformers read identical weights), and a model to try a pipeline on
//! without a download.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The shape of a random Llama.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Decoder layers.
    pub layers: usize,
    /// Residual width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// MLP width.
    pub inter: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

/// 12 layers, hidden 768, 12 heads, 4 KV heads, MLP 2048, vocabulary 32000: 124.6M parameters
/// (the shape of `shared/tools/peers/cpu_baseline.py`).
pub const LLAMA_125M: Shape = Shape {
    layers: 12,
    hidden: 768,
    heads: 12,
    kv_heads: 4,
    inter: 2048,
    vocab: 32000,
};
/// 2 layers, hidden 64: for smoke runs.
pub const SMOKE: Shape = Shape {
    layers: 2,
    hidden: 64,
    heads: 4,
    kv_heads: 2,
    inter: 128,
    vocab: 512,
};

impl Shape {
    /// Writes a checkpoint of this shape into `dir` (`config.json`, `model.safetensors`: weights
    /// from N(0, 0.02), norms 1), unless one is there already.
    ///
    /// # Errors
    /// The directory cannot be written.
    pub fn write(&self, dir: &Path) -> Result<()> {
        if dir.join("model.safetensors").exists() {
            return Ok(());
        }
        let io = |source| Error::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let config = serde_json::json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.vocab, "hidden_size": self.hidden, "intermediate_size": self.inter,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
            "hidden_act": "silu", "torch_dtype": "float32"
        });
        std::fs::write(dir.join("config.json"), config.to_string()).map_err(io)?;
        let dev = Device::Cpu;
        let hd = self.hidden / self.heads;
        let mut w: HashMap<String, Tensor> = HashMap::new();
        let mut randn = |name: String, shape: (usize, usize)| -> Result<()> {
            w.insert(name, Tensor::randn(0f32, 0.02, shape, &dev)?);
            Ok(())
        };
        randn(
            "model.embed_tokens.weight".into(),
            (self.vocab, self.hidden),
        )?;
        randn("lm_head.weight".into(), (self.vocab, self.hidden))?;
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            randn(
                format!("{p}.self_attn.q_proj.weight"),
                (self.heads * hd, self.hidden),
            )?;
            randn(
                format!("{p}.self_attn.k_proj.weight"),
                (self.kv_heads * hd, self.hidden),
            )?;
            randn(
                format!("{p}.self_attn.v_proj.weight"),
                (self.kv_heads * hd, self.hidden),
            )?;
            randn(
                format!("{p}.self_attn.o_proj.weight"),
                (self.hidden, self.heads * hd),
            )?;
            randn(
                format!("{p}.mlp.gate_proj.weight"),
                (self.inter, self.hidden),
            )?;
            randn(format!("{p}.mlp.up_proj.weight"), (self.inter, self.hidden))?;
            randn(
                format!("{p}.mlp.down_proj.weight"),
                (self.hidden, self.inter),
            )?;
        }
        let ones = Tensor::ones(self.hidden, DType::F32, &dev)?;
        for i in 0..self.layers {
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
        candle_core::safetensors::save(&w, dir.join("model.safetensors"))?;
        Ok(())
    }

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
