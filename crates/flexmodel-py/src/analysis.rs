//! The analyses and SAEs for Python: thin calls of `flexmodel::analysis` and `flexmodel::sae`
//! on a wrapped model. Results come back as dicts of raw tensors (rank 0; `None` elsewhere).

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use flexmodel::analysis::{self, Direction, LensOptions, Metric, SweepSite};
use flexmodel::sae::{self, FeatureEdit, Sae};
use flexmodel::{Device, Input};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::error;
use crate::model::{PyModel, input, lock, raw};
use crate::tensor::{RawTensor, from_bytes};

/// The logit lens of one forward pass.
#[pyfunction]
#[pyo3(signature = (model, ids, shape, mask, top_k, target))]
pub(crate) fn logit_lens<'py>(
    py: Python<'py>,
    model: &PyModel,
    ids: &Bound<'_, PyBytes>,
    shape: (usize, usize),
    mask: Option<&Bound<'_, PyBytes>>,
    top_k: usize,
    target: Option<u32>,
) -> PyResult<Option<Bound<'py, PyDict>>> {
    let input = input(ids, shape, mask)?;
    let options = LensOptions { top_k, target };
    let Some(lens) = model.run(py, |fm| analysis::logit_lens(fm, &input, &options))? else {
        return Ok(None);
    };
    let d = PyDict::new(py);
    d.set_item("points", lens.points)?;
    d.set_item("top_ids", raw(&lens.top_ids)?)?;
    d.set_item("top_probs", raw(&lens.top_probs)?)?;
    d.set_item("final_token_probs", raw(&lens.final_token_probs)?)?;
    d.set_item(
        "target_probs",
        lens.target_probs.as_ref().map(raw).transpose()?,
    )?;
    d.set_item(
        "target_ranks",
        lens.target_ranks.as_ref().map(raw).transpose()?,
    )?;
    Ok(Some(d))
}

/// Direct logit attribution of each row's last position.
#[pyfunction]
#[pyo3(signature = (model, ids, shape, mask, token, versus))]
pub(crate) fn direct_logit_attribution<'py>(
    py: Python<'py>,
    model: &PyModel,
    ids: &Bound<'_, PyBytes>,
    shape: (usize, usize),
    mask: Option<&Bound<'_, PyBytes>>,
    token: u32,
    versus: Option<u32>,
) -> PyResult<Option<Bound<'py, PyDict>>> {
    let input = input(ids, shape, mask)?;
    let direction = match versus {
        Some(v) => Direction::Diff(token, v),
        None => Direction::Token(token),
    };
    let found = model.run(py, |fm| {
        analysis::direct_logit_attribution(fm, &input, direction)
    })?;
    let Some(a) = found else {
        return Ok(None);
    };
    let d = PyDict::new(py);
    d.set_item("components", a.components)?;
    d.set_item("values", raw(&a.values)?)?;
    d.set_item("bias", raw(&a.bias)?)?;
    d.set_item("logit", raw(&a.logit)?)?;
    Ok(Some(d))
}

/// An activation-patching sweep (exact, or attribution patching).
#[pyfunction]
#[pyo3(signature = (model, clean, corrupted, shape, right, wrong, site, attribution, cells_per_pass))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn patching_sweep<'py>(
    py: Python<'py>,
    model: &PyModel,
    clean: &Bound<'_, PyBytes>,
    corrupted: &Bound<'_, PyBytes>,
    shape: (usize, usize),
    right: Option<u32>,
    wrong: Option<u32>,
    site: &str,
    attribution: bool,
    cells_per_pass: usize,
) -> PyResult<Option<Bound<'py, PyDict>>> {
    let (clean, corrupted) = (input(clean, shape, None)?, input(corrupted, shape, None)?);
    let metric = match (right, wrong) {
        (Some(right), Some(wrong)) => Metric::LogitDiff { right, wrong },
        (None, None) => Metric::Loss,
        _ => {
            return Err(PyValueError::new_err(
                "give both right and wrong (a logit difference), or neither (the loss)",
            ));
        }
    };
    let site = match site {
        "resid" => SweepSite::Resid,
        "attn" => SweepSite::Attn,
        "mlp" => SweepSite::Mlp,
        "heads" => SweepSite::Heads,
        other => {
            return Err(PyValueError::new_err(format!(
                "site {other:?}: use \"resid\", \"attn\", \"mlp\" or \"heads\""
            )));
        }
    };
    let sweep = model.run(py, |fm| match attribution {
        true => analysis::attribution_patching(fm, &clean, &corrupted, metric, site).map(Some),
        false => analysis::patching_sweep(fm, &clean, &corrupted, metric, site, cells_per_pass),
    })?;
    let Some(s) = sweep else {
        return Ok(None);
    };
    let d = PyDict::new(py);
    d.set_item("sites", s.sites)?;
    d.set_item("values", raw(&s.values)?)?;
    d.set_item("normalized", raw(&s.normalized)?)?;
    d.set_item("clean", s.clean)?;
    d.set_item("corrupted", s.corrupted)?;
    Ok(Some(d))
}

