//! The wrapper as Python sees it: a loaded model with hooks, whose every pass runs with the
//! GIL released (taken again only around Python editing functions).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use candle_core::backprop::GradStore;
use flexmodel::harvest::{self, DataSource, HarvestOptions, Settings, StatsSettings, StoreDType};
use flexmodel::{
    DType, Device, FlexModel, GenerateOptions, Groups, HookFunction, HookHandle, Input,
    LoadOptions, ModelInfo, Offload, Parallelism, Sampling, Steps, Tensor, Tokenizer,
};
use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::edit::{Failures, PyEdit};
use crate::error;
use crate::tensor::{RawTensor, dtype_name, from_bytes, parse_dtype};

/// A model wrapped for hooks (the native half of `flexmodel.FlexModel`).
#[pyclass(frozen, module = "flexmodel._flexmodel", name = "Model")]
pub struct PyModel {
    /// Empty once the job ended or the wrapper was restored.
    fm: Arc<Mutex<Option<FlexModel>>>,
    failures: Arc<Failures>,
    /// Our hook ids and the wrapper's handles.
    pub(crate) handles: Mutex<HashMap<u64, HookHandle>>,
    pub(crate) next_id: AtomicU64,
    /// The logits of the last recorded forward pass, for [`PyModel::backward`].
    recorded: Mutex<Option<Tensor>>,
    dir: PathBuf,
    info: ModelInfo,
    device: Device,
    degrees: Parallelism,
    rank: usize,
    sites_json: String,
}

impl PyModel {
    fn wrap(fm: FlexModel, dir: PathBuf, degrees: Parallelism) -> PyResult<Self> {
        let model = fm.model();
        let sites: Vec<_> = model.sites().iter().map(|(_, s)| s).collect();
        let sites_json = serde_json::to_string(&sites)
            .map_err(|e| PyRuntimeError::new_err(format!("cannot describe the sites: {e}")))?;
        let info = model.info().clone();
        let device = model.device().clone();
        let grid = model.grid();
        let failures = Arc::new(Failures::new(grid.is_distributed()));
        let rank = grid.world.rank();
        let fm = Arc::new(Mutex::new(Some(fm)));
        crate::dist::track(&fm);
        Ok(Self {
            fm,
            failures,
            handles: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            recorded: Mutex::new(None),
            dir,
            info,
            device,
            degrees,
            rank,
            sites_json,
        })
    }

    /// The wrapper, for a call outside a pass; a call from inside an editing function (while
    /// the pass holds it) is an error, not a deadlock.
    pub(crate) fn model(&self) -> PyResult<Guard<'_>> {
        let guard = match self.fm.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return Err(PyRuntimeError::new_err(
                    "the model is running a pass: an editing function cannot call the model it \
                     is a hook of (read ctx and the activation instead)",
                ));
            }
        };
        if guard.is_none() {
            return Err(PyRuntimeError::new_err(
                "this wrapper no longer holds a model (it was restored, or the job ended)",
            ));
        }
        Ok(Guard(guard))
    }

    /// Runs `f` on the wrapper with the GIL released; an exception an editing function raised
    /// comes back as itself, any other failure as flexmodel's exception.
    pub(crate) fn run<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut FlexModel) -> flexmodel::Result<T> + Send,
    ) -> PyResult<T> {
        let mut guard = self.model()?;
        let fm = guard.get();
        self.failures.take();
        let result = py.detach(|| f(fm));
        result.map_err(|e| self.failures.take().unwrap_or_else(|| error::core(&e)))
    }

    fn handle(&self, id: u64) -> PyResult<HookHandle> {
        lock(&self.handles)
            .get(&id)
            .copied()
            .ok_or_else(|| error::core(&flexmodel::Error::UnknownHook(id)))
    }
}

pub(crate) struct Guard<'a>(MutexGuard<'a, Option<FlexModel>>);

