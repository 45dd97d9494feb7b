//! Harvest: the activations of chosen sites over a dataset, streamed to disk in safetensors
//! shards, bounded in memory, resumable after a crash, on any parallel layout.
//!
//! ```no_run
//! use flexmodel::harvest::{self, DataSource, HarvestOptions, Settings};
//! use flexmodel::{FlexModel, LoadOptions, Tokenizer, load};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::path::Path::new("models/tiny-llama");
//! let mut fm = FlexModel::new(load(dir, &LoadOptions::default())?);
//! let tokenizer = Tokenizer::from_dir(dir)?;
//! let data = DataSource::from_path("data/tiny.txt", "text")?;
//! let options = HarvestOptions {
//!     settings: Settings { sites: vec!["model.layers.*".into()], ..Settings::default() },
//!     ..HarvestOptions::default()
//! };
//! let summary = harvest::run(&mut fm, dir, Some(&tokenizer), &data, "out".as_ref(), &options, |_| {})?;
//! println!("{} tokens in {} shards", summary.stored_tokens, summary.shards);
//! # Ok(()) }
//! ```
//!
//! The output directory holds `shard-NNNNNN.safetensors` files and `manifest.json`. Each
//! shard holds, for the tokens it covers, `input_ids`, `doc` (document index) and `position`
//! (position in the document), all I64 `[tokens]`, and one `[tokens, ...]` tensor per captured
//! site, named by the site. Shards are cut at batch boundaries once they hold `shard_tokens`
//! (by default, about 256 MB of activations).
//!
//! Who writes: global rank 0. Every rank reads the same data and runs each batch (data-parallel
//! ranks take their share of its rows, tensor- and pipeline-parallel ranks their part of the
//! model); the hook runtime assembles the captures on rank 0, which stores them. A resumed
//! harvest asks rank 0 where to continue and every rank skips the same rows.

mod data;
mod stats;
mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use serde::{Deserialize, Serialize};

pub use data::{DataSource, Document, Row, Rows};
pub use stats::{MAX_COVARIANCE_WIDTH, StatsSettings};
pub use store::{
    DataIdentity, MANIFEST, Manifest, ModelIdentity, ShardEntry, TensorEntry, hash_file,
    model_identity,
};

use crate::{Dim, FlexModel, HookFunction, Input, Tokenizer};
use stats::{Stats, TokenInfo};
use store::{Shard, Writer};

/// What can go wrong in a harvest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The data or an option is not usable (the message says why and what is accepted).
    #[error("{0}")]
    Data(String),
    /// The output directory holds a harvest made otherwise.
    #[error(
        "{} holds a harvest with other {what}; resume it with the same model, data and \
         options, or choose another output directory",
        dir.display()
    )]
    Mismatch {
        /// The output directory.
        dir: PathBuf,
        /// What differs.
        what: String,
    },
    /// The memory budget cannot hold the model, one batch and the shards in flight.
    #[error("{0}")]
    Budget(String),
    /// The model or a hook failed.
    #[error(transparent)]
    Model(#[from] flexmodel_core::Error),
    /// Tokenizing failed.
    #[error(transparent)]
    Load(#[from] flexmodel_models::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// [`HarvestOptions::stop`] was raised: the complete shards are on disk and listed, the
    /// rows after them were dropped.
    #[error(
        "the harvest was interrupted after {rows} rows ({shards} complete shards in {}); \
         resume it to continue",
        dir.display()
    )]
    Interrupted {
        /// The output directory.
        dir: PathBuf,
        /// Rows in complete shards.
        rows: usize,
        /// Complete shards.
        shards: usize,
    },
}

/// Stored bytes per shard when no shard size is given.
pub const DEFAULT_SHARD_BYTES: u64 = 256 << 20;

/// Which positions of each row are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// Every position of the row, padding included (padding has `doc` and `position` -1 and
    /// `input_ids` -1), so that a shard reshapes to `[rows, seq_len, ...]`.
    All,
    /// Real tokens only.
    Real,
    /// The last real token of each row.
    Last,
    /// Positions `start..end` of each row (real tokens only).
    Range {
        /// First position kept.
        start: usize,
        /// One past the last position kept.
        end: usize,
    },
}

