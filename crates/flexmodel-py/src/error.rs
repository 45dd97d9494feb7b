//! flexmodel's errors as Python exceptions: the classes of `flexmodel.errors`, with the
//! CLI's messages (the error and its causes, joined by `: `).

use flexmodel::Error;
use flexmodel::harvest::Error as HarvestError;
use pyo3::prelude::*;
use pyo3::types::PyType;

/// The exception class `name` of `flexmodel.errors`.
fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyType>> {
    Ok(py
        .import("flexmodel.errors")?
        .getattr(name)?
        .cast_into::<PyType>()?)
}

/// An exception of class `name` with `message`.
pub(crate) fn raise(name: &str, message: String) -> PyErr {
    Python::attach(|py| match class(py, name) {
        Ok(cls) => PyErr::from_type(cls, message),
        Err(e) => e,
    })
}

/// The error and its causes, as the CLI prints them.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        // Many errors already print their cause.
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// A flexmodel error as the exception a Python user expects: unknown names are `KeyError`s,
/// shapes and inputs `ValueError`s.
pub(crate) fn core(e: &Error) -> PyErr {
    let name = match e {
        Error::UnknownSite { .. } | Error::NoMatch { .. } => "UnknownSiteError",
        Error::UnknownParameter { .. } => "UnknownParameterError",
        Error::UnknownGroup { .. } | Error::UnknownHook(_) => "UnknownGroupError",
        Error::ShapeMismatch { .. } | Error::BadEdit { .. } => "ShapeError",
        Error::Input(_) | Error::NotAModule(_) | Error::Layout(_) => "InputError",
        Error::Backward(_) => "BackwardError",
        Error::Hook { source, .. } => match **source {
            Error::ShapeMismatch { .. } | Error::BadEdit { .. } => "ShapeError",
            _ => "HookError",
        },
        _ => "FlexModelError",
    };
    raise(name, chain(e))
}

/// A loading error.
pub(crate) fn load(e: &flexmodel::LoadError) -> PyErr {
    raise("LoadError", chain(e))
}

/// A harvest error.
pub(crate) fn harvest(e: &HarvestError) -> PyErr {
    match e {
        HarvestError::Model(inner) => core(inner),
        _ => raise("HarvestError", chain(e)),
    }
}

/// A tensor error outside a pass.
pub(crate) fn candle(e: candle_core::Error) -> PyErr {
    raise("FlexModelError", chain(&e))
}

/// An error of the job's ranks (starting MPI, a layout that does not fit).
pub(crate) fn distributed(e: &Error) -> PyErr {
    raise("DistributedError", chain(e))
}
