//! The MPI communicator: tensors travel as bytes (dtype, shape, data) through the `mpi` crate.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};
use flexmodel_core::comm::{from_bytes, to_bytes};
use flexmodel_core::{Comm, Error, Result};
use mpi::Count;
use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;

/// Keeps MPI initialized while any communicator lives; finalizes it after the last.
struct Env(#[allow(dead_code)] Universe);

/// A group of MPI ranks.
pub(crate) struct MpiComm {
    // Dropped before `env`: a communicator must be freed before MPI is finalized.
    comm: Mutex<SimpleCommunicator>,
    env: Arc<Mutex<Env>>,
    rank: usize,
    size: usize,
}

// SAFETY: an MPI communicator handle may be used from any thread once MPI runs at
// `MPI_THREAD_SERIALIZED` or above, provided no two threads call MPI at once. `init` refuses a
// lower level, and every call on a communicator holds its mutex; a group's collectives are
// also ordered by the SPMD program itself. rsmpi leaves the types `!Send` because it cannot
// know the threading level.
#[allow(unsafe_code)]
unsafe impl Send for MpiComm {}
#[allow(unsafe_code)]
unsafe impl Sync for MpiComm {}

pub(crate) fn init() -> Result<Arc<dyn Comm>> {
    let (universe, level) = mpi::initialize_with_threading(mpi::Threading::Serialized)
        .ok_or_else(|| Error::msg("MPI was already initialized"))?;
    if level < mpi::Threading::Serialized {
        return Err(Error::msg(format!(
            "the MPI library offers thread level {level:?}; flexmodel needs Serialized or Multiple"
        )));
    }
    let world = universe.world();
    let comm = MpiComm::new(world, Arc::new(Mutex::new(Env(universe))));
    install_abort_on_panic();
    Ok(Arc::new(comm))
}

/// A panic on one rank must end the job, not leave the other ranks waiting.
fn install_abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        mpi::topology::SimpleCommunicator::world().abort(101);
    }));
}

impl MpiComm {
    fn new(comm: SimpleCommunicator, env: Arc<Mutex<Env>>) -> Self {
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        Self {
            comm: Mutex::new(comm),
            env,
            rank,
            size,
        }
    }

    fn comm(&self) -> MutexGuard<'_, SimpleCommunicator> {
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn count(n: usize) -> Result<Count> {
    Count::try_from(n).map_err(|_| {
        Error::msg(format!(
            "{n} bytes is more than MPI can send in one message"
        ))
    })
}

fn displacements(counts: &[Count]) -> Vec<Count> {
    counts
        .iter()
        .scan(0, |acc, &c| {
            let d = *acc;
            *acc += c;
            Some(d)
        })
        .collect()
}

fn split_bytes(buf: &[u8], counts: &[Count]) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(counts.len());
    let mut start = 0;
    for &c in counts {
        out.push(buf[start..start + c as usize].to_vec());
        start += c as usize;
    }
    out
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Comm>> {
        let color = Color::with_value(
            i32::try_from(color).map_err(|_| Error::msg("split color too large"))?,
        );
        let key = i32::try_from(key).map_err(|_| Error::msg("split key too large"))?;
        let sub = self
            .comm()
            .split_by_color_with_key(color, key)
            .ok_or_else(|| Error::msg("MPI split gave no communicator"))?;
        Ok(Arc::new(MpiComm::new(sub, self.env.clone())))
    }

