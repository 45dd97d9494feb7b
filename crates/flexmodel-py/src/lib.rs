//! The native module of the `flexmodel` Python package: thin bindings over the `flexmodel`
//! crate (no model logic here). The package's Python half (`python/flexmodel`) builds the
//! public API on it: hook functions written in Python, numpy and torch arrays, errors.

mod analysis;
mod dist;
mod edit;
mod error;
mod model;
mod tensor;

use pyo3::prelude::*;

/// flexmodel's native module.
#[pymodule]
fn _flexmodel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<model::PyModel>()?;
    m.add_class::<model::PyTokenizer>()?;
    m.add_class::<tensor::RawTensor>()?;
    m.add_function(wrap_pyfunction!(model::load, m)?)?;
    m.add_function(wrap_pyfunction!(model::resolve, m)?)?;
    m.add_function(wrap_pyfunction!(model::hub_name, m)?)?;
    m.add_function(wrap_pyfunction!(model::read_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(dist::rank, m)?)?;
    m.add_function(wrap_pyfunction!(dist::world_size, m)?)?;
    m.add_function(wrap_pyfunction!(dist::has_mpi, m)?)?;
    m.add_function(wrap_pyfunction!(dist::broadcast_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(dist::idle_barrier, m)?)?;
    m.add_function(wrap_pyfunction!(dist::abort, m)?)?;
    m.add_function(wrap_pyfunction!(dist::shutdown, m)?)?;
    m.add_function(wrap_pyfunction!(analysis::logit_lens, m)?)?;
    m.add_function(wrap_pyfunction!(analysis::direct_logit_attribution, m)?)?;
    m.add_function(wrap_pyfunction!(analysis::patching_sweep, m)?)?;
    m.add_function(wrap_pyfunction!(analysis::head_scores, m)?)?;
    m.add_function(wrap_pyfunction!(analysis::attach_sae, m)?)?;
    m.add_function(wrap_pyfunction!(analysis::sae_encode, m)?)?;
    m.add("SUPPORTED", flexmodel::SUPPORTED.to_vec())?;
    m.add("HAS_CUDA", cfg!(feature = "cuda"))?;
    Ok(())
}