impl std::str::FromStr for Positions {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "all" => Ok(Self::All),
            "real" => Ok(Self::Real),
            "last" => Ok(Self::Last),
            _ => {
                let range = s.split_once(':').and_then(|(a, b)| {
                    Some(Self::Range {
                        start: a.parse().ok()?,
                        end: b.parse().ok()?,
                    })
                });
                range.ok_or_else(|| {
                    Error::Data(format!(
                        "positions `{s}`: expected all, real, last or START:END (e.g. 0:16)"
                    ))
                })
            }
        }
    }
}

/// The dtype activations are stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreDType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
}

impl From<StoreDType> for DType {
    fn from(d: StoreDType) -> Self {
        match d {
            StoreDType::F32 => DType::F32,
            StoreDType::F16 => DType::F16,
            StoreDType::Bf16 => DType::BF16,
        }
    }
}

/// The options that shape a harvest's output (a resumed harvest must use the same).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Site names or patterns to capture.
    pub sites: Vec<String>,
    /// Tokens per row.
    pub seq_len: usize,
    /// Lay documents end to end and cut rows every `seq_len` tokens (else one row per
    /// document, cut at `seq_len`).
    pub packing: bool,
    /// Rows per forward pass.
    pub batch_size: usize,
    /// Stop after this many input tokens.
    pub max_tokens: Option<usize>,
    /// Dtype of the stored activations.
    pub dtype: StoreDType,
    /// Which positions are stored.
    pub positions: Positions,
    /// Store the activations (shards); else only statistics.
    pub raw: bool,
    /// Keep statistics of every site (saved with each shard, final in `stats.safetensors`).
    pub stats: Option<StatsSettings>,
    /// A shard is closed at the first batch boundary at which it holds this many tokens
    /// (`None`: about [`DEFAULT_SHARD_BYTES`] of stored data).
    pub shard_tokens: Option<usize>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            sites: Vec::new(),
            seq_len: 128,
            packing: false,
            batch_size: 8,
            max_tokens: None,
            dtype: StoreDType::F32,
            positions: Positions::Real,
            raw: true,
            stats: None,
            shard_tokens: None,
        }
    }
}

impl Settings {
    fn check(&self) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::Data(m.to_string()));
        if self.sites.is_empty() {
            return bad("no sites to harvest: give at least one site name or pattern");
        }
        if self.seq_len == 0 || self.batch_size == 0 || self.shard_tokens == Some(0) {
            return bad("sequence length, batch size and shard size must be at least 1");
        }
        if !self.raw && self.stats.is_none() {
            return bad("nothing to keep: store the activations, statistics, or both");
        }
        if self
            .stats
            .as_ref()
            .is_some_and(|s| s.top_k == 0 || s.context == 0)
        {
            return bad("statistics need top-k and context of at least 1");
        }
        if let Positions::Range { start, end } = self.positions {
            if start >= end || end > self.seq_len {
                return Err(Error::Data(format!(
                    "positions {start}:{end}: need START < END <= the sequence length ({})",
                    self.seq_len
                )));
            }
        }
        Ok(())
    }
}

/// A harvest's options: the output-shaping [`Settings`], and how to run.
#[derive(Clone, Debug, Default)]
pub struct HarvestOptions {
    /// What is stored and how.
    pub settings: Settings,
    /// Peak resident memory of the whole process, in bytes (Linux): shards are made small
    /// enough that the model, one batch and two shards (one filling, one being written, plus
    /// the allocator's slack) fit.
    pub memory_budget: Option<u64>,
    /// Continue the harvest in the output directory (else it must hold none).
    pub resume: bool,
    /// Checked after each batch of a single-process harvest: once raised (a Ctrl-C), the
    /// harvest ends with [`Error::Interrupted`], its complete shards kept for a resume. (In a
    /// multi-rank job the launcher ends every rank on Ctrl-C; the complete shards stay as well.)
    pub stop: Option<Arc<AtomicBool>>,
}

