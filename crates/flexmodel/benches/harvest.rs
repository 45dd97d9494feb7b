//! Harvest speed: tokens per second storing every decoder layer's output of the random
//! 125M-parameter Llama over token-id documents, against the hand-written transformers loop
//! (forward hooks + safetensors) on the same weights and data, alternating in one run; and
//! the limits, measured in the same run: the disk's write bandwidth, and each side's forward
//! pass alone (ours through the decoder layers only, as a harvest runs it; theirs whole, as
//! their loop runs it), whose ratio bounds what a harvester on these forwards can reach.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p flexmodel --bench harvest -- \
//!     [--hf PYTHON] [--docs N] [--repeats N]
//! ```
//!
//! `--hf` names a Python with torch, transformers and safetensors
//! (`scripts/setup-ref-venv.sh` makes one); it runs `bench/hf_harvest.py`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails by panicking

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{Device, Tensor};
use flexmodel::harvest::{self, DataSource, HarvestOptions, Positions, Settings};
use flexmodel::{FlexModel, HookFunction, Input, LoadOptions, load};
use flexmodel_models::random::{LLAMA_125M, token_ids};

const SEQ: usize = 128;
const BATCH: usize = 4;
const SHARD_TOKENS: usize = 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let docs: usize = flag("--docs").map_or(32, |v| v.parse().unwrap());
    let repeats: usize = flag("--repeats").map_or(3, |v| v.parse().unwrap());
    let python = flag("--hf");

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/flexmodel-bench");
    let model_dir = root.join("llama-125m");
    if !model_dir.join("model.safetensors").exists() {
        LLAMA_125M.write(&model_dir).unwrap();
    }
    let data = root.join("harvest-docs.safetensors");
    let ids = Tensor::from_vec(
        token_ids(docs * SEQ, LLAMA_125M.vocab, 1)
            .into_iter()
            .map(i64::from)
            .collect::<Vec<_>>(),
        (docs, SEQ),
        &Device::Cpu,
    )
    .unwrap();
    candle_core::safetensors::save(&[("input_ids".to_string(), ids.clone())].into(), &data)
        .unwrap();
    let out = root.join("harvest-out");

    let mut fm = FlexModel::new(load(&model_dir, &LoadOptions::default()).unwrap());
    let sites: Vec<String> = fm
        .model()
        .info()
        .decoder_layers
        .iter()
        .map(|s| s.to_string())
        .collect();
    let last_layer = sites[sites.len() - 1].clone();
    let options = HarvestOptions {
        settings: Settings {
            sites: sites.clone(),
            seq_len: SEQ,
            batch_size: BATCH,
            positions: Positions::Real,
            shard_tokens: Some(SHARD_TOKENS),
            ..Settings::default()
        },
        ..HarvestOptions::default()
    };
    let source = DataSource::Ids { path: data.clone() };
    let tokens = (docs * SEQ) as f64;
    // One warm-up harvest.
    let _ = std::fs::remove_dir_all(&out);
    harvest::run(&mut fm, &model_dir, None, &source, &out, &options, |_| {}).unwrap();

    let (mut ours, mut theirs, mut theirs_plain, mut disk, mut plain, mut layers) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let batches: Vec<Tensor> = (0..docs.div_ceil(BATCH))
        .map(|b| {
            ids.narrow(0, b * BATCH, BATCH.min(docs - b * BATCH))
                .unwrap()
        })
        .collect();
    let mut bytes = 0;
    for _ in 0..repeats {
        let _ = std::fs::remove_dir_all(&out);
        let start = Instant::now();
        let summary =
            harvest::run(&mut fm, &model_dir, None, &source, &out, &options, |_| {}).unwrap();
        ours.push(start.elapsed().as_secs_f64());
        bytes = summary.bytes;
        if let Some(python) = &python {
            let _ = std::fs::remove_dir_all(&out);
            let (lp, fwd) = transformers_seconds(python, &model_dir, &data, &out);
            theirs.push(lp);
            theirs_plain.push(fwd);
        }
        disk.push(write_bandwidth(&root));
        // The model alone over the same batches, no hooks, head included: a whole forward.
        let start = Instant::now();
        for batch in &batches {
            fm.forward(batch).unwrap();
        }
        plain.push(start.elapsed().as_secs_f64());
        // Through the decoder layers only, storing nothing: a harvest's compute floor.
        let last = fm
            .register(HookFunction::new(last_layer.as_str()).capture(false))
            .unwrap();
        let start = Instant::now();
        for batch in &batches {
            fm.capture(&Input::new(batch.clone())).unwrap();
        }
        layers.push(start.elapsed().as_secs_f64());
        fm.remove(last).unwrap();
    }
    let _ = std::fs::remove_dir_all(&out);

    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ours, disk) = (median(ours), median(disk));
    let per_token = bytes as f64 / tokens;
    println!(
        "{docs} documents x {SEQ} tokens, batch {BATCH}, 12 decoder layers ({:.1} KB per token, {:.0} MB), median of {repeats}",
        per_token / 1e3,
        bytes as f64 / 1e6
    );
    let plain = median(plain);
    println!(
        "flexmodel harvest: {ours:.3} s, {:.0} tokens/s",
        tokens / ours
    );
    println!(
        "flexmodel forward alone over the same batches: {plain:.3} s, {:.0} tokens/s",
        tokens / plain
    );
    let layers = median(layers);
    println!(
        "flexmodel forward through the decoder layers alone: {layers:.3} s, {:.0} tokens/s",
        tokens / layers
    );
    if !theirs.is_empty() {
        let (theirs, theirs_plain) = (median(theirs), median(theirs_plain));
        println!(
            "transformers loop: {theirs:.3} s, {:.0} tokens/s; flexmodel / transformers: {:.2}x",
            tokens / theirs,
            theirs / ours
        );
        println!(
            "transformers forward alone over the same batches: {theirs_plain:.3} s; the bound, \
             their loop over our layers alone: {:.2}x",
            theirs / layers
        );
    }
    println!(
        "disk write bandwidth (1 MiB writes + fsync): {:.0} MB/s = {:.0} tokens/s at this size",
        disk / 1e6,
        disk / per_token
    );
}

/// The transformers loop's seconds and its plain forward's over the same batches, as it
/// reports them (model loading excluded).
fn transformers_seconds(python: &str, model: &Path, data: &Path, out: &Path) -> (f64, f64) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/hf_harvest.py");
    let output = Command::new(python)
        .args([script])
        .args([model, data, out])
        .args([BATCH.to_string(), SHARD_TOKENS.to_string()])
        .output()
        .expect("run the transformers loop");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let seconds: Vec<f64> = stdout
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    (seconds[0], seconds[1])
}

/// Bytes per second writing 256 MiB in 1 MiB writes, synced, where the harvest writes.
fn write_bandwidth(dir: &Path) -> f64 {
    let path = dir.join("bandwidth.tmp");
    let chunk = vec![7u8; 1 << 20];
    let start = Instant::now();
    let mut file = std::fs::File::create(&path).unwrap();
    for _ in 0..256 {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
    let seconds = start.elapsed().as_secs_f64();
    std::fs::remove_file(&path).unwrap();
    (256 << 20) as f64 / seconds
}
