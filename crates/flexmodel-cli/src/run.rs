//! `flexmodel run`: one forward pass with captures and edits, written to a safetensors file.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Result, bail};
use flexmodel::{DType, FlexModel, HookFunction, Input, Tensor, Tokenizer};

use crate::opts::{ComputeOpts, FloatType, HookOpts, InputOpts, ModelOpts, Padding};
use crate::parallel::ParallelOpts;
use crate::safetensors_io;

/// Arguments of `flexmodel run`.
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

    /// Gradient of the causal-LM loss (labels = input_ids, mean cross-entropy of
    /// logits[:, :-1] against input_ids[:, 1:], padding excluded) with respect to the output of
    /// the sites a name or pattern selects, written as `grad.<site>`; the loss is written as
    /// `loss`. Repeatable.
    #[arg(long, value_name = "PATTERN")]
    grad: Vec<String>,

    /// Write a parameter by its Hugging Face name as `param.<name>` (gathered from every rank
    /// that holds a piece of it); repeatable.
    #[arg(long, value_name = "NAME")]
    param: Vec<String>,

    /// Output safetensors file: `logits` and one tensor per captured site, named by the site
    /// (a site that fires k times per forward also writes `<site>#1` ... `<site>#k-1`).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,

    /// Dtype of the tensors written.
    #[arg(long, value_enum, default_value_t = FloatType::F32)]
    dtype: FloatType,

    #[command(flatten)]
    compute: ComputeOpts,
}

pub fn main(args: Args) -> Result<()> {
    // Everything that can be checked without the weights is checked first.
    let dir = args.model.dir()?;
    let edits = args.hooks.edits()?;
    check_out_dir(&args.out)?;
    let (input, tokenizer) = args.input.load(&dir, Padding::Right)?;

    let device = args.compute.device()?;
    let grid = args.parallel.grid(&device)?;
    let model = args.compute.load(&dir, device, &grid)?;
    let mut fm = FlexModel::new(model);
    args.hooks.register(&mut fm, edits)?;
    for pattern in &args.grad {
        fm.register(HookFunction::backward(pattern.as_str()))?;
    }
    let out_dtype: DType = args.dtype.into();
    let mut tensors = Vec::new();
    let logits = if args.grad.is_empty() {
        fm.forward_input(&input)?
    } else {
        // One forward pass (with the captures and edits) and the backward pass of the loss.
        let backward = fm.lm_backward(&input)?;
        tensors.push(("loss".to_string(), backward.loss.to_dtype(out_dtype)?));
        backward.logits
    };
    tensors.insert(0, ("logits".to_string(), logits.to_dtype(out_dtype)?));
    for name in &args.param {
        let p = fm.parameter(name)?;
        tensors.push((format!("param.{name}"), p.to_dtype(out_dtype)?));
    }
    for (site, firings) in fm.take_output() {
        for (k, t) in firings.into_iter().enumerate() {
            let name = if k == 0 {
                site.clone()
            } else {
                format!("{site}#{k}")
            };
            tensors.push((name, t.to_dtype(out_dtype)?));
        }
    }
    // Every capture and the logits are on rank 0, which writes the file.
    if !grid.is_root() {
        return Ok(());
    }
    safetensors_io::write_atomic(&args.out, &tensors)?;
    report(&tensors, &logits, &input, tokenizer.as_ref(), &args.out)
}

/// Fails early when the output's directory does not exist.
pub fn check_out_dir(out: &std::path::Path) -> Result<()> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent {
        if !dir.is_dir() {
            bail!(
                "--out {}: directory {} does not exist",
                out.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// What was written, and the model's next-token guesses for each row.
fn report(
    tensors: &[(String, Tensor)],
    logits: &Tensor,
    input: &Input,
    tok: Option<&Tokenizer>,
    out: &std::path::Path,
) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "wrote {} tensors to {}",
        tensors.len(),
        out.display()
    )?;
    let width = tensors.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    for (name, t) in tensors {
        writeln!(stdout, "  {name:width$}  {:?}", t.dims())?;
    }
    let lengths: Vec<usize> = match &input.attention_mask {
        None => vec![input.input_ids.dim(1)?; input.input_ids.dim(0)?],
        Some(m) => m
            .to_dtype(DType::F32)?
            .sum(1)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|n| n as usize)
            .collect(),
    };
    for (row, len) in lengths.into_iter().enumerate() {
        let last = logits
            .get(row)?
            .get(len.saturating_sub(1))?
            .to_dtype(DType::F32)?;
        let mut ranked: Vec<(usize, f32)> =
            last.to_vec1::<f32>()?.into_iter().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let top: Vec<String> = ranked
            .iter()
            .take(5)
            .map(
                |&(id, _)| match tok.and_then(|t| t.decode(&[id as u32]).ok()) {
                    Some(text) => format!("{text:?}"),
                    None => id.to_string(),
                },
            )
            .collect();
        writeln!(stdout, "row {row}: next token top-5 {}", top.join(" "))?;
    }
    Ok(())
}
