//! The analysis commands: `lens`, `dla`, `patch`, `heads`, `pattern`. Each runs on any layout
//! (under mpirun every rank runs it; rank 0 prints and draws) and can draw its result as a PNG
//! heatmap.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use flexmodel::analysis::{self, Direction, LensOptions, Metric, SweepSite};
use flexmodel::plot::{Heatmap, Scale};
use flexmodel::{DType, Device, FlexModel, Grid, Input, Tensor, Tokenizer};

use crate::opts::{ComputeOpts, ModelOpts};
use crate::parallel::ParallelOpts;

/// The model, where it runs and how it is split: what every analysis command takes.
#[derive(clap::Args)]
pub struct Setup {
    #[command(flatten)]
    model: ModelOpts,

    #[command(flatten)]
    parallel: ParallelOpts,

    #[command(flatten)]
    compute: ComputeOpts,
}

/// A loaded model with its tokenizer.
struct Loaded {
    fm: FlexModel,
    tok: Tokenizer,
    grid: Grid,
}

impl Setup {
    fn load(&self) -> Result<Loaded> {
        let dir = self.model.dir()?;
        let tok = Tokenizer::from_dir(&dir)
            .with_context(|| format!("the analyses need the tokenizer of {}", dir.display()))?;
        let device = self.compute.device()?;
        let grid = self.parallel.grid(&device)?;
        let model = self.compute.load(&dir, device, &grid)?;
        Ok(Loaded {
            fm: FlexModel::new(model),
            tok,
            grid,
        })
    }
}

impl Loaded {
    /// One prompt as a `[1, seq]` input, and its tokens' labels.
    fn prompt(&self, text: &str) -> Result<(Input, Vec<String>)> {
        let ids = self.tok.encode(text)?;
        if ids.is_empty() {
            bail!("the prompt {text:?} has no tokens");
        }
        let labels = ids.iter().map(|&i| self.label(i)).collect();
        let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        Ok((Input::new(ids), labels))
    }

    /// The id of a token given as text (exactly one token) or as `#ID`.
    fn token(&self, what: &str, text: &str) -> Result<u32> {
        if let Some(id) = text.strip_prefix('#') {
            return id
                .parse()
                .with_context(|| format!("{what} {text:?}: `#` must be followed by a token id"));
        }
        let ids = self.tok.encode(text)?;
        match ids.as_slice() {
            [id] => Ok(*id),
            _ => bail!(
                "{what} {text:?} is {} tokens ({}), not one; give a single token (mind the \
                 leading space: \" x\" and \"x\" differ) or an id as #ID",
                ids.len(),
                ids.iter()
                    .map(|&i| format!("{:?}=#{i}", self.label(i)))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }
    }

    fn label(&self, id: u32) -> String {
        self.tok.decode(&[id]).unwrap_or_else(|_| format!("#{id}"))
    }
}

/// Where a picture goes, checked before any work.
#[derive(clap::Args)]
pub struct PngOpt {
    /// Draw the result as a PNG heatmap to this file.
    #[arg(long, value_name = "FILE.png")]
    png: Option<PathBuf>,
}

impl PngOpt {
    fn check(&self) -> Result<()> {
        if let Some(path) = &self.png {
            crate::run::check_out_dir(path)?;
        }
        Ok(())
    }

