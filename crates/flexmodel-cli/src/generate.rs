//! `flexmodel generate`: generation with a key/value cache, hooks at every step, text streamed
//! to stdout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use flexmodel::{
    DType, Dim, FlexModel, GenerateOptions, OutputMap, Sampling, SiteInfo, Tensor, Tokenizer,
};

use crate::opts::{ComputeOpts, FloatType, HookOpts, InputOpts, ModelOpts, Padding};
use crate::parallel::ParallelOpts;
use crate::run::check_out_dir;
use crate::safetensors_io;

/// Arguments of `flexmodel generate`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelOpts,

    #[command(flatten)]
    input: InputOpts,

    #[command(flatten)]
    hooks: HookOpts,

    #[command(flatten)]
    parallel: ParallelOpts,

    /// New tokens per prompt at most.
    #[arg(long, value_name = "N")]
    max_new_tokens: usize,

    /// Pick the most likely token (the default).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    greedy: bool,

    /// Sample with this temperature (> 0) instead of picking greedily.
    #[arg(long, value_name = "T")]
    temperature: Option<f64>,

    /// Sample among the K most likely tokens.
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,

    /// Sample among the most likely tokens whose probability reaches P.
    #[arg(long, value_name = "P")]
    top_p: Option<f64>,

    /// Seed of the sampler: the same seed gives the same tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// End a row once its text contains this string; repeatable. Rows also end at the model's
    /// EOS token(s) (`eos_token_id` of generation_config.json or config.json).
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,

    /// Generate exactly --max-new-tokens tokens: EOS tokens do not end rows.
    #[arg(long)]
    ignore_eos: bool,

    /// Write `sequences` (I64 [batch, prompt + new]) and the captures: per site, the prompt
    /// pass and every step concatenated along the sequence axis; attention probabilities,
    /// whose key length grows, one tensor per step as `<site>@<step>`.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,

    /// Dtype of the captures written.
    #[arg(long, value_enum, default_value_t = FloatType::F32)]
    dtype: FloatType,

    #[command(flatten)]
    compute: ComputeOpts,
}

pub fn main(args: Args) -> Result<()> {
    let dir = args.model.dir()?;
    let edits = args.hooks.edits()?;
    if let Some(out) = &args.out {
        check_out_dir(out)?;
    }
    let (input, tokenizer) = args.input.load(&dir, Padding::Left)?;
    if !args.stop.is_empty() && tokenizer.is_none() {
        bail!("--stop needs the model's tokenizer.json to read the generated text");
    }
    let sampling = match (args.temperature, args.top_k, args.top_p) {
        (None, None, None) => Sampling::Greedy,
        (temperature, top_k, top_p) => Sampling::Sample {
            temperature: temperature.unwrap_or(1.0),
            top_k,
            top_p,
            seed: args.seed,
        },
    };
    let (mut eos_token_ids, pad_token_id) = flexmodel::generation_tokens(&dir)?;
    if args.ignore_eos {
        eos_token_ids.clear();
    }
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        eos_token_ids,
        pad_token_id,
    };

    let device = args.compute.device()?;
    let grid = args.parallel.grid(&device)?;
    let model = args.compute.load(&dir, device, &grid)?;
    let sites: Vec<SiteInfo> = model.sites().iter().map(|(_, s)| s.clone()).collect();
    let mut fm = FlexModel::new(model);
    args.hooks.register(&mut fm, edits)?;

    let batch = input.input_ids.dim(0)?;
    let mut stream = Stream::new(tokenizer.as_ref(), batch, &args.stop);
    let generation = fm.generate(&input, &options, |row, token| stream.push(row, token))?;
    // Rank 0 chose the tokens, holds the captures and writes.
    if !grid.is_root() {
        return Ok(());
    }
    stream.finish()?;

    if let Some(out) = &args.out {
        let mut tensors = vec![("sequences".to_string(), generation.sequences.clone())];
        tensors.extend(per_site(
            fm.take_output(),
            &sites,
            generation.steps,
            batch,
            args.dtype.into(),
        )?);
        safetensors_io::write_atomic(out, &tensors)?;
        eprintln!("wrote {} tensors to {}", tensors.len(), out.display());
    }
    Ok(())
}

/// Text to stdout as tokens arrive: a single prompt streams; a batch prints one line per
/// prompt (`<row>\t<text>`, newlines escaped) at the end.
struct Stream<'a> {
    tokenizer: Option<&'a Tokenizer>,
    rows: Vec<Vec<u32>>,
    printed: usize,
    stops: &'a [String],
}

impl<'a> Stream<'a> {
    fn new(tokenizer: Option<&'a Tokenizer>, batch: usize, stops: &'a [String]) -> Self {
        Self {
            tokenizer,
            rows: vec![Vec::new(); batch],
            printed: 0,
            stops,
        }
    }

