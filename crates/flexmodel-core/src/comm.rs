//! Communicators and the rank grid.
//!
//! [`Comm`] is what the runtime and the parallel layers need from a communication library,
//! on tensors, so that a GPU backend (NCCL) can move device memory without touching model
//! code. [`Local`] is the single-process communicator; the MPI backend lives in
//! `flexmodel-dist`. [`Grid`] arranges `tp × pp × dp` ranks in FlexModel's order (tensor
//! parallel fastest, then data parallel, then pipeline stages).

use std::sync::Arc;

use candle_core::Tensor;

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

    /// Every rank's tensor on `root`, concatenated along `dim` in rank order (`None`
    /// elsewhere); the tensors may differ in size along `dim` only. A backend may place each
    /// piece straight where it belongs in the result, without a concatenation pass.
    ///
    /// # Errors
    /// The communication library failed; the tensors do not fit together.
    fn gather_cat(&self, t: &Tensor, dim: usize, root: usize) -> Result<Option<Tensor>> {
        match self.gather(t, root)? {
            Some(pieces) => Ok(Some(Tensor::cat(&pieces, dim)?)),
            None => Ok(None),
        }
    }

    /// Every rank's tensor on every rank, in rank order.
    ///
    /// # Errors
    /// The communication library failed.
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>>;

    /// Every rank's `t` concatenated along dimension 0 in rank order, on every rank (FSDP's
    /// gather of flat shards). Communicators that receive into one buffer return it as is.
    ///
    /// # Errors
    /// As [`Comm::all_gather`]; pieces whose other dimensions differ.
    fn all_gather_cat(&self, t: &Tensor) -> Result<Tensor> {
        Ok(Tensor::cat(&self.all_gather(t)?, 0)?)
    }

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

    /// [`barrier`](Self::barrier) for ranks that may wait long (a driven job's ranks between
    /// runs): where the backend can, the wait sleeps instead of spinning, at the price of up
    /// to a few milliseconds after the last rank arrives.
    ///
    /// # Errors
    /// The communication library failed.
    fn idle_barrier(&self) -> Result<()> {
        self.barrier()
    }

    /// Seconds this rank spent, since the last call, waiting at gathers for the other ranks to
    /// arrive (load imbalance, not transfer), where the backend can tell; else 0.
    fn take_waiting(&self) -> f64 {
        0.0
    }

    /// Whether another thread may run collectives on another communicator of this job while
    /// this one is in use (MPI at `MPI_THREAD_MULTIPLE`): what gathering the next FSDP unit
    /// while the current one computes needs.
    fn concurrent(&self) -> bool {
        false
    }

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
    /// Data-parallel ranks (the batch split by rows), FSDP ranks included.
    pub dp: usize,
    /// Fully sharded data parallelism (ZeRO-3): groups of `fsdp` consecutive data-parallel
    /// ranks each hold `1/fsdp` of every parameter of their stage, gathered layer by layer
    /// as the pass reaches it. 1 (the default) keeps whole parameters on every data-parallel
    /// rank; `dp / fsdp` groups are replicas of each other.
    pub fsdp: usize,
    /// Micro-batches each pipeline splits a batch into (GPipe), so that its stages work at
    /// the same time: 0 (the default) is four per stage, at most one per row. Only passes in
    /// which no hook is enabled are split, so that every hook sees its site's whole batch.
    pub micro_batches: usize,
}

impl Default for Parallelism {
    fn default() -> Self {
        Self {
            tp: 1,
            pp: 1,
            dp: 1,
            fsdp: 1,
            micro_batches: 0,
        }
    }
}

impl Parallelism {
    /// Ranks the layout needs.
    pub fn world(&self) -> usize {
        self.tp * self.pp * self.dp
    }

    /// The micro-batches a pipeline splits a batch of `rows` into.
    pub fn micro_batches_for(&self, rows: usize) -> usize {
        if self.pp == 1 {
            return 1;
        }
        let m = match self.micro_batches {
            0 => 4 * self.pp,
            m => m,
        };
        m.clamp(1, rows.max(1))
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
    /// The data-parallel ranks sharing this rank's parameters under FSDP (its group of
    /// `degrees.fsdp`; this rank alone without FSDP).
    pub fsdp: Arc<dyn Comm>,
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
            pp: local.clone(),
            fsdp: local,
            degrees: Parallelism::default(),
        }
    }

    /// Arranges the ranks of `world`.
    ///
    /// # Errors
    /// `world` does not have `tp * pp * dp` ranks, a degree is 0, or `fsdp` does not divide
    /// `dp`.
    pub fn new(world: Arc<dyn Comm>, degrees: Parallelism) -> Result<Self> {
        let Parallelism {
            tp, pp, dp, fsdp, ..
        } = degrees;
        if fsdp == 0 || dp % fsdp != 0 {
            return Err(Error::msg(format!(
                "{fsdp} FSDP ranks do not divide the {dp} data-parallel ranks: the data axis \
                 is `--dp` replicas of `--fsdp` sharded ranks"
            )));
        }
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
        let dp_comm = world.split(p * tp + t, d)?;
        Ok(Self {
            tp: world.split(p * dp + d, t)?,
            fsdp: dp_comm.split(d / fsdp, d % fsdp)?,
            dp: dp_comm,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_split_gives_the_first_parts_one_more() {
        assert_eq!(even_split(5, 2), [(0, 3), (3, 2)]);
        assert_eq!(even_split(4, 4), [(0, 1), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(even_split(1, 2), [(0, 1), (1, 0)]);
    }
}
