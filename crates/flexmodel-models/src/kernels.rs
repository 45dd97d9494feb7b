//! CPU kernels for hot paths candle leaves unfused.
//!
//! A matmul for the few rows of a decode step: candle's gemm packs its operands for every call and runs at ~20 GFLOP/s on 2 cores when the
//! left matrix has 2 to 8 rows; the product is then compute-bound at 3-4x the cost of one row.
//! Here each weight row is read once and multiplied into every input row while it is in
//! registers, so the product stays bound by memory like a matrix-vector product
//! (BENCHMARKS.md has the measurements).

use std::f32::consts::FRAC_1_SQRT_2;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

/// The most rows this path takes; beyond, gemm's blocking wins.
pub(crate) const MAX_ROWS: usize = 8;

/// Weight rows per parallel task.
const CHUNK: usize = 32;

/// `x @ w^T` for `x` `[m, k]` (m ≤ [`MAX_ROWS`]) and `w` `[n, k]`, both contiguous f32 on the CPU,
/// without autograd (callers use it only when nothing tracks gradients).
pub(crate) fn skinny_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op2_no_bwd(w, &Skinny)
}

struct Skinny;

impl CustomOp2 for Skinny {
    fn name(&self) -> &'static str {
        "flexmodel-skinny-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(xs, xl, self.name())?, f32s(ws, wl, self.name())?);
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 || m > MAX_ROWS {
            candle_core::bail!("skinny matmul: shapes {:?} x {:?}^T", xl.dims(), wl.dims());
        }
        // Column blocks of the output, computed in parallel, stored [block][m][cols].
        let blocks: Vec<Vec<f32>> = (0..n.div_ceil(CHUNK))
            .into_par_iter()
            .map(|b| {
                let rows = &w[b * CHUNK * k..((b + 1) * CHUNK).min(n) * k];
                Arch::new().dispatch(Block { x, m, k, rows })
            })
            .collect();
        let mut y = vec![0f32; m * n];
        for (b, block) in blocks.iter().enumerate() {
            let cols = block.len() / m;
            for i in 0..m {
                y[i * n + b * CHUNK..i * n + b * CHUNK + cols]
                    .copy_from_slice(&block[i * cols..(i + 1) * cols]);
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// Products of the `m` rows of `x` with some rows of `w`; returns `[m][rows]`.
struct Block<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
    rows: &'a [f32],
}

impl WithSimd for Block<'_> {
    type Output = Vec<f32>;

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Vec<f32> {
        let Block { x, m, k, rows } = self;
        let cols = rows.len() / k;
        let mut out = vec![0f32; m * cols];
        for c in 0..cols {
            let (w_head, w_tail) = S::as_simd_f32s(&rows[c * k..(c + 1) * k]);
            let mut acc = [simd.splat_f32s(0.0); MAX_ROWS];
            for (j, &wv) in w_head.iter().enumerate() {
                for (i, a) in acc.iter_mut().enumerate().take(m) {
                    let (x_head, _) = S::as_simd_f32s(&x[i * k..(i + 1) * k]);
                    *a = simd.mul_add_e_f32s(wv, x_head[j], *a);
                }
            }
            let tail_start = k - w_tail.len();
            for (i, a) in acc.iter().enumerate().take(m) {
                let xr = &x[i * k..(i + 1) * k];
                let tail: f32 = w_tail
                    .iter()
                    .zip(&xr[tail_start..])
                    .map(|(a, b)| a * b)
                    .sum();
                out[i * cols + c] = simd.reduce_sum_f32s(*a) + tail;
            }
        }
        out
    }
}

/// The values of a contiguous f32 operand of the kernel `op`.
fn f32s<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("{op}: contiguous f32 operands only"),
    }
}

