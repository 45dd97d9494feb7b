//! A trainable module used inside an editing function gets from a multi-rank gradient pass the
//! gradient one process gives it: a steering vector that scales and shifts a decoder layer's
//! output, and one that replaces it (the gradient then reaches the module only). The test
//! starts itself under `mpirun` on 8 ranks (tp2 · pp2 · dp2: the steered layer is on the second
//! pipeline stage, so rank 0 serves it); rank 0 also runs the single-process reference.
#![cfg(feature = "mpi")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{Device, Tensor, Var};
use flexmodel_core::{FlexModel, Grid, HookCtx, HookFunction, Input, Model, Parallelism};
use flexmodel_models::{LoadOptions, load};

const RANKS: usize = 8;

/// The llama fixture on `grid`, with a steering vector applied at its last layer's output (or
/// replacing it); returns the wrapper and the vector.
fn steered(grid: Grid, replace: bool) -> (FlexModel<Box<dyn Model>>, Var) {
    let options = LoadOptions {
        grid,
        ..Default::default()
    };
    let mut fm = FlexModel::new(load(flexmodel_testkit::model_dir("llama"), &options).unwrap());
    let values: Vec<f32> = (0..64)
        .map(|i| ((i * 37) % 11) as f32 * 0.01 - 0.05)
        .collect();
    let steer = Var::from_tensor(&Tensor::new(values, &Device::Cpu).unwrap()).unwrap();
    fm.add_module("steer", steer.as_tensor().clone(), vec![steer.clone()]);
    fm.register(HookFunction::new("model.layers.1").capture(false).edit(
        move |x: &Tensor, cx: &mut HookCtx| {
            let v = cx.modules.get::<Tensor>("steer")?;
            if replace {
                Ok(v.broadcast_as(x.shape())?.contiguous()?)
            } else {
                Ok(x.broadcast_mul(&(v + 1.0)?)?.broadcast_add(v)?)
            }
        },
    ))
    .unwrap();
    (fm, steer)
}

fn check() {
    let world = flexmodel_dist::init().unwrap();
    let degrees = Parallelism {
        tp: 2,
        pp: 2,
        dp: 2,
        ..Parallelism::default()
    };
    let grid = Grid::new(world, degrees).unwrap();
    let ids = flexmodel_testkit::reference("llama")["input_ids"].clone();
    let input = Input::new(ids);
    for replace in [false, true] {
        let (mut fm, steer) = steered(grid.clone(), replace);
        let got = fm.lm_backward(&input).unwrap();
        if !grid.is_root() {
            continue;
        }
        let (mut single, single_steer) = steered(Grid::single(), replace);
        let want = single.lm_backward(&input).unwrap();
        let want = want.grads.get(single_steer.as_tensor()).unwrap().clone();
        let got = got
            .grads
            .get(steer.as_tensor())
            .expect("rank 0 has the steering vector's gradient")
            .clone();
        let largest = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            largest > 0.0,
            "replace {replace}: the reference gradient is zero"
        );
        flexmodel_testkit::assert_close(&format!("replace {replace}"), &got, &want, 1e-5);
    }
}

#[test]
fn a_module_inside_an_edit_gets_the_one_process_gradient() {
    common::on_ranks(
        RANKS,
        "a_module_inside_an_edit_gets_the_one_process_gradient",
        check,
    );
}
