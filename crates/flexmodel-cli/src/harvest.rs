//! `flexmodel harvest`: activations over a dataset, streamed to safetensors shards.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use flexmodel::harvest::{
    self, DataSource, HarvestOptions, Positions, Progress, Settings, StatsSettings, StoreDType,
};
use flexmodel::{FlexModel, Tokenizer};
use indicatif::{ProgressBar, ProgressStyle};

use crate::opts::{ComputeOpts, FloatType, ModelOpts};
use crate::parallel::ParallelOpts;

/// Arguments of `flexmodel harvest`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelOpts,

    #[command(flatten)]
    parallel: ParallelOpts,

    /// The documents: `.txt` (one per line), `.jsonl` (text in --text-field) or
    /// `.safetensors` (integer `input_ids` [docs, len], optional `attention_mask`).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,

    /// The field of each JSON line that holds the text.
    #[arg(long, default_value = "text", value_name = "NAME")]
    text_field: String,

    /// Sites to capture, by name or pattern (`*` matches any characters); repeatable.
    #[arg(long, required = true, num_args = 1.., value_name = "PATTERN")]
    sites: Vec<String>,

    /// Output directory: shard-NNNNNN.safetensors files and manifest.json.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// Tokens per row.
    #[arg(long, default_value_t = 128, value_name = "N")]
    seq_len: usize,

    /// Lay documents end to end and cut rows every --seq-len tokens (default: one row per
    /// document, truncated).
    #[arg(long)]
    packing: bool,

    /// Rows per forward pass.
    #[arg(long, default_value_t = 8, value_name = "B")]
    batch_size: usize,

    /// Stop after this many input tokens.
    #[arg(long, value_name = "N")]
    max_tokens: Option<usize>,

    /// Dtype of the stored activations.
    #[arg(long, value_enum, default_value_t = FloatType::F32)]
    dtype: FloatType,

    /// Positions stored: all (padding too), real (non-padding), last, or START:END.
    #[arg(long, default_value = "real", value_name = "WHICH")]
    positions: String,

    /// Tokens per shard (a shard closes at the first batch boundary past it). Default: about
    /// 256 MiB of activations per shard.
    #[arg(long, value_name = "N")]
    shard_tokens: Option<usize>,

    /// Also keep statistics of every site: running mean and variance of each unit and its
    /// top-k activating tokens with context (stats.safetensors).
    #[arg(long)]
    stats: bool,

    /// Statistics only: store no activations.
    #[arg(long, requires = "stats")]
    no_raw: bool,

    /// Top activating tokens kept per unit (with --stats).
    #[arg(long, default_value_t = 10, value_name = "K")]
    top_k: usize,

    /// Tokens of context stored with each top token, ending at it (with --stats).
    #[arg(long, default_value_t = 8, value_name = "N")]
    context: usize,

    /// Also the covariance between the units of each site of at most 4096 units (with --stats).
    #[arg(long, requires = "stats")]
    covariance: bool,

    /// Peak resident memory of the process, in MB: shards shrink to fit.
    #[arg(long, value_name = "MB")]
    memory_budget: Option<u64>,

    /// Continue the harvest in --out after an interruption.
    #[arg(long)]
    resume: bool,

    #[command(flatten)]
    compute: ComputeOpts,
}

pub fn main(args: Args) -> Result<()> {
    // What can be checked without the weights is checked first.
    let dir = args.model.dir()?;
    let data = DataSource::from_path(&args.data, &args.text_field)?;
    let positions: Positions = args.positions.parse()?;
    let options = HarvestOptions {
        settings: Settings {
            sites: args.sites.clone(),
            seq_len: args.seq_len,
            packing: args.packing,
            batch_size: args.batch_size,
            max_tokens: args.max_tokens,
            dtype: match args.dtype {
                FloatType::F32 => StoreDType::F32,
                FloatType::F16 => StoreDType::F16,
                FloatType::Bf16 => StoreDType::Bf16,
            },
            positions,
            raw: !args.no_raw,
            stats: args.stats.then_some(StatsSettings {
                top_k: args.top_k,
                context: args.context,
                covariance: args.covariance,
            }),
            shard_tokens: args.shard_tokens,
        },
        memory_budget: args.memory_budget.map(|mb| mb * 1_000_000),
        resume: args.resume,
        // Ctrl-C ends the process; the complete shards stay, for --resume.
        stop: None,
    };
    let tokenizer = Tokenizer::from_dir(&dir).ok();
    let device = args.compute.device()?;
    let grid = args.parallel.grid(&device)?;
    let model = args.compute.load(&dir, device, &grid)?;
    let mut fm = FlexModel::new(model);

    let bar = progress_bar(grid.is_root());
    let result = harvest::run(
        &mut fm,
        &dir,
        tokenizer.as_ref(),
        &data,
        &args.out,
        &options,
        |p: &Progress| show(&bar, p),
    );
    bar.finish_and_clear();
    let summary = match result {
        Ok(summary) => summary,
        // The other ranks wait in the next forward pass: end them all.
        Err(e) if grid.is_distributed() => {
            eprintln!("flexmodel rank {}: error: {e}", grid.world.rank());
            grid.world.abort(1)
        }
        Err(e) => return Err(e.into()),
    };
    if grid.is_root() {
        let mb = |b: u64| b as f64 / 1e6;
        println!(
            "harvested {} tokens ({} rows) into {} shards, {:.1} MB, in {}: {} tokens this run, {:.0} tokens/s{}",
            summary.stored_tokens,
            summary.rows,
            summary.shards,
            mb(summary.bytes),
            args.out.display(),
            summary.tokens,
            summary.tokens as f64 / summary.seconds.max(1e-9),
            summary
                .peak_rss
                .map(|b| format!(", peak memory {:.0} MB", mb(b)))
                .unwrap_or_default(),
        );
    }
    Ok(())
}

/// A progress bar on stderr (rank 0, a terminal), in thousandths of the data, with the ETA.
fn progress_bar(root: bool) -> ProgressBar {
    if !root || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template("{bar:30} {percent:>3}% ETA {eta} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::new(1000).with_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn show(bar: &ProgressBar, p: &Progress) {
    bar.set_position((p.fraction * 1000.0) as u64);
    bar.set_message(format!(
        "{} tokens, {:.0} tokens/s, {} stored in {} shards",
        p.tokens,
        p.tokens as f64 / p.seconds.max(1e-9),
        p.stored_tokens,
        p.shards
    ));
}
