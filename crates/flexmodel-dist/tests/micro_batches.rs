//! Micro-batched pipelines (GPipe) give one process's results: a 4-row batch with padding,
//! split into 3 micro-batches under tp2 · pp2, into the default count under pp2 · dp2 and into
//! 2 under pp2 · fsdp2, on
//! Llama, GPT-2 (learned positions) and Phi-3 with LongRoPE (whose frequencies depend on the
//! whole batch's longest position): the logits of a forward pass, and the loss and logits of
//! `lm_backward`. The test starts itself under `mpirun` on 4 ranks; rank 0 also runs the
//! single-process reference.
#![cfg(feature = "mpi")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{DType, Tensor};
use flexmodel_core::{FlexModel, Grid, Input, Parallelism};
use flexmodel_models::{LoadOptions, load};

const RANKS: usize = 4;

/// Four rows: the reference's two left-padded prompts and its two unpadded ones.
fn input(arch: &str) -> Input {
    let refs = flexmodel_testkit::reference(arch);
    let plain = refs["input_ids"].to_dtype(DType::I64).unwrap();
    let padded = refs["generate.padded.input_ids"]
        .to_dtype(DType::I64)
        .unwrap();
    let mask = refs["generate.padded.attention_mask"]
        .to_dtype(DType::I64)
        .unwrap();
    let seq = plain.dim(1).unwrap().min(padded.dim(1).unwrap());
    let plain = plain.narrow(1, 0, seq).unwrap();
    let (padded, mask) = (
        padded.narrow(1, padded.dim(1).unwrap() - seq, seq).unwrap(),
        mask.narrow(1, mask.dim(1).unwrap() - seq, seq).unwrap(),
    );
    Input::with_mask(
        Tensor::cat(&[&padded, &plain], 0).unwrap(),
        Tensor::cat(&[&mask, &plain.ones_like().unwrap()], 0).unwrap(),
    )
}

fn check() {
    let world = flexmodel_dist::init().unwrap();
    let layouts = [
        Parallelism {
            tp: 2,
            pp: 2,
            micro_batches: 3,
            ..Parallelism::default()
        },
        Parallelism {
            pp: 2,
            dp: 2,
            ..Parallelism::default()
        },
        // Each micro-batch gathers the FSDP shards of its stage's units again.
        Parallelism {
            pp: 2,
            dp: 2,
            fsdp: 2,
            micro_batches: 2,
            ..Parallelism::default()
        },
    ];
    for degrees in layouts {
        let grid = Grid::new(world.clone(), degrees).unwrap();
        for arch in ["llama", "gpt2", "phi3_longrope"] {
            let dir = flexmodel_testkit::model_dir(arch);
            let options = |grid: Grid| LoadOptions {
                grid,
                ..Default::default()
            };
            let mut fm = FlexModel::new(load(&dir, &options(grid.clone())).unwrap());
            let input = input(arch);
            let logits = fm.forward_input(&input).unwrap();
            let backward = fm.lm_backward(&input).unwrap();
            if !grid.is_root() {
                continue;
            }
            let mut single = FlexModel::new(load(&dir, &options(Grid::single())).unwrap());
            let want = single.lm_backward(&input).unwrap();
            let what = format!("{arch} {degrees:?}");
            flexmodel_testkit::assert_close(
                &format!("{what} forward"),
                &logits,
                &want.logits,
                1e-5,
            );
            flexmodel_testkit::assert_close(
                &format!("{what} lm_backward logits"),
                &backward.logits,
                &want.logits,
                1e-5,
            );
            flexmodel_testkit::assert_close(
                &format!("{what} loss"),
                &backward.loss,
                &want.loss,
                1e-5,
            );
        }
    }
}

#[test]
fn micro_batched_pipelines_equal_one_process() {
    common::on_ranks(RANKS, "micro_batched_pipelines_equal_one_process", check);
}
