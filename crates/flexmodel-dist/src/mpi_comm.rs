//! The MPI communicator: tensors travel as bytes (dtype, shape, data) through the `mpi` crate.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use flexmodel_core::wire::{self, HEADER_LEN, Header};
use flexmodel_core::{Comm, Error, Result};
use mpi::Count;
use mpi::collective::SystemOperation;
use mpi::datatype::{MutView, Partition, PartitionMut, UserDatatype};
use mpi::environment::Universe;
use mpi::topology::{Color, Process, SimpleCommunicator};
use mpi::traits::*;

/// Keeps MPI initialized while any communicator lives; finalizes it after the last.
struct Env {
    _universe: Universe,
    /// MPI runs at `MPI_THREAD_MULTIPLE`: threads may use different communicators at once.
    multiple: bool,
}

/// A group of MPI ranks.
pub(crate) struct MpiComm {
    // Dropped before `env`: a communicator must be freed before MPI is finalized.
    comm: Mutex<SimpleCommunicator>,
    env: Arc<Mutex<Env>>,
    rank: usize,
    size: usize,
    /// Seconds spent waiting for the other ranks at gathers, not yet taken.
    waiting: Mutex<f64>,
}

// SAFETY: an MPI communicator handle may be used from any thread once MPI runs at
// `MPI_THREAD_SERIALIZED` or above, provided no two threads call MPI at once on it (and, below
// `MPI_THREAD_MULTIPLE`, on any communicator). `init` refuses a lower level; every call on a
// communicator holds its mutex; only FSDP's gather-ahead thread uses a communicator of its own
// while the main thread computes, and only at `MPI_THREAD_MULTIPLE` (`Comm::concurrent`). A
// group's collectives are ordered by the SPMD program itself. rsmpi leaves the types `!Send`
// because it cannot know the threading level.
#[allow(unsafe_code)]
unsafe impl Send for MpiComm {}
#[allow(unsafe_code)]
unsafe impl Sync for MpiComm {}

pub(crate) fn init() -> Result<Arc<dyn Comm>> {
    // Multiple where the library offers it (FSDP gathers the next unit on a second thread).
    let (universe, level) = mpi::initialize_with_threading(mpi::Threading::Multiple)
        .ok_or_else(|| Error::msg("MPI was already initialized"))?;
    if level < mpi::Threading::Serialized {
        return Err(Error::msg(format!(
            "the MPI library offers thread level {level:?}; flexmodel needs Serialized or Multiple"
        )));
    }
    let world = universe.world();
    let env = Env {
        _universe: universe,
        multiple: level == mpi::Threading::Multiple,
    };
    let comm = MpiComm::new(world, Arc::new(Mutex::new(env)));
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
            waiting: Mutex::new(0.0),
        }
    }

    fn comm(&self) -> MutexGuard<'_, SimpleCommunicator> {
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// On the root: every rank's header. The root waits here until the last rank reaches
    /// the gather; that time is recorded as waiting.
    fn gather_headers(&self, root: &Process<'_>, header: &[u64; HEADER_LEN]) -> Vec<u64> {
        let start = Instant::now();
        let mut words = vec![0u64; HEADER_LEN * self.size];
        root.gather_into_root(&header[..], &mut words[..]);
        *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) += start.elapsed().as_secs_f64();
        words
    }
}

/// `bytes`, or an empty slice of a real buffer: an empty `Vec<u8>`'s dangling pointer is 1,
/// which Open MPI reads as `MPI_IN_PLACE`.
fn sendable(bytes: &[u8]) -> &[u8] {
    static ONE: [u8; 1] = [0];
    if bytes.is_empty() { &ONE[..0] } else { bytes }
}

