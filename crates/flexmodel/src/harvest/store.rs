//! The output directory: safetensors shards and `manifest.json`. Every file is written under a
//! temporary name, synced, and renamed when complete, so a file under its final name is always
//! whole; the manifest lists the shards that are.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{DataSource, Error, Settings};

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";

/// What a harvest directory holds, in `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// `flexmodel-harvest/1`.
    pub format: String,
    /// The model the activations come from.
    pub model: ModelIdentity,
    /// The data they were computed on.
    pub data: DataIdentity,
    /// The options that shape the output.
    pub settings: Settings,
    /// Each stored tensor (`input_ids`, `doc`, `position` and one per captured site): its
    /// shape after the leading token axis, and its dtype.
    pub tensors: BTreeMap<String, TensorEntry>,
    /// Complete shards, in order.
    pub shards: Vec<ShardEntry>,
    /// The statistics file (statistics mode), as of the last shard.
    pub stats: Option<String>,
    /// Whether the whole dataset has been harvested.
    pub complete: bool,
}

/// Identity of the model directory: content hashes (xxh3-128) of its files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// The directory, as given.
    pub dir: PathBuf,
    /// Hash of `config.json`.
    pub config: String,
    /// Hash of `tokenizer.json`, if there is one.
    pub tokenizer: Option<String>,
    /// Hash of each weight file, by name.
    pub weights: BTreeMap<String, String>,
}

/// Identity of the data file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataIdentity {
    /// Where the documents come from.
    pub source: DataSource,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its content hash (xxh3-128).
    pub hash: String,
}

/// One stored tensor kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Shape after the token axis.
    pub shape: Vec<usize>,
    /// `F32`, `F16`, `BF16` or `I64`.
    pub dtype: String,
}

/// One complete shard: a checkpoint of the harvest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name in the directory (`None` when only statistics are kept).
    pub file: Option<String>,
    /// Rows (model input sequences) it covers: `[start, end)`.
    pub rows: [usize; 2],
    /// Stored tokens it holds: `[start, end)` in the whole harvest.
    pub tokens: [usize; 2],
    /// First and last document index it holds tokens of (`[-1, -1]` for none).
    pub docs: [i64; 2],
}

impl Manifest {
    /// Rows covered by complete shards.
    pub fn rows_done(&self) -> usize {
        self.shards.last().map_or(0, |s| s.rows[1])
    }

    /// Stored tokens in complete shards.
    pub fn tokens_done(&self) -> usize {
        self.shards.last().map_or(0, |s| s.tokens[1])
    }

    /// Reads `dir/manifest.json`, if there is one.
    ///
    /// # Errors
    /// The file cannot be read or is not a manifest.
    pub fn read(dir: &Path) -> Result<Option<Self>, Error> {
        let path = dir.join(MANIFEST);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::Io { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Data(format!("{} is not a harvest manifest: {e}", path.display())))
    }

    /// Writes `dir/manifest.json` atomically.
    ///
    /// # Errors
    /// The directory is not writable or full.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Data(format!("cannot encode the manifest: {e}")))?;
        write_atomic(&dir.join(MANIFEST), |w| w.write_all(&json))
    }
}

/// xxh3-128 of a file's content, as 32 hex digits.
///
/// # Errors
/// The file cannot be read.
pub fn hash_file(path: &Path) -> Result<String, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:032x}", hasher.digest128()))
}

/// The identity of the model in `dir`: hashes of its config, tokenizer and weight files.
///
/// # Errors
/// A file cannot be read.
pub fn model_identity(dir: &Path) -> Result<ModelIdentity, Error> {
    let tokenizer = dir.join("tokenizer.json");
    let mut weights = BTreeMap::new();
    let entries = fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let path = entry
            .map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            weights.insert(name.unwrap_or_default(), hash_file(&path)?);
        }
    }
    Ok(ModelIdentity {
        dir: dir.to_path_buf(),
        config: hash_file(&dir.join("config.json"))?,
        tokenizer: if tokenizer.exists() {
            Some(hash_file(&tokenizer)?)
        } else {
            None
        },
        weights,
    })
}

