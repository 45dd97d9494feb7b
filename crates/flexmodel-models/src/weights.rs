//! Safetensors checkpoints (headers through a memory map, data with `pread`), and [`Vb`]: a
//! path into the checkpoint that is at the same time the Hugging Face module path, so weights
//! and sites share one name.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Shape, Tensor, Var};
use flexmodel_core::comm::even_split;
use flexmodel_core::layout::{Part, block};
use flexmodel_core::{Comm, Dim, Grid, Layout, Parameters, SiteId, SiteKind, SiteTable};

use crate::config::RawConfig;
use crate::stream::{Builder, EMBED, HEAD, Mode, Param, Streams, layer_unit};
use memmap2::Mmap;
use safetensors::SafeTensors;

use crate::error::{Error, Result};

/// Where one tensor lives.
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range in the file.
    start: usize,
    end: usize,
}

/// The tensors of a checkpoint (one file or several shards): headers parsed through a memory
/// map, data read with `pread` into each tensor.
pub(crate) struct Weights {
    /// The files, read with `pread`.
    fds: Vec<File>,
    paths: Vec<PathBuf>,
    entries: HashMap<String, Entry>,
    dtype: DType,
    device: Device,
    /// Build models without reading any weight (for listing sites).
    meta: bool,
    /// Load weights as variables, so that gradients reach them.
    requires_grad: bool,
}

impl Weights {
    /// Maps the checkpoint of `dir`: `model.safetensors.index.json` and its shards, or
    /// `model.safetensors`.
    pub(crate) fn open(
        dir: &Path,
        dtype: DType,
        device: &Device,
        meta: bool,
        requires_grad: bool,
    ) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let paths: Vec<PathBuf> = if index.exists() {
            shard_paths(&index)?
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::NoWeights {
                dir: dir.to_path_buf(),
            });
        };
        let mut fds = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let (fd, mmap) = map(path)?;
            fds.push(fd);
            let bad = |message: String| Error::Safetensors {
                path: path.clone(),
                message,
            };
            let (header, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                bad(match e {
                    safetensors::SafeTensorError::MetadataIncompleteBuffer
                    | safetensors::SafeTensorError::InvalidHeaderLength
                    | safetensors::SafeTensorError::HeaderTooSmall => format!(
                        "truncated or corrupt safetensors file ({} bytes): {e}",
                        mmap.len()
                    ),
                    e => format!("not a valid safetensors file: {e}"),
                })
            })?;
            let data_start = 8 + header;
            for (name, info) in metadata.tensors() {
                let dtype = to_dtype(info.dtype).ok_or_else(|| {
                    bad(format!(
                        "tensor `{name}` has unsupported dtype {:?}",
                        info.dtype
                    ))
                })?;
                let (start, end) = info.data_offsets;
                entries.insert(
                    name,
                    Entry {
                        file: i,
                        dtype,
                        shape: info.shape.clone(),
                        start: data_start + start,
                        end: data_start + end,
                    },
                );
            }
        }
        Ok(Self {
            fds,
            paths,
            entries,
            dtype,
            device: device.clone(),
            meta,
            requires_grad,
        })
    }

    /// The checkpoint's name for `name`: itself, or `name` without its first component for
    /// checkpoints saved from the base model (`h.0.attn...` for `transformer.h.0.attn...`).
    fn find(&self, name: &str) -> Option<(&str, &Entry)> {
        if let Some((k, e)) = self.entries.get_key_value(name) {
            return Some((k, e));
        }
        let (_, rest) = name.split_once('.')?;
        self.entries
            .get_key_value(rest)
            .map(|(k, e)| (k.as_str(), e))
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    /// How to read `name` (its full shape `shape`), or only `select` of it, as `dtype`.
    ///
    /// # Errors
    /// The checkpoint has no `name`, or it has another shape.
    pub(crate) fn read_of(
        self: &Arc<Self>,
        name: &str,
        shape: &Shape,
        dtype: DType,
        select: Option<Selection>,
    ) -> Result<Read> {
        let (key, entry) = self.find(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            nearest: self.nearest(name),
        })?;
        if entry.shape != shape.dims() {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: shape.dims().to_vec(),
                got: entry.shape.clone(),
            });
        }
        Ok(Read {
            weights: self.clone(),
            key: key.to_string(),
            dtype,
            select,
        })
    }

    fn entry(&self, key: &str) -> &Entry {
        &self.entries[key]
    }

    fn nearest(&self, name: &str) -> Vec<String> {
        flexmodel_core::site::nearest(name, self.entries.keys().map(String::as_str), 3)
    }
}

