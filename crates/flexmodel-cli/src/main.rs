//! `flexmodel`: list the sites of a model, capture and edit its activations.
//!
//! Exit codes: 0 success, 1 error (the message says what and how to fix it), 2 bad usage.

mod analyze;
mod bench;
mod check;
mod edit;
mod generate;
mod harvest;
mod opts;
mod parallel;
mod run;
mod safetensors_io;
mod sites;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Read and edit any activation of a Hugging Face language model.
#[derive(Parser)]
#[command(name = "flexmodel", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    /// More logging on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    /// Fail (exit 1) when this process's peak resident memory (Linux's VmHWM, checked as the
    /// command finishes; under mpirun each rank checks its own) exceeded MB megabytes: a
    /// check that a job fits a machine (see --offload, --fsdp).
    #[arg(long, global = true, value_name = "MB")]
    max_memory: Option<f64>,
}

#[derive(Subcommand)]
enum Command {
    /// List every hook site of a model, one per line, name first.
    Sites(sites::Args),
    /// Run a forward pass, capturing and editing activations; write them to a safetensors file.
    Run(run::Args),
    /// Generate text with a key/value cache, with captures and edits at every step.
    Generate(generate::Args),
    /// Store the activations of chosen sites over a dataset: safetensors shards and a
    /// manifest, bounded in memory, resumable.
    Harvest(harvest::Args),
    /// Time a forward pass with the everyday capture jobs on this machine and device.
    Bench(bench::Args),
    /// Logit lens: every layer's residual stream decoded through the final norm and head.
    Lens(analyze::LensArgs),
    /// Direct logit attribution: each head's and MLP's share of the next token's logit.
    Dla(analyze::DlaArgs),
    /// Activation patching: patch each layer × position (or head) from a clean prompt into a
    /// corrupted one and watch a metric recover; exact or by attribution patching.
    Patch(analyze::PatchArgs),
    /// Head scores: previous-token, induction and duplicate-token, for every head.
    Heads(analyze::HeadsArgs),
    /// Draw one attention head's pattern on a prompt.
    Pattern(analyze::PatternArgs),
    /// Check this machine's setup: the build, the device against the CPU, and each collective
    /// of the job's communicator (run under mpirun to check a multi-rank job).
    Check(check::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Sites(args) => sites::main(args),
        Command::Run(args) => run::main(args),
        Command::Generate(args) => generate::main(args),
        Command::Harvest(args) => harvest::main(args),
        Command::Bench(args) => bench::main(args),
        Command::Check(args) => check::main(args),
        Command::Lens(args) => analyze::lens(args),
        Command::Dla(args) => analyze::dla(args),
        Command::Patch(args) => analyze::patch(args),
        Command::Heads(args) => analyze::heads(args),
        Command::Pattern(args) => analyze::pattern(args),
    };
    let result = result.and_then(|()| check_memory(cli.max_memory));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `flexmodel sites | head`: the reader left, nothing to report.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs this process's peak resident memory, and fails when it exceeded `budget` MB.
fn check_memory(budget: Option<f64>) -> anyhow::Result<()> {
    let Some(peak) = flexmodel::harvest::peak_rss().map(|bytes| bytes as f64 / 1e6) else {
        anyhow::ensure!(
            budget.is_none(),
            "--max-memory needs /proc/self/status (Linux) to read the peak memory"
        );
        return Ok(());
    };
    tracing::info!("peak resident memory {peak:.1} MB");
    match budget {
        Some(budget) if peak > budget => anyhow::bail!(
            "peak resident memory {peak:.1} MB exceeded --max-memory {budget} MB: hold fewer \
             weights per process with --offload disk, --fsdp N or --tp N"
        ),
        _ => Ok(()),
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    let broken = Some(std::io::ErrorKind::BrokenPipe);
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().map(|io| io.kind()) == broken
            || c.downcast_ref::<serde_json::Error>()
                .and_then(|j| j.io_error_kind())
                == broken
    })
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