impl Guard<'_> {
    pub(crate) fn get(&mut self) -> &mut FlexModel {
        self.0
            .as_mut()
            .unwrap_or_else(|| unreachable!("checked in PyModel::model"))
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The model input from the token ids (uint32, C order) and mask Python sent.
pub(crate) fn input(
    ids: &Bound<'_, PyBytes>,
    shape: (usize, usize),
    mask: Option<&Bound<'_, PyBytes>>,
) -> PyResult<Input> {
    let dims = [shape.0, shape.1];
    let ids = from_bytes(ids, "uint32", &dims, &Device::Cpu)?;
    Ok(match mask {
        Some(m) => Input::with_mask(ids, from_bytes(m, "uint32", &dims, &Device::Cpu)?),
        None => Input::new(ids),
    })
}

fn groups(only: Option<Vec<String>>, except: Option<Vec<String>>) -> PyResult<Groups> {
    match (only, except) {
        (Some(_), Some(_)) => Err(PyValueError::new_err(
            "give groups (the hooks to run) or exclude_groups (the hooks to skip), not both",
        )),
        (Some(only), None) => Ok(Groups::only(only)),
        (None, Some(except)) => Ok(Groups::except(except)),
        (None, None) => Ok(Groups::All),
    }
}

fn steps(kind: &str, start: usize, end: usize) -> PyResult<Steps> {
    Ok(match kind {
        "all" => Steps::All,
        "prompt" => Steps::Prompt,
        "decode" => Steps::Decode,
        "range" => Steps::Range(start, end),
        other => {
            return Err(PyValueError::new_err(format!(
                "steps `{other}`: use \"all\", \"prompt\", \"decode\" or a (start, end) range"
            )));
        }
    })
}

/// The gradients `store` holds of the model's weights, by parameter name (empty unless the
/// model was loaded with `requires_grad`).
fn weight_grads(fm: &FlexModel, store: &GradStore) -> Vec<(String, Tensor)> {
    let params = fm.model().parameters().iter();
    params
        .filter_map(|(name, p)| Some((name.to_string(), store.get(p)?.clone())))
        .collect()
}

fn raw_grads(grads: &[(String, Tensor)]) -> PyResult<Vec<(String, RawTensor)>> {
    grads
        .iter()
        .map(|(n, g)| Ok((n.clone(), raw(g)?)))
        .collect()
}

pub(crate) fn raw(t: &Tensor) -> PyResult<RawTensor> {
    RawTensor::read_only(t)
}

/// The model directory `model` names: itself, or a Hub name's snapshot in the local cache.
#[pyfunction]
pub(crate) fn resolve(model: PathBuf) -> PyResult<PathBuf> {
    flexmodel::resolve(&model).map_err(|e| error::load(&e))
}

/// `(repo, revision)` when `model` can be a Hugging Face Hub name, else `None`.
#[pyfunction]
pub(crate) fn hub_name(model: &str) -> Option<(String, String)> {
    flexmodel::hub_name(model).map(|(repo, revision)| (repo.to_string(), revision.to_string()))
}

/// Loads the Hugging Face model in `dir`; under `mpirun`, this rank's part of it.
#[pyfunction]
#[pyo3(signature = (dir, dtype = "float32", device = "cpu", tp = 1, pp = 1, dp = 1, fsdp = 1, offload = None, micro_batches = 0, requires_grad = false))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn load(
    py: Python<'_>,
    dir: PathBuf,
    dtype: &str,
    device: &str,
    tp: usize,
    pp: usize,
    dp: usize,
    fsdp: usize,
    offload: Option<&str>,
    micro_batches: usize,
    requires_grad: bool,
) -> PyResult<PyModel> {
    let offload = match offload {
        None => Offload::None,
        Some("cpu") => Offload::Cpu,
        Some("disk") => Offload::Disk,
        Some(other) => {
            return Err(error::raise(
                "InputError",
                format!("offload '{other}': use None, 'cpu' or 'disk'"),
            ));
        }
    };
    let dtype = match parse_dtype(dtype)? {
        d @ (DType::F32 | DType::F16 | DType::BF16) => d,
        other => {
            return Err(error::raise(
                "InputError",
                format!(
                    "a model computes in float32, float16 or bfloat16, not {}",
                    dtype_name(other)
                ),
            ));
        }
    };
    let spec = match device {
        "cuda" => format!("cuda:{}", flexmodel_dist::local_rank().unwrap_or(0)),
        other => other.to_string(),
    };
    let device = flexmodel::device(&spec).map_err(|e| error::load(&e))?;
    let degrees = Parallelism {
        tp,
        pp,
        dp: dp * fsdp,
        fsdp,
        micro_batches,
    };
    let grid = crate::dist::grid(degrees, &device)?;
    let options = LoadOptions {
        dtype,
        device,
        requires_grad,
        grid,
        offload,
    };
    let model = py
        .detach(|| flexmodel::load(&dir, &options))
        .map_err(|e| error::load(&e))?;
    PyModel::wrap(FlexModel::new(model), dir, degrees)
}

