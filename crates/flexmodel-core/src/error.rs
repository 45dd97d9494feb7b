//! The error type of flexmodel-core.

use candle_core::DType;

/// Errors raised while registering hooks or running a hooked forward pass.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A hook was registered for a site name that the model does not have.
    #[error("unknown site `{name}`{}", did_you_mean(suggestions))]
    UnknownSite {
        /// The name as given.
        name: String,
        /// The closest valid site names.
        suggestions: Vec<String>,
    },

    /// A glob pattern matched no site.
    #[error("pattern `{pattern}` matches no site{}", did_you_mean(suggestions))]
    NoMatch {
        /// The pattern as given.
        pattern: String,
        /// The closest valid site names.
        suggestions: Vec<String>,
    },

    /// An activation does not have the shape the hook expected.
    #[error(
        "site `{site}`: expected shape {}, got {got:?}",
        shape_pattern(expected)
    )]
    ShapeMismatch {
        /// The site that fired.
        site: String,
        /// The shape the hook was registered with (`None`: any size).
        expected: Vec<Option<usize>>,
        /// The shape of the activation.
        got: Vec<usize>,
    },

    /// An editing function returned a tensor whose shape or dtype differs from its input.
    #[error(
        "site `{site}`: the editing function returned shape {got:?} {got_dtype:?}, \
         the activation is {expected:?} {expected_dtype:?}; an edit must keep shape and dtype"
    )]
    BadEdit {
        /// The site that fired.
        site: String,
        /// Shape of the activation given to the function.
        expected: Vec<usize>,
        /// Dtype of the activation given to the function.
        expected_dtype: DType,
        /// Shape of the returned tensor.
        got: Vec<usize>,
        /// Dtype of the returned tensor.
        got_dtype: DType,
    },

    /// A hook function failed; `source` is its error.
    #[error("hook at site `{site}` failed")]
    Hook {
        /// The site that fired.
        site: String,
        /// What the hook function returned.
        #[source]
        source: Box<Error>,
    },

    /// No hook has this handle (it was removed already, or belongs to another wrapper).
    #[error("no hook with handle {0}")]
    UnknownHook(u64),

    /// A pre-hook was registered on a site that is not a module (it has no input).
    #[error(
        "`{0}` is not a module, so it has no input to pre-hook; pre-hooks attach to Hugging Face \
         modules (use a forward hook for attention internals)"
    )]
    NotAModule(String),

    /// A group name that was never created.
    #[error("no hook group `{name}` (groups: {groups:?})")]
    UnknownGroup {
        /// The name as given.
        name: String,
        /// The groups that exist.
        groups: Vec<String>,
    },

    /// A parameter name the model does not have.
    #[error("no parameter `{name}`{}", did_you_mean(suggestions))]
    UnknownParameter {
        /// The name as given.
        name: String,
        /// The closest parameter names.
        suggestions: Vec<String>,
    },

    /// A backward pass that cannot run or did not reach a hook.
    #[error("backward: {0}")]
    Backward(String),

    /// A tensor layout cannot be split over the requested number of ranks.
    #[error("{0}")]
    Layout(String),

    /// The model input is malformed.
    #[error("bad input: {0}")]
    Input(String),

    /// An error from a hook function or model code that is not a tensor error.
    #[error("{0}")]
    Msg(String),

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// An error carrying a plain message, for hook functions that reject their input.
    pub fn msg(message: impl Into<String>) -> Self {
        Self::Msg(message.into())
    }
}

/// `[1, any, 64]`.
fn shape_pattern(dims: &[Option<usize>]) -> String {
    let dims: Vec<String> = dims
        .iter()
        .map(|d| d.map_or_else(|| "any".to_string(), |n| n.to_string()))
        .collect();
    format!("[{}]", dims.join(", "))
}

fn did_you_mean(suggestions: &[String]) -> String {
    match suggestions {
        [] => String::new(),
        _ => format!("; did you mean {}?", quoted_list(suggestions)),
    }
}

fn quoted_list(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The result type of flexmodel-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;
