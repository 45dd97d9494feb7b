//! Text in and out: the model's `tokenizer.json`, and padded batches.

use std::path::Path;

use candle_core::{Device, Tensor};
use flexmodel_core::Input;

use crate::error::{Error, Result};

/// A Hugging Face fast tokenizer read from `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Reads `dir/tokenizer.json`.
    ///
    /// # Errors
    /// [`Error::NoTokenizer`] when the file is absent, [`Error::Tokenizer`] when it is invalid.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::NoTokenizer {
                dir: dir.to_path_buf(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    /// Token ids of `text`, with the special tokens the tokenizer adds by default (as
    /// transformers' `tokenizer(text)`).
    ///
    /// # Errors
    /// The tokenizer failed.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`.
    ///
    /// # Errors
    /// The tokenizer failed.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

/// One batch from sequences of different lengths: right-padded with `pad_id`, with an
/// attention mask (1 real, 0 padding) whenever lengths differ. Positions of real tokens are
/// then `0..len`, so each row computes exactly what that sequence computes alone.
///
/// # Errors
/// No sequence, or an empty one.
pub fn pad_right(rows: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Input> {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    if rows.is_empty() || rows.iter().any(Vec::is_empty) {
        return Err(
            flexmodel_core::Error::Input("every prompt needs at least one token".into()).into(),
        );
    }
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut mask = Vec::with_capacity(rows.len() * width);
    for row in rows {
        for i in 0..width {
            ids.push(row.get(i).copied().unwrap_or(pad_id));
            mask.push(u32::from(i < row.len()));
        }
    }
    let shape = (rows.len(), width);
    let input_ids = Tensor::from_vec(ids, shape, device)?;
    if rows.iter().all(|r| r.len() == width) {
        return Ok(Input::new(input_ids));
    }
    Ok(Input::with_mask(
        input_ids,
        Tensor::from_vec(mask, shape, device)?,
    ))
}
