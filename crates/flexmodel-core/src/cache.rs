//! The key/value cache of a generation: per attention layer, the keys and values of every
//! position processed so far.

use candle_core::Tensor;

use crate::Result;

/// Keys and values per attention layer, `[batch, kv_heads, positions, head_dim]` each.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of positions cached (the same for every layer between passes).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends the keys and values of this pass for `layer`; returns those of every position.
    ///
    /// # Shapes
    /// `k`, `v`: `[batch, kv_heads, seq, head_dim]` → `[batch, kv_heads, len + seq, head_dim]`.
    ///
    /// # Errors
    /// Shapes that do not extend the cached ones.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let (k, v) = match &self.layers[layer] {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Records that a pass of `seq` positions has been appended to every layer.
    pub(crate) fn advance(&mut self, seq: usize) {
        self.len += seq;
    }
}
