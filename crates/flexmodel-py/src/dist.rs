//! The job's ranks from Python: MPI started once per process (under `mpirun`), the grid of a
//! model's layout, and the end of the job (MPI finalized after every model is gone, or every
//! rank aborted when one fails).

use std::sync::{Arc, Mutex, Weak};

use candle_core::Tensor;
use flexmodel::{Comm, Device, FlexModel, Grid, Parallelism};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// The world communicator, once started; taken at exit.
static WORLD: Mutex<Option<Arc<dyn Comm>>> = Mutex::new(None);

/// The wrappers of this process, so that the job's end can drop their communicators before
/// MPI is finalized.
static MODELS: Mutex<Vec<Weak<Mutex<Option<FlexModel>>>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The world of this job: MPI's under an MPI launcher (started on first use), else one
/// process.
pub(crate) fn world() -> PyResult<Arc<dyn Comm>> {
    let mut world = lock(&WORLD);
    if let Some(w) = &*world {
        return Ok(w.clone());
    }
    let w: Arc<dyn Comm> = if flexmodel_dist::launched_size().is_some_and(|n| n > 1) {
        flexmodel_dist::init().map_err(|e| crate::error::distributed(&e))?
    } else {
        Arc::new(flexmodel::Local)
    };
    *world = Some(w.clone());
    Ok(w)
}

/// The grid of a model with `degrees` on `device` (one process when every degree is 1 and no
/// launcher started several).
pub(crate) fn grid(degrees: Parallelism, device: &Device) -> PyResult<Grid> {
    let world = world()?;
    if degrees.world() == 1 && world.size() == 1 {
        return Ok(Grid::single());
    }
    let world =
        flexmodel_dist::for_device(world, device).map_err(|e| crate::error::distributed(&e))?;
    Grid::new(world, degrees).map_err(|e| crate::error::distributed(&e))
}

/// Remembers a wrapper for [`shutdown`].
pub(crate) fn track(model: &Arc<Mutex<Option<FlexModel>>>) {
    let mut models = lock(&MODELS);
    models.retain(|m| m.strong_count() > 0);
    models.push(Arc::downgrade(model));
}

/// This process's rank in the job (0 outside MPI).
#[pyfunction]
pub(crate) fn rank() -> PyResult<usize> {
    Ok(world()?.rank())
}

/// The number of processes in the job.
#[pyfunction]
pub(crate) fn world_size() -> PyResult<usize> {
    Ok(world()?.size())
}

/// Waits for every rank, sleeping while it waits: where a [`flexmodel.Job`]'s ranks wait for
/// the next run.
#[pyfunction]
pub(crate) fn idle_barrier(py: Python<'_>) -> PyResult<()> {
    let world = world()?;
    py.detach(|| world.idle_barrier())
        .map_err(|e| crate::error::distributed(&e))
}

/// `data` of rank 0, on every rank (the others pass `None`): what a [`flexmodel.Job`]'s rank
/// 0 hands the others.
#[pyfunction]
pub(crate) fn broadcast_bytes(py: Python<'_>, data: Option<Vec<u8>>) -> PyResult<Py<PyBytes>> {
    let world = world()?;
    let sent = match (data, world.rank()) {
        (Some(bytes), 0) => {
            let n = bytes.len();
            Some(Tensor::from_vec(bytes, n, &Device::Cpu).map_err(crate::error::candle)?)
        }
        (None, rank) if rank != 0 => None,
        _ => {
            return Err(crate::error::raise(
                "InputError",
                "broadcast_bytes: rank 0 passes the bytes, every other rank None".to_string(),
            ));
        }
    };
    let got = py
        .detach(|| world.broadcast(sent.as_ref(), 0))
        .map_err(|e| crate::error::distributed(&e))?;
    let bytes = got.to_vec1::<u8>().map_err(crate::error::candle)?;
    Ok(PyBytes::new(py, &bytes).unbind())
}

/// Whether this binary was built with MPI support (the `mpi` feature).
#[pyfunction]
pub(crate) fn has_mpi() -> bool {
    flexmodel_dist::HAS_MPI
}

/// Ends every rank of the job with `code` (MPI_Abort): an uncaught exception on one rank must
/// not leave the others waiting in a collective.
#[pyfunction]
pub(crate) fn abort(code: i32) -> PyResult<()> {
    let world = lock(&WORLD).clone();
    match world {
        Some(w) if w.size() > 1 => w.abort(code),
        _ => Ok(()),
    }
}

/// The end of the job: every wrapper gives up its model and communicators, then MPI is
/// finalized (at interpreter exit; models are unusable after).
#[pyfunction]
pub(crate) fn shutdown() {
    let models = std::mem::take(&mut *lock(&MODELS));
    for model in models.iter().filter_map(Weak::upgrade) {
        lock(&model).take();
    }
    lock(&WORLD).take();
}
