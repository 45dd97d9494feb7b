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
    /// Reads `dir/tokenizer.json` (`dir`: a model directory or a cached Hub name, as
    /// [`crate::load`] takes).
    ///
    /// # Errors
    /// [`Error::ModelNotFound`] for neither, [`Error::NoTokenizer`] when the file is absent,
    /// [`Error::Tokenizer`] when it is invalid.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = &crate::resolve(dir)?;
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
    pad(rows, pad_id, device, Side::Right)
}

/// One batch for generation: left-padded with `pad_id`, with an attention mask whenever lengths
/// differ (as transformers pads for `generate`; positions then come from the mask, so each row
/// generates what its prompt generates alone).
///
/// # Errors
/// No sequence, or an empty one.
pub fn pad_left(rows: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Input> {
    pad(rows, pad_id, device, Side::Left)
}

enum Side {
    Left,
    Right,
}

fn pad(rows: &[Vec<u32>], pad_id: u32, device: &Device, side: Side) -> Result<Input> {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    if rows.is_empty() || rows.iter().any(Vec::is_empty) {
        return Err(
            flexmodel_core::Error::Input("every prompt needs at least one token".into()).into(),
        );
    }
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut mask = Vec::with_capacity(rows.len() * width);
    for row in rows {
        let padding = width - row.len();
        let (before, after) = match side {
            Side::Left => (padding, 0),
            Side::Right => (0, padding),
        };
        ids.extend(
            std::iter::repeat_n(pad_id, before)
                .chain(row.iter().copied())
                .chain(std::iter::repeat_n(pad_id, after)),
        );
        mask.extend(
            std::iter::repeat_n(0u32, before)
                .chain(std::iter::repeat_n(1, row.len()))
                .chain(std::iter::repeat_n(0, after)),
        );
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

/// Token ids that end a generation, and the id that pads: from `generation_config.json`, else
/// `config.json` (`eos_token_id` may be one id or a list; `pad_token_id` defaults to the first
/// EOS id, else 0).
///
/// # Errors
/// A file that exists but is not JSON.
pub fn generation_tokens(dir: impl AsRef<Path>) -> Result<(Vec<u32>, u32)> {
    let dir = dir.as_ref();
    let mut eos = Vec::new();
    let mut pad = None;
    for file in ["generation_config.json", "config.json"] {
        let path = dir.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.clone(),
            message: format!("invalid JSON: {e}"),
        })?;
        if eos.is_empty() {
            eos = match &json["eos_token_id"] {
                serde_json::Value::Number(n) => {
                    n.as_u64().map(|n| vec![n as u32]).unwrap_or_default()
                }
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|n| n as u32)
                    .collect(),
                _ => Vec::new(),
            };
        }
        pad = pad.or_else(|| json["pad_token_id"].as_u64().map(|n| n as u32));
    }
    let pad = pad.or(eos.first().copied()).unwrap_or(0);
    Ok((eos, pad))
}
