//! A hooks-only pass (`FlexModel::capture`) on several ranks: with tensor and data parallelism
//! every rank stops after the last decoder layer a hook needs, as one process does, and rank 0
//! holds the captures of a whole single-process forward pass; with pipeline parallelism the
//! stages run whole. The test starts itself under `mpirun` on 4 ranks (tp2 · dp2, then
//! pp2 · dp2); rank 0 also runs the single-process reference.
#![cfg(feature = "mpi")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::Tensor;
use flexmodel_core::{
    FlexModel, Grid, HookCtx, HookFunction, Input, Model, OutputMap, Parallelism,
};
use flexmodel_models::{LoadOptions, load};

const RANKS: usize = 4;

/// The llama fixture (2 decoder layers) on `grid` with hooks that end in layer 0: the
/// embeddings and everything inside layer 0 captured, layer 0's MLP output halved.
fn hooked(grid: Grid) -> FlexModel<Box<dyn Model>> {
    let options = LoadOptions {
        grid,
        ..Default::default()
    };
    let mut fm = FlexModel::new(load(flexmodel_testkit::model_dir("llama"), &options).unwrap());
    fm.register(HookFunction::new("model.embed_tokens"))
        .unwrap();
    fm.register(HookFunction::new("model.layers.0*")).unwrap();
    fm.register(
        HookFunction::new("model.layers.0.mlp")
            .capture(false)
            .edit(|x: &Tensor, _: &mut HookCtx| Ok((x * 0.5)?)),
    )
    .unwrap();
    fm
}

fn assert_same(layout: &str, got: &OutputMap, want: &OutputMap) {
    let keys = |m: &OutputMap| {
        m.iter()
            .map(|(k, v)| (k.to_string(), v.len()))
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(got), keys(want), "{layout}: the captured sites");
    for (site, tensors) in want.iter() {
        for (g, w) in got.get(site).unwrap().iter().zip(tensors) {
            flexmodel_testkit::assert_close(&format!("{layout} {site}"), g, w, 1e-5);
        }
    }
}

fn check() {
    let world = flexmodel_dist::init().unwrap();
    let ids = flexmodel_testkit::reference("llama")["input_ids"].clone();
    let input = Input::new(ids);
    let layouts = [
        (
            Parallelism {
                tp: 2,
                pp: 1,
                dp: 2,
                ..Parallelism::default()
            },
            "tp2 dp2",
            Some(0),
        ),
        (
            Parallelism {
                tp: 1,
                pp: 2,
                dp: 2,
                ..Parallelism::default()
            },
            "pp2 dp2",
            None,
        ),
    ];
    for (degrees, layout, stop) in layouts {
        let grid = Grid::new(world.clone(), degrees).unwrap();
        let mut fm = hooked(grid.clone());
        let stopped = fm.capture(&input).unwrap();
        assert_eq!(stopped, stop, "{layout}: where the pass stopped");
        if grid.is_root() {
            let mut single = hooked(Grid::single());
            single.forward_input(&input).unwrap();
            let got = fm.take_output();
            assert!(!got.is_empty(), "{layout}: rank 0 holds the captures");
            assert_same(layout, &got, single.output());
        }
    }
}

#[test]
fn a_hooks_only_pass_stops_on_every_rank_without_a_pipeline() {
    common::on_ranks(
        RANKS,
        "a_hooks_only_pass_stops_on_every_rank_without_a_pipeline",
        check,
    );
}