    fn draw(&self, map: impl FnOnce() -> Result<Heatmap>) -> Result<()> {
        if let Some(path) = &self.png {
            map()?.save_png(path)?;
            println!("drew {}", path.display());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

/// Arguments of `flexmodel lens`.
#[derive(clap::Args)]
pub struct LensArgs {
    /// The prompt.
    #[arg(long)]
    prompt: String,

    /// Report this token's probability and rank at every layer (text of one token, or #ID);
    /// the picture then shows its probability. Default: the model's final top token at each
    /// position.
    #[arg(long)]
    target: Option<String>,

    /// Most likely tokens to print per layer.
    #[arg(long, default_value_t = 3)]
    top_k: usize,

    #[command(flatten)]
    png: PngOpt,

    #[command(flatten)]
    setup: Setup,
}

/// `flexmodel lens`.
pub fn lens(args: LensArgs) -> Result<()> {
    args.png.check()?;
    let mut m = args.setup.load()?;
    let (input, labels) = m.prompt(&args.prompt)?;
    let target = args
        .target
        .as_deref()
        .map(|t| m.token("--target", t))
        .transpose()?;
    let options = LensOptions {
        top_k: args.top_k,
        target,
    };
    let Some(lens) = analysis::logit_lens(&mut m.fm, &input, &options)? else {
        return Ok(());
    };
    let ids = first_row(&lens.top_ids)?; // [points, seq, k]
    let probs = first_row(&lens.top_probs)?;
    let mut out = std::io::stdout().lock();
    for (p, label) in labels.iter().enumerate() {
        writeln!(out, "position {p} {label:?}:")?;
        for (i, point) in lens.points.iter().enumerate() {
            let ids = ids.get(i)?.get(p)?.to_vec1::<u32>()?;
            let probs = probs.get(i)?.get(p)?.to_vec1::<f32>()?;
            let top: Vec<String> = ids
                .iter()
                .zip(&probs)
                .map(|(&id, pr)| format!("{:?} {pr:.3}", m.label(id)))
                .collect();
            let target = match (&lens.target_probs, &lens.target_ranks) {
                (Some(tp), Some(tr)) => format!(
                    "   target p={:.3} rank {}",
                    tp.get(i)?.get(0)?.get(p)?.to_scalar::<f32>()?,
                    tr.get(i)?.get(0)?.get(p)?.to_scalar::<u32>()?
                ),
                _ => String::new(),
            };
            writeln!(out, "  {point:24} {}{target}", top.join("  "))?;
        }
    }
    args.png.draw(|| {
        // probability of the target (or of the final top token) at each layer and position
        let values = match &lens.target_probs {
            Some(tp) => first_row(tp)?,
            None => first_row(&lens.final_token_probs)?,
        };
        let title = match &args.target {
            Some(t) => format!("logit lens: p({t:?})"),
            None => "logit lens: p(final top token)".to_string(),
        };
        let cols = position_labels(&labels);
        Ok(Heatmap::new(
            title,
            &values,
            lens.points.clone(),
            cols,
            Scale::Sequential,
        )?)
    })
}

// ---------------------------------------------------------------------------------------------

/// Arguments of `flexmodel dla`.
#[derive(clap::Args)]
pub struct DlaArgs {
    /// The prompt; the logit of its next token is attributed.
    #[arg(long)]
    prompt: String,

    /// The token whose logit to attribute (text of one token, or #ID).
    #[arg(long)]
    token: String,

    /// Attribute the logit difference `token - versus` instead.
    #[arg(long)]
    versus: Option<String>,

    /// Components to print, largest first.
    #[arg(long, default_value_t = 12)]
    top: usize,

    #[command(flatten)]
    png: PngOpt,

    #[command(flatten)]
    setup: Setup,
}

/// `flexmodel dla`.
pub fn dla(args: DlaArgs) -> Result<()> {
    args.png.check()?;
    let mut m = args.setup.load()?;
    let (input, _) = m.prompt(&args.prompt)?;
    let token = m.token("--token", &args.token)?;
    let direction = match &args.versus {
        Some(v) => Direction::Diff(token, m.token("--versus", v)?),
        None => Direction::Token(token),
    };
    let Some(dla) = analysis::direct_logit_attribution(&mut m.fm, &input, direction)? else {
        return Ok(());
    };
    let values = dla.values.get(0)?.to_vec1::<f32>()?;
    let what = match &args.versus {
        Some(v) => format!("logit({:?}) - logit({v:?})", args.token),
        None => format!("logit({:?})", args.token),
    };
    let logit = dla.logit.get(0)?.to_scalar::<f32>()?;
    let bias = dla.bias.get(0)?.to_scalar::<f32>()?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{what} = {logit:.4} = sum of {} components + bias {bias:.4}",
        values.len()
    )?;
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()));
    for &i in order.iter().take(args.top) {
        writeln!(out, "  {:+10.4}  {}", values[i], dla.components[i])?;
    }
    args.png.draw(|| {
        // layers × (heads, then the MLP); the embeddings and biases are printed
        let layers = m.fm.model().info().decoder_layers.clone();
        let heads = dla
            .components
            .iter()
            .filter(|c| c.contains(".head."))
            .count()
            / layers.len().max(1);
        let mut grid = vec![vec![0f32; heads + 1]; layers.len()];
        for (c, v) in dla.components.iter().zip(&values) {
            let Some(l) = layers.iter().position(|l| c.starts_with(&format!("{l}."))) else {
                continue;
            };
            if let Some(h) = c
                .rsplit_once(".head.")
                .and_then(|(_, h)| h.parse::<usize>().ok())
            {
                grid[l][h] = *v;
            } else if c.ends_with(".mlp") {
                grid[l][heads] = *v;
            }
        }
        let mut cols: Vec<String> = (0..heads).map(|h| format!("head {h}")).collect();
        cols.push("mlp".into());
        Ok(Heatmap {
            title: format!("direct logit attribution of {what}"),
            values: grid,
            rows: layers,
            cols,
            scale: Scale::Diverging,
        })
    })
}

// ---------------------------------------------------------------------------------------------

/// What a sweep patches, on the command line.
#[derive(Clone, Copy, ValueEnum)]
enum SiteArg {
    /// Each decoder layer's output (the residual stream), per position.
    Resid,
    /// Each attention module's output, per position.
    Attn,
    /// Each MLP's output, per position.
    Mlp,
    /// Each attention head's output, all positions.
    Heads,
}

impl From<SiteArg> for SweepSite {
    fn from(s: SiteArg) -> Self {
        match s {
            SiteArg::Resid => SweepSite::Resid,
            SiteArg::Attn => SweepSite::Attn,
            SiteArg::Mlp => SweepSite::Mlp,
            SiteArg::Heads => SweepSite::Heads,
        }
    }
}

/// Arguments of `flexmodel patch`.
#[derive(clap::Args)]
pub struct PatchArgs {
    /// The clean prompt (the behaviour to explain).
    #[arg(long)]
    clean: String,