/// The blocks of one dimension a rank reads of a weight: `(start, len)` along `dim`, in the
/// order they are concatenated (one block for a split weight, one per part of a fused one).
#[derive(Clone, Debug)]
pub(crate) struct Selection {
    pub(crate) dim: usize,
    pub(crate) blocks: Vec<(usize, usize)>,
}

/// One weight as a rank reads it from the checkpoint: all of it or a [`Selection`], converted
/// to a dtype. Reading again reads the file again (streamed weights).
#[derive(Clone)]
pub(crate) struct Read {
    weights: Arc<Weights>,
    /// The checkpoint's name.
    key: String,
    dtype: DType,
    select: Option<Selection>,
}

impl Read {
    /// The weight's name in the checkpoint.
    pub(crate) fn name(&self) -> &str {
        &self.key
    }

    /// The dtype it is read as.
    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device it is read to.
    pub(crate) fn device(&self) -> &Device {
        &self.weights.device
    }

    /// The dims of what is read.
    pub(crate) fn dims(&self) -> Vec<usize> {
        let mut dims = self.weights.entry(&self.key).shape.clone();
        if let Some(s) = &self.select {
            dims[s.dim] = s.blocks.iter().map(|b| b.1).sum();
        }
        dims
    }

    /// A zero-stride view of the right shape: no memory, no read.
    pub(crate) fn placeholder(&self) -> Result<Tensor> {
        Ok(Tensor::zeros((), self.dtype, &self.weights.device)?.broadcast_as(self.dims())?)
    }

    /// Byte ranges of the file to read, in the order of the result's elements.
    fn runs(&self) -> Vec<(usize, usize)> {
        let entry = self.weights.entry(&self.key);
        let Some(s) = &self.select else {
            return vec![(entry.start, entry.end)];
        };
        let elem = entry.dtype.size_in_bytes();
        let inner: usize = entry.shape[s.dim + 1..].iter().product::<usize>() * elem;
        let outer: usize = entry.shape[..s.dim].iter().product();
        let run = entry.shape[s.dim] * inner;
        let mut runs = Vec::with_capacity(outer * s.blocks.len());
        for o in 0..outer {
            for &(start, len) in &s.blocks {
                let at = entry.start + o * run + start * inner;
                runs.push((at, at + len * inner));
            }
        }
        runs
    }

    /// Reads it.
    pub(crate) fn read(&self) -> Result<Tensor> {
        self.read_runs(&self.runs(), self.dims())
    }

    /// Reads elements `range` of it (flattened), as a 1-D tensor: only their bytes.
    pub(crate) fn read_elements(&self, range: std::ops::Range<usize>) -> Result<Tensor> {
        let elem = self.weights.entry(&self.key).dtype.size_in_bytes();
        let (lo, hi) = (range.start * elem, range.end * elem);
        let mut runs = Vec::new();
        let mut at = 0;
        for (a, b) in self.runs() {
            let (from, to) = (lo.max(at), hi.min(at + b - a));
            if from < to {
                runs.push((a + from - at, a + to - at));
            }
            at += b - a;
        }
        self.read_runs(&runs, vec![range.len()])
    }

    fn read_runs(&self, runs: &[(usize, usize)], dims: Vec<usize>) -> Result<Tensor> {
        let w = &self.weights;
        let entry = w.entry(&self.key);
        let (file, path) = (&w.fds[entry.file], w.paths[entry.file].as_path());
        let device = &w.device;
        let t = match entry.dtype {
            DType::F32 => read::<f32>(file, path, runs, &dims, device),
            DType::F16 => read::<half::f16>(file, path, runs, &dims, device),
            DType::BF16 => read::<half::bf16>(file, path, runs, &dims, device),
            DType::F64 => read::<f64>(file, path, runs, &dims, device),
            DType::I64 => read::<i64>(file, path, runs, &dims, device),
            DType::I32 => read::<i32>(file, path, runs, &dims, device),
            DType::U32 => read::<u32>(file, path, runs, &dims, device),
            DType::U8 => read::<u8>(file, path, runs, &dims, device),
            other => unreachable!("`to_dtype` admits no {other:?}"),
        }?;
        Ok(t.to_dtype(self.dtype)?)
    }

    /// Asks the kernel to read its pages ahead (the next layer's, while this one computes).
    pub(crate) fn will_need(&self) {
        self.advise(libc::POSIX_FADV_WILLNEED);
    }

