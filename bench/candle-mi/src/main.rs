//! candle-mi behind the line protocol of `bench/peers.py` (see `bench/peer_worker.py` for the
//! reference implementation): `candle-mi-worker MODEL_DIR`, then one command per line on stdin.
//!
//! - `<job> <batch> <seq>` runs one forward pass and answers `<seconds> <captured tensors>`;
//!   job is `plain`, `layers` (the residual stream after every decoder layer, `ResidPost`) or
//!   `edit` (layer 5's MLP output zeroed, `MlpOut(5)`). Only the forward call is timed.
//! - `rss` answers the peak resident set size in KiB; `quit` ends the worker.
//!
//! Loading goes around `MIModel::from_pretrained`, which treats a local path as a hub name.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_mi::{
    GenericTransformer, HookPoint, HookSpec, Intervention, MIModel, TransformerConfig,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn load(dir: &Path) -> Result<(MIModel, usize, usize)> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let layers = json["num_hidden_layers"]
        .as_u64()
        .ok_or("num_hidden_layers")? as usize;
    let vocab = json["vocab_size"].as_u64().ok_or("vocab_size")? as usize;
    let config = TransformerConfig::from_hf_config(&json)?;
    let device = Device::Cpu;
    let weights = [dir.join("model.safetensors")];
    // SAFETY: the benchmark's checkpoint is not modified while it is mapped.
    let vb =
        unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&weights, DType::F32, &device)? };
    let transformer = GenericTransformer::load(config, &device, DType::F32, vb)?;
    Ok((MIModel::new(Box::new(transformer), device), layers, vocab))
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: candle-mi-worker MODEL_DIR")?;
    let (model, layers, vocab) = load(Path::new(&dir))?;
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["quit"] => break,
            ["rss"] => peak_rss_kib().to_string(),
            [job, batch, seq] => {
                let (batch, seq): (usize, usize) = (batch.parse()?, seq.parse()?);
                let ids: Vec<u32> = (0..batch * seq)
                    .map(|i| ((i * 7919 + 13) % vocab) as u32)
                    .collect();
                let ids = Tensor::from_vec(ids, (batch, seq), &Device::Cpu)?;
                let mut spec = HookSpec::new();
                match *job {
                    "plain" => {}
                    "layers" => {
                        spec.capture_all((0..layers).map(HookPoint::ResidPost));
                    }
                    "edit" => {
                        spec.intervene(HookPoint::MlpOut(5), Intervention::Zero);
                    }
                    other => return Err(format!("unknown job {other}").into()),
                }
                let start = Instant::now();
                let cache = model.forward(&ids, &spec)?;
                let seconds = start.elapsed().as_secs_f64();
                format!("{seconds} {}", cache.num_captures())
            }
            _ => return Err(format!("bad command {line:?}").into()),
        };
        writeln!(stdout.lock(), "{answer}")?;
    }
    Ok(())
}