    /// The corrupted prompt: the same number of tokens, the clue changed.
    #[arg(long)]
    corrupted: String,

    /// Metric: the logit of this token (text of one token, or #ID) minus `--wrong`'s at the
    /// last position. Without it the metric is the loss of the prompt's own tokens.
    #[arg(long, requires = "wrong")]
    right: Option<String>,

    /// The other token of the logit difference.
    #[arg(long, requires = "right")]
    wrong: Option<String>,

    /// Which activations to patch.
    #[arg(long, value_enum, default_value_t = SiteArg::Resid)]
    site: SiteArg,

    /// The gradient approximation (attribution patching: one forward and backward pass)
    /// instead of one patched run per cell; one process only.
    #[arg(long)]
    attribution: bool,

    /// Patched copies per forward pass.
    #[arg(long, default_value_t = 16)]
    cells_per_pass: usize,

    /// Write `values` and `normalized` to this safetensors file.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,

    #[command(flatten)]
    png: PngOpt,

    #[command(flatten)]
    setup: Setup,
}

/// `flexmodel patch`.
pub fn patch(args: PatchArgs) -> Result<()> {
    args.png.check()?;
    if let Some(out) = &args.out {
        crate::run::check_out_dir(out)?;
    }
    let mut m = args.setup.load()?;
    let (clean, labels) = m.prompt(&args.clean)?;
    let (corrupted, corrupted_labels) = m.prompt(&args.corrupted)?;
    if labels.len() != corrupted_labels.len() {
        bail!(
            "the clean prompt is {} tokens and the corrupted one {}; patching goes position by              position, so they must have the same length",
            labels.len(),
            corrupted_labels.len()
        );
    }
    let metric = match (&args.right, &args.wrong) {
        (Some(r), Some(w)) => Metric::LogitDiff {
            right: m.token("--right", r)?,
            wrong: m.token("--wrong", w)?,
        },
        _ => Metric::Loss,
    };
    let site = SweepSite::from(args.site);
    let sweep = if args.attribution {
        Some(analysis::attribution_patching(
            &mut m.fm, &clean, &corrupted, metric, site,
        )?)
    } else {
        analysis::patching_sweep(
            &mut m.fm,
            &clean,
            &corrupted,
            metric,
            site,
            args.cells_per_pass,
        )?
    };
    let Some(sweep) = sweep else {
        return Ok(());
    };
    let cols: Vec<String> = match site {
        SweepSite::Heads => (0..sweep.values.dim(1)?)
            .map(|h| format!("head {h}"))
            .collect(),
        _ => position_labels(&labels),
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "metric: clean {:.4}, corrupted {:.4}; normalized recovery (1 = clean) per layer and {}:",
        sweep.clean,
        sweep.corrupted,
        if site == SweepSite::Heads {
            "head"
        } else {
            "position"
        }
    )?;
    let norm = sweep.normalized.to_vec2::<f32>()?;
    write!(out, "{:32}", "")?;
    for c in &cols {
        write!(out, " {:>8}", truncate(c, 8))?;
    }
    writeln!(out)?;
    for (row, name) in norm.iter().zip(&sweep.sites) {
        write!(out, "{:32}", truncate(name, 32))?;
        for v in row {
            write!(out, " {v:>8.3}")?;
        }
        writeln!(out)?;
    }
    if let Some(path) = &args.out {
        crate::safetensors_io::write_atomic(
            path,
            &[
                ("values".into(), sweep.values.clone()),
                ("normalized".into(), sweep.normalized.clone()),
            ],
        )?;
        writeln!(out, "wrote {}", path.display())?;
    }
    let how = if args.attribution {
        "attribution patching"
    } else {
        "activation patching"
    };
    args.png.draw(|| {
        Ok(Heatmap::new(
            format!("{how}: recovery of the clean metric"),
            &sweep.normalized,
            sweep.sites.clone(),
            cols,
            Scale::Diverging,
        )?)
    })
}

// ---------------------------------------------------------------------------------------------

/// Which head score a picture shows.
#[derive(Clone, Copy, ValueEnum)]
enum ScoreArg {
    PreviousToken,
    Induction,
    DuplicateToken,
}

/// Arguments of `flexmodel heads`.
#[derive(clap::Args)]
pub struct HeadsArgs {
    /// Tokens in each half of the repeated random sequences.
    #[arg(long, default_value_t = 40)]
    half: usize,