/// Where a harvest stands, after each batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    /// Rows done, including those of an earlier run that this one resumed.
    pub rows: usize,
    /// Input tokens run through the model by this run.
    pub tokens: usize,
    /// Tokens stored, including earlier runs'.
    pub stored_tokens: usize,
    /// Shards handed to the writer, including earlier runs'.
    pub shards: usize,
    /// Seconds since this run started.
    pub seconds: f64,
    /// How far through the data (or through `max_tokens`, if that ends first), from 0 to 1.
    pub fraction: f64,
}

/// What a harvest did.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Rows in the harvest.
    pub rows: usize,
    /// Input tokens this run computed.
    pub tokens: usize,
    /// Tokens stored in the harvest.
    pub stored_tokens: usize,
    /// Shards in the harvest.
    pub shards: usize,
    /// Bytes of shard data in the harvest.
    pub bytes: u64,
    /// Seconds this run took.
    pub seconds: f64,
    /// Peak resident memory of the process, in bytes, where the system tells (Linux).
    pub peak_rss: Option<u64>,
    /// The shard size used, in tokens (smaller than asked when the memory budget needs it).
    pub shard_tokens: usize,
}

/// Harvests `settings.sites` over the documents of `data` into `out` (created if needed).
/// The model directory `model_dir` identifies the model in the manifest; `tokenizer` reads
/// text data. `progress` is called on rank 0 after each batch.
///
/// # Errors
/// Bad options or data, an output directory holding another harvest, a budget too small, a
/// write that fails (complete shards stay intact and listed), or the model failing.
pub fn run(
    fm: &mut FlexModel,
    model_dir: &Path,
    tokenizer: Option<&Tokenizer>,
    data: &DataSource,
    out: &Path,
    options: &HarvestOptions,
    mut progress: impl FnMut(&Progress),
) -> Result<Summary, Error> {
    let start = Instant::now();
    let settings = &options.settings;
    settings.check()?;
    let grid = fm.model().grid().clone();
    // Rank 0 owns the directory; it tells every rank where to start.
    let mut state = if grid.is_root() {
        Some(open(model_dir, data, out, options)?)
    } else {
        None
    };
    let rows_done = match &state {
        Some(s) => s.manifest.rows_done(),
        None => 0,
    };
    let rows_done = if grid.is_distributed() {
        let n = Tensor::new(&[rows_done as u32], &Device::Cpu)?;
        grid.world
            .broadcast(grid.is_root().then_some(&n), 0)?
            .to_vec1::<u32>()?[0] as usize
    } else {
        rows_done
    };
    if state.as_ref().is_some_and(|s| s.manifest.complete) {
        let manifest = state.map(|s| s.manifest);
        return Ok(summary(manifest, out, 0, start, 0));
    }

    let mut handles = Vec::new();
    for pattern in &settings.sites {
        handles.push(fm.register(HookFunction::new(pattern.as_str()))?);
    }
    let result = harvest_rows(
        fm,
        tokenizer,
        data,
        out,
        options,
        &mut state,
        rows_done,
        start,
        &mut progress,
    );
    for handle in handles {
        fm.remove(handle)?;
    }
    result
}

/// The output directory, opened for this harvest on rank 0.
struct Open {
    manifest: Manifest,
    /// A fresh harvest's model and data hashes, computed while the first batch runs (reading
    /// every weight file again can take as long as many batches); joined before anything
    /// writes the manifest.
    hashing: Option<JoinHandle<Result<Identity, Error>>>,
}

/// The model's identity and the data file's hash.
type Identity = (ModelIdentity, String);

impl Open {
    /// The manifest, with a fresh harvest's hashes in it (waiting for them if need be).
    fn identified(&mut self) -> Result<&mut Manifest, Error> {
        if let Some(hashing) = self.hashing.take() {
            let (model, data) = hashing.join().map_err(|_| {
                Error::Data("the thread hashing the model and data panicked".into())
            })??;
            self.manifest.model = model;
            self.manifest.data.hash = data;
        }
        Ok(&mut self.manifest)
    }
}

fn identity(model_dir: &Path, data: &Path) -> Result<Identity, Error> {
    Ok((model_identity(model_dir)?, hash_file(data)?))
}

