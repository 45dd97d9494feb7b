//! Tensors across the boundary: host tensors handed to numpy without a copy (the buffer
//! protocol over candle's storage), and arrays from Python read into candle tensors.

use std::ffi::{CStr, c_int, c_void};

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

/// A host tensor that numpy reads in place (`numpy.asarray(raw)`) through the buffer protocol:
/// the array's memory is the tensor's storage, which lives as long as the array does (the
/// buffer holds a reference to this object, which holds the tensor).
#[pyclass(frozen, module = "flexmodel._flexmodel")]
pub struct RawTensor {
    pub(crate) tensor: Tensor,
    /// Whether numpy may write into it (an editing function's argument; captures are
    /// read-only).
    writable: bool,
    /// Address of the first element, and the buffer protocol's format, shape and strides
    /// (bytes), fixed at construction: the storage never moves (candle tensors are immutable
    /// from Rust and this object keeps it alive).
    address: usize,
    format: &'static CStr,
    shape: Box<[isize]>,
    strides: Box<[isize]>,
}

impl RawTensor {
    /// A read-only view of `tensor`, copied to the host first if it lives on a device.
    pub(crate) fn read_only(tensor: &Tensor) -> PyResult<Self> {
        let host = tensor
            .to_device(&Device::Cpu)
            .map_err(crate::error::candle)?;
        Self::new(host, false)
    }

    /// A writable view of a host tensor.
    pub(crate) fn writable(tensor: Tensor) -> PyResult<Self> {
        Self::new(tensor, true)
    }

    fn new(tensor: Tensor, writable: bool) -> PyResult<Self> {
        let (address, format, shape, strides) = {
            let (storage, layout) = tensor.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                return Err(PyValueError::new_err("a device tensor has no host address"));
            };
            let Some((base, _, format)) = host_buffer(cpu) else {
                return Err(PyValueError::new_err(format!(
                    "dtype {:?} has no numpy equivalent",
                    tensor.dtype()
                )));
            };
            let size = tensor.dtype().size_in_bytes();
            let shape = tensor.dims().iter().map(|&d| d as isize).collect();
            let strides = layout
                .stride()
                .iter()
                .map(|&s| (s * size) as isize)
                .collect();
            (base + layout.start_offset() * size, format, shape, strides)
        };
        Ok(Self {
            tensor,
            writable,
            address,
            format,
            shape,
            strides,
        })
    }
}

#[pymethods]
impl RawTensor {
    /// The buffer protocol: numpy's view of the tensor's memory, no copy.
    ///
    /// # Safety
    /// Called by Python with a `Py_buffer` to fill, as the protocol prescribes.
    #[allow(unsafe_code)]
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("no buffer to fill"));
        }
        let this = slf.get();
        if flags & ffi::PyBUF_WRITABLE != 0 && !this.writable {
            return Err(PyBufferError::new_err("a capture is read-only"));
        }
        if flags & ffi::PyBUF_STRIDES != ffi::PyBUF_STRIDES && !this.tensor.is_contiguous() {
            return Err(PyBufferError::new_err(
                "the tensor is strided and the consumer asked for no strides",
            ));
        }
        let itemsize = this.tensor.dtype().size_in_bytes() as isize;
        // SAFETY: `view` is a valid, writable Py_buffer (checked non-null above), which this
        // function owns until it returns. The pointers stored in it (data, format, shape,
        // strides) point into `this`, which the buffer keeps alive through `obj` (a new
        // reference) until Python releases the buffer; none of them is ever freed or moved
        // while `this` lives.
        unsafe {
            (*view).obj = slf.clone().into_any().into_ptr();
            (*view).buf = this.address as *mut c_void;
            (*view).len = this.tensor.elem_count() as isize * itemsize;
            (*view).readonly = c_int::from(!this.writable);
            (*view).itemsize = itemsize;
            (*view).format = if flags & ffi::PyBUF_FORMAT != 0 {
                this.format.as_ptr().cast_mut()
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = this.shape.len() as c_int;
            (*view).shape = this.shape.as_ptr().cast_mut();
            (*view).strides = this.strides.as_ptr().cast_mut();
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    /// The dtype's name as numpy and torch spell it (`float32`, `bfloat16`, ...).
    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.tensor.dtype())
    }

    /// The shape.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.tensor.dims())
    }
}

/// A host storage's first element's address, its length in elements and its buffer-protocol
/// format (`None` for the dtypes numpy has no equivalent of).
pub(crate) fn host_buffer(cpu: &CpuStorage) -> Option<(usize, usize, &'static CStr)> {
    fn of<T>(v: &[T], format: &'static CStr) -> Option<(usize, usize, &'static CStr)> {
        Some((v.as_ptr() as usize, v.len(), format))
    }
    match cpu {
        CpuStorage::U8(v) => of(v, c"B"),
        CpuStorage::U32(v) => of(v, c"I"),
        CpuStorage::I16(v) => of(v, c"h"),
        CpuStorage::I32(v) => of(v, c"i"),
        CpuStorage::I64(v) => of(v, c"q"),
        // No buffer format for bfloat16: its bits, viewed as ml_dtypes.bfloat16 (or
        // torch.bfloat16) on the Python side.
        CpuStorage::BF16(v) => of(v, c"H"),
        CpuStorage::F16(v) => of(v, c"e"),
        CpuStorage::F32(v) => of(v, c"f"),
        CpuStorage::F64(v) => of(v, c"d"),
        _ => None,
    }
}

/// The numpy/torch name of a dtype.
pub(crate) fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::U8 => "uint8",
        DType::U32 => "uint32",
        DType::I16 => "int16",
        DType::I32 => "int32",
        DType::I64 => "int64",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F32 => "float32",
        DType::F64 => "float64",
        _ => "unsupported",
    }
}

/// A dtype from its numpy/torch name (or the CLI's `f32`, `f16`, `bf16`).
pub(crate) fn parse_dtype(name: &str) -> PyResult<DType> {
    Ok(match name {
        "uint8" => DType::U8,
        "uint32" => DType::U32,
        "int16" => DType::I16,
        "int32" => DType::I32,
        "int64" => DType::I64,
        "bfloat16" | "bf16" => DType::BF16,
        "float16" | "f16" => DType::F16,
        "float32" | "f32" => DType::F32,
        "float64" | "f64" => DType::F64,
        other => {
            return Err(PyValueError::new_err(format!(
                "dtype `{other}` is not supported; use float32, float16, bfloat16, float64, \
                 int64, int32, int16, uint32 or uint8"
            )));
        }
    })
}

/// The tensor whose bytes (C order), dtype name and shape Python sent, on `device`.
pub(crate) fn from_bytes(
    data: &Bound<'_, PyBytes>,
    dtype: &str,
    shape: &[usize],
    device: &Device,
) -> PyResult<Tensor> {
    let dtype = parse_dtype(dtype)?;
    let bytes = data.as_bytes();
    let expected = shape.iter().product::<usize>() * dtype.size_in_bytes();
    if bytes.len() != expected {
        return Err(PyValueError::new_err(format!(
            "{} bytes for a {dtype:?} tensor of shape {shape:?}, which needs {expected}",
            bytes.len()
        )));
    }
    let t =
        Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu).map_err(crate::error::candle)?;
    t.to_device(device).map_err(crate::error::candle)
}