#[pymethods]
impl PyModel {
    /// Registers a hook; returns its id.
    #[pyo3(signature = (pattern, point, expected_shape, edit, capture, groups, steps_kind, steps_start, steps_end))]
    #[allow(clippy::too_many_arguments)]
    fn register(
        &self,
        pattern: &str,
        point: &str,
        expected_shape: Option<Vec<Option<usize>>>,
        edit: Option<Py<PyAny>>,
        capture: bool,
        groups: Vec<String>,
        steps_kind: &str,
        steps_start: usize,
        steps_end: usize,
    ) -> PyResult<u64> {
        let mut hook = match point {
            "output" => HookFunction::new(pattern),
            "input" => HookFunction::pre(pattern),
            "grad" => HookFunction::backward(pattern),
            other => {
                return Err(PyValueError::new_err(format!(
                    "hook point `{other}`: use \"output\", \"input\" or \"grad\""
                )));
            }
        };
        hook = hook
            .capture(capture)
            .steps(steps(steps_kind, steps_start, steps_end)?);
        if let Some(shape) = expected_shape {
            hook = hook.expected_dims(&shape);
        }
        if let Some(call) = edit {
            let failures = self.failures.clone();
            hook = hook.edit(PyEdit { call, failures }).in_place(true);
        }
        for g in groups {
            hook = hook.group(g);
        }
        let handle = self
            .model()?
            .get()
            .register(hook)
            .map_err(|e| error::core(&e))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(id, handle);
        Ok(id)
    }

    /// Removes the hook `id`.
    fn remove(&self, id: u64) -> PyResult<()> {
        let handle = self.handle(id)?;
        self.model()?
            .get()
            .remove(handle)
            .map_err(|e| error::core(&e))?;
        lock(&self.handles).remove(&id);
        Ok(())
    }