    /// Drops its pages from the page cache (they were copied out already).
    pub(crate) fn drop_cached(&self) {
        self.advise(libc::POSIX_FADV_DONTNEED);
    }

    fn advise(&self, advice: libc::c_int) {
        use std::os::fd::AsRawFd;
        let entry = self.weights.entry(&self.key);
        let fd = self.weights.fds[entry.file].as_raw_fd();
        // SAFETY: a hint about a file descriptor this struct owns; no memory is involved.
        #[allow(unsafe_code)]
        let _ = unsafe {
            libc::posix_fadvise(
                fd,
                entry.start as libc::off_t,
                (entry.end - entry.start) as libc::off_t,
                advice,
            )
        };
    }
}

fn map(path: &Path) -> Result<(File, Mmap)> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // SAFETY: the mapping is read-only; like every reader of memory-mapped checkpoints we
    // assume the file is not modified while the model is loaded.
    #[allow(unsafe_code)]
    let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
    Ok((file, mmap))
}

/// Reads the byte ranges `runs` of `file` into one tensor of `dims` with `pread`: straight
/// from the page cache into the tensor's memory. The process never maps the weights, so it
/// holds each weight once (in its tensor), and a streamed weight costs one copy per read.
fn read<T>(
    file: &File,
    path: &Path,
    runs: &[(usize, usize)],
    dims: &[usize],
    device: &Device,
) -> Result<Tensor>
where
    T: candle_core::WithDType + bytemuck::Pod,
{
    use std::os::unix::fs::FileExt;
    let len: usize = runs.iter().map(|(a, b)| b - a).sum();
    // Zeroed allocations come straight from the kernel: no pass over the memory.
    let mut data = bytemuck::zeroed_vec::<T>(len / size_of::<T>());
    let out: &mut [u8] = bytemuck::cast_slice_mut(&mut data);
    let mut at = 0;
    for &(start, end) in runs {
        file.read_exact_at(&mut out[at..at + end - start], start as u64)
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
        at += end - start;
    }
    Ok(Tensor::from_vec(data, dims, device)?)
}

fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let bad = |message: String| Error::Safetensors {
        path: index.to_path_buf(),
        message,
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    files.sort_unstable();
    files.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn to_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match dtype {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::U32 => DType::U32,
        S::U8 => DType::U8,
        _ => return None,
    })
}

/// Which part of the model this rank holds: its tensor-parallel group and its pipeline stage.
pub(crate) struct Shard {
    /// The job's ranks.
    pub(crate) grid: Grid,
    /// The ranks holding the other tensor-parallel pieces.
    pub(crate) tp: Arc<dyn Comm>,
    /// Decoder layers of this rank's stage.
    pub(crate) layers: std::ops::Range<usize>,
    /// This stage embeds the input.
    pub(crate) first: bool,
    /// This stage computes the logits.
    pub(crate) last: bool,
}

impl Shard {
    /// This rank's part under `grid`: contiguous layer ranges per stage, balanced by work:
    /// the last stage, which also computes the LM head, takes as many fewer layers as the
    /// head costs (see [`stage_layers`]).
    pub(crate) fn of(cfg: &RawConfig, grid: &Grid) -> Result<Self> {
        let layers = cfg.num_layers()?;
        let stages = grid.degrees.pp;
        if stages > layers {
            return Err(cfg.error(format!(
                "{stages} pipeline stages for {layers} layers: use at most {layers}"
            )));
        }
        let stage = grid.stage();
        let (start, len) = stage_layers(layers, stages, head_cost(cfg))[stage];
        Ok(Self {
            grid: grid.clone(),
            tp: grid.tp.clone(),
            layers: start..start + len,
            first: stage == 0,
            last: stage + 1 == stages,
        })
    }
}

/// The LM head's work in decoder layers: `vocab · hidden` multiply-adds per token against a
/// layer's ~`12 · hidden²` (attention's four projections and an MLP of four times the width).
fn head_cost(cfg: &RawConfig) -> f64 {
    let number = |keys: &[&str]| keys.iter().find_map(|k| cfg.get(k)?.as_u64());
    match (
        number(&["vocab_size"]),
        number(&["hidden_size", "n_embd", "d_model"]),
    ) {
        (Some(vocab), Some(hidden)) if hidden > 0 => vocab as f64 / (12.0 * hidden as f64),
        _ => 0.0,
    }
}