    fn gather(&self, t: &Tensor, root: usize) -> Result<Option<Vec<Tensor>>> {
        let bytes = to_bytes(t)?;
        let comm = self.comm();
        let root_process = comm.process_at_rank(root as i32);
        let len = count(bytes.len())?;
        if self.rank != root {
            root_process.gather_into(&len);
            root_process.gather_varcount_into(&bytes[..]);
            return Ok(None);
        }
        let mut counts = vec![0 as Count; self.size];
        root_process.gather_into_root(&len, &mut counts[..]);
        let displs = displacements(&counts);
        let mut buf = vec![0u8; counts.iter().map(|&c| c as usize).sum()];
        {
            let mut partition = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
            root_process.gather_varcount_into_root(&bytes[..], &mut partition);
        }
        let device = t.device();
        split_bytes(&buf, &counts)
            .iter()
            .map(|b| from_bytes(b, device))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let bytes = to_bytes(t)?;
        let comm = self.comm();
        let mut counts = vec![0 as Count; self.size];
        comm.all_gather_into(&count(bytes.len())?, &mut counts[..]);
        let displs = displacements(&counts);
        let mut buf = vec![0u8; counts.iter().map(|&c| c as usize).sum()];
        {
            let mut partition = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
            comm.all_gather_varcount_into(&bytes[..], &mut partition);
        }
        split_bytes(&buf, &counts)
            .iter()
            .map(|b| from_bytes(b, t.device()))
            .collect()
    }

    fn scatter(&self, pieces: Option<&[Tensor]>, root: usize) -> Result<Tensor> {
        let comm = self.comm();
        let root_process = comm.process_at_rank(root as i32);
        let mut len: Count = 0;
        if self.rank != root {
            root_process.scatter_into(&mut len);
            let mut buf = vec![0u8; len as usize];
            root_process.scatter_varcount_into(&mut buf[..]);
            return from_bytes(&buf, &Device::Cpu);
        }
        let pieces = pieces.filter(|p| p.len() == self.size).ok_or_else(|| {
            Error::msg(format!(
                "scatter: the root needs one piece per rank ({})",
                self.size
            ))
        })?;
        let encoded: Vec<Vec<u8>> = pieces.iter().map(to_bytes).collect::<Result<_>>()?;
        let counts: Vec<Count> = encoded
            .iter()
            .map(|b| count(b.len()))
            .collect::<Result<_>>()?;
        root_process.scatter_into_root(&counts[..], &mut len);
        let flat: Vec<u8> = encoded.concat();
        let displs = displacements(&counts);
        let mut buf = vec![0u8; len as usize];
        let partition = Partition::new(&flat[..], &counts[..], &displs[..]);
        root_process.scatter_varcount_into_root(&partition, &mut buf[..]);
        from_bytes(&buf, pieces[root].device())
    }

    fn broadcast(&self, t: Option<&Tensor>, root: usize) -> Result<Tensor> {
        let comm = self.comm();
        let root_process = comm.process_at_rank(root as i32);
        let mut bytes = match (self.rank == root, t) {
            (true, Some(t)) => to_bytes(t)?,
            (true, None) => return Err(Error::msg("broadcast: no tensor on the root")),
            (false, _) => Vec::new(),
        };
        let mut len = count(bytes.len())?;
        root_process.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        root_process.broadcast_into(&mut bytes[..]);
        from_bytes(&bytes, &Device::Cpu)
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let comm = self.comm();
        let (dims, dtype, device) = (t.dims().to_vec(), t.dtype(), t.device().clone());
        let summed = if dtype == DType::F64 {
            let local: Vec<f64> = t.flatten_all()?.to_vec1()?;
            let mut out = vec![0f64; local.len()];
            comm.all_reduce_into(&local[..], &mut out[..], SystemOperation::sum());
            Tensor::from_vec(out, dims, &device)?
        } else {
            // f16 and bf16 are summed in f32, as the reduction of a half-precision matmul is.
            let local: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            let mut out = vec![0f32; local.len()];
            comm.all_reduce_into(&local[..], &mut out[..], SystemOperation::sum());
            Tensor::from_vec(out, dims, &device)?.to_dtype(dtype)?
        };
        Ok(summed)
    }

    fn send(&self, t: &Tensor, dest: usize) -> Result<()> {
        let bytes = to_bytes(t)?;
        self.comm().process_at_rank(dest as i32).send(&bytes[..]);
        Ok(())
    }

    fn recv(&self, src: usize) -> Result<Tensor> {
        let (bytes, _) = self.comm().process_at_rank(src as i32).receive_vec::<u8>();
        from_bytes(&bytes, &Device::Cpu)
    }

    fn barrier(&self) -> Result<()> {
        self.comm().barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.comm().abort(code)
    }
}