    /// A forward pass; the logits on rank 0 (None on the other ranks). With `record` (one
    /// process) it records the autograd graph for a loss of the caller's, and keeps the logits
    /// for [`PyModel::backward`].
    #[pyo3(signature = (ids, shape, mask = None, only = None, except = None, record = false))]
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        py: Python<'_>,
        ids: &Bound<'_, PyBytes>,
        shape: (usize, usize),
        mask: Option<&Bound<'_, PyBytes>>,
        only: Option<Vec<String>>,
        except: Option<Vec<String>>,
        record: bool,
    ) -> PyResult<Option<RawTensor>> {
        let input = input(ids, shape, mask)?;
        let groups = groups(only, except)?;
        let logits = self.run(py, |fm| match record {
            true => fm.forward_recorded(&input, &groups),
            false => fm.forward_groups(&input, &groups),
        })?;
        if record {
            let view = raw(&logits.detach())?;
            *lock(&self.recorded) = Some(logits);
            return Ok(Some(view));
        }
        if self.rank != 0 {
            return Ok(None);
        }
        raw(&logits).map(Some)
    }

    /// The backward pass from the last recorded forward pass, given the gradient of the
    /// caller's loss with respect to its logits: runs the backward hooks and the torch edits'
    /// vector-Jacobian products; returns the weights' gradients (a model loaded with
    /// `requires_grad`).
    fn backward(
        &self,
        py: Python<'_>,
        grad: &Bound<'_, PyBytes>,
        dtype: &str,
        shape: Vec<usize>,
    ) -> PyResult<Vec<(String, RawTensor)>> {
        let logits = lock(&self.recorded).take().ok_or_else(|| {
            error::raise(
                "BackwardError",
                "backward: no recorded forward pass to differentiate; run fm(ids, grad=True) \
                 first (each recorded pass serves one backward pass)"
                    .into(),
            )
        })?;
        let grad = from_bytes(grad, dtype, &shape, logits.device())?;
        if grad.dims() != logits.dims() {
            return Err(error::raise(
                "ShapeError",
                format!(
                    "backward: the gradient has shape {:?}, the logits {:?}",
                    grad.dims(),
                    logits.dims()
                ),
            ));
        }
        let grads = self.run(py, |fm| {
            let f32 = flexmodel::DType::F32;
            let surrogate = (logits.to_dtype(f32)? * grad.to_dtype(f32)?)?.sum_all()?;
            let store = fm.backward(&surrogate)?;
            Ok(weight_grads(fm, &store))
        })?;
        raw_grads(&grads)
    }

    /// A pass for the hooks alone; the decoder layer it stopped after.
    #[pyo3(signature = (ids, shape, mask = None))]
    fn capture(
        &self,
        py: Python<'_>,
        ids: &Bound<'_, PyBytes>,
        shape: (usize, usize),
        mask: Option<&Bound<'_, PyBytes>>,
    ) -> PyResult<Option<usize>> {
        let input = input(ids, shape, mask)?;
        self.run(py, |fm| fm.capture(&input))
    }

    /// Generation with a key/value cache; the sequences (int64) on every rank.
    #[pyo3(signature = (ids, shape, mask, max_new_tokens, sample, temperature, top_k, top_p, seed, eos_token_ids, pad_token_id))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        ids: &Bound<'_, PyBytes>,
        shape: (usize, usize),
        mask: Option<&Bound<'_, PyBytes>>,
        max_new_tokens: usize,
        sample: bool,
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
        seed: u64,
        eos_token_ids: Vec<u32>,
        pad_token_id: u32,
    ) -> PyResult<(RawTensor, usize)> {
        let input = input(ids, shape, mask)?;
        let sampling = if sample {
            Sampling::Sample {
                temperature,
                top_k,
                top_p,
                seed,
            }
        } else {
            Sampling::Greedy
        };
        let options = GenerateOptions {
            max_new_tokens,
            sampling,
            eos_token_ids,
            pad_token_id,
        };
        let interrupted = AtomicBool::new(false);
        let generation = self.run(py, |fm| {
            fm.generate(&input, &options, |_, _| {
                // Ctrl-C ends every row at its next token.
                if !interrupted.load(Ordering::Relaxed)
                    && Python::attach(|py| py.check_signals()).is_err()
                {
                    interrupted.store(true, Ordering::Relaxed);
                }
                interrupted.load(Ordering::Relaxed)
            })
        })?;
        if interrupted.load(Ordering::Relaxed) {
            return Err(PyKeyboardInterrupt::new_err("generation interrupted"));
        }
        Ok((raw(&generation.sequences)?, generation.steps))
    }

    /// The causal-LM loss's forward and backward pass: (loss, logits, weight gradients) on
    /// rank 0; weight gradients only for a model loaded with `requires_grad`.
    #[pyo3(signature = (ids, shape, mask = None))]
    #[allow(clippy::type_complexity)]
    fn lm_backward(
        &self,
        py: Python<'_>,
        ids: &Bound<'_, PyBytes>,
        shape: (usize, usize),
        mask: Option<&Bound<'_, PyBytes>>,
    ) -> PyResult<(Option<f32>, Option<RawTensor>, Vec<(String, RawTensor)>)> {
        let input = input(ids, shape, mask)?;
        let (loss, logits, grads) = self.run(py, |fm| {
            let b = fm.lm_backward(&input)?;
            let grads = weight_grads(fm, &b.grads);
            let loss = b.loss.to_dtype(flexmodel::DType::F32)?.to_scalar::<f32>()?;
            Ok((loss, b.logits, grads))
        })?;
        if self.rank != 0 {
            return Ok((None, None, Vec::new()));
        }
        Ok((Some(loss), Some(raw(&logits)?), raw_grads(&grads)?))
    }

    /// The full tensor of a parameter (on rank 0; every rank must call it).
    fn parameter(&self, py: Python<'_>, name: &str) -> PyResult<RawTensor> {
        let t = self.run(py, |fm| fm.parameter(name))?;
        raw(&t)
    }

    /// Every parameter name.
    fn parameter_names(&self) -> PyResult<Vec<String>> {
        let mut guard = self.model()?;
        let names = guard.get().model().parameters().iter();
        Ok(names.map(|(n, _)| n.to_string()).collect())
    }

    /// Site names with captures, in name order.
    fn output_keys(&self) -> PyResult<Vec<String>> {
        let mut guard = self.model()?;
        Ok(guard
            .get()
            .output()
            .iter()
            .map(|(k, _)| k.to_string())
            .collect())
    }

    /// The captures of `key`, oldest first (read-only arrays over the captured tensors).
    fn output_get(&self, key: &str) -> PyResult<Option<Vec<RawTensor>>> {
        let mut guard = self.model()?;
        match guard.get().output().get(key) {
            Some(list) => list.iter().map(raw).collect::<PyResult<_>>().map(Some),
            None => Ok(None),
        }
    }

    /// Forgets every capture.
    fn clear_output(&self) -> PyResult<()> {
        self.model()?.get().clear_output();
        Ok(())
    }

    /// Takes every capture, leaving the output map empty.
    fn take_output(&self) -> PyResult<Vec<(String, Vec<RawTensor>)>> {
        let output = self.model()?.get().take_output();
        output
            .into_iter()
            .map(|(k, v)| Ok((k, v.iter().map(raw).collect::<PyResult<_>>()?)))
            .collect()
    }

    /// Every site as JSON: name, kind, shape template, layouts.
    fn sites_json(&self) -> &str {
        &self.sites_json
    }

    /// Creates an empty hook group.
    fn create_group(&self, name: &str) -> PyResult<()> {
        self.model()?.get().create_group(name);
        Ok(())
    }

    /// Adds hook `id` to group `name`.
    fn add_to_group(&self, name: &str, id: u64) -> PyResult<()> {
        let handle = self.handle(id)?;
        let mut guard = self.model()?;
        let fm = guard.get();
        fm.add_to_group(name, handle).map_err(|e| error::core(&e))
    }

    /// Takes hook `id` out of group `name`.
    fn remove_from_group(&self, name: &str, id: u64) -> PyResult<()> {
        let handle = self.handle(id)?;
        let mut guard = self.model()?;
        let fm = guard.get();
        fm.remove_from_group(name, handle)
            .map_err(|e| error::core(&e))
    }

    /// Removes group `name` and its hooks; returns how many.
    fn remove_group(&self, name: &str) -> PyResult<usize> {
        let mut guard = self.model()?;
        let fm = guard.get();
        let members = fm.group(name).map_err(|e| error::core(&e))?;
        let n = fm.remove_group(name).map_err(|e| error::core(&e))?;
        lock(&self.handles).retain(|_, h| !members.contains(h));
        Ok(n)
    }

    /// The ids of the hooks in group `name`.
    fn group(&self, name: &str) -> PyResult<Vec<u64>> {
        let members = self
            .model()?
            .get()
            .group(name)
            .map_err(|e| error::core(&e))?;
        let handles = lock(&self.handles);
        let mut ids: Vec<u64> = handles
            .iter()
            .filter(|(_, h)| members.contains(h))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Every group name.
    fn groups(&self) -> PyResult<Vec<String>> {
        Ok(self.model()?.get().groups())
    }

    /// Hands the untouched model to a new wrapper (every hook, group and capture gone); this
    /// one is empty after.
    fn restore(&self) -> PyResult<PyModel> {
        let mut guard = self.model()?;
        let fm = guard.0.take().unwrap_or_else(|| unreachable!("checked"));
        drop(guard);
        PyModel::wrap(FlexModel::new(fm.restore()), self.dir.clone(), self.degrees)
    }

    /// Harvests sites over a dataset (the CLI's `harvest`); returns the summary as a dict's
    /// items.
    #[pyo3(signature = (data, text_field, sites, out, seq_len, packing, batch_size, max_tokens, dtype, positions, shard_tokens, stats, raw, top_k, context, covariance, memory_budget, resume, progress))]
    #[allow(clippy::too_many_arguments)]
    fn harvest(
        &self,
        py: Python<'_>,
        data: PathBuf,
        text_field: &str,
        sites: Vec<String>,
        out: PathBuf,
        seq_len: usize,
        packing: bool,
        batch_size: usize,
        max_tokens: Option<usize>,
        dtype: &str,
        positions: &str,
        shard_tokens: Option<usize>,
        stats: bool,
        raw: bool,
        top_k: usize,
        context: usize,
        covariance: bool,
        memory_budget: Option<u64>,
        resume: bool,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Vec<(String, f64)>> {
        let source = DataSource::from_path(&data, text_field).map_err(|e| error::harvest(&e))?;
        let positions = positions.parse().map_err(|e| error::harvest(&e))?;
        let dtype = match parse_dtype(dtype)? {
            flexmodel::DType::F32 => StoreDType::F32,
            flexmodel::DType::F16 => StoreDType::F16,
            flexmodel::DType::BF16 => StoreDType::Bf16,
            other => {
                return Err(PyValueError::new_err(format!(
                    "harvest dtype {}: use float32, float16 or bfloat16",
                    dtype_name(other)
                )));
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let options = HarvestOptions {
            settings: Settings {
                sites,
                seq_len,
                packing,
                batch_size,
                max_tokens,
                dtype,
                positions,
                raw,
                stats: stats.then_some(StatsSettings {
                    top_k,
                    context,
                    covariance,
                }),
                shard_tokens,
            },
            memory_budget,
            resume,
            stop: Some(stop.clone()),
        };
        let stop_reason: Mutex<Option<PyErr>> = Mutex::new(None);
        let tokenizer = Tokenizer::from_dir(&self.dir).ok();
        let dir = self.dir.clone();
        let mut guard = self.model()?;
        let fm = guard.get();
        self.failures.take();
        let summary = py
            .detach(|| {
                harvest::run(fm, &dir, tokenizer.as_ref(), &source, &out, &options, |p| {
                    Python::attach(|py| {
                        // Ctrl-C, or an exception in the progress callback: the harvest
                        // ends after this batch, resumable.
                        let reported = match &progress {
                            Some(f) => report_progress(py, f, p),
                            None => Ok(()),
                        };
                        if let Err(e) = reported.and_then(|()| py.check_signals()) {
                            lock(&stop_reason).get_or_insert(e);
                            stop.store(true, Ordering::Relaxed);
                        }
                    })
                })
            })
            .map_err(|e| match e {
                // A progress callback's exception as itself; Ctrl-C with the harvest's state.
                harvest::Error::Interrupted { .. } => match lock(&stop_reason).take() {
                    Some(reason) if !reason.is_instance_of::<PyKeyboardInterrupt>(py) => reason,
                    _ => PyKeyboardInterrupt::new_err(error::chain(&e)),
                },
                // An editing function of the wrapper raised (a Ctrl-C there too).
                e => self.failures.take().unwrap_or_else(|| error::harvest(&e)),
            })?;
        Ok(vec![
            ("rows".into(), summary.rows as f64),
            ("tokens".into(), summary.tokens as f64),
            ("stored_tokens".into(), summary.stored_tokens as f64),
            ("shards".into(), summary.shards as f64),
            ("bytes".into(), summary.bytes as f64),
            ("seconds".into(), summary.seconds),
        ])
    }

    /// The model's directory.
    #[getter]
    fn dir(&self) -> PathBuf {
        self.dir.clone()
    }

    /// The family (`model_type` of config.json).
    #[getter]
    fn model_type(&self) -> &str {
        &self.info.model_type
    }

    /// The compute dtype's name.
    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.info.dtype)
    }

    /// Where the weights live (`cpu`, `cuda:0`).
    #[getter]
    fn device(&self) -> String {
        match self.device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".into(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        }
    }

    /// (tp, pp, dp, fsdp): `dp` counts every data-parallel rank, FSDP's included.
    #[getter]
    fn layout(&self) -> (usize, usize, usize, usize) {
        let d = &self.degrees;
        (d.tp, d.pp, d.dp, d.fsdp)
    }

    /// This process's rank.
    #[getter]
    fn rank(&self) -> usize {
        self.rank
    }

    /// The decoder layers' site names.
    #[getter]
    fn decoder_layers(&self) -> Vec<String> {
        self.info.decoder_layers.clone()
    }

    /// The vocabulary size.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.info.vocab_size
    }

    /// The hidden size.
    #[getter]
    fn hidden_size(&self) -> usize {
        self.info.hidden_size
    }

    /// The number of registered hooks.
    #[getter]
    fn hook_count(&self) -> usize {
        lock(&self.handles).len()
    }
}

