//! `flexmodel sites`: every hook site of a model.

use std::io::Write;

use anyhow::Result;
use clap::ValueEnum;

use crate::opts::ModelOpts;

/// Arguments of `flexmodel sites`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelOpts,

    /// Output format: `text` (name and shape template per line) or `json` (adds kind and
    /// tensor-parallel layout).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

pub fn main(args: Args) -> Result<()> {
    let sites = flexmodel::sites(args.model.dir()?)?;
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Text => {
            let width = sites.iter().map(|(_, s)| s.name.len()).max().unwrap_or(0);
            for (_, site) in sites.iter() {
                let shape: Vec<String> = site.shape.iter().map(ToString::to_string).collect();
                writeln!(out, "{:width$}  [{}]", site.name, shape.join(", "))?;
            }
        }
        Format::Json => {
            let list: Vec<_> = sites.iter().map(|(_, s)| s).collect();
            serde_json::to_writer_pretty(&mut out, &list)?;
            writeln!(out)?;
        }
    }
    Ok(())
}
