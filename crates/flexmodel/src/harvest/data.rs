//! Documents from a data file, cut into the rows the model reads.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::Error;
use crate::Tokenizer;

/// Where the documents come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "format")]
pub enum DataSource {
    /// A text file, one document per line (empty lines are skipped; a document's index is
    /// its line number, from 0).
    Text {
        /// The file.
        path: PathBuf,
    },
    /// JSON Lines, the text of each document in `field` (index: line number, from 0).
    Jsonl {
        /// The file.
        path: PathBuf,
        /// The field holding the text.
        field: String,
    },
    /// Token ids: a safetensors file with an integer `input_ids` `[docs, len]` and optionally
    /// an `attention_mask` (0 marks padding, which is dropped). Index: the row.
    Ids {
        /// The file.
        path: PathBuf,
    },
}

impl DataSource {
    /// The source a file's extension names: `.txt`, `.jsonl` (text in `field`) or
    /// `.safetensors`.
    ///
    /// # Errors
    /// Another extension.
    pub fn from_path(path: impl Into<PathBuf>, field: &str) -> Result<Self, Error> {
        let path = path.into();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "txt" => Ok(Self::Text { path }),
            "jsonl" => Ok(Self::Jsonl {
                path,
                field: field.to_string(),
            }),
            "safetensors" => Ok(Self::Ids { path }),
            _ => Err(Error::Data(format!(
                "{}: unknown data format `.{ext}`; accepted: .txt (one document per line), \
                 .jsonl (a text field), .safetensors (input_ids)",
                path.display()
            ))),
        }
    }

    /// The data file.
    pub fn path(&self) -> &Path {
        match self {
            Self::Text { path } | Self::Jsonl { path, .. } | Self::Ids { path } => path,
        }
    }

    /// The documents, tokenized, in file order.
    ///
    /// # Errors
    /// The file cannot be read; text without a tokenizer.
    pub fn documents<'a>(
        &'a self,
        tokenizer: Option<&'a Tokenizer>,
    ) -> Result<Box<dyn Iterator<Item = Result<Document, Error>> + 'a>, Error> {
        let open = |path: &Path| {
            File::open(path).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        let need_tokenizer = || {
            tokenizer.ok_or_else(|| {
                Error::Data(format!(
                    "{} holds text but the model directory has no tokenizer.json; give token \
                     ids (.safetensors with input_ids) instead",
                    self.path().display()
                ))
            })
        };
        Ok(match self {
            Self::Text { path } => Box::new(TextDocs {
                lines: BufReader::new(open(path)?).lines(),
                line: 0,
                read: 0,
                size: file_size(path)?,
                path,
                tokenizer: need_tokenizer()?,
                field: None,
            }),
            Self::Jsonl { path, field } => Box::new(TextDocs {
                lines: BufReader::new(open(path)?).lines(),
                line: 0,
                read: 0,
                size: file_size(path)?,
                path,
                tokenizer: need_tokenizer()?,
                field: Some(field),
            }),
            Self::Ids { path } => Box::new(id_rows(path)?.into_iter().map(Ok)),
        })
    }
}

fn file_size(path: &Path) -> Result<u64, Error> {
    std::fs::metadata(path)
        .map(|m| m.len().max(1))
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// One document: its index in the data file and its tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// Index in the file (line or row).
    pub index: usize,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// How far through the data file it ends, from 0 to 1.
    pub end: f64,
}

struct TextDocs<'a> {
    lines: Lines<BufReader<File>>,
    line: usize,
    /// Bytes read so far, of `size`.
    read: u64,
    size: u64,
    path: &'a Path,
    tokenizer: &'a Tokenizer,
    field: Option<&'a str>,
}

