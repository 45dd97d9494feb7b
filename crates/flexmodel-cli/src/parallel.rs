//! `--tp --pp --dp --fsdp --micro-batches`: the layout of a multi-process job
//! (`mpirun -n N flexmodel ...`).

use anyhow::{Context, Result};
use flexmodel::{Device, Grid, Parallelism};

/// How the model is spread over the processes of an MPI job.
#[derive(clap::Args, Clone, Copy)]
pub struct ParallelOpts {
    /// Tensor-parallel ranks: attention heads, MLP columns and the vocabulary split.
    #[arg(long, default_value_t = 1, value_name = "T")]
    pub tp: usize,

    /// Pipeline stages: contiguous ranges of layers.
    #[arg(long, default_value_t = 1, value_name = "P")]
    pub pp: usize,

    /// Data-parallel ranks: the batch split by rows, every rank holding its stage's weights
    /// whole (with `--fsdp F`: D replicas of F sharded ranks).
    #[arg(long, default_value_t = 1, value_name = "D")]
    pub dp: usize,

    /// Fully sharded data parallelism (ZeRO-3): the batch split by rows over F ranks that each
    /// hold 1/F of every weight, each layer's weights all-gathered just before it runs and
    /// dropped after.
    #[arg(long, default_value_t = 1, value_name = "F")]
    pub fsdp: usize,

    /// Micro-batches each pipeline splits a batch into (GPipe), so that its stages compute at
    /// the same time. Default: four per stage (at most one per row). Passes with an enabled
    /// hook run the whole batch at once, so that every hook sees its site's whole batch.
    #[arg(long, value_name = "M")]
    pub micro_batches: Option<usize>,
}

impl ParallelOpts {
    /// The grid of this job's ranks for a model on `device` (one process when every degree
    /// is 1 and no launcher started several).
    pub fn grid(&self, device: &Device) -> Result<Grid> {
        let degrees = Parallelism {
            tp: self.tp,
            pp: self.pp,
            dp: self.dp * self.fsdp,
            fsdp: self.fsdp,
            micro_batches: self.micro_batches.unwrap_or(0),
        };
        if degrees.world() == 1 && flexmodel_dist::launched_size().is_none_or(|n| n == 1) {
            return Ok(Grid::single());
        }
        let world = flexmodel_dist::init().context("starting MPI")?;
        let world = flexmodel_dist::for_device(world, device)?;
        Ok(Grid::new(world, degrees)?)
    }
}