    fn text(&self, row: usize) -> String {
        let tokens = &self.rows[row];
        match self.tokenizer.and_then(|t| t.decode(tokens).ok()) {
            Some(text) => text,
            None => tokens.iter().map(|t| format!("{t} ")).collect(),
        }
    }

    /// Records a token; returns whether the row reached a stop string.
    fn push(&mut self, row: usize, token: u32) -> bool {
        self.rows[row].push(token);
        let text = self.text(row);
        if self.rows.len() == 1 && !text.ends_with('\u{FFFD}') {
            // A byte-level token may end inside a character: print whole characters only.
            let new = text.get(self.printed..).unwrap_or("");
            let mut out = std::io::stdout().lock();
            // Streaming is best effort: a closed stdout must not stop the generation.
            let _ = out.write_all(new.as_bytes()).and_then(|()| out.flush());
            self.printed = text.len();
        }
        self.stops.iter().any(|s| text.contains(s.as_str()))
    }

    fn finish(&mut self) -> Result<()> {
        let mut out = std::io::stdout().lock();
        if self.rows.len() == 1 {
            let text = self.text(0);
            writeln!(out, "{}", text.get(self.printed..).unwrap_or(""))?;
            return Ok(());
        }
        for row in 0..self.rows.len() {
            writeln!(
                out,
                "{row}\t{}",
                self.text(row).replace('\\', "\\\\").replace('\n', "\\n")
            )?;
        }
        Ok(())
    }
}

/// The captures of a generation, one tensor per site (and per firing within a pass): the
/// prompt pass and the steps concatenated along the sequence axis.
fn per_site(
    output: OutputMap,
    sites: &[SiteInfo],
    steps: usize,
    batch: usize,
    dtype: DType,
) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = Vec::new();
    for (name, captures) in output {
        let Some(info) = sites.iter().find(|s| *s.name == *name) else {
            continue; // gradients and module inputs are not captured here
        };
        if info.shape.contains(&Dim::Routed) {
            // Once per expert with tokens, a number that varies from pass to pass: in firing
            // order (pass by pass, expert by expert).
            for (i, t) in captures.iter().enumerate() {
                tensors.push((format!("{name}@{i}"), t.to_dtype(dtype)?));
            }
            continue;
        }
        if steps == 0 || captures.len() % steps != 0 {
            bail!(
                "site `{name}` fired {} times over {steps} passes",
                captures.len()
            );
        }
        let calls = captures.len() / steps;
        for call in 0..calls {
            let key = if call == 0 {
                name.clone()
            } else {
                format!("{name}#{call}")
            };
            let parts: Vec<&Tensor> = captures.iter().skip(call).step_by(calls).collect();
            // Keys grow from step to step: one tensor per step.
            if info.shape.contains(&Dim::KeySeq) {
                for (step, t) in parts.into_iter().enumerate() {
                    tensors.push((format!("{key}@{step}"), t.to_dtype(dtype)?));
                }
            } else {
                tensors.push((
                    key,
                    concat_steps(&parts, &info.shape, batch)?.to_dtype(dtype)?,
                ));
            }
        }
    }
    Ok(tensors)
}

/// Concatenates per-step captures along their sequence axis. Flattened tokens (`[batch*seq,
/// ..]`) stay flattened with row `b * seq + t`, as one forward pass over the sequence lays
/// them out; position tables of batch 1 are broadcast to the batch.
fn concat_steps(parts: &[&Tensor], template: &[Dim], batch: usize) -> Result<Tensor> {
    let flat = template.first() == Some(&Dim::Tokens);
    let mut shaped = Vec::with_capacity(parts.len());
    for t in parts {
        let mut t = (*t).clone();
        if flat {
            let mut dims = vec![batch, t.dim(0)? / batch];
            dims.extend_from_slice(&t.dims()[1..]);
            t = t.reshape(dims)?;
        }
        if template.first() == Some(&Dim::PosBatch) && t.dim(0)? == 1 {
            let mut dims = t.dims().to_vec();
            dims[0] = batch;
            t = t.broadcast_as(dims)?.contiguous()?;
        }
        shaped.push(t);
    }
    let axis = if flat {
        1
    } else {
        template
            .iter()
            .position(|d| *d == Dim::Seq)
            .context("no sequence axis")?
    };
    let joined = Tensor::cat(&shaped, axis)?;
    if flat {
        let mut dims = vec![joined.dim(0)? * joined.dim(1)?];
        dims.extend_from_slice(&joined.dims()[2..]);
        return Ok(joined.reshape(dims)?);
    }
    Ok(joined)
}
