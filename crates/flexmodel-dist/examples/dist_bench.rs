//! Multi-process costs on the random 125M-parameter Llama (batch 4 × 128): the forward time
//! under a layout against one process, the time spent assembling captured activations
//! (the MLP `up_proj` output of every layer, split over tensor-parallel ranks) against a raw
//! MPI gather of the same bytes in the same run, and each rank's memory (VmRSS before loading,
//! VmHWM after loading and after the passes).
//!
//! ```text
//! cargo build --release -p flexmodel-dist --features mpi --example dist_bench
//! RAYON_NUM_THREADS=2 target/release/examples/dist_bench --repeats 5   # one process, no MPI
//! RAYON_NUM_THREADS=1 mpirun -n 2 target/release/examples/dist_bench --tp 2   # also --pp 2, --dp 2
//! # also --fsdp F, --micro-batches M (with --pp), --offload cpu|disk, --batch B, --no-capture
//! ```

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use flexmodel_core::{FlexModel, Grid, HookFunction, Parallelism};
use flexmodel_models::random::{LLAMA_125M, token_ids};
use flexmodel_models::{LoadOptions, Offload, load};
use mpi::datatype::PartitionMut;
use mpi::traits::*;

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
        dp: flag("--dp", 1) * flag("--fsdp", 1),
        fsdp: flag("--fsdp", 1),
        micro_batches: flag("--micro-batches", 0),
    };
    let offload = match args.iter().position(|a| a == "--offload") {
        None => Offload::None,
        Some(i) => match args.get(i + 1).map(String::as_str) {
            Some("cpu") => Offload::Cpu,
            Some("disk") => Offload::Disk,
            other => return Err(format!("--offload {other:?}: use cpu or disk").into()),
        },
    };
    let capture = !args.iter().any(|a| a == "--no-capture");
    let rss_before = memory_mb("VmRSS");
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
            offload,
            ..Default::default()
        },
    )?);
    let hwm_loaded = memory_mb("VmHWM");
    let ids = Tensor::from_vec(
        token_ids(batch * seq, LLAMA_125M.vocab, 0),
        (batch, seq),
        &Device::Cpu,
    )?;

    // Forward times, and the seconds rank 0 spent assembling hooked tensors in each pass
    // (total, and the part spent waiting for the other rank to reach the site).
    type Times = (Vec<f64>, Vec<(f64, f64)>);
    let time_forward = |fm: &mut FlexModel| -> Result<Times, Box<dyn std::error::Error>> {
        let mut times = Vec::new();
        let mut assembly = Vec::new();
        for round in 0..=repeats {
            grid.world.barrier()?;
            let start = Instant::now();
            fm.forward(&ids)?;
            grid.world.barrier()?;
            if round > 0 {
                times.push(start.elapsed().as_secs_f64());
                let stats = fm.comm_stats();
                assembly.push((stats.seconds, stats.waiting));
            }
            fm.clear_output();
        }
        Ok((times, assembly))
    };
    let (plain, _) = time_forward(&mut fm)?;
    let hwm_plain = memory_mb("VmHWM");
    let sites = "model.layers.*.mlp.up_proj";
    let (captured, assembly) = if capture {
        let handle = fm.register(HookFunction::new(sites))?;
        let timed = time_forward(&mut fm)?;
        fm.remove(handle)?;
        timed
    } else {
        (vec![0.0], vec![(0.0, 0.0)])
    };
    // Every rank's memory, in MB: VmRSS before loading, VmHWM after loading and after the
    // plain passes.
    let memory = Tensor::new(&[rss_before, hwm_loaded, hwm_plain], &Device::Cpu)?;
    let memory: Vec<Vec<f64>> = grid
        .world
        .all_gather(&memory)?
        .iter()
        .map(|t| t.to_vec1::<f64>())
        .collect::<Result<_, _>>()?;

    // The same bytes through raw MPI gathers (`MPI_Gatherv` of plain bytes), each into a new
    // buffer kept until the pass ends, as captures are: what any gather of these activations
    // costs, against which the runtime's assembly (headers, layouts, placement) is measured.
    let raw = if degrees.world() > 1 && capture {
        raw_gathers(
            batch / degrees.dp * seq * LLAMA_125M.inter / degrees.tp * 4,
            repeats,
            &grid,
        )?
    } else {
        vec![0.0]
    };

    if grid.is_root() {
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (p, c, r) = (median(plain), median(captured), median(raw));
        let a = median(assembly.iter().map(|s| s.0).collect());
        let moving = median(assembly.iter().map(|s| s.0 - s.1).collect());
        let bytes = (LLAMA_125M.layers * batch * seq * LLAMA_125M.inter * 4) as f64;
        let gbs = |s: f64| bytes / s / 1e9;
        println!(
            "layout {degrees:?}, {} ranks, batch {batch} x seq {seq}, median of {repeats}",
            grid.world.size()
        );
        println!("plain forward: {p:.4} s");
        for (rank, m) in memory.iter().enumerate() {
            println!(
                "rank {rank}: VmRSS before loading {:.0} MB, VmHWM after loading {:.0} MB, after the plain passes {:.0} MB",
                m[0], m[1], m[2]
            );
        }
        if !capture {
            return Ok(());
        }
        println!(
            "forward capturing {sites} (12 x {:.1} MB): {c:.4} s",
            bytes / 12.0 / 1e6
        );
        if grid.world.size() > 1 {
            println!(
                "assembling them: {a:.4} s, of which waiting for the other rank {:.4} s",
                a - moving
            );
            println!(
                "assembling without the wait: {moving:.4} s ({:.2} GB/s); raw gathers of the same bytes: {r:.4} s ({:.2} GB/s): {:.0}% of raw throughput",
                gbs(moving),
                gbs(r),
                100.0 * r / moving
            );
        }
    }
    Ok(())
}

/// A memory figure of this process in MB (`VmRSS`, `VmHWM`) from `/proc/self/status`; 0
/// where there is none.
fn memory_mb(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb * 1024.0 / 1e6)
}

/// Seconds per pass of one raw gather per layer of `bytes` from every rank to rank 0.
fn raw_gathers(
    bytes: usize,
    repeats: usize,
    grid: &Grid,
) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let world = mpi::topology::SimpleCommunicator::world();
    let root = world.process_at_rank(0);
    // One piece per layer, as the activations are: not one buffer that stays in cache.
    let pieces: Vec<Vec<u8>> = (0..LLAMA_125M.layers)
        .map(|l| vec![l as u8; bytes])
        .collect();
    let counts = vec![mpi::Count::try_from(bytes)?; world.size() as usize];
    let displs: Vec<mpi::Count> = (0..world.size()).map(|r| r * counts[0]).collect();
    let mut raw = Vec::new();
    for round in 0..=repeats {
        grid.world.barrier()?;
        let start = Instant::now();
        let mut kept = Vec::new();
        for piece in &pieces {
            if world.rank() == 0 {
                let mut buf = vec![0u8; bytes * world.size() as usize];
                let mut partition = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
                root.gather_varcount_into_root(&piece[..], &mut partition);
                kept.push(buf);
            } else {
                root.gather_varcount_into(&piece[..]);
            }
        }
        grid.world.barrier()?;
        if round > 0 {
            raw.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(raw)
}