/// `softmax(scores + mask)` over the last dimension, in one pass over the scores: candle adds
/// a broadcast mask through its strided path and then reads the sum again for the softmax.
/// `scores` `[b, h, s, k]` and `mask` `[b|1, 1, s, k]`, f32 on the CPU without gradients;
/// anything else takes the unfused ops.
pub(crate) fn masked_softmax(scores: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let fused = scores.device().is_cpu()
        && scores.dtype() == DType::F32
        && mask.dtype() == DType::F32
        && !scores.track_op()
        && !mask.track_op()
        && scores.rank() == 4
        && mask.rank() == 4
        && mask.dim(1)? == 1
        && mask.dims()[2..] == scores.dims()[2..]
        && (mask.dim(0)? == 1 || mask.dim(0)? == scores.dim(0)?);
    if fused {
        scores.apply_op2_no_bwd(mask, &MaskedSoftmax)
    } else {
        crate::nn::softmax_last_dim(&scores.broadcast_add(mask)?)
    }
}

struct MaskedSoftmax;

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "flexmodel-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, m) = (f32s(xs, xl, self.name())?, f32s(ms, ml, self.name())?);
        let (_, h, s, k) = xl.shape().dims4()?;
        // Mask rows per batch row: `s` (one mask per batch row) or 0 (one shared mask).
        let mask_batch_stride = if ml.dims()[0] == 1 { 0 } else { s * k };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(k)
            .zip(x.par_chunks(k))
            .enumerate()
            .for_each(|(row, (out, scores))| {
                let (batch, query) = (row / (h * s), row % s);
                let at = batch * mask_batch_stride + query * k;
                let mask = &m[at..at + k];
                Arch::new().dispatch(SoftmaxRow { scores, mask, out });
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }
}

/// One row of [`masked_softmax`], compiled for the best instruction set the CPU has.
struct SoftmaxRow<'a> {
    scores: &'a [f32],
    mask: &'a [f32],
    out: &'a mut [f32],
}

impl WithSimd for SoftmaxRow<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let SoftmaxRow { scores, mask, out } = self;
        for ((o, &x), &m) in out.iter_mut().zip(scores).zip(mask) {
            *o = x + m;
        }
        let max = lanes(out, f32::NEG_INFINITY, f32::max);
        for o in out.iter_mut() {
            *o = exp(*o - max);
        }
        let inv = 1.0 / lanes(out, 0.0, |a, b| a + b);
        for o in out.iter_mut() {
            *o *= inv;
        }
    }
}

/// Reduces `x` with `f` over 8 independent lanes (so that the loop vectorizes), then the lanes.
#[inline(always)]
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(init, |a, &b| f(a, b));
    for c in chunks {
        for (a, &b) in acc.iter_mut().zip(c) {
            *a = f(*a, b);
        }
    }
    acc.iter().fold(tail, |a, &b| f(a, b))
}

/// Elementwise activations whose `exp`, `tanh` and `erf` go through libm one value at a time
/// in candle (the tanh GELU took 14% of GPT-2's forward pass); here in forms LLVM vectorizes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Fast {
    /// `x * sigmoid(x)`.
    Silu,
    /// `0.5 x (1 + tanh(u))`, `u = sqrt(2/π) (x + 0.044715 x³)`, computed as `x * sigmoid(2u)`.
    GeluTanh,
    /// `0.5 x (1 + erf(x / √2))`, computed as `0.5 x erfc(-x / √2)`.
    GeluErf,
}

/// Applies `act` to `x`: the vectorized kernel for contiguous f32 on the CPU without
/// gradients, else candle's ops (which carry the backward pass).
pub(crate) fn activation(x: &Tensor, act: Fast) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op() && x.is_contiguous() {
        return x.apply_op1_no_bwd(&act);
    }
    match act {
        Fast::Silu => x.silu(),
        Fast::GeluTanh => x.gelu(),
        Fast::GeluErf => x.gelu_erf(),
    }
}

impl CustomOp1 for Fast {
    fn name(&self) -> &'static str {
        "flexmodel-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        let act = *self;
        y.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(y, x)| Arch::new().dispatch(Apply { act, x, y }));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

/// One chunk of an activation, compiled for the best instruction set the CPU has: the loops
/// are scalar code that LLVM vectorizes there.
struct Apply<'a> {
    act: Fast,
    x: &'a [f32],
    y: &'a mut [f32],
}