fn open(
    model_dir: &Path,
    data: &DataSource,
    out: &Path,
    options: &HarvestOptions,
) -> Result<Open, Error> {
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let bytes = std::fs::metadata(data.path())
        .map_err(|source| Error::Io {
            path: data.path().to_path_buf(),
            source,
        })?
        .len();
    let fresh = |(model, hash): Identity| Manifest {
        format: "flexmodel-harvest/1".into(),
        model,
        data: DataIdentity {
            source: data.clone(),
            bytes,
            hash,
        },
        settings: options.settings.clone(),
        tensors: Default::default(),
        shards: Vec::new(),
        stats: None,
        complete: false,
    };
    let Some(old) = Manifest::read(out)? else {
        let (dir, path) = (model_dir.to_path_buf(), data.path().to_path_buf());
        let hashing = std::thread::Builder::new()
            .name("flexmodel-harvest-hash".into())
            .spawn(move || identity(&dir, &path))
            .map_err(|source| Error::Io {
                path: out.to_path_buf(),
                source,
            })?;
        let unknown = ModelIdentity {
            dir: model_dir.to_path_buf(),
            config: String::new(),
            tokenizer: None,
            weights: Default::default(),
        };
        let manifest = fresh((unknown, String::new()));
        store::clean(out, &manifest)?;
        return Ok(Open {
            manifest,
            hashing: Some(hashing),
        });
    };
    if !options.resume {
        return Err(Error::Data(format!(
            "{} already holds a harvest ({MANIFEST}); pass --resume to continue it, or \
             choose an empty directory",
            out.display()
        )));
    }
    let fresh = fresh(identity(model_dir, data.path())?);
    let mut differs = Vec::new();
    if old.model.config != fresh.model.config || old.model.weights != fresh.model.weights {
        differs.push("model");
    }
    if old.data.hash != fresh.data.hash || old.data.source != fresh.data.source {
        differs.push("data");
    }
    if old.settings != fresh.settings {
        differs.push("settings");
    }
    if !differs.is_empty() {
        return Err(Error::Mismatch {
            dir: out.to_path_buf(),
            what: differs.join(" and "),
        });
    }
    store::clean(out, &old)?;
    Ok(Open {
        manifest: old,
        hashing: None,
    })
}

/// The shard being filled: per stored tensor, its chunks.
#[derive(Default)]
struct Filling {
    rows: [usize; 2],
    tokens: [usize; 2],
    docs: [i64; 2],
    tensors: Vec<(String, Vec<Tensor>)>,
}

