//! flexmodel-dist: communicators for multi-process runs.
//!
//! With the `mpi` feature, [`init`] starts MPI (launch with `mpirun -n N` or `srun`) and
//! returns the world communicator; without it, a job of one process gets
//! [`flexmodel_core::Local`] and a job of several a clear error. [`for_device`] adapts it to
//! the model's device: with the `nccl` feature, CUDA tensors travel by NCCL
//! ([`DeviceComm`] over `NcclTransport`), one process per GPU.

use std::sync::Arc;

use candle_core::Device;
#[cfg(not(feature = "mpi"))]
use flexmodel_core::Local;
use flexmodel_core::{Comm, Result};

mod device;
#[cfg(feature = "mpi")]
mod mpi_comm;
#[cfg(feature = "nccl")]
mod nccl;

pub use device::{DeviceComm, Transport};
#[cfg(feature = "nccl")]
pub use nccl::NcclTransport;

/// The communicator of a job whose model runs on `device`: `world` for a CPU model or a
/// single process; for a CUDA model on several ranks, `world` carries the control messages
/// and NCCL the tensors.
///
/// # Errors
/// A CUDA model on several ranks in a binary without the `nccl` feature, or NCCL failed to
/// start.
pub fn for_device(world: Arc<dyn Comm>, device: &Device) -> Result<Arc<dyn Comm>> {
    match device {
        Device::Cuda(_cuda) if world.size() > 1 => {
            #[cfg(feature = "nccl")]
            {
                let nccl = Arc::new(NcclTransport::new(&world, _cuda)?);
                Ok(Arc::new(DeviceComm::new(world, nccl)))
            }
            #[cfg(not(feature = "nccl"))]
            Err(flexmodel_core::Error::msg(
                "a CUDA model on several ranks needs NCCL: build with the `nccl` feature \
                 (scripts/build-cuda.sh --features cuda,nccl,mpi)",
            ))
        }
        _ => Ok(world),
    }
}

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
            Some(n) if n > 1 => Err(flexmodel_core::Error::msg(format!(
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

/// This process's rank among those of the job on its node, as an MPI launcher announced it
/// (one process per GPU: the GPU to take).
pub fn local_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// Whether this binary can run several processes.
pub const HAS_MPI: bool = cfg!(feature = "mpi");