impl Iterator for TextDocs<'_> {
    type Item = Result<Document, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let index = self.line;
            self.line += 1;
            let line = match self.lines.next()? {
                Ok(line) => line,
                Err(source) => {
                    return Some(Err(Error::Io {
                        path: self.path.to_path_buf(),
                        source,
                    }));
                }
            };
            self.read += line.len() as u64 + 1;
            if line.trim().is_empty() {
                continue;
            }
            let text = match self.field {
                None => line,
                Some(field) => match json_text(&line, field) {
                    Ok(text) => text,
                    Err(message) => {
                        return Some(Err(Error::Data(format!(
                            "{} line {}: {message}",
                            self.path.display(),
                            index + 1
                        ))));
                    }
                },
            };
            let tokens = match self.tokenizer.encode(&text) {
                Ok(tokens) => tokens,
                Err(e) => return Some(Err(Error::Load(e))),
            };
            if !tokens.is_empty() {
                let end = (self.read as f64 / self.size as f64).min(1.0);
                return Some(Ok(Document { index, tokens, end }));
            }
        }
    }
}

/// The string in `field` of a JSON object line.
fn json_text(line: &str, field: &str) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let object = value
        .as_object()
        .ok_or_else(|| "not a JSON object".to_string())?;
    match object.get(field) {
        Some(serde_json::Value::String(text)) => Ok(text.clone()),
        Some(other) => Err(format!("field `{field}` is not a string: {other}")),
        None => Err(format!(
            "no field `{field}` (fields: {}); choose it with --text-field",
            object.keys().cloned().collect::<Vec<_>>().join(", ")
        )),
    }
}

/// The rows of a token-id file, padding dropped.
fn id_rows(path: &Path) -> Result<Vec<Document>, Error> {
    let bad = |message: String| Error::Data(format!("{}: {message}", path.display()));
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
    let ids = tensors
        .get("input_ids")
        .ok_or_else(|| bad("no `input_ids` tensor (an integer [docs, len])".into()))?;
    if !ids.dtype().is_int() || ids.rank() != 2 {
        return Err(bad(format!(
            "`input_ids` must be an integer [docs, len] tensor, got {:?} {:?}",
            ids.dtype(),
            ids.dims()
        )));
    }
    let ids: Vec<Vec<i64>> = ids.to_dtype(DType::I64)?.to_vec2()?;
    let mask: Option<Vec<Vec<i64>>> = match tensors.get("attention_mask") {
        Some(m) if m.dims() == [ids.len(), ids.first().map_or(0, Vec::len)] => {
            Some(m.to_dtype(DType::I64)?.to_vec2()?)
        }
        Some(m) => {
            return Err(bad(format!(
                "`attention_mask` {:?} does not match `input_ids` [{}, {}]",
                m.dims(),
                ids.len(),
                ids.first().map_or(0, Vec::len)
            )));
        }
        None => None,
    };
    let rows = ids.len();
    let mut docs = Vec::with_capacity(rows);
    for (index, row) in ids.into_iter().enumerate() {
        let mut tokens = Vec::with_capacity(row.len());
        for (j, id) in row.into_iter().enumerate() {
            if mask.as_ref().is_some_and(|m| m[index][j] == 0) {
                continue;
            }
            tokens.push(
                u32::try_from(id)
                    .map_err(|_| bad(format!("row {index}: token id {id} out of range")))?,
            );
        }
        if !tokens.is_empty() {
            let end = (index + 1) as f64 / rows as f64;
            docs.push(Document { index, tokens, end });
        }
    }
    Ok(docs)
}

/// One row of a batch: up to `seq_len` tokens, each with its document and its position in
/// that document.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Document index of each token.
    pub docs: Vec<i64>,
    /// Position of each token in its document.
    pub positions: Vec<i64>,
    /// How far through the data file the last document read into it ends, from 0 to 1.
    pub data_end: f64,
}

impl Row {
    /// A one-token row that fills a batch and is not stored.
    pub(crate) fn placeholder() -> Self {
        Self {
            ids: vec![0],
            docs: vec![-1],
            positions: vec![-1],
            data_end: 0.0,
        }
    }
}

/// Cuts documents into rows: one row per document, cut at `seq_len` (truncation), or
/// documents laid end to end and cut every `seq_len` tokens (packing; a document may continue
/// in the next row). Stops after `max_tokens` tokens.
pub struct Rows<'a> {
    docs: Box<dyn Iterator<Item = Result<Document, Error>> + 'a>,
    seq_len: usize,
    packing: bool,
    left: Option<usize>,
    /// Packing: the unread rest of the current document.
    pending: VecDeque<(Document, usize)>,
}