impl Filling {
    fn starting_at(rows: usize, tokens: usize) -> Self {
        Self {
            rows: [rows, rows],
            tokens: [tokens, tokens],
            docs: [-1, -1],
            tensors: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.tokens[1] - self.tokens[0]
    }

    fn append(&mut self, tensors: Vec<(String, Tensor)>) -> Result<(), Error> {
        if self.tensors.is_empty() {
            self.tensors = tensors.into_iter().map(|(n, t)| (n, vec![t])).collect();
            return Ok(());
        }
        for ((name, chunks), (new_name, t)) in self.tensors.iter_mut().zip(tensors) {
            if *name != new_name {
                return Err(Error::Data(format!(
                    "a batch captured `{new_name}` where the harvest has `{name}`"
                )));
            }
            chunks.push(t);
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn harvest_rows(
    fm: &mut FlexModel,
    tokenizer: Option<&Tokenizer>,
    data: &DataSource,
    out: &Path,
    options: &HarvestOptions,
    state: &mut Option<Open>,
    rows_done: usize,
    start: Instant,
    progress: &mut impl FnMut(&Progress),
) -> Result<Summary, Error> {
    let settings = &options.settings;
    let rows = Rows::new(
        data.documents(tokenizer)?,
        settings.seq_len,
        settings.packing,
        settings.max_tokens,
    );
    let mut rows = rows.peekable();
    // The rows an earlier run stored: read (tokenized) again, not run.
    let mut tokens_in_done = 0;
    for row in rows.by_ref().take(rows_done) {
        tokens_in_done += row?.ids.len();
    }
    let dp = fm.model().grid().degrees.dp;
    // Started on rank 0 once the first batch says what the shards hold.
    let mut writer: Option<Writer> = None;
    let mut stats = match state {
        Some(open) => open_stats(out, &open.manifest)?,
        None => None,
    };
    let tokens_done = state.as_ref().map_or(0, |s| s.manifest.tokens_done());
    let mut shards = state.as_ref().map_or(0, |s| s.manifest.shards.len());
    let mut shard_tokens = 0;
    let mut filling = Filling::starting_at(rows_done, tokens_done);
    let mut done = Progress {
        rows: rows_done,
        stored_tokens: tokens_done,
        shards,
        ..Progress::default()
    };
    while rows.peek().is_some() {
        let mut batch: Vec<Row> = rows
            .by_ref()
            .take(settings.batch_size)
            .collect::<Result<_, _>>()?;
        let real = batch.len();
        // Every data-parallel rank needs a row: a short last batch gets one-token rows
        // that nothing stores.
        batch.resize(real.max(dp), Row::placeholder());
        let input = batch_input(&batch, settings.seq_len)?;
        // Only the captures are wanted: the pass stops after the last stored layer (but for
        // pipeline stages, which run whole).
        fm.capture(&input)?;
        let captures = fm.take_output();
        batch.truncate(real);
        done.rows += real;
        done.tokens += batch.iter().map(|r| r.ids.len()).sum::<usize>();
        let through_data = batch.last().map_or(0.0, |r| r.data_end);
        let through_limit = settings.max_tokens.map_or(0.0, |m| {
            (done.tokens + tokens_in_done) as f64 / m.max(1) as f64
        });
        done.fraction = through_data.max(through_limit).min(1.0);
        let Some(open) = state.as_mut() else {
            continue; // Not rank 0: nothing to store.
        };
        let (tensors, flat) = select(&batch, real.max(dp), captures, fm, settings)?;
        let kept = flat.len();
        if let Some(stats) = &mut stats {
            let context = settings.stats.as_ref().map_or(1, |s| s.context);
            stats.add(
                &tensors[3..],
                &token_info(&batch, &tensors, &flat, settings.seq_len, context)?,
            )?;
        }
        let writer = match &mut writer {
            Some(w) => w,
            None => {
                let manifest = open.identified()?;
                manifest.tensors = tensor_entries(&tensors)?;
                shard_tokens = settings.shard_tokens.unwrap_or_else(|| {
                    (DEFAULT_SHARD_BYTES / per_token_bytes(&tensors)).max(1) as usize
                });
                if let Some(budget) = options.memory_budget {
                    shard_tokens = fit_budget(budget, &tensors, kept, shard_tokens)?;
                }
                writer.insert(Writer::start(out.to_path_buf(), manifest.clone()))
            }
        };
        let (first_doc, last_doc) = doc_range(&tensors);
        if filling.docs[0] < 0 {
            filling.docs[0] = first_doc;
        }
        if last_doc >= 0 {
            filling.docs[1] = last_doc;
        }
        filling.rows[1] += batch.len();
        filling.tokens[1] += kept;
        if settings.raw {
            filling.append(tensors)?;
        }
        done.stored_tokens += kept;
        if filling.len() >= shard_tokens {
            let next = Filling::starting_at(filling.rows[1], filling.tokens[1]);
            let full = std::mem::replace(&mut filling, next);
            writer.send(shard(full, shards, settings.raw, stats.as_ref())?)?;
            shards += 1;
            done.shards = shards;
        }
        done.seconds = start.elapsed().as_secs_f64();
        progress(&done);
        let stop = options
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed));
        if stop && !fm.model().grid().is_distributed() {
            // The filling shard is dropped: the manifest lists what is complete.
            let rows = writer.finish()?.rows_done();
            return Err(Error::Interrupted {
                dir: out.to_path_buf(),
                rows,
                shards,
            });
        }
    }
    let Some(mut open) = state.take() else {
        return Ok(summary(None, out, done.tokens, start, shard_tokens));
    };
    let mut manifest = match writer.as_mut() {
        Some(writer) => {
            if filling.rows[1] > filling.rows[0] {
                writer.send(shard(filling, shards, settings.raw, stats.as_ref())?)?;
            }
            writer.finish()?
        }
        // Every row was stored by an earlier run, or there were none.
        None => {
            open.identified()?;
            open.manifest
        }
    };
    // The final statistics under their own name, then the manifest that names them.
    let old_stats = match &stats {
        Some(stats) => {
            store::write_tensors(&out.join(STATS), stats.tensors()?)?;
            manifest
                .stats
                .replace(STATS.into())
                .filter(|old| old != STATS)
        }
        None => None,
    };
    manifest.complete = true;
    manifest.write(out)?;
    if let Some(old) = old_stats {
        let _ = std::fs::remove_file(out.join(old));
    }
    Ok(summary(
        Some(manifest),
        out,
        done.tokens,
        start,
        shard_tokens,
    ))
}

/// The statistics to continue from (statistics mode): those the manifest names, if any.
fn open_stats(out: &Path, manifest: &Manifest) -> Result<Option<Stats>, Error> {
    let Some(settings) = &manifest.settings.stats else {
        return Ok(None);
    };
    let Some(file) = &manifest.stats else {
        return Ok(Some(Stats::new(settings.clone())));
    };
    let path = out.join(file);
    let saved = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
        Error::Data(format!(
            "{}: cannot read the statistics: {e}",
            path.display()
        ))
    })?;
    let sites: Vec<(String, Vec<usize>)> = manifest
        .tensors
        .iter()
        .filter(|(name, _)| !META.contains(&name.as_str()))
        .map(|(name, t)| (name.clone(), t.shape.clone()))
        .collect();
    Stats::restore(settings.clone(), &saved, &sites).map(Some)
}