/// [`wire::receive`], handing `fill` a real buffer even for an empty tensor (see
/// [`sendable`]).
fn receive(
    header: &Header,
    device: &Device,
    fill: impl FnOnce(&mut [u8]) -> Result<()>,
) -> Result<Tensor> {
    wire::receive(header, device, |buf| {
        let mut one = [0u8; 1];
        fill(if buf.is_empty() { &mut one[..0] } else { buf })
    })
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

fn headers(words: &[u64]) -> Result<Vec<Header>> {
    words.chunks(HEADER_LEN).map(Header::decode).collect()
}

/// The header of the concatenation along `dim` of tensors with `headers`.
fn concatenated(headers: &[Header], dim: usize) -> Result<Header> {
    let first = &headers[0];
    let fits = |h: &Header| {
        h.dtype == first.dtype
            && h.dims.len() == first.dims.len()
            && h.dims
                .iter()
                .zip(&first.dims)
                .enumerate()
                .all(|(d, (a, b))| d == dim || a == b)
    };
    if let Some(h) = headers.iter().find(|h| !fits(h)) {
        return Err(Error::msg(format!(
            "cannot concatenate a {:?} {:?} piece with a {:?} {:?} one along dimension {dim}",
            first.dtype, first.dims, h.dtype, h.dims
        )));
    }
    let mut dims = first.dims.clone();
    dims[dim] = headers.iter().map(|h| h.dims[dim]).sum();
    Ok(Header {
        dtype: first.dtype,
        dims,
    })
}

/// Everyone's pieces, received into one buffer of `dtype` on `device`, as views of it.
/// Every rank's piece, received into one buffer (the pieces are views of it).
fn receive_pieces(
    headers: &[Header],
    device: &Device,
    fill: impl FnOnce(&mut [u8], &[Count], &[Count]) -> Result<()>,
) -> Result<Vec<Tensor>> {
    split_pieces(headers, &receive_flat(headers, device, fill)?)
}

/// The pieces `headers` describe, in `all` one after the other.
fn split_pieces(headers: &[Header], all: &Tensor) -> Result<Vec<Tensor>> {
    let mut start = 0;
    headers
        .iter()
        .map(|h| {
            let piece = all
                .narrow(0, start, h.elems())?
                .reshape(h.dims.as_slice())?;
            start += h.elems();
            Ok(piece)
        })
        .collect()
}

/// Every rank's piece received into one flat tensor, in rank order.
fn receive_flat(
    headers: &[Header],
    device: &Device,
    fill: impl FnOnce(&mut [u8], &[Count], &[Count]) -> Result<()>,
) -> Result<Tensor> {
    let dtype = headers[0].dtype;
    if let Some(h) = headers.iter().find(|h| h.dtype != dtype) {
        return Err(Error::msg(format!(
            "ranks sent pieces of different dtypes ({dtype:?} and {:?})",
            h.dtype
        )));
    }
    let counts: Vec<Count> = headers
        .iter()
        .map(|h| count(h.bytes()))
        .collect::<Result<_>>()?;
    let displs = displacements(&counts);
    let elems: usize = headers.iter().map(Header::elems).sum();
    let all = Header {
        dtype,
        dims: vec![elems],
    };
    receive(&all, device, |buf| fill(buf, &counts, &displs))
}

impl MpiComm {
    /// The headers of every rank's `t` and their data received into one flat tensor.
    fn all_gather_flat(&self, t: &Tensor) -> Result<(Vec<Header>, Tensor)> {
        let header = Header::of(t)?.encode();
        let comm = self.comm();
        let mut words = vec![0u64; HEADER_LEN * self.size];
        comm.all_gather_into(&header[..], &mut words[..]);
        let headers = headers(&words)?;
        let all = receive_flat(&headers, t.device(), |buf, counts, displs| {
            let mut partition = PartitionMut::new(buf, counts, displs);
            wire::with_bytes(t, |own| {
                comm.all_gather_varcount_into(sendable(own), &mut partition)
            })
        })?;
        Ok((headers, all))
    }
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
        let header = Header::of(t)?.encode();
        let comm = self.comm();
        let root_process = comm.process_at_rank(root as i32);
        if self.rank != root {
            root_process.gather_into(&header[..]);
            return wire::with_bytes(t, |bytes| {
                root_process.gather_varcount_into(sendable(bytes))
            })
            .map(|()| None);
        }
        let words = self.gather_headers(&root_process, &header);
        let pieces = receive_pieces(&headers(&words)?, t.device(), |buf, counts, displs| {
            let mut partition = PartitionMut::new(buf, counts, displs);
            wire::with_bytes(t, |own| {
                root_process.gather_varcount_into_root(sendable(own), &mut partition);
            })
        })?;
        Ok(Some(pieces))
    }

    fn gather_cat(&self, t: &Tensor, dim: usize, root: usize) -> Result<Option<Tensor>> {
        let header = Header::of(t)?;
        if dim >= t.rank() {
            return Err(Error::msg(format!(
                "cannot concatenate along dimension {dim} of a tensor of shape {:?}",
                t.dims()
            )));
        }
        let comm = self.comm();
        let root_process = comm.process_at_rank(root as i32);
        if self.rank != root {
            root_process.gather_into(&header.encode()[..]);
            return wire::with_bytes(t, |bytes| root_process.send(sendable(bytes))).map(|()| None);
        }
        let headers = headers(&self.gather_headers(&root_process, &header.encode()))?;
        let full = concatenated(&headers, dim)?;
        // Row-major: `outer` rows, in each of which rank r owns a run of `runs[r]` bytes.
        let outer: usize = full.dims[..dim].iter().product();
        let inner = full.dims[dim + 1..].iter().product::<usize>() * full.dtype.size_in_bytes();
        let runs: Vec<usize> = headers.iter().map(|h| h.dims[dim] * inner).collect();
        let row: usize = runs.iter().sum();
        let full = receive(&full, t.device(), |buf| {
            let mut offset = 0;
            for (r, &run) in runs.iter().enumerate() {
                if r == root {
                    wire::with_bytes(t, |own| {
                        for (i, chunk) in own.chunks(run.max(1)).enumerate() {
                            buf[i * row + offset..][..run].copy_from_slice(chunk);
                        }
                    })?;
                } else if outer == 1 || run == 0 || run == row {
                    comm.process_at_rank(r as i32)
                        .receive_into(&mut buf[offset..offset + outer * run]);
                } else {
                    // MPI writes each row's run straight to its place.
                    let runs_of_rows = UserDatatype::vector(
                        count(outer)?,
                        count(run)?,
                        count(row)?,
                        &u8::equivalent_datatype(),
                    );
                    let target = &mut buf[offset..];
                    debug_assert!((outer - 1) * row + run <= target.len());
                    // SAFETY: the datatype spans `(outer - 1) * row + run` bytes from the start
                    // of `target`, within it since `offset + run <= row`, and maps plain bytes.
                    #[allow(unsafe_code)]
                    let mut view =
                        unsafe { MutView::with_count_and_datatype(target, 1, &runs_of_rows) };
                    comm.process_at_rank(r as i32).receive_into(&mut view);
                }
                offset += run;
            }
            Ok(())
        })?;
        Ok(Some(full))
    }

    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let (headers, all) = self.all_gather_flat(t)?;
        split_pieces(&headers, &all)
    }

    fn all_gather_cat(&self, t: &Tensor) -> Result<Tensor> {
        let (headers, all) = self.all_gather_flat(t)?;
        let rest = &headers[0].dims.get(1..).unwrap_or_default();
        if headers
            .iter()
            .any(|h| h.dims.get(1..).unwrap_or_default() != *rest)
        {
            return Err(Error::msg(
                "all_gather_cat: the ranks' pieces differ beyond their first dimension",
            ));
        }
        let rows: usize = headers
            .iter()
            .map(|h| h.dims.first().copied().unwrap_or(1))
            .sum();
        let mut dims = vec![rows];
        dims.extend_from_slice(rest);
        Ok(all.reshape(dims)?)
    }

    fn scatter(&self, pieces: Option<&[Tensor]>, root: usize) -> Result<Tensor> {
        let comm = self.comm();
        let root_process = comm.process_at_rank(root as i32);
        let mut header = [0u64; HEADER_LEN];
        if self.rank != root {
            root_process.scatter_into(&mut header[..]);
            return receive(&Header::decode(&header)?, &Device::Cpu, |buf| {
                root_process.scatter_varcount_into(buf);
                Ok(())
            });
        }
        let pieces = pieces.filter(|p| p.len() == self.size).ok_or_else(|| {
            Error::msg(format!(
                "scatter: the root needs one piece per rank ({})",
                self.size
            ))
        })?;
        let all: Vec<Header> = pieces.iter().map(Header::of).collect::<Result<_>>()?;
        let words: Vec<u64> = all.iter().flat_map(Header::encode).collect();
        let counts: Vec<Count> = all
            .iter()
            .map(|h| count(h.bytes()))
            .collect::<Result<_>>()?;
        root_process.scatter_into_root(&words[..], &mut header[..]);
        // One send buffer holding every piece, in rank order.
        let mut flat = Vec::with_capacity(all.iter().map(Header::bytes).sum());
        for p in pieces {
            wire::with_bytes(p, |b| flat.extend_from_slice(b))?;
        }
        let displs = displacements(&counts);
        let partition = Partition::new(sendable(&flat), &counts[..], &displs[..]);
        receive(&all[root], pieces[root].device(), |buf| {
            root_process.scatter_varcount_into_root(&partition, buf);
            Ok(())
        })
    }

    fn broadcast(&self, t: Option<&Tensor>, root: usize) -> Result<Tensor> {
        let comm = self.comm();
        let root_process = comm.process_at_rank(root as i32);
        let mut header = [0u64; HEADER_LEN];
        if self.rank == root {
            let t = t.ok_or_else(|| Error::msg("broadcast: no tensor on the root"))?;
            header = Header::of(t)?.encode();
            root_process.broadcast_into(&mut header[..]);
            // MPI's broadcast takes a mutable buffer on the root too: send a copy. (An empty
            // tensor has no data to send; MPI refuses an empty broadcast.)
            if t.elem_count() > 0 {
                let mut bytes = wire::with_bytes(t, <[u8]>::to_vec)?;
                root_process.broadcast_into(&mut bytes[..]);
            }
            return Ok(t.clone());
        }
        root_process.broadcast_into(&mut header[..]);
        receive(&Header::decode(&header)?, &Device::Cpu, |buf| {
            if !buf.is_empty() {
                root_process.broadcast_into(buf);
            }
            Ok(())
        })
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
        let header = Header::of(t)?.encode();
        let comm = self.comm();
        let process = comm.process_at_rank(dest as i32);
        process.send(&header[..]);
        wire::with_bytes(t, |bytes| process.send(sendable(bytes)))
    }

    fn recv(&self, src: usize) -> Result<Tensor> {
        let comm = self.comm();
        let process = comm.process_at_rank(src as i32);
        let mut header = [0u64; HEADER_LEN];
        process.receive_into(&mut header[..]);
        receive(&Header::decode(&header)?, &Device::Cpu, |buf| {
            process.receive_into(buf);
            Ok(())
        })
    }

    fn take_waiting(&self) -> f64 {
        std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn barrier(&self) -> Result<()> {
        self.comm().barrier();
        Ok(())
    }

    fn idle_barrier(&self) -> Result<()> {
        let comm = self.comm();
        let mut request = comm.immediate_barrier();
        // Polled with sleeps growing to 5 ms: an idle rank costs no CPU, a waiting one loses
        // at most 5 ms.
        let mut pause = Duration::from_micros(50);
        loop {
            match request.test() {
                Ok(_) => return Ok(()),
                Err(pending) => request = pending,
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    fn concurrent(&self) -> bool {
        self.env.lock().is_ok_and(|env| env.multiple)
    }

    fn abort(&self, code: i32) -> ! {
        self.comm().abort(code)
    }
}