    /// Sequences.
    #[arg(long, default_value_t = 8)]
    batch: usize,

    /// Seed of the random tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// The score the picture shows.
    #[arg(long, value_enum, default_value_t = ScoreArg::Induction)]
    score: ScoreArg,

    #[command(flatten)]
    png: PngOpt,

    #[command(flatten)]
    setup: Setup,
}

/// `flexmodel heads`.
pub fn heads(args: HeadsArgs) -> Result<()> {
    args.png.check()?;
    let mut m = args.setup.load()?;
    let vocab = m.fm.model().info().vocab_size as u32;
    // the tokenizer's first id is its special token: sequences start with it, as documents do
    let ids = analysis::repeated_tokens(vocab, 1, args.half, args.batch, args.seed, Some(0))?;
    let Some(scores) = analysis::head_scores(&mut m.fm, &Input::new(ids), args.half)? else {
        return Ok(());
    };
    let mut out = std::io::stdout().lock();
    for (name, t) in [
        ("previous-token", &scores.previous_token),
        ("induction", &scores.induction),
        ("duplicate-token", &scores.duplicate_token),
    ] {
        writeln!(out, "{name} scores (layer × head):")?;
        for (layer, row) in scores.layers.iter().zip(t.to_vec2::<f32>()?) {
            let row: Vec<String> = row.iter().map(|v| format!("{v:.3}")).collect();
            writeln!(out, "  {layer:32} {}", row.join(" "))?;
        }
    }
    args.png.draw(|| {
        let (name, t) = match args.score {
            ScoreArg::PreviousToken => ("previous-token", &scores.previous_token),
            ScoreArg::Induction => ("induction", &scores.induction),
            ScoreArg::DuplicateToken => ("duplicate-token", &scores.duplicate_token),
        };
        let cols = (0..t.dim(1)?).map(|h| format!("head {h}")).collect();
        Ok(Heatmap::new(
            format!("{name} score"),
            t,
            scores.layers.clone(),
            cols,
            Scale::Sequential,
        )?)
    })
}

// ---------------------------------------------------------------------------------------------

/// Arguments of `flexmodel pattern`.
#[derive(clap::Args)]
pub struct PatternArgs {
    /// The prompt.
    #[arg(long)]
    prompt: String,

