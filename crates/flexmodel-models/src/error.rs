//! The error type of flexmodel-models.

use std::path::PathBuf;

/// Errors raised while loading a model directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },

    /// `config.json` is malformed or lacks a required field.
    #[error("{}: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// The `model_type` is not one flexmodel implements.
    #[error("unsupported model_type `{model_type}`; supported: {}", supported.join(", "))]
    UnknownArchitecture {
        /// The `model_type` of the config.
        model_type: String,
        /// What would be accepted.
        supported: Vec<&'static str>,
    },

    /// A configuration option (or value) that flexmodel does not implement. Loading stops
    /// rather than running a silently different model.
    #[error("unsupported config option {option} = {value}: {hint}")]
    Unsupported {
        /// The option's name in `config.json`.
        option: String,
        /// Its value.
        value: String,
        /// What is supported instead.
        hint: String,
    },

    /// A weight the architecture needs is not in the checkpoint.
    #[error(
        "tensor `{name}` is missing from the checkpoint{}",
        nearest_names(nearest)
    )]
    MissingTensor {
        /// The weight's name.
        name: String,
        /// The closest names the checkpoint has.
        nearest: Vec<String>,
    },

    /// A weight has another shape than the config implies.
    #[error("tensor `{name}` has shape {got:?}, the config implies {expected:?}")]
    TensorShape {
        /// The weight's name.
        name: String,
        /// Shape implied by `config.json`.
        expected: Vec<usize>,
        /// Shape in the file.
        got: Vec<usize>,
    },

    /// A safetensors file is truncated or malformed.
    #[error("{}: {message}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A model that is neither a directory nor a Hub model in the local Hub cache.
    #[error("{}", model_not_found(model, cache.as_deref()))]
    ModelNotFound {
        /// What was asked for.
        model: String,
        /// The Hub cache searched, when `model` can be a Hub name.
        cache: Option<PathBuf>,
    },

    /// The directory holds no weights.
    #[error(
        "no weights in {}: expected model.safetensors or model.safetensors.index.json",
        dir.display()
    )]
    NoWeights {
        /// The model directory.
        dir: PathBuf,
    },

    /// Text was given but the model directory has no tokenizer.
    #[error(
        "{} has no tokenizer.json, so text prompts cannot be tokenized; pass token ids instead \
         (`--input-ids FILE.safetensors` holding an I64 `input_ids` [batch, seq])",
        dir.display()
    )]
    NoTokenizer {
        /// The model directory.
        dir: PathBuf,
    },

    /// A device that cannot be opened (see [`device`](crate::device)).
    #[error("{0}")]
    Device(String),

    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// An error of the hook runtime.
    #[error(transparent)]
    Core(#[from] flexmodel_core::Error),

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn model_not_found(model: &str, cache: Option<&std::path::Path>) -> String {
    let Some(cache) = cache else {
        return format!(
            "`{model}` is not a model directory: pass a directory holding config.json and \
             *.safetensors, or a Hugging Face Hub name (`org/name`, `org/name@revision`)"
        );
    };
    format!(
        "`{model}` is not a model directory, nor a model in the Hugging Face cache {}: pass a \
         directory holding config.json and *.safetensors, or download the Hub model first \
         (`hf download {model}`; from Python, `flexmodel.load(\"{model}\")` downloads it when \
         huggingface_hub is installed)",
        cache.display()
    )
}

fn nearest_names(names: &[String]) -> String {
    match names {
        [] => String::new(),
        _ => format!(" (nearest names in the checkpoint: {})", names.join(", ")),
    }
}

impl Error {
    pub(crate) fn unsupported(
        option: impl Into<String>,
        value: impl std::fmt::Display,
        hint: impl Into<String>,
    ) -> Self {
        Self::Unsupported {
            option: option.into(),
            value: value.to_string(),
            hint: hint.into(),
        }
    }
}

/// The result type of flexmodel-models.
pub type Result<T, E = Error> = std::result::Result<T, E>;
