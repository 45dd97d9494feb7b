//! A full activation-patching sweep (each decoder layer's output × each position, from a clean
//! prompt into a corrupted one, logit-difference metric), timed: BENCHMARKS.md, "Analyses",
//! side by side with the same sweep written with transformers' forward hooks (`bench/sweep.py`,
//! which `bench/sweep.sh` runs with this in one go).
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p flexmodel --bench sweep -- MODEL_DIR TOKENS [CELLS_PER_PASS]
//! cargo test -p flexmodel --bench sweep       # smoke run on the bundled model
//! ```
//!
//! The prompts are token ids `1..=TOKENS` and the same with the middle token changed; the
//! metric is the logit of token 1 minus token 2 at the last position. One warm-up sweep, then
//! the median of 5. Prints one JSON line.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails by panicking

use std::time::Instant;

use flexmodel::analysis::{self, Metric, SweepSite};
use flexmodel::{Device, FlexModel, Input, LoadOptions, Tensor, load};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let smoke = args.is_empty();
    let dir = args.first().cloned().unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/stdlib-llama").to_string()
    });
    let tokens: u32 = args.get(1).map_or(8, |t| t.parse().unwrap());
    let cells: usize = args.get(2).map_or(16, |c| c.parse().unwrap());
    let mut fm = FlexModel::new(load(&dir, &LoadOptions::default()).unwrap());
    let clean: Vec<u32> = (1..=tokens).collect();
    let mut corrupted = clean.clone();
    corrupted[tokens as usize / 2] = tokens + 7;
    let row = |ids: &[u32]| {
        Input::new(
            Tensor::new(ids, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
    };
    let (clean, corrupted) = (row(&clean), row(&corrupted));
    let metric = Metric::LogitDiff { right: 1, wrong: 2 };
    let mut sweep = || {
        let start = Instant::now();
        let s =
            analysis::patching_sweep(&mut fm, &clean, &corrupted, metric, SweepSite::Resid, cells)
                .unwrap()
                .unwrap();
        (start.elapsed().as_secs_f64(), s)
    };
    let (_, first) = sweep();
    let repeats = if smoke { 1 } else { 5 };
    let mut times: Vec<f64> = (0..repeats).map(|_| sweep().0).collect();
    times.sort_by(f64::total_cmp);
    let (layers, positions) = first.values.dims2().unwrap();
    println!(
        "{{\"peer\": \"flexmodel\", \"model\": {dir:?}, \"tokens\": {tokens}, \"cells\": {}, \"cells_per_pass\": {cells}, \"seconds\": {:.4}, \"clean\": {:.4}, \"corrupted\": {:.4}, \"last_cell\": {:.4}}}",
        layers * positions,
        times[times.len() / 2],
        first.clean,
        first.corrupted,
        first
            .values
            .get(layers - 1)
            .unwrap()
            .get(positions - 1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
    );
}
