//! Weight gradients of weights that are not resident equal one process's: under fsdp2 (each
//! rank's gradient from its own rows, summed over the group), under fsdp2 with its shards
//! offloaded, and with `--offload disk` (in one process), for every parameter of Llama and of GPT-2 (whose head is tied to the embeddings:
//! the unit is resident twice per pass, both uses add up). The test starts itself under
//! `mpirun` on 2 ranks; rank 0 also runs the references.
#![cfg(feature = "mpi")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::backprop::GradStore;
use flexmodel_core::{FlexModel, Grid, Input, Model, Parallelism};
use flexmodel_models::{LoadOptions, Offload, load};

const RANKS: usize = 2;

/// `lm_backward` of `arch` loaded with gradients under `grid` and `offload`.
fn weight_grads(
    arch: &str,
    grid: Grid,
    offload: Offload,
) -> (FlexModel<Box<dyn Model>>, GradStore) {
    let options = LoadOptions {
        grid,
        offload,
        requires_grad: true,
        ..Default::default()
    };
    let mut fm = FlexModel::new(load(flexmodel_testkit::model_dir(arch), &options).unwrap());
    let input = Input::new(flexmodel_testkit::reference(arch)["input_ids"].clone());
    let grads = fm.lm_backward(&input).unwrap().grads;
    (fm, grads)
}

fn check() {
    let world = flexmodel_dist::init().unwrap();
    let fsdp2 = Parallelism {
        dp: 2,
        fsdp: 2,
        ..Parallelism::default()
    };
    let grid = Grid::new(world, fsdp2).unwrap();
    for arch in ["llama", "gpt2"] {
        let sharded = weight_grads(arch, grid.clone(), Offload::None);
        let sharded_offloaded = weight_grads(arch, grid.clone(), Offload::Disk);
        if !grid.is_root() {
            continue;
        }
        let resident = weight_grads(arch, Grid::single(), Offload::None);
        let streamed = weight_grads(arch, Grid::single(), Offload::Disk);
        let params = resident.0.model().parameters();
        assert!(params.len() > 10, "{arch}: {} parameters", params.len());
        for (name, weight) in params.iter() {
            let want = resident
                .1
                .get(weight)
                .expect("a resident weight's gradient");
            let all = [
                ("fsdp2", &sharded),
                ("fsdp2 offload disk", &sharded_offloaded),
                ("offload disk", &streamed),
            ];
            for (what, (fm, grads)) in all {
                let placeholder = fm.model().parameters().get(name).unwrap();
                let got = grads
                    .get(placeholder)
                    .unwrap_or_else(|| panic!("{arch} {what}: no gradient for {name}"));
                flexmodel_testkit::assert_close(&format!("{arch} {what} {name}"), got, want, 1e-5);
            }
        }
    }
}

#[test]
fn weight_gradients_of_sharded_and_streamed_weights_equal_one_process() {
    common::on_ranks(
        RANKS,
        "weight_gradients_of_sharded_and_streamed_weights_equal_one_process",
        check,
    );
}