/// `(start, len)` of each stage's layers: as even as possible once the last stage's `head`
/// (in layers) is counted, every stage keeping at least one layer.
fn stage_layers(layers: usize, stages: usize, head: f64) -> Vec<(usize, usize)> {
    if stages <= 1 {
        return vec![(0, layers)];
    }
    let per_stage = (layers as f64 + head) / stages as f64;
    let last = ((per_stage - head).round().max(1.0) as usize).min(layers + 1 - stages);
    let mut split = even_split(layers - last, stages - 1);
    split.push((layers - last, last));
    split
}

/// A module path during model construction: where its weights are read and what its site is
/// called. `vb.pp("mlp").pp("up_proj")` is both the prefix of `...mlp.up_proj.weight` and
/// the site `...mlp.up_proj`.
#[derive(Clone)]
pub(crate) struct Vb {
    weights: Arc<Weights>,
    sites: Rc<RefCell<SiteTable>>,
    params: Rc<RefCell<Parameters>>,
    /// Attention layers built so far (each gets the next key/value cache slot).
    attention_layers: Rc<std::cell::Cell<usize>>,
    /// This rank's part of the model.
    shard: Rc<Shard>,
    /// The module belongs to another pipeline stage: declare its sites, read no weight.
    meta: bool,
    /// Streamed weights (offload, FSDP), by unit.
    streams: Rc<RefCell<Builder>>,
    /// The unit this module's weights stream with (its decoder layer's, or the outer one).
    unit: usize,
    /// Its weights are vocabulary-sized: kept by rows under FSDP.
    by_rows: bool,
    path: String,
    /// Where this module's weights are stored, when a checkpoint keeps a legacy name
    /// (GPT-NeoX's `embed_out` for `lm_head`); else `path`.
    weight_path: String,
}

impl Vb {
    pub(crate) fn root(weights: Weights, shard: Shard, mode: Mode) -> Self {
        let grad = weights.requires_grad;
        Self {
            weights: Arc::new(weights),
            sites: Rc::new(RefCell::new(SiteTable::new())),
            params: Rc::new(RefCell::new(Parameters::default())),
            attention_layers: Rc::new(std::cell::Cell::new(0)),
            shard: Rc::new(shard),
            meta: false,
            streams: Rc::new(RefCell::new(Builder::new(mode, grad))),
            unit: EMBED,
            by_rows: false,
            path: String::new(),
            weight_path: String::new(),
        }
    }

    /// The sub-path `name`.
    pub(crate) fn pp(&self, name: impl std::fmt::Display) -> Self {
        Self {
            weights: self.weights.clone(),
            sites: self.sites.clone(),
            params: self.params.clone(),
            attention_layers: self.attention_layers.clone(),
            shard: self.shard.clone(),
            meta: self.meta,
            streams: self.streams.clone(),
            unit: self.unit,
            by_rows: self.by_rows,
            path: join(&self.path, &name),
            weight_path: join(&self.weight_path, &name),
        }
    }

    /// This module, with its weights read from `weight_path` instead.
    pub(crate) fn weights_at(&self, weight_path: &str) -> Self {
        Self {
            weight_path: weight_path.to_string(),
            ..self.clone()
        }
    }

    /// The module path.
    pub(crate) fn name(&self) -> &str {
        &self.path
    }

    fn full(&self, name: &str) -> String {
        join(&self.weight_path, &name)
    }

    /// The weight `name` under this path, in the compute dtype.
    pub(crate) fn get(&self, name: &str, shape: impl Into<Shape>) -> Result<Param> {
        self.load(
            name,
            shape.into(),
            self.weights.dtype,
            None,
            Layout::Replicated,
        )
    }

    /// The weight `name` under this path in f32 (norm weights: normalisation runs in f32).
    pub(crate) fn get_f32(&self, name: &str, shape: impl Into<Shape>) -> Result<Param> {
        self.load(name, shape.into(), DType::F32, None, Layout::Replicated)
    }