/// Writes `path` through `write` to `path.tmp`, syncs it, and renames it to `path`; on error
/// the temporary file is removed and `path` is untouched.
pub(crate) fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>,
) -> Result<(), Error> {
    let tmp = tmp_name(path);
    let result = (|| {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, &file);
        write(&mut w)?;
        w.flush()?;
        drop(w);
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    result.map_err(|source| {
        let _ = fs::remove_file(&tmp);
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// `path` with `.tmp` appended.
pub(crate) fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Streams `tensors` into a safetensors file: each is the concatenation of its chunks along
/// the first axis, written chunk after chunk straight from their storage (never concatenated
/// in memory).
fn write_safetensors(w: &mut impl Write, tensors: &[(String, Vec<Tensor>)]) -> std::io::Result<()> {
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, chunks) in tensors {
        let first = chunks
            .first()
            .ok_or_else(|| invalid(format!("tensor `{name}` has no data")))?;
        let mut shape = first.dims().to_vec();
        if chunks.len() > 1 {
            if shape.is_empty() {
                return Err(invalid(format!(
                    "tensor `{name}` has no axis to join chunks on"
                )));
            }
            shape[0] = chunks.iter().map(|c| c.dim(0).unwrap_or(0)).sum();
        }
        let bytes = shape.iter().product::<usize>() * first.dtype().size_in_bytes();
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype_name(first.dtype()).map_err(invalid)?,
                "shape": shape,
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| invalid(e.to_string()))?;
    // The data starts 8-byte aligned, as safetensors writers do.
    json.resize(json.len().next_multiple_of(8), b' ');
    w.write_all(&(json.len() as u64).to_le_bytes())?;
    w.write_all(&json)?;
    for chunk in tensors.iter().flat_map(|(_, chunks)| chunks) {
        flexmodel_core::wire::with_bytes(chunk, |b| w.write_all(b))
            .map_err(|e| invalid(e.to_string()))??;
    }
    Ok(())
}

/// The safetensors name of a dtype.
pub(crate) fn dtype_name(dtype: DType) -> Result<&'static str, String> {
    Ok(match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        DType::I64 => "I64",
        DType::U32 => "U32",
        DType::U8 => "U8",
        other => return Err(format!("cannot store a {other:?} tensor")),
    })
}

/// A complete shard on its way to disk.
pub(crate) struct Shard {
    pub(crate) entry: ShardEntry,
    /// Each tensor as chunks along the token axis (none when only statistics are kept).
    pub(crate) tensors: Vec<(String, Vec<Tensor>)>,
    /// The statistics as of the end of this shard, in statistics mode.
    pub(crate) stats: Option<Vec<(String, Tensor)>>,
}

/// Writes shards on a thread of its own, overlapping disk writes with the model's compute,
/// and records each in the manifest once it is on disk. The channel holds no shard: the
/// forward blocks until the writer takes the previous one, so at most two shards are in
/// memory (one filling, one being written).
pub(crate) struct Writer {
    tx: Option<SyncSender<Shard>>,
    thread: Option<JoinHandle<Result<Manifest, Error>>>,
}

impl Writer {
    pub(crate) fn start(dir: PathBuf, manifest: Manifest) -> Self {
        let (tx, rx) = sync_channel(0);
        let thread = std::thread::Builder::new()
            .name("flexmodel-harvest-writer".into())
            .spawn(move || write_shards(&dir, manifest, &rx));
        match thread {
            Ok(thread) => Self {
                tx: Some(tx),
                thread: Some(thread),
            },
            // No thread: `send` and `finish` report it.
            Err(_) => Self {
                tx: None,
                thread: None,
            },
        }
    }

    /// Hands a shard to the writer, waiting while it writes the previous one.
    ///
    /// # Errors
    /// The writer failed (its error).
    pub(crate) fn send(&mut self, shard: Shard) -> Result<(), Error> {
        let sent = match &self.tx {
            Some(tx) => tx.send(shard).is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The writer stopped: its error says why.
        self.finish().and(Err(Error::Data(
            "the shard writer stopped without an error".into(),
        )))
    }

    /// Waits for every shard to be on disk; returns the manifest as written.
    ///
    /// # Errors
    /// The writer failed.
    pub(crate) fn finish(&mut self) -> Result<Manifest, Error> {
        self.tx = None;
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(Error::Data("the shard writer panicked".into()))),
            None => Err(Error::Data("the shard writer is not running".into())),
        }
    }
}

fn write_shards(
    dir: &Path,
    mut manifest: Manifest,
    rx: &Receiver<Shard>,
) -> Result<Manifest, Error> {
    for shard in rx {
        if let Some(file) = &shard.entry.file {
            write_atomic(&dir.join(file), |w| write_safetensors(w, &shard.tensors))?;
        }
        let old_stats = match shard.stats {
            Some(stats) => {
                let name = format!("stats-{:06}.safetensors", manifest.shards.len());
                write_tensors(&dir.join(&name), stats)?;
                manifest.stats.replace(name)
            }
            None => None,
        };
        manifest.shards.push(shard.entry);
        manifest.write(dir)?;
        // The manifest now names the new statistics: the old ones can go.
        if let Some(old) = old_stats {
            let _ = fs::remove_file(dir.join(old));
        }
    }
    Ok(manifest)
}

/// Writes whole tensors to a safetensors file, atomically.
pub(crate) fn write_tensors(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<(), Error> {
    let tensors: Vec<(String, Vec<Tensor>)> =
        tensors.into_iter().map(|(n, t)| (n, vec![t])).collect();
    write_atomic(path, |w| write_safetensors(w, &tensors))
}

/// Removes what an interrupted harvest left: temporary files, and shards and statistics the
/// manifest does not list (renamed before the manifest was updated; they are written again).
///
/// # Errors
/// The directory cannot be read or a file removed.
pub(crate) fn clean(dir: &Path, manifest: &Manifest) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let listed = manifest
            .shards
            .iter()
            .any(|s| s.file.as_deref() == Some(&name))
            || manifest.stats.as_deref() == Some(&name);
        let ours = name.starts_with("shard-") || name.starts_with("stats");
        let stale = ours && name.ends_with(".safetensors") && !listed;
        if name.ends_with(".tmp") || stale {
            fs::remove_file(&path).map_err(|source| Error::Io { path, source })?;
        }
    }
    Ok(())
}

/// The file name of shard `index`.
pub(crate) fn shard_name(index: usize) -> String {
    format!("shard-{index:06}.safetensors")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shards_are_readable_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let a = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::new(&[7i64, 8, 9], &Device::Cpu).unwrap();
        let c = a.to_dtype(DType::BF16).unwrap();
        let path = dir.path().join("x.safetensors");
        // `a` in two chunks of rows, written as one tensor.
        let tensors = vec![
            (
                "a".into(),
                vec![a.narrow(0, 0, 1).unwrap(), a.narrow(0, 1, 1).unwrap()],
            ),
            ("b".into(), vec![b]),
            ("c".into(), vec![c]),
        ];
        write_atomic(&path, |w| write_safetensors(w, &tensors)).unwrap();
        let back = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert_eq!(
            back["a"].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(back["b"].to_vec1::<i64>().unwrap(), [7, 8, 9]);
        assert_eq!(back["c"].dtype(), DType::BF16);
        assert!(!tmp_name(&path).exists());
    }
}