/// Tensors by name.
type Named = Vec<(String, Tensor)>;

/// The per-token tensors every shard holds before the sites.
const META: [&str; 3] = ["input_ids", "doc", "position"];

/// The statistics file of a finished harvest.
pub const STATS: &str = "stats.safetensors";

/// Where each kept token is, and the `context` tokens ending at it in its row.
fn token_info(
    batch: &[Row],
    tensors: &[(String, Tensor)],
    flat: &[u32],
    seq_len: usize,
    context: usize,
) -> Result<TokenInfo, Error> {
    let mut contexts = Vec::with_capacity(flat.len() * context);
    for &f in flat {
        let (r, p) = (f as usize / seq_len, f as usize % seq_len);
        let ids = &batch[r].ids;
        for back in (0..context).rev() {
            // The token `back` places before this one (-1 before the row or in its padding).
            let id = p.checked_sub(back).and_then(|q| ids.get(q));
            contexts.push(id.map_or(-1, |&id| i64::from(id)));
        }
    }
    Ok(TokenInfo {
        docs: tensors[1].1.to_vec1()?,
        positions: tensors[2].1.to_vec1()?,
        contexts,
    })
}

/// The manifest's description of the stored tensors.
fn tensor_entries(
    tensors: &[(String, Tensor)],
) -> Result<std::collections::BTreeMap<String, TensorEntry>, Error> {
    tensors
        .iter()
        .map(|(name, t)| {
            let entry = TensorEntry {
                shape: t.dims()[1..].to_vec(),
                dtype: store::dtype_name(t.dtype()).map_err(Error::Data)?.into(),
            };
            Ok((name.clone(), entry))
        })
        .collect()
}

/// The shard `filling` becomes: its file (with raw storage), its statistics (in statistics
/// mode).
fn shard(filling: Filling, index: usize, raw: bool, stats: Option<&Stats>) -> Result<Shard, Error> {
    Ok(Shard {
        entry: ShardEntry {
            file: raw.then(|| store::shard_name(index)),
            rows: filling.rows,
            tokens: filling.tokens,
            docs: filling.docs,
        },
        tensors: filling.tensors,
        stats: stats.map(Stats::tensors).transpose()?,
    })
}

