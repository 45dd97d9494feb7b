//! Tensors as bytes, for communication backends that move bytes (MPI): a fixed-size header
//! (dtype and shape) travels first, then the data, read straight from the tensor's storage and
//! received straight into the new tensor's storage, without intermediate copies.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use crate::{Error, Result};

/// The dtypes that can travel, by their code in a [`Header`].
const DTYPES: [DType; 7] = [
    DType::F32,
    DType::F64,
    DType::F16,
    DType::BF16,
    DType::U32,
    DType::I64,
    DType::U8,
];

/// Most dimensions a tensor on the wire may have.
const MAX_RANK: usize = 8;

/// Length of an encoded [`Header`], in `u64`s.
pub const HEADER_LEN: usize = 2 + MAX_RANK;

/// What the receiver needs to know before a tensor's data: its dtype and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub dims: Vec<usize>,
}

impl Header {
    /// The header of `t`.
    ///
    /// # Errors
    /// A dtype that cannot travel, or more than 8 dimensions.
    pub fn of(t: &Tensor) -> Result<Self> {
        if !DTYPES.contains(&t.dtype()) {
            return Err(Error::msg(format!(
                "cannot send a {:?} tensor (sendable: {DTYPES:?})",
                t.dtype()
            )));
        }
        if t.rank() > MAX_RANK {
            return Err(Error::msg(format!(
                "cannot send a tensor of {} dimensions (at most {MAX_RANK})",
                t.rank()
            )));
        }
        Ok(Self {
            dtype: t.dtype(),
            dims: t.dims().to_vec(),
        })
    }

    /// The header as `[dtype code, rank, dims..., 0...]`.
    pub fn encode(&self) -> [u64; HEADER_LEN] {
        let mut out = [0u64; HEADER_LEN];
        // `of` admitted only listed dtypes.
        out[0] = DTYPES.iter().position(|d| *d == self.dtype).unwrap_or(0) as u64;
        out[1] = self.dims.len() as u64;
        for (slot, &d) in out[2..].iter_mut().zip(&self.dims) {
            *slot = d as u64;
        }
        out
    }

    /// The header [`Header::encode`] wrote.
    ///
    /// # Errors
    /// Numbers that are not a header.
    pub fn decode(words: &[u64]) -> Result<Self> {
        let bad = || Error::msg(format!("received words are not a tensor header: {words:?}"));
        let (&code, rest) = words.split_first().ok_or_else(bad)?;
        let (&rank, dims) = rest.split_first().ok_or_else(bad)?;
        let dtype = *DTYPES.get(code as usize).ok_or_else(bad)?;
        let dims = dims.get(..rank as usize).ok_or_else(bad)?;
        Ok(Self {
            dtype,
            dims: dims.iter().map(|&d| d as usize).collect(),
        })
    }

    /// Number of elements.
    pub fn elems(&self) -> usize {
        self.dims.iter().product()
    }

    /// Number of bytes of the data.
    pub fn bytes(&self) -> usize {
        self.elems() * self.dtype.size_in_bytes()
    }
}

/// Calls `f` with the data of `t` as bytes: borrowed from the storage when `t` is a
/// contiguous tensor in memory (else from a contiguous copy).
///
/// # Errors
/// A dtype that cannot travel, or candle's error copying the tensor to memory.
pub fn with_bytes<R>(t: &Tensor, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
    Header::of(t)?;
    let t = t.to_device(&Device::Cpu)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::msg("a contiguous tensor has no contiguous offsets"))?;
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::msg("a tensor moved to the CPU is not in memory"));
    };
    let bytes: &[u8] = match cpu {
        CpuStorage::F32(v) => bytemuck::cast_slice(&v[start..end]),
        CpuStorage::F64(v) => bytemuck::cast_slice(&v[start..end]),
        CpuStorage::F16(v) => bytemuck::cast_slice(&v[start..end]),
        CpuStorage::BF16(v) => bytemuck::cast_slice(&v[start..end]),
        CpuStorage::U32(v) => bytemuck::cast_slice(&v[start..end]),
        CpuStorage::I64(v) => bytemuck::cast_slice(&v[start..end]),
        CpuStorage::U8(v) => &v[start..end],
        _ => return Err(Error::msg(format!("cannot send a {:?} tensor", t.dtype()))),
    };
    Ok(f(bytes))
}

