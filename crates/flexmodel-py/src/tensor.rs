//! Tensors across the boundary: host tensors handed to numpy without a copy (numpy's array
//! interface over candle's storage), and arrays from Python read into candle tensors.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

/// A host tensor that numpy reads in place (`numpy.asarray(raw)`): the array's memory is the
/// tensor's storage, which lives as long as the array does (numpy keeps this object as the
/// array's base).
#[pyclass(frozen, module = "flexmodel._flexmodel")]
pub struct RawTensor {
    pub(crate) tensor: Tensor,
    /// Whether numpy may write into it (an editing function's argument; captures are
    /// read-only).
    writable: bool,
}

impl RawTensor {
    /// A read-only view of `tensor`, copied to the host first if it lives on a device.
    pub(crate) fn read_only(tensor: &Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            tensor: tensor.to_device(&Device::Cpu)?,
            writable: false,
        })
    }

    /// A writable view of a host tensor.
    pub(crate) fn writable(tensor: Tensor) -> Self {
        Self {
            tensor,
            writable: true,
        }
    }
}

#[pymethods]
impl RawTensor {
    /// numpy's array interface (version 3): shape, dtype, strides and the address of the data.
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let t = &self.tensor;
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Err(PyValueError::new_err("a device tensor has no host address"));
        };
        // The address of the storage's first element; numpy reads the tensor's elements from
        // there through its offset and strides. The storage is never reallocated: candle
        // tensors are immutable from Rust, and this object keeps it alive.
        let (base, typestr) = match cpu {
            CpuStorage::U8(v) => (v.as_ptr() as usize, "|u1"),
            CpuStorage::U32(v) => (v.as_ptr() as usize, "<u4"),
            CpuStorage::I16(v) => (v.as_ptr() as usize, "<i2"),
            CpuStorage::I32(v) => (v.as_ptr() as usize, "<i4"),
            CpuStorage::I64(v) => (v.as_ptr() as usize, "<i8"),
            // numpy has no bfloat16: the bits, viewed as ml_dtypes.bfloat16 on the Python side.
            CpuStorage::BF16(v) => (v.as_ptr() as usize, "<u2"),
            CpuStorage::F16(v) => (v.as_ptr() as usize, "<f2"),
            CpuStorage::F32(v) => (v.as_ptr() as usize, "<f4"),
            CpuStorage::F64(v) => (v.as_ptr() as usize, "<f8"),
            _ => {
                return Err(PyValueError::new_err(format!(
                    "dtype {:?} has no numpy equivalent",
                    t.dtype()
                )));
            }
        };
        let size = t.dtype().size_in_bytes();
        let interface = PyDict::new(py);
        interface.set_item("version", 3)?;
        interface.set_item("shape", PyTuple::new(py, t.dims())?)?;
        interface.set_item("typestr", typestr)?;
        let strides: Vec<usize> = layout.stride().iter().map(|s| s * size).collect();
        interface.set_item("strides", PyTuple::new(py, strides)?)?;
        let address = base + layout.start_offset() * size;
        interface.set_item("data", (address, !self.writable))?;
        Ok(interface)
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
