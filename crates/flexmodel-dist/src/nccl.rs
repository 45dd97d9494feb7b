//! NCCL: the [`Transport`] of CUDA tensors, one process per GPU.
//!
//! Every operation runs on the device's compute stream, so it is ordered with the kernels
//! that produce and consume its tensors and the host does not wait for it. Each operation is
//! a candle custom op whose CUDA forward allocates the result and enqueues the NCCL call.

use std::sync::Arc;

use candle_core::backend::BackendDevice;
use candle_core::cuda::cudarc::driver::CudaSlice;
use candle_core::cuda::cudarc::nccl::safe::{Comm as Nccl, Id, ReduceOp};
use candle_core::cuda_backend::{CudaStorageSlice, cudarc};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor,
};
use flexmodel_core::wire::Header;
use flexmodel_core::{Comm, Error, Result};

use crate::device::Transport;

/// Runs `$f!(slice)` on the typed slice inside a [`CudaStorageSlice`]; `$otherwise` for the
/// dtypes that cannot travel.
macro_rules! by_slice {
    ($slice:expr, $f:ident, $otherwise:expr) => {
        match $slice {
            CudaStorageSlice::U8(s) => $f!(s),
            CudaStorageSlice::U32(s) => $f!(s),
            CudaStorageSlice::I64(s) => $f!(s),
            CudaStorageSlice::BF16(s) => $f!(s),
            CudaStorageSlice::F16(s) => $f!(s),
            CudaStorageSlice::F32(s) => $f!(s),
            CudaStorageSlice::F64(s) => $f!(s),
            _ => $otherwise,
        }
    };
}

/// A new device buffer of `n` elements of `dtype` as `out`, filled by `call`, as storage.
macro_rules! fresh {
    ($device:expr, $dtype:expr, $n:expr, |$out:ident| $call:expr) => {{
        macro_rules! typed {
            ($t:ty) => {{
                let mut $out: CudaSlice<$t> = $device.alloc_zeros::<$t>($n)?;
                $call;
                CudaStorage::wrap_cuda_slice($out, $device.clone())
            }};
        }
        match $dtype {
            DType::U8 => typed!(u8),
            DType::U32 => typed!(u32),
            DType::I64 => typed!(i64),
            DType::BF16 => typed!(half::bf16),
            DType::F16 => typed!(half::f16),
            DType::F32 => typed!(f32),
            DType::F64 => typed!(f64),
            other => candle_core::bail!("NCCL: cannot move a {other:?} tensor"),
        }
    }};
}

/// An NCCL communicator over the ranks of a host group, on this rank's GPU.
pub struct NcclTransport {
    comm: Arc<Handle>,
    device: CudaDevice,
}

/// NCCL's communicator handle.
struct Handle(Nccl);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; flexmodel calls each communicator from one thread at a time (the SPMD program
// orders a group's operations, and a pass runs on one thread). cudarc leaves the raw handle
// `!Send`.
#[allow(unsafe_code)]
unsafe impl Send for Handle {}
#[allow(unsafe_code)]
unsafe impl Sync for Handle {}

fn nccl_error(e: impl std::fmt::Debug) -> Error {
    Error::msg(format!("NCCL: {e:?}"))
}

impl NcclTransport {
    /// Sets up NCCL over the ranks of `host` on `device`; every rank of `host` calls it. Rank 0
    /// makes the unique id and `host` broadcasts it.
    ///
    /// # Errors
    /// libnccl cannot be loaded (cudarc looks for `libnccl.so`: link it to NCCL's
    /// `libnccl.so.2` on `LD_LIBRARY_PATH`), or NCCL failed to start.
    pub fn new(host: &Arc<dyn Comm>, device: &CudaDevice) -> Result<Self> {
        if !flexmodel_core::cuda_library_loadable("nccl") {
            return Err(Error::msg(
                "NCCL is not loadable: no libnccl.so on LD_LIBRARY_PATH (NCCL installs \
                 libnccl.so.2; make a libnccl.so link to it)",
            ));
        }
        let id = if host.rank() == 0 {
            let id = Id::new().map_err(nccl_error)?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            Some(Tensor::from_vec(bytes, 128, &Device::Cpu)?)
        } else {
            None
        };
        let bytes = host.broadcast(id.as_ref(), 0)?.to_vec1::<u8>()?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (slot, b) in internal.iter_mut().zip(bytes) {
            *slot = b as std::ffi::c_char;
        }
        // NCCL takes the GPU of the thread's current context.
        let stream = device.cuda_stream();
        stream.context().bind_to_thread().map_err(nccl_error)?;
        let comm = Nccl::from_rank(stream, host.rank(), host.size(), Id::uninit(internal))
            .map_err(nccl_error)?;
        Ok(Self {
            comm: Arc::new(Handle(comm)),
            device: device.clone(),
        })
    }

    /// A one-byte tensor on the device, to hang the custom ops that make new tensors on (a
    /// device cannot allocate zero bytes).
    fn anchor(&self) -> Result<Tensor> {
        Ok(Tensor::zeros(
            1,
            DType::U8,
            &Device::Cuda(self.device.clone()),
        )?)
    }

    fn apply(&self, t: &Tensor, op: Op) -> Result<Tensor> {
        let t = t.contiguous()?;
        Ok(t.apply_op1_no_bwd(&Nccl1 {
            comm: &self.comm,
            op,
        })?)
    }
}

impl Transport for NcclTransport {
    fn carries(&self, t: &Tensor) -> bool {
        matches!(t.device(), Device::Cuda(d) if d.same_device(&self.device))
    }

    fn send(&self, t: &Tensor, dest: usize) -> Result<()> {
        let t = t.contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(storage) = &*storage else {
            return Err(Error::msg("NCCL send of a tensor not on the GPU"));
        };
        let (start, end) = offsets(layout)?;
        let peer = dest as i32;
        macro_rules! send {
            ($s:expr) => {
                self.comm.0.send(&$s.slice(start..end), peer)
            };
        }
        by_slice!(
            &storage.slice,
            send,
            return Err(Error::msg("NCCL: a dtype that cannot travel"))
        )
        .map_err(nccl_error)
    }

    fn recv(&self, header: &Header, src: usize) -> Result<Tensor> {
        self.apply(
            &self.anchor()?,
            Op::Recv {
                header: header.clone(),
                src: src as i32,
            },
        )
    }

    fn broadcast(&self, t: Option<&Tensor>, header: &Header, root: usize) -> Result<Tensor> {
        let root = root as i32;
        match t {
            Some(t) if self.comm.0.rank() == root as usize => {
                self.apply(t, Op::BroadcastFrom(root))
            }
            _ => self.apply(&self.anchor()?, Op::BroadcastTo(header.clone(), root)),
        }
    }

    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let all = self.apply(t, Op::AllGather(self.comm.0.world_size()))?;
        (0..all.dim(0)?).map(|r| Ok(all.get(r)?)).collect()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if !t.dtype().is_float() {
            return Err(Error::msg(format!(
                "all_reduce_sum over NCCL of a {:?} tensor (floats only)",
                t.dtype()
            )));
        }
        self.apply(t, Op::AllReduceSum)
    }

    fn split(&self, group: &Arc<dyn Comm>) -> Result<Arc<dyn Transport>> {
        Ok(Arc::new(Self::new(group, &self.device)?))
    }
}