impl<'a> Rows<'a> {
    /// Rows of `seq_len` tokens from `docs`.
    pub fn new(
        docs: Box<dyn Iterator<Item = Result<Document, Error>> + 'a>,
        seq_len: usize,
        packing: bool,
        max_tokens: Option<usize>,
    ) -> Self {
        Self {
            docs,
            seq_len,
            packing,
            left: max_tokens,
            pending: VecDeque::new(),
        }
    }
}

impl Iterator for Rows<'_> {
    type Item = Result<Row, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        let room = self.left.map_or(self.seq_len, |l| l.min(self.seq_len));
        if room == 0 {
            return None;
        }
        let mut row = Row::default();
        while row.ids.len() < room {
            let (doc, start) = match self.pending.pop_front() {
                Some(rest) => rest,
                None => match self.docs.next() {
                    None => break,
                    Some(Err(e)) => return Some(Err(e)),
                    Some(Ok(doc)) => (doc, 0),
                },
            };
            let take = (doc.tokens.len() - start).min(room - row.ids.len());
            row.ids.extend_from_slice(&doc.tokens[start..start + take]);
            row.docs.extend(std::iter::repeat_n(doc.index as i64, take));
            row.positions
                .extend((start..start + take).map(|p| p as i64));
            row.data_end = doc.end;
            if !self.packing {
                break;
            }
            if start + take < doc.tokens.len() {
                self.pending.push_back((doc, start + take));
            }
        }
        if row.ids.is_empty() {
            return None;
        }
        if let Some(left) = &mut self.left {
            *left -= row.ids.len();
        }
        Some(Ok(row))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(lengths: &[usize]) -> Box<dyn Iterator<Item = Result<Document, Error>>> {
        let docs: Vec<Document> = lengths
            .iter()
            .enumerate()
            .map(|(index, &n)| Document {
                index,
                tokens: (0..n as u32).map(|t| 100 * index as u32 + t).collect(),
                end: (index + 1) as f64 / lengths.len() as f64,
            })
            .collect();
        Box::new(docs.into_iter().map(Ok))
    }

    fn rows(lengths: &[usize], seq_len: usize, packing: bool, max: Option<usize>) -> Vec<Row> {
        Rows::new(docs(lengths), seq_len, packing, max)
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn truncation_gives_a_row_per_document() {
        let got = rows(&[5, 2], 3, false, None);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].ids, [0, 1, 2]);
        assert_eq!(got[1].ids, [100, 101]);
        assert_eq!(got[1].docs, [1, 1]);
        assert_eq!(got[1].positions, [0, 1]);
    }

    #[test]
    fn packing_continues_documents_across_rows() {
        let got = rows(&[5, 2, 1], 3, true, None);
        let ids: Vec<Vec<u32>> = got.iter().map(|r| r.ids.clone()).collect();
        assert_eq!(ids, [vec![0, 1, 2], vec![3, 4, 100], vec![101, 200]]);
        assert_eq!(got[1].docs, [0, 0, 1]);
        assert_eq!(got[1].positions, [3, 4, 0]);
        assert_eq!(got[2].positions, [1, 0]);
    }

    #[test]
    fn the_token_limit_cuts_the_last_row() {
        let got = rows(&[5, 2, 1], 3, true, Some(4));
        assert_eq!(got.iter().map(|r| r.ids.len()).sum::<usize>(), 4);
        assert_eq!(got[1].ids, [3]);
    }

    #[test]
    fn jsonl_errors_name_the_field_and_the_fields_there() {
        assert_eq!(json_text(r#"{"text": "hi"}"#, "text").unwrap(), "hi");
        let err = json_text(r#"{"body": "hi", "id": 3}"#, "text").unwrap_err();
        assert!(
            err.contains("no field `text`") && err.contains("body, id"),
            "{err}"
        );
        assert!(
            json_text("[1]", "text")
                .unwrap_err()
                .contains("not a JSON object")
        );
    }
}
