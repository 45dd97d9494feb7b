//! Reading tensors from and writing them to safetensors files.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use flexmodel::{Device, Tensor};

/// All tensors of a safetensors file, on the CPU.
pub fn read(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        bail!("{}: no such file", path.display());
    }
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{}: not a readable safetensors file", path.display()))
}

/// The tensor `key` of `path`, or an error listing the keys the file has.
pub fn read_key(path: &Path, key: &str) -> Result<Tensor> {
    let mut tensors = read(path)?;
    match tensors.remove(key) {
        Some(t) => Ok(t),
        None => {
            let mut keys: Vec<&String> = tensors.keys().collect();
            keys.sort();
            let near = nearest_hint(key, &keys);
            bail!(
                "{} has no tensor `{key}`{near}; it holds {} tensors",
                path.display(),
                keys.len()
            )
        }
    }
}

fn nearest_hint(key: &str, keys: &[&String]) -> String {
    let near = flexmodel::site::nearest(key, keys.iter().map(|k| k.as_str()), 3);
    match near.as_slice() {
        [] => String::new(),
        names => format!(" (nearest: {})", names.join(", ")),
    }
}

/// Writes `tensors` to `path` atomically: to a temporary file in the same directory, renamed
/// over `path` once complete, so an interrupted run never leaves a half-written file.
pub fn write_atomic(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".flexmodel-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    // Logits and parameters of a GPU model are still on the device; captures never are.
    let contiguous: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(name, t)| Ok((name.as_str(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(contiguous, None, tmp.path())
        .with_context(|| format!("cannot write {}", tmp.path().display()))?;
    tmp.persist(path)
        .with_context(|| format!("cannot move the output into place at {}", path.display()))?;
    Ok(())
}
