//! flexmodel-dist: communicators for multi-process runs.
//!
//! With the `mpi` feature, [`init`] starts MPI (launch with `mpirun -n N` or `srun`) and
//! returns the world communicator; without it, a job of one process gets
//! [`flexmodel_core::Local`] and a job of several a clear error.

use std::sync::Arc;

use flexmodel_core::{Comm, Result};
#[cfg(not(feature = "mpi"))]
use flexmodel_core::{Error, Local};

#[cfg(feature = "mpi")]
mod mpi_comm;

/// The world communicator of this job: MPI's when this binary was built with the `mpi`
/// feature and started by an MPI launcher, else the single-process one.
///
/// # Errors
/// The job has several processes but this binary has no MPI support, or MPI failed to start.
pub fn init() -> Result<Arc<dyn Comm>> {
    #[cfg(feature = "mpi")]
    {
        mpi_comm::init()
    }
    #[cfg(not(feature = "mpi"))]
    {
        match launched_size() {
            Some(n) if n > 1 => Err(Error::msg(format!(
                "this job has {n} processes but flexmodel was built without MPI; rebuild with \
                 `cargo build --release --features mpi` (needs libopenmpi-dev and libclang-dev)"
            ))),
            _ => Ok(Arc::new(Local)),
        }
    }
}

/// The process count an MPI launcher announced in the environment, if any.
pub fn launched_size() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "SLURM_NTASKS",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// Whether this binary can run several processes.
pub const HAS_MPI: bool = cfg!(feature = "mpi");
