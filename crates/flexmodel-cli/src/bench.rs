//! `flexmodel bench`: how long a forward pass takes with the everyday capture jobs, on this
//! machine and device.
//!
//! Jobs: `plain` (no hook); `layers` (capture every decoder layer's output); `modules` (every
//! module site, as hooks on every module of a transformers model would); `sites` (every site,
//! attention internals included). Input ids are fixed pseudo-random tokens. Each job runs
//! `--warmup` untimed passes, then `--iters` timed ones; a pass ends when the logits are
//! computed and every capture is in host memory (the device is synchronised).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use flexmodel::{Device, FlexModel, HookFunction, Model, SiteKind, Tensor};
use serde::Serialize;

use crate::opts::{ComputeOpts, ModelOpts};

/// Arguments of `flexmodel bench`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelOpts,

    #[command(flatten)]
    compute: ComputeOpts,

    /// Input shapes, BATCHxSEQ; repeatable.
    #[arg(long = "shape", value_name = "BxS", default_values_t = vec!["1x128".to_string()])]
    shapes: Vec<String>,

    /// Jobs to time: plain, layers, modules, sites; repeatable.
    #[arg(long = "job", value_name = "JOB", default_values_t = ["plain", "layers", "modules", "sites"].map(String::from).to_vec())]
    jobs: Vec<String>,

    /// Timed passes per job and shape (the median is reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,

    /// Untimed passes before them.
    #[arg(long, default_value_t = 2)]
    warmup: usize,

    /// Also write every timing as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// The timings of one job at one shape.
#[derive(Serialize)]
struct Row {
    job: String,
    batch: usize,
    seq: usize,
    /// Seconds of each timed pass.
    seconds: Vec<f64>,
    median_s: f64,
    /// Tensors and bytes captured per pass.
    captures: usize,
    captured_bytes: usize,
}

pub fn main(args: Args) -> Result<()> {
    let dir = args.model.dir()?;
    let shapes = args
        .shapes
        .iter()
        .map(|s| parse_shape(s))
        .collect::<Result<Vec<_>>>()?;
    for job in &args.jobs {
        if !["plain", "layers", "modules", "sites"].contains(&job.as_str()) {
            bail!("unknown --job {job}; accepted: plain, layers, modules, sites");
        }
    }
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let device = args.compute.device()?;
    let model = args
        .compute
        .load(&dir, device.clone(), &flexmodel::Grid::single())?;
    let info = model.info().clone();
    let hooks = |job: &str| -> Vec<String> {
        let kinds = |keep: fn(SiteKind) -> bool| {
            model
                .sites()
                .iter()
                .filter(|(_, s)| keep(s.kind))
                .map(|(_, s)| s.name.to_string())
                .collect()
        };
        match job {
            "layers" => info.decoder_layers.clone(),
            "modules" => kinds(|k| k == SiteKind::Module),
            "sites" => kinds(|_| true),
            _ => Vec::new(),
        }
    };
    let jobs: Vec<(String, Vec<String>)> =
        args.jobs.iter().map(|j| (j.clone(), hooks(j))).collect();
    let mut fm = FlexModel::new(model);
    // One capture before any timing: on a GPU the first one starts the copy stream and its
    // worker threads (and cudarc's stream mode changes), so every job runs in that state.
    if let Some(first) = info.decoder_layers.first() {
        let h = fm.register(HookFunction::new(first.as_str()))?;
        fm.forward(&Tensor::new(&[[1u32, 2, 3]], &device)?)?;
        device.synchronize()?;
        fm.remove(h)?;
        fm.clear_output();
    }

    let mut rows = Vec::new();
    for &(batch, seq) in &shapes {
        let ids: Vec<u32> = (0..batch * seq)
            .map(|i| ((i * 7919 + 13) % info.vocab_size) as u32)
            .collect();
        let ids = Tensor::from_vec(ids, (batch, seq), &device)?;
        for (job, sites) in &jobs {
            let handles = sites
                .iter()
                .map(|s| fm.register(HookFunction::new(s.as_str())))
                .collect::<flexmodel::Result<Vec<_>>>()?;
            let mut seconds = Vec::with_capacity(args.iters);
            for i in 0..args.warmup + args.iters {
                fm.clear_output();
                let start = Instant::now();
                let logits = fm.forward(&ids)?;
                device.synchronize()?;
                let elapsed = start.elapsed().as_secs_f64();
                drop(logits);
                if i >= args.warmup {
                    seconds.push(elapsed);
                }
            }
            // What the last pass captured.
            let captures = fm.output().iter().map(|(_, v)| v.len()).sum();
            let captured_bytes = fm
                .output()
                .iter()
                .flat_map(|(_, v)| v)
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum();
            fm.clear_output();
            for h in handles {
                fm.remove(h)?;
            }
            let mut sorted = seconds.clone();
            sorted.sort_by(f64::total_cmp);
            rows.push(Row {
                job: job.clone(),
                batch,
                seq,
                median_s: sorted[sorted.len() / 2],
                seconds,
                captures,
                captured_bytes,
            });
        }
    }
    report(&rows, &device, &fm)?;
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "model": dir,
            "device": format!("{:?}", device.location()),
            "dtype": fm.model().info().dtype.as_str(),
            "rows": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let parsed = s
        .split_once('x')
        .and_then(|(b, s)| Some((b.parse().ok()?, s.parse().ok()?)));
    match parsed {
        Some((b, s)) if b > 0 && s > 0 => Ok((b, s)),
        _ => bail!("--shape {s}: expected BATCHxSEQ, e.g. 4x512"),
    }
}

fn report(rows: &[Row], device: &Device, fm: &FlexModel<Box<dyn Model>>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let info = fm.model().info();
    writeln!(
        out,
        "{} on {:?}, {}",
        info.model_type,
        device.location(),
        info.dtype.as_str()
    )?;
    writeln!(
        out,
        "{:8} {:>9} {:>10} {:>8} {:>11}",
        "job", "shape", "median ms", "captures", "captured MB"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:8} {:>9} {:>10.2} {:>8} {:>11.1}",
            r.job,
            format!("{}x{}", r.batch, r.seq),
            r.median_s * 1e3,
            r.captures,
            r.captured_bytes as f64 / 1e6
        )?;
    }
    Ok(())
}