    /// Reads (or registers for streaming) weight `name`, or `select` of it, and records it
    /// as a parameter laid out over tensor-parallel ranks by `layout`. Elsewhere than on its
    /// stage, a zero view of its shape.
    fn load(
        &self,
        name: &str,
        shape: Shape,
        dtype: DType,
        select: Option<Selection>,
        layout: Layout,
    ) -> Result<Param> {
        let read = self
            .weights
            .read_of(&self.full(name), &shape, dtype, select)?;
        let meta = self.meta || self.weights.meta;
        if !meta && self.streams.borrow().streams() {
            let mut streams = self.streams.borrow_mut();
            let param = if self.by_rows {
                streams.add_rows(self.unit, read)?
            } else {
                streams.add(self.unit, read)?
            };
            drop(streams);
            self.record(name, &param, layout);
            return Ok(param);
        }
        let t = if meta {
            read.placeholder()?
        } else {
            read.read()?
        };
        let t = if self.weights.requires_grad && !meta {
            Var::from_tensor(&t)?.as_tensor().clone()
        } else {
            t
        };
        self.record(name, &Param::Resident(t.clone()), layout);
        Ok(Param::Resident(t))
    }

    /// Weight `name` of a module that lives whole on one tensor-parallel rank (an expert under
    /// expert parallelism): read where `held`, else a zero view of its shape (no memory);
    /// recorded as a partial sum, so that gathering the parameter sums the holder's weight
    /// with the others' zeros.
    pub(crate) fn get_held(
        &self,
        name: &str,
        shape: impl Into<Shape>,
        held: bool,
    ) -> Result<Option<Param>> {
        let shape = shape.into();
        if held {
            let p = self.load(name, shape, self.weights.dtype, None, Layout::PartialSum)?;
            return Ok(Some(p));
        }
        let zero = Tensor::zeros((), self.weights.dtype, &self.weights.device)?;
        let zero = Param::Resident(zero.broadcast_as(shape)?);
        self.record(name, &zero, Layout::PartialSum);
        Ok(None)
    }

    /// This rank's block of weight `name` along `dim` (made of `units` equal blocks: heads,
    /// columns), in the compute dtype.
    pub(crate) fn get_split(
        &self,
        name: &str,
        shape: impl Into<Shape>,
        dim: usize,
        units: usize,
    ) -> Result<Param> {
        self.get_parts(
            name,
            shape,
            dim,
            &[Part {
                size: 0,
                units: Some(units),
            }],
        )
    }

    /// This rank's piece of each part of weight `name` along `dim` (a fused projection),
    /// concatenated. A part of size 0 stands for the whole dimension.
    pub(crate) fn get_parts(
        &self,
        name: &str,
        shape: impl Into<Shape>,
        dim: usize,
        parts: &[Part],
    ) -> Result<Param> {
        let shape = shape.into();
        let full = shape.dims()[dim];
        let (rank, world) = (self.shard.tp.rank(), self.shard.tp.size());
        let mut blocks = Vec::with_capacity(parts.len());
        let mut offset = 0;
        for part in parts {
            let size = if part.size == 0 { full } else { part.size };
            let (start, len) = match part.units {
                Some(units) => block(size, units, rank, world)?,
                None => (0, size),
            };
            blocks.push((offset + start, len));
            offset += size;
        }
        let layout = match parts {
            [
                Part {
                    size: 0,
                    units: Some(units),
                },
            ] => Layout::Split { dim, units: *units },
            _ => Layout::Fused {
                dim,
                parts: parts.to_vec(),
            },
        };
        let select = Selection { dim, blocks };
        self.load(name, shape, self.weights.dtype, Some(select), layout)
    }

    /// This module on its pipeline stage: `active` says whether this rank's stage computes it;
    /// elsewhere its sites exist but no weight is read.
    pub(crate) fn on_stage(&self, active: bool) -> Self {
        Self {
            meta: self.meta || !active,
            ..self.clone()
        }
    }

    /// Decoder layer `i` under this path, its weights read only on the stage that runs it
    /// (and streamed with the layer's unit).
    pub(crate) fn layer(&self, i: usize) -> Self {
        Self {
            unit: layer_unit(i),
            ..self.pp(i).on_stage(self.shard.layers.contains(&i))
        }
    }

    /// This module, read only on the first stage (position embeddings, input projections),
    /// streamed with the embeddings.
    pub(crate) fn first_stage(&self) -> Self {
        Self {
            unit: EMBED,
            ..self.on_stage(self.shard.first)
        }
    }

    /// The token embeddings: read where they are used, on the first stage, and on the last
    /// when `tied` to the head.
    pub(crate) fn embeddings(&self, tied: bool) -> Self {
        let shard = &self.shard;
        Self {
            unit: EMBED,
            ..self.on_stage(shard.first || (shard.last && tied))
        }
    }

    /// This module, read only on the last stage (final norm, head), streamed with the head.
    pub(crate) fn last_stage(&self) -> Self {
        Self {
            unit: HEAD,
            ..self.on_stage(self.shard.last)
        }
    }

