//! Communicators and the rank grid.
//!
//! [`Comm`] is what the runtime and the parallel layers need from a communication library,
//! on tensors, so that a GPU backend (NCCL) can move device memory without touching model
//! code. [`Local`] is the single-process communicator; the MPI backend lives in
//! `flexmodel-dist`. [`Grid`] arranges `tp × pp × dp` ranks in FlexModel's order (tensor
//! parallel fastest, then data parallel, then pipeline stages).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Collective and point-to-point operations on tensors among the ranks of a group.
///
/// Every rank of the group calls a collective with matching arguments (SPMD). Tensors may
/// differ in shape between ranks where the operation allows it (gathers, scatters).
pub trait Comm: Send + Sync {
    /// This rank's index in the group.
    fn rank(&self) -> usize;

    /// Number of ranks in the group.
    fn size(&self) -> usize;

    /// Splits the group: ranks with the same `color` form a new group, ordered by `key`.
    ///
    /// # Errors
    /// The communication library failed.
    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Comm>>;

    /// Every rank's tensor on `root` (in rank order), `None` elsewhere.
    ///
    /// # Errors
    /// The communication library failed.
    fn gather(&self, t: &Tensor, root: usize) -> Result<Option<Vec<Tensor>>>;

    /// Every rank's tensor on every rank, in rank order.
    ///
    /// # Errors
    /// The communication library failed.
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>>;

    /// `pieces[r]` of `root` to each rank `r` (`pieces` is read on `root` only).
    ///
    /// # Errors
    /// The communication library failed; `root` gave another number of pieces than ranks.
    fn scatter(&self, pieces: Option<&[Tensor]>, root: usize) -> Result<Tensor>;

    /// `root`'s tensor on every rank (`t` is read on `root` only).
    ///
    /// # Errors
    /// The communication library failed.
    fn broadcast(&self, t: Option<&Tensor>, root: usize) -> Result<Tensor>;

    /// The elementwise sum of every rank's tensor, on every rank.
    ///
    /// # Errors
    /// The communication library failed; shapes differ between ranks.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;

    /// Sends `t` to rank `dest`.
    ///
    /// # Errors
    /// The communication library failed.
    fn send(&self, t: &Tensor, dest: usize) -> Result<()>;

    /// Receives a tensor from rank `src`.
    ///
    /// # Errors
    /// The communication library failed.
    fn recv(&self, src: usize) -> Result<Tensor>;

    /// Waits for every rank of the group.
    ///
    /// # Errors
    /// The communication library failed.
    fn barrier(&self) -> Result<()>;

    /// Ends every rank of the job (MPI_Abort): the way out of an error that other ranks
    /// would otherwise wait on forever.
    fn abort(&self, code: i32) -> !;
}

/// The communicator of a single process: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Local;

impl Comm for Local {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn split(&self, _: usize, _: usize) -> Result<Arc<dyn Comm>> {
        Ok(Arc::new(Local))
    }
    fn gather(&self, t: &Tensor, _: usize) -> Result<Option<Vec<Tensor>>> {
        Ok(Some(vec![t.clone()]))
    }
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        Ok(vec![t.clone()])
    }
    fn scatter(&self, pieces: Option<&[Tensor]>, _: usize) -> Result<Tensor> {
        pieces
            .and_then(|p| p.first().cloned())
            .ok_or_else(|| Error::msg("scatter: no piece for rank 0"))
    }
    fn broadcast(&self, t: Option<&Tensor>, _: usize) -> Result<Tensor> {
        t.cloned()
            .ok_or_else(|| Error::msg("broadcast: no tensor on the root"))
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn send(&self, _: &Tensor, dest: usize) -> Result<()> {
        Err(Error::msg(format!(
            "send to rank {dest} in a single-process group"
        )))
    }
    fn recv(&self, src: usize) -> Result<Tensor> {
        Err(Error::msg(format!(
            "receive from rank {src} in a single-process group"
        )))
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Tensor parallel, pipeline parallel and data parallel degrees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parallelism {
    /// Tensor-parallel ranks (heads and columns split).
    pub tp: usize,
    /// Pipeline stages (contiguous layer ranges).
    pub pp: usize,
    /// Data-parallel ranks (the batch split).
    pub dp: usize,
}

impl Default for Parallelism {
    fn default() -> Self {
        Self {
            tp: 1,
            pp: 1,
            dp: 1,
        }
    }
}

impl Parallelism {
    /// Ranks the layout needs.
    pub fn world(&self) -> usize {
        self.tp * self.pp * self.dp
    }
}

impl std::fmt::Debug for Grid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Grid(rank {} of {}, {:?})",
            self.world.rank(),
            self.world.size(),
            self.degrees
        )
    }
}

/// The ranks of a job arranged `tp × pp × dp`: global rank `r` has tensor-parallel index
/// `r % tp`, data-parallel index `(r / tp) % dp` and pipeline stage `r / (tp * dp)`.
#[derive(Clone)]
pub struct Grid {
    /// Every rank of the job.
    pub world: Arc<dyn Comm>,
    /// The ranks holding the other tensor-parallel pieces of this rank's activations.
    pub tp: Arc<dyn Comm>,
    /// The ranks holding the other batch rows (same stage, same tensor-parallel index).
    pub dp: Arc<dyn Comm>,
    /// The ranks of the other stages (same tensor- and data-parallel index).
    pub pp: Arc<dyn Comm>,
    /// The degrees.
    pub degrees: Parallelism,
}

