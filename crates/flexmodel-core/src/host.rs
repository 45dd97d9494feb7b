//! Captures to host memory.
//!
//! On the CPU a capture shares the activation's storage (tensors are immutable). On a CUDA
//! device the copy is asynchronous, so that the GPU never waits for the host: the capture's
//! bytes go by DMA into a pinned (page-locked) staging buffer on a copy stream that waits only
//! for the work that produced them, while the compute stream runs on; worker threads move each
//! finished buffer into an ordinary host tensor and return the buffer to a pool. The forward
//! pass collects the host tensors when it ends ([`Hooks::settle`](crate::run::Hooks)), so the
//! output map holds host tensors when `forward` returns, as on the CPU.

use candle_core::{Device, Tensor};

use crate::Result;

/// A capture on its way to host memory.
pub(crate) enum HostCopy {
    /// Already on the host.
    Ready(Tensor),
    /// Being copied from a GPU.
    #[cfg(feature = "cuda")]
    Copying(cuda::Pending),
}

impl HostCopy {
    /// Starts copying `x`, cut from the autograd graph, to host memory.
    pub(crate) fn start(x: &Tensor) -> Result<Self> {
        let x = if x.track_op() { x.detach() } else { x.clone() };
        if x.device().is_cpu() {
            return Ok(Self::Ready(x));
        }
        if x.elem_count() == 0 {
            // A device cannot copy zero bytes.
            return Ok(Self::Ready(Tensor::zeros(
                x.shape(),
                x.dtype(),
                &Device::Cpu,
            )?));
        }
        #[cfg(feature = "cuda")]
        if let Some(pending) = cuda::start(&x)? {
            return Ok(Self::Copying(pending));
        }
        // No asynchronous path (another device, or the pinned memory is spent): a blocking copy.
        Ok(Self::Ready(x.to_device(&Device::Cpu)?))
    }

    /// Whether the tensor is already on the host.
    pub(crate) fn is_ready(&self) -> bool {
        matches!(self, Self::Ready(_))
    }

    /// The host tensor, once the copy is complete.
    pub(crate) fn wait(self) -> Result<Tensor> {
        match self {
            Self::Ready(t) => Ok(t),
            #[cfg(feature = "cuda")]
            Self::Copying(p) => p.wait(),
        }
    }
}

/// The CUDA path: pinned staging buffers, a copy stream per device, host workers.
#[cfg(feature = "cuda")]
mod cuda {
    use std::collections::HashMap;
    use std::sync::mpsc::{Receiver, Sender, channel};
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::cuda::cudarc::driver::{CudaContext, CudaStream, PinnedHostSlice};
    use candle_core::cuda_backend::CudaStorageSlice;
    use candle_core::{Device, Storage, Tensor};

    use crate::wire::{Header, from_bytes};
    use crate::{Error, Result};

    /// Pinned memory a process keeps for captures in flight. A capture that finds the pool
    /// spent is copied synchronously through pageable memory instead.
    const PINNED_LIMIT: usize = 8 << 30;
    /// Host threads that move finished copies out of pinned memory.
    const WORKERS: usize = 8;

    /// A copy in flight; its result arrives from a worker.
    pub(crate) struct Pending {
        result: Receiver<Result<Tensor>>,
        /// The captured tensor, alive until its copy is done and released on the thread that
        /// made it: candle's CUDA stream is the per-thread default stream, so a worker thread
        /// that dropped the last reference would free the memory in its own stream's order,
        /// ahead of the kernels this thread queued to read it (measured: an illegal address
        /// on an H200 when a layer's output was freed that way).
        _source: Tensor,
    }

    impl Pending {
        pub(crate) fn wait(self) -> Result<Tensor> {
            self.result
                .recv()
                .map_err(|_| Error::msg("a capture's host-copy worker stopped"))?
        }
    }

    impl Drop for Pending {
        /// A capture dropped unread (a failed pass) still waits for its copy before its
        /// source may be freed; after `wait` this returns at once.
        fn drop(&mut self) {
            let _ = self.result.recv();
        }
    }

    /// One staged copy, for a worker: the pinned bytes (ready once their event fires), what
    /// they hold, and where the result goes.
    struct Job {
        staged: PinnedHostSlice<u8>,
        header: Header,
        done: Sender<Result<Tensor>>,
    }

    /// Per device: its copy stream and staging buffers.
    struct Copier {
        context: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        pool: Mutex<Pool>,
        jobs: Mutex<Sender<Job>>,
    }

    /// Staging buffers by size. A copy fills its whole destination (cudarc copies the
    /// destination's length), so each buffer has the exact size of the captures it serves;
    /// a forward pass captures the same shapes each time, so they are reused.
    #[derive(Default)]
    struct Pool {
        free: HashMap<usize, Vec<PinnedHostSlice<u8>>>,
        /// Bytes of every buffer, free or in flight.
        pinned: usize,
    }