    /// Decoder layer (0-based).
    #[arg(long)]
    layer: usize,

    /// Attention head (0-based).
    #[arg(long)]
    head: usize,

    #[command(flatten)]
    png: PngOpt,

    #[command(flatten)]
    setup: Setup,
}

/// `flexmodel pattern`: one head's attention pattern, tokens on both axes.
pub fn pattern(args: PatternArgs) -> Result<()> {
    if args.png.png.is_none() {
        bail!("flexmodel pattern draws a picture: give --png FILE.png");
    }
    args.png.check()?;
    let mut m = args.setup.load()?;
    let (input, labels) = m.prompt(&args.prompt)?;
    let layers = m.fm.model().info().decoder_layers.len();
    if args.layer >= layers {
        bail!(
            "--layer {}: the model has {layers} layers (0..{layers})",
            args.layer
        );
    }
    let site = format!(
        "{}.hook_attn_probs",
        analysis::attention_sites(&m.fm)?[args.layer]
    );
    m.fm.register(flexmodel::HookFunction::new(site.as_str()))?;
    m.fm.forward_input(&input)?;
    if !m.grid.is_root() {
        return Ok(());
    }
    let probs =
        m.fm.output()
            .last(&site)
            .with_context(|| format!("no capture of {site}"))?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?;
    let heads = probs.dim(1)?;
    if args.head >= heads {
        bail!(
            "--head {}: {site} has {heads} heads (0..{heads})",
            args.head
        );
    }
    let pattern = probs.get(0)?.get(args.head)?; // [query, key]
    let tokens = position_labels(&labels);
    args.png.draw(|| {
        Ok(Heatmap::new(
            format!(
                "attention of layer {} head {} (rows: queries)",
                args.layer, args.head
            ),
            &pattern,
            tokens.clone(),
            tokens,
            Scale::Sequential,
        )?)
    })
}

// ---------------------------------------------------------------------------------------------

/// `[points, batch, ...]` → its first row, `[points, ...]`.
fn first_row(t: &Tensor) -> Result<Tensor> {
    Ok(t.narrow(1, 0, 1)?.squeeze(1)?)
}

/// `0 "def"`, `1 " f"`, ...: a position and its token.
fn position_labels(labels: &[String]) -> Vec<String> {
    labels
        .iter()
        .enumerate()
        .map(|(i, l)| format!("{i} {l:?}"))
        .collect()
}

fn truncate(s: &str, n: usize) -> String {
    let count = s.chars().count();
    if count <= n {
        s.to_string()
    } else {
        s.chars().skip(count - n).collect()
    }
}