/// Calls a harvest's progress callback with a dict of where it stands.
fn report_progress(py: Python<'_>, f: &Py<PyAny>, p: &harvest::Progress) -> PyResult<()> {
    let d = pyo3::types::PyDict::new(py);
    d.set_item("rows", p.rows)?;
    d.set_item("tokens", p.tokens)?;
    d.set_item("stored_tokens", p.stored_tokens)?;
    d.set_item("shards", p.shards)?;
    d.set_item("seconds", p.seconds)?;
    d.set_item("fraction", p.fraction)?;
    f.call1(py, (d,)).map(drop)
}

/// A model directory's tokenizer (`tokenizer.json`).
#[pyclass(frozen, module = "flexmodel._flexmodel", name = "Tokenizer")]
pub struct PyTokenizer(Tokenizer);

#[pymethods]
impl PyTokenizer {
    /// The tokenizer of the model in `dir`.
    #[new]
    fn new(dir: PathBuf) -> PyResult<Self> {
        Tokenizer::from_dir(&dir)
            .map(Self)
            .map_err(|e| error::load(&e))
    }

    /// The token ids of `text`.
    fn encode(&self, text: &str) -> PyResult<Vec<u32>> {
        self.0.encode(text).map_err(|e| error::load(&e))
    }

    /// The text of `ids`.
    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        self.0.decode(&ids).map_err(|e| error::load(&e))
    }
}

/// Every tensor of a safetensors file, as read-only host tensors.
#[pyfunction]
pub(crate) fn read_safetensors(path: PathBuf) -> PyResult<Vec<(String, RawTensor)>> {
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| PyValueError::new_err(format!("{}: {}", path.display(), error::chain(&e))))?;
    let mut items: Vec<_> = tensors.into_iter().collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    items.into_iter().map(|(n, t)| Ok((n, raw(&t)?))).collect()
}