/// A tensor of shape `header.dims` on `device` whose data `fill` writes as bytes into the
/// tensor's own (zeroed) storage.
///
/// # Errors
/// `fill`'s error, or candle's moving the tensor to `device`.
pub fn receive(
    header: &Header,
    device: &Device,
    fill: impl FnOnce(&mut [u8]) -> Result<()>,
) -> Result<Tensor> {
    fn typed<T: bytemuck::Pod + candle_core::WithDType>(
        header: &Header,
        fill: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<Tensor> {
        let mut data = fresh::<T>(header.elems());
        fill(bytemuck::cast_slice_mut(&mut data))?;
        Ok(Tensor::from_vec(
            data,
            header.dims.as_slice(),
            &Device::Cpu,
        )?)
    }
    let t = match header.dtype {
        DType::F32 => typed::<f32>(header, fill)?,
        DType::F64 => typed::<f64>(header, fill)?,
        DType::F16 => typed::<half::f16>(header, fill)?,
        DType::BF16 => typed::<half::bf16>(header, fill)?,
        DType::U32 => typed::<u32>(header, fill)?,
        DType::I64 => typed::<i64>(header, fill)?,
        DType::U8 => typed::<u8>(header, fill)?,
        other => return Err(Error::msg(format!("cannot receive a {other:?} tensor"))),
    };
    Ok(t.to_device(device)?)
}

/// A host tensor holding a copy of `bytes`, laid out as `header` says: one pass over the bytes,
/// into memory backed by huge pages when it is large (32 MiB or more).
///
/// # Errors
/// `bytes` of another length than the header's.
pub fn from_bytes(header: &Header, bytes: &[u8]) -> Result<Tensor> {
    if bytes.len() != header.bytes() {
        return Err(Error::msg(format!(
            "{} bytes for a {:?} tensor of shape {:?} ({} bytes)",
            bytes.len(),
            header.dtype,
            header.dims,
            header.bytes()
        )));
    }
    if bytes.len() < LARGE {
        return Ok(Tensor::from_raw_buffer(
            bytes,
            header.dtype,
            &header.dims,
            &Device::Cpu,
        )?);
    }
    receive(header, &Device::Cpu, |buf| {
        buf.copy_from_slice(bytes);
        Ok(())
    })
}

/// Allocations from this size on come fresh from the kernel: glibc maps them on their own, at
/// the threshold `flexmodel::load` sets.
const LARGE: usize = 32 << 20;

/// A zeroed vector for data about to be written. A [`LARGE`] one is fresh memory, so its first
/// write faults in every page; asked to be backed by 2 MiB pages, that is 512 times fewer faults
/// (a 64 MiB copy into fresh memory on the 2-core development VM: 29.9 ms with 4 KiB pages,
/// 7.6 ms with huge pages, 5.9 ms into reused memory).
fn fresh<T: bytemuck::Pod>(len: usize) -> Vec<T> {
    let mut data = bytemuck::zeroed_vec::<T>(len);
    #[cfg(target_os = "linux")]
    if size_of_val(data.as_slice()) >= LARGE {
        const HUGE: usize = 2 << 20;
        let start = data.as_mut_ptr() as usize;
        let end = start + size_of_val(data.as_slice());
        let (from, to) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        // SAFETY: advice on whole pages inside `data`'s allocation: it changes how the kernel
        // backs them (they stay zero), not what they hold. Refused advice (huge pages turned
        // off) changes nothing, so its result is ignored.
        #[allow(unsafe_code)]
        unsafe {
            libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE);
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(t: &Tensor) -> Tensor {
        let header = Header::decode(&Header::of(t).unwrap().encode()).unwrap();
        let bytes = with_bytes(t, <[u8]>::to_vec).unwrap();
        receive(&header, &Device::Cpu, |buf| {
            buf.copy_from_slice(&bytes);
            Ok(())
        })
        .unwrap()
    }

    #[test]
    fn large_tensors_round_trip_through_bytes() {
        // 40 MiB: received into fresh memory advised for huge pages.
        let t = Tensor::arange(0u32, 10 << 20, &Device::Cpu).unwrap();
        let back = round_trip(&t);
        assert_eq!(back.to_vec1::<u32>().unwrap(), t.to_vec1::<u32>().unwrap());
    }

    #[test]
    fn tensors_are_made_from_their_bytes() {
        // Under and over the size that takes fresh memory.
        for n in [1000u32, 10 << 20] {
            let t = Tensor::arange(0u32, n, &Device::Cpu).unwrap();
            let header = Header::of(&t).unwrap();
            let bytes = with_bytes(&t, <[u8]>::to_vec).unwrap();
            let made = from_bytes(&header, &bytes).unwrap();
            assert_eq!(made.to_vec1::<u32>().unwrap(), t.to_vec1::<u32>().unwrap());
            assert!(from_bytes(&header, &bytes[1..]).is_err());
        }
    }

    #[test]
    fn tensors_round_trip_through_bytes() {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        // A narrowed view (offset storage) and a transposed one (a copy) travel too.
        let views = [
            t.clone(),
            t.narrow(0, 1, 1).unwrap(),
            t.transpose(1, 2).unwrap(),
        ];
        for view in views {
            for dtype in DTYPES {
                let sent = view.to_dtype(dtype).unwrap();
                let back = round_trip(&sent);
                assert_eq!(back.dims(), sent.dims());
                assert_eq!(back.dtype(), dtype);
                let as_f64 = |t: &Tensor| {
                    t.to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap()
                };
                assert_eq!(as_f64(&back), as_f64(&sent), "{dtype:?} {:?}", view.dims());
            }
        }
        let scalar = Tensor::new(3.5f32, &Device::Cpu).unwrap();
        assert_eq!(round_trip(&scalar).to_scalar::<f32>().unwrap(), 3.5);
    }

    #[test]
    fn bad_headers_are_refused() {
        assert!(Header::decode(&[0]).is_err());
        assert!(Header::decode(&[99, 0]).is_err());
        assert!(Header::decode(&[0, 3, 1]).is_err());
        let i16s = Tensor::new(&[1f32, 2.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::I16)
            .unwrap();
        assert!(Header::of(&i16s).is_err());
    }
}