impl Grid {
    /// One process: every degree 1.
    pub fn single() -> Self {
        let local: Arc<dyn Comm> = Arc::new(Local);
        Self {
            world: local.clone(),
            tp: local.clone(),
            dp: local.clone(),
            pp: local,
            degrees: Parallelism::default(),
        }
    }

    /// Arranges the ranks of `world`.
    ///
    /// # Errors
    /// `world` does not have `tp * pp * dp` ranks, or a degree is 0.
    pub fn new(world: Arc<dyn Comm>, degrees: Parallelism) -> Result<Self> {
        let Parallelism { tp, pp, dp } = degrees;
        if tp == 0 || pp == 0 || dp == 0 || world.size() != degrees.world() {
            return Err(Error::msg(format!(
                "the layout tp {tp} x pp {pp} x dp {dp} needs {} ranks, the job has {}; \
                 launch with `mpirun -n {}`",
                degrees.world(),
                world.size(),
                degrees.world()
            )));
        }
        let r = world.rank();
        let (t, d, p) = (r % tp, (r / tp) % dp, r / (tp * dp));
        // Each split is its own collective: colors only need to be unique within it.
        Ok(Self {
            tp: world.split(p * dp + d, t)?,
            dp: world.split(p * tp + t, d)?,
            pp: world.split(d * tp + t, p)?,
            world,
            degrees,
        })
    }

    /// This rank's pipeline stage.
    pub fn stage(&self) -> usize {
        self.pp.rank()
    }

    /// Whether this rank holds tensor-parallel piece 0 and data-parallel rows 0 of its stage:
    /// the rank that assembles its stage's activations.
    pub fn stage_leader(&self) -> bool {
        self.tp.rank() == 0 && self.dp.rank() == 0
    }

    /// Whether this is global rank 0, where hook functions run and outputs land.
    pub fn is_root(&self) -> bool {
        self.world.rank() == 0
    }

    /// Whether more than one process takes part.
    pub fn is_distributed(&self) -> bool {
        self.world.size() > 1
    }
}

/// Splits `n` items over `parts` as evenly as possible (the first `n % parts` get one more);
/// returns each part's `(start, len)`.
pub fn even_split(n: usize, parts: usize) -> Vec<(usize, usize)> {
    let (base, extra) = (n / parts.max(1), n % parts.max(1));
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let part = (start, len);
            start += len;
            part
        })
        .collect()
}

/// A tensor as bytes: dtype code, rank, dims, then the data (little endian), for backends
/// that move bytes.
pub fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(&Device::Cpu)?.contiguous()?;
    let code = DTYPES
        .iter()
        .position(|d| *d == t.dtype())
        .ok_or_else(|| Error::msg(format!("cannot send a {:?} tensor", t.dtype())))?;
    let mut out =
        Vec::with_capacity(16 + 8 * t.rank() + t.elem_count() * t.dtype().size_in_bytes());
    out.push(code as u8);
    out.push(t.rank() as u8);
    for &d in t.dims() {
        out.extend_from_slice(&(d as u64).to_le_bytes());
    }
    // The dtype was checked above, so candle's byte view cannot fail here.
    out.extend_from_slice(&safetensors::View::data(&t));
    Ok(out)
}

const DTYPES: [DType; 7] = [
    DType::F32,
    DType::F64,
    DType::F16,
    DType::BF16,
    DType::U32,
    DType::I64,
    DType::U8,
];

/// The tensor [`to_bytes`] wrote, on `device`.
///
/// # Errors
/// Bytes that are not a tensor.
pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Tensor> {
    let bad = || Error::msg("received bytes are not a tensor");
    let (&code, rest) = bytes.split_first().ok_or_else(bad)?;
    let (&rank, mut rest) = rest.split_first().ok_or_else(bad)?;
    let dtype = *DTYPES.get(code as usize).ok_or_else(bad)?;
    let mut dims = Vec::with_capacity(rank as usize);
    for _ in 0..rank {
        let (d, r) = rest.split_at_checked(8).ok_or_else(bad)?;
        dims.push(u64::from_le_bytes(d.try_into().map_err(|_| bad())?) as usize);
        rest = r;
    }
    if rest.len() != dims.iter().product::<usize>() * dtype.size_in_bytes() {
        return Err(bad());
    }
    Ok(Tensor::from_raw_buffer(rest, dtype, &dims, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_through_bytes() {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::U32, DType::I64] {
            let t = t.to_dtype(dtype).unwrap();
            let back = from_bytes(&to_bytes(&t).unwrap(), &Device::Cpu).unwrap();
            assert_eq!(back.dims(), t.dims());
            assert_eq!(back.dtype(), dtype);
            let diff =
                (back.to_dtype(DType::F32).unwrap() - t.to_dtype(DType::F32).unwrap()).unwrap();
            assert_eq!(
                diff.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
        }
        let scalar = Tensor::new(3.5f32, &Device::Cpu).unwrap();
        assert_eq!(
            from_bytes(&to_bytes(&scalar).unwrap(), &Device::Cpu)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            3.5
        );
        assert!(from_bytes(&[0, 1, 2], &Device::Cpu).is_err());
    }

    #[test]
    fn even_split_gives_the_first_parts_one_more() {
        assert_eq!(even_split(5, 2), [(0, 3), (3, 2)]);
        assert_eq!(even_split(4, 4), [(0, 1), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(even_split(1, 2), [(0, 1), (1, 0)]);
    }
}