impl WithSimd for Apply<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let Apply { act, x, y } = self;
        let pairs = y.iter_mut().zip(x);
        match act {
            Fast::Silu => pairs.for_each(|(y, &x)| *y = x / (1.0 + exp(-x))),
            Fast::GeluTanh => pairs.for_each(|(y, &x)| {
                let u = 0.797_884_6 * (x + 0.044_715 * x * x * x);
                *y = x / (1.0 + exp(-2.0 * u));
            }),
            Fast::GeluErf => pairs.for_each(|(y, &x)| *y = 0.5 * x * erfc(-x * FRAC_1_SQRT_2)),
        }
    }
}

/// `e^x` for f32 without branches (Cephes' `expf`: `2^n e^r`, `|r| ≤ ln2 / 2`, degree-6
/// polynomial; relative error ~1e-7). Saturates below -87.3 (to ~1e-38) and above 88 (to ~1.7e38).
#[inline(always)]
fn exp(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to the nearest integer, which lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from the exponent bits; n is in [-126, 127] after the clamp.
    let n = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    e * f32::from_bits(n << 23)
}

/// `erfc(x)` after Numerical Recipes' `erfcc` (Chebyshev fit, relative error < 1.2e-7
/// everywhere, so the GELU keeps its precision far into the negative tail).
#[inline(always)]
fn erfc(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let p = 0.170_872_77_f32;
    let p = p * t - 0.822_152_23;
    let p = p * t + 1.488_515_9;
    let p = p * t - 1.135_204;
    let p = p * t + 0.278_868_07;
    let p = p * t - 0.186_288_06;
    let p = p * t + 0.096_784_18;
    let p = p * t + 0.374_091_96;
    let p = p * t + 1.000_023_7;
    let p = p * t - 1.265_512_2;
    let r = t * exp(-z * z + p);
    if x >= 0.0 { r } else { 2.0 - r }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_matmul_for_every_row_count_and_odd_widths() {
        let dev = Device::Cpu;
        for (k, n) in [(64, 96), (77, 33), (768, 130)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            for m in 1..=MAX_ROWS {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let want = x.matmul(&w.t().unwrap()).unwrap();
                let got = skinny_matmul(&x, &w).unwrap();
                let err = (got - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let scale = want
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(err <= 1e-5 * scale.max(1.0), "m {m} k {k} n {n}: {err}");
            }
        }
    }

    #[test]
    fn masked_softmax_equals_add_then_softmax() {
        let dev = Device::Cpu;
        let scores = Tensor::randn(0f32, 3.0, (2, 3, 5, 7), &dev).unwrap();
        // A causal-like mask per batch row, one row fully hidden, and a shared mask.
        let mut per_row = vec![0f32; 2 * 5 * 7];
        for (i, v) in per_row.iter_mut().enumerate() {
            let (b, q, k) = (i / 35, (i / 7) % 5, i % 7);
            if k > q + 2 || (b == 1 && q == 0) {
                *v = f32::MIN;
            }
        }
        let per_row = Tensor::from_vec(per_row, (2, 1, 5, 7), &dev).unwrap();
        let shared = per_row.narrow(0, 0, 1).unwrap().contiguous().unwrap();
        for mask in [per_row, shared] {
            let want =
                candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
            let got = masked_softmax(&scores, &mask).unwrap();
            let err = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err <= 1e-6, "{err}");
        }
    }

    #[test]
    fn activations_equal_candle_in_f64() {
        let dev = Device::Cpu;
        // A wide range, with values where exp under- and overflows.
        let x = Tensor::cat(
            &[
                (Tensor::randn(0f32, 40.0, 50_000, &dev).unwrap()),
                (Tensor::randn(0f32, 1.0, 50_000, &dev).unwrap()),
            ],
            0,
        )
        .unwrap();
        let x64 = x.to_dtype(DType::F64).unwrap();
        for (act, want) in [
            (Fast::Silu, x64.silu().unwrap()),
            (Fast::GeluTanh, x64.gelu().unwrap()),
            (Fast::GeluErf, x64.gelu_erf().unwrap()),
        ] {
            let got = activation(&x, act).unwrap().to_dtype(DType::F64).unwrap();
            // Relative error, measured against 1e-6 where the value is smaller.
            let err = (&got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .broadcast_div(&want.abs().unwrap().maximum(1e-6).unwrap())
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(err <= 1e-5, "{act:?}: relative error {err}");
        }
    }
}
