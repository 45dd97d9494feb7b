//! Multi-process costs on the random 125M-parameter Llama (batch 4 × 128): the forward time
//! under a layout against one process, and the time spent assembling captured activations
//! (the MLP `up_proj` output of every layer, split over tensor-parallel ranks) against a raw
//! MPI gather of the same bytes in the same run.
//!
//! ```text
//! cargo build --release -p flexmodel-dist --features mpi --example dist_bench
//! RAYON_NUM_THREADS=2 mpirun -n 1 target/release/examples/dist_bench
//! RAYON_NUM_THREADS=1 mpirun -n 2 target/release/examples/dist_bench --tp 2   # also --pp 2, --dp 2
//! ```

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use flexmodel_core::{FlexModel, Grid, HookFunction, Parallelism};
use flexmodel_models::random::{LLAMA_125M, token_ids};
use flexmodel_models::{LoadOptions, load};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let degrees = Parallelism {
        tp: flag("--tp", 1),
        pp: flag("--pp", 1),
        dp: flag("--dp", 1),
    };
    let (batch, seq, repeats) = (flag("--batch", 4), flag("--seq", 128), flag("--repeats", 5));
    // One process runs without MPI, as `flexmodel` does.
    let grid = if degrees.world() == 1 {
        Grid::single()
    } else {
        Grid::new(flexmodel_dist::init()?, degrees)?
    };
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/flexmodel-bench/llama-125m");
    if grid.is_root() {
        LLAMA_125M.write(&dir)?;
    }
    grid.world.barrier()?;
    let mut fm = FlexModel::new(load(
        &dir,
        &LoadOptions {
            grid: grid.clone(),
            ..Default::default()
        },
    )?);
    let ids = Tensor::from_vec(
        token_ids(batch * seq, LLAMA_125M.vocab, 0),
        (batch, seq),
        &Device::Cpu,
    )?;

    // Forward times, and the seconds rank 0 spent assembling hooked tensors in each pass.
    let time_forward =
        |fm: &mut FlexModel| -> Result<(Vec<f64>, Vec<f64>), Box<dyn std::error::Error>> {
            let mut times = Vec::new();
            let mut assembly = Vec::new();
            for round in 0..=repeats {
                grid.world.barrier()?;
                let start = Instant::now();
                fm.forward(&ids)?;
                grid.world.barrier()?;
                if round > 0 {
                    times.push(start.elapsed().as_secs_f64());
                    assembly.push(fm.comm_stats().seconds);
                }
                fm.clear_output();
            }
            Ok((times, assembly))
        };
    let (plain, _) = time_forward(&mut fm)?;
    let sites = "model.layers.*.mlp.up_proj";
    let handle = fm.register(HookFunction::new(sites))?;
    let (captured, assembly) = time_forward(&mut fm)?;
    fm.remove(handle)?;

    // The same bytes through a raw gather of every layer's local piece, as the capture moves them.
    let local = Tensor::ones(
        (batch / degrees.dp, seq, LLAMA_125M.inter / degrees.tp),
        candle_core::DType::F32,
        &Device::Cpu,
    )?;
    let mut raw = Vec::new();
    for round in 0..=repeats {
        grid.world.barrier()?;
        let start = Instant::now();
        for _ in 0..LLAMA_125M.layers {
            if let Some(pieces) = grid.tp.gather(&local, 0)? {
                if grid.dp.size() > 1 {
                    grid.dp.gather(&Tensor::cat(&pieces, 2)?, 0)?;
                }
            }
        }
        grid.world.barrier()?;
        if round > 0 {
            raw.push(start.elapsed().as_secs_f64());
        }
    }

    if grid.is_root() {
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (p, c, a, r) = (
            median(plain),
            median(captured),
            median(assembly),
            median(raw),
        );
        let bytes = (LLAMA_125M.layers * batch * seq * LLAMA_125M.inter * 4) as f64;
        println!(
            "layout {degrees:?}, {} ranks, batch {batch} x seq {seq}, median of {repeats}",
            grid.world.size()
        );
        println!("plain forward: {p:.4} s");
        println!(
            "forward capturing {sites} (12 x {:.1} MB): {c:.4} s",
            bytes / 12.0 / 1e6
        );
        if grid.world.size() > 1 {
            println!(
                "assembling them: {a:.4} s ({:.2} GB/s); raw gather of the same pieces: {r:.4} s ({:.2} GB/s): {:.0}% of raw throughput",
                bytes / a / 1e9,
                bytes / r / 1e9,
                100.0 * r / a
            );
        }
    }
    Ok(())
}