    /// This module, whose weights are vocabulary-sized (token embeddings, LM head): under
    /// FSDP they are kept by rows and used block by block ([`Param::blocks`]).
    pub(crate) fn by_rows(&self) -> Self {
        Self {
            by_rows: true,
            ..self.clone()
        }
    }

    /// This rank's part of the model.
    pub(crate) fn shard(&self) -> &Shard {
        &self.shard
    }

    /// Records `p` as parameter `<path>.<name>` (a tied weight under its second name), laid
    /// out over tensor-parallel ranks by `layout`.
    pub(crate) fn record(&self, name: &str, p: &Param, layout: Layout) {
        let name = join(&self.path, &name);
        let mut params = self.params.borrow_mut();
        match p {
            Param::Resident(t) => params.insert_piece(name, t.clone(), layout, !self.meta),
            Param::Streamed { slot, .. } if self.meta => {
                params.insert_piece(name, slot.placeholder.clone(), layout, false);
            }
            Param::Streamed { slot, .. } => {
                // A weight shared with another unit (a tied head): that unit must be resident
                // whenever this one is.
                self.streams.borrow_mut().need(self.unit, slot.unit);
                params.insert_streamed(name, slot.placeholder.clone(), layout, slot.fetch.clone());
            }
            Param::Rows { rows, .. } => {
                params.insert_streamed(name, rows.placeholder.clone(), layout, rows.fetch.clone());
            }
        }
    }

    /// Whether the checkpoint has `name` under this path.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.weights.contains(&self.full(name))
    }

    /// The dtype the model computes in.
    pub(crate) fn dtype(&self) -> DType {
        self.weights.dtype
    }

    /// The device the weights live on.
    pub(crate) fn device(&self) -> &Device {
        &self.weights.device
    }

    /// Declares the site of the module at this path.
    pub(crate) fn site(&self, shape: Vec<Dim>, layout: Layout) -> Result<SiteId> {
        Ok(self.sites.borrow_mut().module(&self.path, shape, layout)?)
    }

    /// Records how the input of this module's site is split over tensor-parallel ranks.
    pub(crate) fn set_input_layout(&self, id: SiteId, layout: Layout) {
        self.sites.borrow_mut().set_input_layout(id, layout);
    }

    /// Declares `<path>.<name>`, a site inside this module that is not a module itself.
    pub(crate) fn internal(&self, name: &str, shape: Vec<Dim>, layout: Layout) -> Result<SiteId> {
        let full = join(&self.path, &name);
        Ok(self
            .sites
            .borrow_mut()
            .add(full, SiteKind::Internal, shape, layout)?)
    }

    /// The sites declared so far (call once construction is complete).
    pub(crate) fn take_sites(&self) -> SiteTable {
        std::mem::take(&mut self.sites.borrow_mut())
    }

    /// The key/value cache slot of the next attention layer.
    pub(crate) fn next_attention_layer(&self) -> usize {
        let n = self.attention_layers.get();
        self.attention_layers.set(n + 1);
        n
    }

    /// The parameters loaded so far (call once construction is complete).
    pub(crate) fn take_parameters(&self) -> Parameters {
        std::mem::take(&mut self.params.borrow_mut())
    }

    /// The streamed weights (call once construction is complete): under FSDP this reads this
    /// rank's shards.
    pub(crate) fn take_streams(&self) -> Result<Arc<OnceLock<Streams>>> {
        let fresh = self.streams.borrow().fresh();
        std::mem::replace(&mut *self.streams.borrow_mut(), fresh).finish()
    }
}

fn join(prefix: &str, name: &dyn std::fmt::Display) -> String {
    match prefix {
        "" => name.to_string(),
        p => format!("{p}.{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::stage_layers;

    #[test]
    fn the_last_stage_takes_fewer_layers_for_the_head() {
        // The 125M Llama: the head costs ~3.5 layers.
        assert_eq!(stage_layers(12, 2, 3.47), [(0, 8), (8, 4)]);
        assert_eq!(stage_layers(12, 4, 3.47), [(0, 4), (4, 4), (8, 3), (11, 1)]);
        // No head cost: even stages; every stage keeps a layer.
        assert_eq!(stage_layers(12, 3, 0.0), [(0, 4), (4, 4), (8, 4)]);
        assert_eq!(stage_layers(2, 2, 40.0), [(0, 1), (1, 1)]);
        assert_eq!(stage_layers(5, 1, 3.0), [(0, 5)]);
    }
}