fn offsets(layout: &Layout) -> Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| Error::msg("a contiguous tensor without contiguous offsets"))
}

/// An NCCL operation that makes a new tensor.
enum Op {
    Recv { header: Header, src: i32 },
    BroadcastFrom(i32),
    BroadcastTo(Header, i32),
    AllGather(usize),
    AllReduceSum,
}

struct Nccl1<'a> {
    comm: &'a Handle,
    op: Op,
}

impl CustomOp1 for Nccl1<'_> {
    fn name(&self) -> &'static str {
        "flexmodel-nccl"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL operations need CUDA tensors")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let device = &storage.device;
        let nccl = &self.comm.0;
        let err =
            |e: cudarc::nccl::result::NcclError| candle_core::Error::Msg(format!("NCCL: {e:?}"));
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("NCCL: a strided operand".into()))?;
        let n = end - start;
        // `call` with the operand's elements as `src` and a new buffer of `len` elements of
        // the same dtype as `out`, which it returns as storage.
        macro_rules! from_operand {
            ($len:expr, |$src:ident, $out:ident| $call:expr) => {{
                macro_rules! typed {
                    ($s:expr) => {{
                        let $src = $s.slice(start..end);
                        let mut $out = device.alloc_zeros($len)?;
                        $call.map_err(err)?;
                        CudaStorage::wrap_cuda_slice($out, device.clone())
                    }};
                }
                by_slice!(
                    &storage.slice,
                    typed,
                    candle_core::bail!("NCCL: a dtype that cannot travel")
                )
            }};
        }
        match &self.op {
            Op::Recv { header, src } => {
                let out = fresh!(device, header.dtype, header.elems(), |out| nccl
                    .recv(&mut out, *src)
                    .map_err(err)?);
                Ok((out, Shape::from(header.dims.clone())))
            }
            Op::BroadcastTo(header, root) => {
                let out = fresh!(device, header.dtype, header.elems(), |out| nccl
                    .broadcast(None::<&CudaSlice<_>>, &mut out, *root)
                    .map_err(err)?);
                Ok((out, Shape::from(header.dims.clone())))
            }
            Op::BroadcastFrom(root) => {
                let out = from_operand!(n, |src, out| nccl.broadcast(Some(&src), &mut out, *root));
                Ok((out, layout.shape().clone()))
            }
            Op::AllGather(ranks) => {
                let out = from_operand!(n * ranks, |src, out| nccl.all_gather(&src, &mut out));
                let mut dims = vec![*ranks];
                dims.extend(layout.dims());
                Ok((out, Shape::from(dims)))
            }
            Op::AllReduceSum => {
                let out = from_operand!(n, |src, out| nccl.all_reduce(
                    &src,
                    &mut out,
                    &ReduceOp::Sum
                ));
                Ok((out, layout.shape().clone()))
            }
        }
    }
}