/// Head scores on repeated random tokens.
#[pyfunction]
#[pyo3(signature = (model, half, batch, seed))]
pub(crate) fn head_scores<'py>(
    py: Python<'py>,
    model: &PyModel,
    half: usize,
    batch: usize,
    seed: u64,
) -> PyResult<Option<Bound<'py, PyDict>>> {
    let scores = model.run(py, |fm| {
        let vocab = fm.model().info().vocab_size as u32;
        let ids = analysis::repeated_tokens(vocab, 1, half, batch, seed, Some(0))?;
        analysis::head_scores(fm, &Input::new(ids), half)
    })?;
    let Some(s) = scores else {
        return Ok(None);
    };
    let d = PyDict::new(py);
    d.set_item("layers", s.layers)?;
    d.set_item("previous_token", raw(&s.previous_token)?)?;
    d.set_item("induction", raw(&s.induction)?)?;
    d.set_item("duplicate_token", raw(&s.duplicate_token)?)?;
    Ok(Some(d))
}

/// Attaches the SAE in `dir` at `site` (default: its `hook_name`) with feature edits given as
/// `(op, feature, value)`: `("zero", f, 0)`, `("clamp", f, v)`, `("scale", f, factor)`.
/// Returns the hook id and the site.
#[pyfunction]
#[pyo3(signature = (model, dir, site, edits))]
pub(crate) fn attach_sae(
    model: &PyModel,
    dir: PathBuf,
    site: Option<String>,
    edits: Vec<(String, usize, f32)>,
) -> PyResult<(u64, String)> {
    let sae = Sae::load(&dir).map_err(|e| error::core(&e))?;
    let site = match site.or_else(|| sae.hook_name().map(str::to_string)) {
        Some(s) => s,
        None => {
            return Err(PyValueError::new_err(format!(
                "{}'s cfg.json names no hook_name: give the site",
                dir.display()
            )));
        }
    };
    let edits = edits
        .into_iter()
        .map(|(op, feature, value)| match op.as_str() {
            "zero" => Ok(FeatureEdit::Zero(feature)),
            "clamp" => Ok(FeatureEdit::Clamp { feature, value }),
            "scale" => Ok(FeatureEdit::Scale {
                feature,
                factor: value,
            }),
            other => Err(PyValueError::new_err(format!(
                "feature edit {other:?}: use \"zero\", \"clamp\" or \"scale\""
            ))),
        })
        .collect::<PyResult<Vec<_>>>()?;
    let handle =
        sae::attach(model.model()?.get(), &site, sae, edits).map_err(|e| error::core(&e))?;
    let id = model.next_id.fetch_add(1, Ordering::Relaxed);
    lock(&model.handles).insert(id, handle);
    Ok((id, site))
}

/// Features of f32 activations `x` (`[..., d_in]`, C order) under the SAE in `dir`, and their
/// reconstruction.
#[pyfunction]
pub(crate) fn sae_encode(
    dir: PathBuf,
    x: &Bound<'_, PyBytes>,
    shape: Vec<usize>,
) -> PyResult<(RawTensor, RawTensor)> {
    let sae = Sae::load(&dir).map_err(|e| error::core(&e))?;
    let x = from_bytes(x, "float32", &shape, &Device::Cpu)?;
    let f = sae.encode(&x).map_err(|e| error::core(&e))?;
    let r = sae.decode(&f).map_err(|e| error::core(&e))?;
    Ok((raw(&f)?, raw(&r)?))
}