    fn copier(context: &Arc<CudaContext>) -> Result<Arc<Copier>> {
        static COPIERS: OnceLock<Mutex<HashMap<usize, Arc<Copier>>>> = OnceLock::new();
        let mut copiers = COPIERS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let ordinal = context.ordinal();
        if let Some(c) = copiers.get(&ordinal) {
            return Ok(c.clone());
        }
        let (jobs, queue) = channel::<Job>();
        let stream = context.new_stream().map_err(cuda_error)?;
        // A second stream puts cudarc in its multi-stream mode, where every kernel launch
        // records events on its buffers; the copies here order themselves instead.
        // SAFETY: the copy stream only reads device memory, after waiting for the compute
        // stream's work so far (`join` in `start`), and the source tensor stays alive until
        // its copy has completed (`Pending` holds it until the worker has waited for the
        // staging buffer's event), so no buffer is read before it is written or freed before
        // it is read. Every other operation (candle's kernels, NCCL) runs on the compute
        // stream.
        #[allow(unsafe_code)]
        unsafe {
            context.disable_event_tracking();
        }
        let copier = Arc::new(Copier {
            context: context.clone(),
            stream,
            pool: Mutex::new(Pool::default()),
            jobs: Mutex::new(jobs),
        });
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..WORKERS {
            let (queue, copier) = (queue.clone(), Arc::downgrade(&copier));
            std::thread::spawn(move || {
                loop {
                    let job = match queue.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    };
                    let Job {
                        staged,
                        header,
                        done,
                    } = job;
                    let result = staged
                        .as_slice()
                        .map_err(cuda_error)
                        .and_then(|bytes| from_bytes(&header, bytes));
                    if let Some(c) = copier.upgrade() {
                        c.give_back(staged);
                    }
                    let _ = done.send(result);
                }
            });
        }
        copiers.insert(ordinal, copier.clone());
        Ok(copier)
    }

    fn cuda_error(e: impl std::fmt::Display) -> Error {
        Error::msg(format!("CUDA: {e}"))
    }

    impl Copier {
        /// A free staging buffer of exactly `bytes`, or a new one (dropping free buffers of
        /// other sizes to stay under the limit); `None` when the buffers in flight fill it.
        fn buffer(&self, bytes: usize) -> Result<Option<PinnedHostSlice<u8>>> {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(buffer) = pool.free.get_mut(&bytes).and_then(Vec::pop) {
                return Ok(Some(buffer));
            }
            while pool.pinned + bytes > PINNED_LIMIT {
                let spare = pool.free.values_mut().find_map(Vec::pop);
                match spare {
                    Some(buffer) => pool.pinned -= buffer.len(),
                    None => return Ok(None),
                }
            }
            // SAFETY: the buffer is uninitialised until a copy writes it, and it is read only
            // through `as_slice`, which waits for the copy that filled all of it. Flags 0:
            // cached host memory (write-combined memory, the default of `alloc_pinned`, is
            // slow for the CPU to read).
            #[allow(unsafe_code)]
            let buffer = unsafe { self.context.alloc_pinned_with_flags::<u8>(bytes, 0) }
                .map_err(cuda_error)?;
            pool.pinned += bytes;
            Ok(Some(buffer))
        }

        /// Returns a staging buffer to the pool.
        fn give_back(&self, buffer: PinnedHostSlice<u8>) {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            pool.free.entry(buffer.len()).or_default().push(buffer);
        }
    }

    /// Starts the copy of `x` (on a CUDA device); `None` when no pinned memory is left.
    pub(crate) fn start(x: &Tensor) -> Result<Option<Pending>> {
        let Device::Cuda(device) = x.device() else {
            return Err(Error::msg(
                "a CUDA capture of a tensor not on a CUDA device",
            ));
        };
        let x = x.contiguous()?;
        let bytes = x.elem_count() * x.dtype().size_in_bytes();
        let copier = copier(device.cuda_stream().context())?;
        let Some(mut staged) = copier.buffer(bytes)? else {
            return Ok(None);
        };
        // The copy stream waits for the work queued so far on the compute stream (which
        // produced `x`), not for what the forward pass queues after.
        copier
            .stream
            .join(&device.cuda_stream())
            .map_err(cuda_error)?;
        {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cuda(storage) = &*storage else {
                return Err(Error::msg("a CUDA tensor without CUDA storage"));
            };
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| Error::msg("a contiguous tensor without contiguous offsets"))?;
            let size = x.dtype().size_in_bytes();
            macro_rules! copy {
                ($slice:expr) => {{
                    let view = $slice.slice(start..end);
                    // SAFETY: reinterprets the elements as their bytes (every bit pattern is
                    // a valid u8); the view covers exactly `(end - start) * size` bytes.
                    #[allow(unsafe_code)]
                    let view = unsafe { view.transmute::<u8>((end - start) * size) }
                        .ok_or_else(|| Error::msg("a capture's byte view is out of bounds"))?;
                    copier
                        .stream
                        .memcpy_dtoh(&view, &mut staged)
                        .map_err(cuda_error)?;
                }};
            }
            match &storage.slice {
                CudaStorageSlice::U8(s) => copy!(s),
                CudaStorageSlice::U32(s) => copy!(s),
                CudaStorageSlice::I64(s) => copy!(s),
                CudaStorageSlice::BF16(s) => copy!(s),
                CudaStorageSlice::F16(s) => copy!(s),
                CudaStorageSlice::F32(s) => copy!(s),
                CudaStorageSlice::F64(s) => copy!(s),
                _ => {
                    copier.give_back(staged);
                    return Ok(None);
                }
            }
        }
        let (done, result) = channel();
        let job = Job {
            staged,
            header: Header {
                dtype: x.dtype(),
                dims: x.dims().to_vec(),
            },
            done,
        };
        copier
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| Error::msg("the host-copy workers stopped"))?;
        Ok(Some(Pending { result, _source: x }))
    }
}
