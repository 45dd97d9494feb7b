//! Models named as on the Hugging Face Hub (`gpt2`, `meta-llama/Llama-3.2-1B@main`), found in
//! the local Hub cache where `transformers`, `huggingface_hub` or `hf download` put them.
//!
//! The cache is the one `huggingface_hub` uses: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`. A model `org/name` at
//! revision `rev` (default `main`) is the snapshot `models--org--name/snapshots/<commit>`,
//! where `refs/<rev>` holds the commit (a revision may also be the commit itself). Nothing is
//! downloaded here: the Python package downloads through `huggingface_hub` when it is
//! installed, and the error says how to download otherwise.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The model directory `model` names: `model` itself when it is a directory, else the
/// snapshot of the Hub model `model` (`org/name` or `name`, optionally `@revision`) in the
/// local Hub cache.
///
/// # Errors
/// [`Error::ModelNotFound`] when `model` is neither a directory nor a cached Hub model,
/// saying where it looked and how to download it.
pub fn resolve(model: impl AsRef<Path>) -> Result<PathBuf> {
    let model = model.as_ref();
    if model.is_dir() {
        return Ok(model.to_path_buf());
    }
    let name = model.to_string_lossy();
    let not_found = |cache: Option<PathBuf>| Error::ModelNotFound {
        model: name.to_string(),
        cache,
    };
    let Some((repo, revision)) = hub_name(&name) else {
        return Err(not_found(None));
    };
    let Some(cache) = cache_dir() else {
        return Err(not_found(None));
    };
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    snapshot(&folder, revision).ok_or_else(|| not_found(Some(cache)))
}

/// `(repo, revision)` of a Hub name (`org/name` or `name`, optionally `@revision`; the
/// revision defaults to `main`), `None` for something that cannot be one (an absolute or
/// relative path, more than one `/`, characters the Hub does not allow).
pub fn hub_name(name: &str) -> Option<(&str, &str)> {
    let (repo, revision) = match name.split_once('@') {
        // A revision is a branch, tag or commit; `refs/pr/N` is a path under `refs/` too.
        Some((repo, revision))
            if !revision.is_empty()
                && !revision.starts_with('/')
                && !revision.split('/').any(|p| p == ".." || p == ".") =>
        {
            (repo, revision)
        }
        Some(_) => return None,
        None => (name, "main"),
    };
    let parts: Vec<&str> = repo.split('/').collect();
    let valid = |part: &&str| {
        !part.is_empty()
            && !part.starts_with('.')
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (parts.len() <= 2 && parts.iter().all(valid)).then_some((repo, revision))
}

/// The Hub cache directory, as `huggingface_hub` finds it.
fn cache_dir() -> Option<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| var("HF_HOME").map(|home| home.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// The snapshot of `revision` in a model's cache folder, if it holds a config.
fn snapshot(folder: &Path, revision: &str) -> Option<PathBuf> {
    let commit = std::fs::read_to_string(folder.join("refs").join(revision))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.starts_with('.') {
        return None;
    }
    let dir = folder.join("snapshots").join(commit);
    dir.join("config.json").is_file().then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::hub_name;

    #[test]
    fn hub_names_and_paths_are_told_apart() {
        assert_eq!(hub_name("gpt2"), Some(("gpt2", "main")));
        assert_eq!(
            hub_name("meta-llama/Llama-3.2-1B@v1.0"),
            Some(("meta-llama/Llama-3.2-1B", "v1.0"))
        );
        assert_eq!(hub_name("org/m@refs/pr/1"), Some(("org/m", "refs/pr/1")));
        for path in [
            "./models/x",
            "/abs/model",
            "a/b/c",
            "models/",
            "x@",
            "../up",
            "",
            "org/m@../../x",
            "org/m@/etc",
        ] {
            assert_eq!(hub_name(path), None, "{path}");
        }
    }
}
