//! Editing functions written in Python: the [`Edit`] that calls them, and the autograd op that
//! carries a torch edit's vector-Jacobian product into candle's backward pass.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Tensor};
use flexmodel::{Edit, HookCtx, Point};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::tensor::{RawTensor, from_bytes, host_buffer};

/// What the editing functions of one wrapper share: the first Python exception one raised in
/// the current pass (re-raised to the caller of the pass, traceback and all), and whether the
/// job has several ranks (an exception then ends every rank).
#[derive(Default)]
pub(crate) struct Failures {
    first: Mutex<Option<PyErr>>,
    pub(crate) distributed: bool,
}

impl Failures {
    pub(crate) fn new(distributed: bool) -> Self {
        Self {
            first: Mutex::new(None),
            distributed,
        }
    }

    /// Keeps `e` for the caller of the pass (the first one only), and returns the message the
    /// pass fails with. In a multi-rank job the traceback goes to stderr now: the job ends
    /// before the pass returns.
    fn record(&self, py: Python<'_>, e: PyErr) -> flexmodel::Error {
        let message = e.to_string();
        if self.distributed {
            e.print(py);
        }
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert(e);
        flexmodel::Error::msg(format!("the Python function raised {message}"))
    }

    /// The Python exception of the last pass, if one raised.
    pub(crate) fn take(&self) -> Option<PyErr> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// A Python editing function, called through the package's trampoline
/// (`flexmodel._call_edit`), which builds the context and converts arrays.
pub(crate) struct PyEdit {
    pub(crate) call: Py<PyAny>,
    pub(crate) failures: Arc<Failures>,
}

impl Edit for PyEdit {
    fn edit(&mut self, x: &Tensor, cx: &mut HookCtx<'_>) -> flexmodel::Result<Tensor> {
        Python::attach(|py| {
            self.call_python(py, x, cx)
                .map_err(|e| self.failures.record(py, e))
        })
    }
}

impl PyEdit {
    fn call_python(&self, py: Python<'_>, x: &Tensor, cx: &HookCtx<'_>) -> PyResult<Tensor> {
        // Ctrl-C during a long pass ends it at the next Python hook.
        py.check_signals()?;
        let grad = x.track_op();
        // The function gets the activation's own memory when it may write there: a host tensor
        // that owns its whole storage, outside a gradient pass (autograd keeps the values it
        // saved). Otherwise a copy of its own.
        let zero_copy = !grad && x.is_contiguous() && owns_storage(x);
        let given = if zero_copy {
            x.clone()
        } else {
            x.to_device(&Device::Cpu)
                .and_then(|h| h.copy())
                .map_err(crate::error::candle)?
        };
        let raw = Bound::new(py, RawTensor::writable(given.clone())?)?;
        let point = match cx.point() {
            Point::Output => "output",
            Point::Input => "input",
            Point::Grad => "grad",
        };
        let positions = cx.positions();
        let args = (
            raw,
            cx.site(),
            point,
            cx.step(),
            positions.start,
            positions.end,
            grad,
        );
        let result = self.call.call1(py, args)?;
        let result = result.bind(py);
        if result.is_none() {
            // The function wrote into (or kept) the array it was given.
            if zero_copy || (grad && unchanged(&given, x)?) {
                return Ok(x.clone());
            }
            return given.to_device(x.device()).map_err(crate::error::candle);
        }
        let parts = result.cast::<PyTuple>()?;
        let data = parts.get_item(0)?;
        let dtype: String = parts.get_item(1)?.extract()?;
        let shape: Vec<usize> = parts.get_item(2)?.extract()?;
        let y = from_bytes(data.cast::<PyBytes>()?, &dtype, &shape, x.device())?;
        let vjp = parts.get_item(3)?;
        if !grad || vjp.is_none() {
            return Ok(y);
        }
        // A torch edit in a gradient pass: y joins candle's graph as a function of x whose
        // backward asks torch for the vector-Jacobian product.
        if y.dims() != x.dims() || y.dtype() != x.dtype() {
            // The wrapper reports the mismatch with both shapes.
            return Ok(y);
        }
        let op = TorchVjp {
            vjp: vjp.clone().unbind(),
            failures: self.failures.clone(),
            // Across ranks, rank 0 first probes what the edit's result depends on (one
            // backward pass of its own), then asks for the product in the real one.
            probes: AtomicU32::new(u32::from(self.failures.distributed)),
        };
        x.apply_op2_arc(&y, Arc::new(Box::new(op)))
            .map_err(crate::error::candle)
    }
}

/// Whether `x` is all of its storage (not a view into a larger tensor, which other code may
/// still read).
fn owns_storage(x: &Tensor) -> bool {
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return false;
    };
    layout.start_offset() == 0 && host_buffer(cpu).is_some_and(|(_, n, _)| n == x.elem_count())
}

/// Whether the copy a function was given still equals the activation (it returned it as is).
fn unchanged(given: &Tensor, x: &Tensor) -> PyResult<bool> {
    let x = x
        .detach()
        .to_device(&Device::Cpu)
        .map_err(crate::error::candle)?;
    let same = given
        .eq(&x)
        .and_then(|e| e.to_dtype(candle_core::DType::F32))
        .and_then(|e| e.min_all())
        .and_then(|m| m.to_scalar::<f32>())
        .map_err(crate::error::candle)?;
    Ok(same == 1.0)
}

/// The identity on an edit's result `y` in the forward pass; in the backward pass, torch's
/// vector-Jacobian product of the edit with respect to its input `x`. The torch parameters the
/// edit used accumulate their gradients (`.grad`) in the same call (but for a probe's call).
struct TorchVjp {
    vjp: Py<PyAny>,
    failures: Arc<Failures>,
    /// Backward calls still to come that only probe (torch keeps its graph and the
    /// parameters' `.grad` stay untouched) before the one that counts.
    probes: AtomicU32,
}

impl CustomOp2 for TorchVjp {
    fn name(&self) -> &'static str {
        "flexmodel-torch-edit"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _xl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        flexmodel::copy_of(y, yl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _xl: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        flexmodel::copy_of(y, yl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Python::attach(|py| {
            let result = (|| -> PyResult<Tensor> {
                let raw = RawTensor::read_only(grad)?;
                let probe = self
                    .probes
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok();
                let out = self.vjp.call1(py, (raw, probe))?;
                let out = out.bind(py);
                if out.is_none() {
                    // The edit does not depend on its input.
                    return grad.zeros_like().map_err(crate::error::candle);
                }
                let parts = out.cast::<PyTuple>()?;
                let dtype: String = parts.get_item(1)?.extract()?;
                let shape: Vec<usize> = parts.get_item(2)?.extract()?;
                let data = parts.get_item(0)?;
                let g = from_bytes(data.cast::<PyBytes>()?, &dtype, &shape, x.device())?;
                g.to_dtype(x.dtype()).map_err(crate::error::candle)
            })();
            match result {
                Ok(g) => Ok((Some(g), None)),
                Err(e) => {
                    let message = self.failures.record(py, e).to_string();
                    Err(candle_core::Error::Msg(message))
                }
            }
        })
    }
}
