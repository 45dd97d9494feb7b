//! `flexmodel run`: one forward pass with captures and edits, written to a safetensors file.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use flexmodel::{DType, FlexModel, HookFunction, Input, LoadOptions, Tensor, Tokenizer};

use crate::edit::EditSpec;
use crate::model_opts::{FloatType, ModelOpts};
use crate::safetensors_io;

/// Arguments of `flexmodel run`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelOpts,

    /// Text prompts; several form one right-padded batch (each row computes what the prompt
    /// computes alone).
    #[arg(long, num_args = 1.., required_unless_present = "input_ids", conflicts_with = "input_ids")]
    prompt: Vec<String>,

    /// Token ids instead of text: a safetensors file with an integer `input_ids` [batch, seq]
    /// and optionally `attention_mask` [batch, seq] (1 real, 0 padding, left or right).
    #[arg(long, value_name = "FILE")]
    input_ids: Option<PathBuf>,

    /// Capture the sites a name or pattern selects (`*` matches any characters, dots
    /// included); repeatable.
    #[arg(long, value_name = "PATTERN")]
    capture: Vec<String>,

    /// Edit a site (or pattern): SITE=zero, SITE=scale:F, SITE=add:FILE.safetensors:KEY
    /// (broadcast over batch and positions), SITE=replace:FILE.safetensors:KEY; repeatable.
    /// Captures record the value before edits.
    #[arg(long, value_name = "SITE=OP")]
    edit: Vec<String>,

    /// Gradient of the causal-LM loss (labels = input_ids, mean cross-entropy of
    /// logits[:, :-1] against input_ids[:, 1:], padding excluded) with respect to the output of
    /// the sites a name or pattern selects, written as `grad.<site>`; the loss is written as
    /// `loss`. Repeatable.
    #[arg(long, value_name = "PATTERN")]
    grad: Vec<String>,

    /// Output safetensors file: `logits` and one tensor per captured site, named by the site
    /// (a site that fires k times per forward also writes `<site>#1` ... `<site>#k-1`).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,

    /// Dtype of the tensors written.
    #[arg(long, value_enum, default_value_t = FloatType::F32)]
    dtype: FloatType,

    /// Dtype the model computes in.
    #[arg(long, value_enum, default_value_t = FloatType::F32)]
    compute_dtype: FloatType,
}

pub fn main(args: Args) -> Result<()> {
    // Everything that can be checked without the weights is checked first.
    let dir = args.model.dir()?;
    let edits = args
        .edit
        .iter()
        .map(|e| EditSpec::parse(e))
        .collect::<Result<Vec<_>>>()?;
    check_out_dir(&args.out)?;
    let tokenizer = match args.input_ids {
        Some(_) => Tokenizer::from_dir(&dir).ok(),
        None => Some(Tokenizer::from_dir(&dir)?),
    };
    let input = match &args.input_ids {
        Some(path) => read_input(path)?,
        None => {
            let tok = tokenizer.as_ref().context("tokenizer")?;
            let rows = args
                .prompt
                .iter()
                .map(|p| tok.encode(p))
                .collect::<Result<Vec<_>, _>>()?;
            flexmodel::pad_right(&rows, 0, &flexmodel::Device::Cpu)?
        }
    };

    let options = LoadOptions {
        dtype: args.compute_dtype.into(),
        ..LoadOptions::default()
    };
    let model =
        flexmodel::load(&dir, &options).with_context(|| format!("loading {}", dir.display()))?;
    let mut fm = FlexModel::new(model);
    // Captures first: hooks fire in registration order, so they see the pre-edit value.
    for pattern in &args.capture {
        fm.register(HookFunction::new(pattern.as_str()))?;
    }
    for edit in edits {
        fm.register(edit.hook())?;
    }
    for pattern in &args.grad {
        fm.register(HookFunction::backward(pattern.as_str()))?;
    }
    let logits = fm.forward_input(&input)?;

    let out_dtype: DType = args.dtype.into();
    let mut tensors = vec![("logits".to_string(), logits.to_dtype(out_dtype)?)];
    if !args.grad.is_empty() {
        let loss = flexmodel::causal_lm_loss(&logits, &input)?;
        fm.backward(&loss)?;
        tensors.push(("loss".to_string(), loss.detach().to_dtype(out_dtype)?));
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
    safetensors_io::write_atomic(&args.out, &tensors)?;
    report(&tensors, &logits, &input, tokenizer.as_ref(), &args.out)
}

fn check_out_dir(out: &std::path::Path) -> Result<()> {
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

fn read_input(path: &std::path::Path) -> Result<Input> {
    let mut tensors = safetensors_io::read(path)?;
    let ids = tensors.remove("input_ids").with_context(|| {
        format!(
            "{} has no `input_ids` tensor (an integer [batch, seq])",
            path.display()
        )
    })?;
    if !ids.dtype().is_int() || ids.rank() != 2 {
        bail!(
            "{}: `input_ids` must be an integer [batch, seq] tensor, got {:?} {:?}",
            path.display(),
            ids.dtype(),
            ids.dims()
        );
    }
    Ok(match tensors.remove("attention_mask") {
        Some(mask) => Input::with_mask(ids, mask),
        None => Input::new(ids),
    })
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