fn summary(
    manifest: Option<Manifest>,
    out: &Path,
    tokens: usize,
    start: Instant,
    shard_tokens: usize,
) -> Summary {
    let m = manifest.as_ref();
    let bytes = m.map_or(0, |m| {
        m.shards
            .iter()
            .filter_map(|s| std::fs::metadata(out.join(s.file.as_ref()?)).ok())
            .map(|f| f.len())
            .sum()
    });
    Summary {
        rows: m.map_or(0, Manifest::rows_done),
        tokens,
        stored_tokens: m.map_or(0, Manifest::tokens_done),
        shards: m.map_or(0, |m| m.shards.len()),
        bytes,
        seconds: start.elapsed().as_secs_f64(),
        peak_rss: peak_rss(),
        shard_tokens,
    }
}

/// The batch as model input: `[rows, seq_len]`, right-padded (padding masked).
fn batch_input(batch: &[Row], seq_len: usize) -> Result<Input, Error> {
    let mut ids = Vec::with_capacity(batch.len() * seq_len);
    let mut mask = Vec::with_capacity(batch.len() * seq_len);
    for row in batch {
        ids.extend(row.ids.iter().map(|&t| i64::from(t)));
        ids.extend(std::iter::repeat_n(0, seq_len - row.ids.len()));
        mask.extend(std::iter::repeat_n(1i64, row.ids.len()));
        mask.extend(std::iter::repeat_n(0, seq_len - row.ids.len()));
    }
    let shape = (batch.len(), seq_len);
    let ids = Tensor::from_vec(ids, shape, &Device::Cpu)?;
    Ok(if batch.iter().all(|r| r.ids.len() == seq_len) {
        Input::new(ids)
    } else {
        Input::with_mask(ids, Tensor::from_vec(mask, shape, &Device::Cpu)?)
    })
}

/// The stored tensors of the rows of `batch` (of the `batch_rows` the model ran):
/// `input_ids`, `doc`, `position`, then each capture, all `[kept tokens, ...]`; and where the
/// kept tokens are (`row * seq_len + position`).
fn select(
    batch: &[Row],
    batch_rows: usize,
    captures: crate::OutputMap,
    fm: &FlexModel,
    settings: &Settings,
) -> Result<(Named, Vec<u32>), Error> {
    let seq_len = settings.seq_len;
    // Flat indices (row * seq_len + position) of the kept positions, with their metadata.
    let (mut flat, mut ids, mut docs, mut positions) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (r, row) in batch.iter().enumerate() {
        let real = row.ids.len();
        let kept = match settings.positions {
            Positions::All => 0..seq_len,
            Positions::Real => 0..real,
            Positions::Last => real.saturating_sub(1)..real,
            Positions::Range { start, end } => start.min(real)..end.min(real),
        };
        for p in kept {
            flat.push((r * seq_len + p) as u32);
            let (id, doc, pos) = if p < real {
                (i64::from(row.ids[p]), row.docs[p], row.positions[p])
            } else {
                (-1, -1, -1)
            };
            ids.push(id);
            docs.push(doc);
            positions.push(pos);
        }
    }
    let kept = flat.len();
    // Every position of every row the model ran, in order (whole rows, no padding): the
    // captures are stored as they are, without a gathering copy.
    let every =
        kept == batch_rows * seq_len && flat.iter().enumerate().all(|(i, &f)| f as usize == i);
    let index = Tensor::new(flat.as_slice(), &Device::Cpu)?;
    let mut tensors = vec![
        (
            "input_ids".to_string(),
            Tensor::from_vec(ids, kept, &Device::Cpu)?,
        ),
        (
            "doc".to_string(),
            Tensor::from_vec(docs, kept, &Device::Cpu)?,
        ),
        (
            "position".to_string(),
            Tensor::from_vec(positions, kept, &Device::Cpu)?,
        ),
    ];
    let sites = fm.model().sites();
    let dtype: DType = settings.dtype.into();
    for (site, firings) in captures {
        let id = sites
            .id(&site)
            .ok_or_else(|| Error::Data(format!("captured `{site}` is not a site")))?;
        let template = &sites.get(id).shape;
        for (k, t) in firings.into_iter().enumerate() {
            let name = if k == 0 {
                site.clone()
            } else {
                format!("{site}#{k}")
            };
            let per_token = per_token(&t, template, batch_rows, seq_len)
                .map_err(|e| Error::Data(format!("site `{site}`: {e}")))?;
            let rows = if every && whole_storage(&per_token) {
                per_token
            } else {
                per_token.index_select(&index, 0)?
            };
            tensors.push((name, rows.to_dtype(dtype)?));
        }
    }
    Ok((tensors, flat))
}

