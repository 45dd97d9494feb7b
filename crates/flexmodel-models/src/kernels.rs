//! A CPU matmul for the few rows of a decode step.
//!
//! candle's gemm packs its operands for every call and runs at ~20 GFLOP/s on 2 cores when the
//! left matrix has 2 to 8 rows; the product is then compute-bound at 3-4x the cost of one row.
//! Here each weight row is read once and multiplied into every input row while it is in
//! registers, so the product stays bound by memory like a matrix-vector product
//! (BENCHMARKS.md has the measurements).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
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
        let (CpuStorage::F32(xs), CpuStorage::F32(ws)) = (xs, ws) else {
            candle_core::bail!("skinny matmul: f32 only");
        };
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("skinny matmul: contiguous operands only");
        };
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 || m > MAX_ROWS {
            candle_core::bail!("skinny matmul: shapes {:?} x {:?}^T", xl.dims(), wl.dims());
        }
        let (x, w) = (&xs[x0..x1], &ws[w0..w1]);
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
}