/// Whether `t` is all of its host storage, so that keeping it until its shard is written holds
/// no more memory than its own (a view into a larger activation would hold all of it).
fn whole_storage(t: &Tensor) -> bool {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return false;
    };
    let len = match cpu {
        CpuStorage::F32(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        CpuStorage::F64(v) => v.len(),
        _ => return false,
    };
    layout.is_contiguous() && layout.start_offset() == 0 && len == t.elem_count()
}

/// An activation laid out as `template`, as `[batch * seq, ...]` (row-major over batch then
/// position).
fn per_token(t: &Tensor, template: &[Dim], batch: usize, seq: usize) -> Result<Tensor, String> {
    if template.first() == Some(&Dim::Tokens) {
        return Ok(t.clone());
    }
    let axis = |d: Dim| template.iter().position(|x| *x == d);
    let (Some(b), Some(s)) = (axis(Dim::Batch), axis(Dim::Seq)) else {
        return Err(format!(
            "shape {template:?} has no batch and sequence axes: harvest stores per-token activations"
        ));
    };
    let mut order = vec![b, s];
    order.extend((0..t.rank()).filter(|&d| d != b && d != s));
    let moved = t.permute(order).map_err(|e| e.to_string())?;
    let mut dims = vec![batch * seq];
    dims.extend_from_slice(&moved.dims()[2..]);
    moved.reshape(dims).map_err(|e| e.to_string())
}

/// First and last document index among the stored tokens (-1 where none).
fn doc_range(tensors: &[(String, Tensor)]) -> (i64, i64) {
    let docs: Vec<i64> = tensors
        .iter()
        .find(|(n, _)| n == "doc")
        .and_then(|(_, t)| t.to_vec1().ok())
        .unwrap_or_default();
    let mut real = docs.into_iter().filter(|&d| d >= 0);
    let first = real.next().unwrap_or(-1);
    (first, real.next_back().unwrap_or(first))
}

/// The shard size (tokens) that keeps the process under `budget` bytes: measured after the
/// first batch (the model, the forward's working memory and one batch's captures are then
/// resident), three shards of at most `shard + one batch` tokens must fit in what is left.
fn fit_budget(
    budget: u64,
    tensors: &[(String, Tensor)],
    batch_tokens: usize,
    shard_tokens: usize,
) -> Result<usize, Error> {
    let used = peak_rss().ok_or_else(|| {
        Error::Budget(
            "a memory budget needs the process's resident memory, which only Linux reports here"
                .into(),
        )
    })?;
    let per_token: u64 = tensors
        .iter()
        .map(|(_, t)| {
            (t.elem_count() / t.dim(0).unwrap_or(1).max(1) * t.dtype().size_in_bytes()) as u64
        })
        .sum();
    let mb = |b: u64| b as f64 / 1e6;
    // Two shards are held at once; a third's worth is left for the allocator's slack (freed
    // chunks it keeps, fragmentation: measured 2.4 shards of growth past the first batch).
    let room = budget.saturating_sub(used);
    let fits = (room / (3 * per_token.max(1))) as usize;
    if fits <= batch_tokens {
        return Err(Error::Budget(format!(
            "memory budget {:.0} MB too small: the model and one batch already use {:.0} MB, and \
             three shards of at least one batch ({batch_tokens} tokens x {per_token} bytes) need \
             {:.0} MB more; raise --memory-budget or lower --batch-size",
            mb(budget),
            mb(used),
            mb(3 * (batch_tokens as u64 + 1) * per_token)
        )));
    }
    Ok(shard_tokens.min(fits - batch_tokens))
}

/// Bytes stored per token.
fn per_token_bytes(tensors: &[(String, Tensor)]) -> u64 {
    let row = |t: &Tensor| t.dims()[1..].iter().product::<usize>() * t.dtype().size_in_bytes();
    tensors
        .iter()
        .map(|(_, t)| row(t) as u64)
        .sum::<u64>()
        .max(1)
}

/// Peak resident memory of this process (`VmHWM`), on Linux.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
