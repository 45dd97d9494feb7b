//! What bounds the CPU forward pass: the machine's fused multiply-add peak, and the GFLOP/s of
//! candle's matrix product on the shapes of the random 125M Llama's linear layers (512 tokens),
//! against it. `bench/torch_linear.py` measures PyTorch on the same shapes.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p flexmodel-models --bench gemm
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails by panicking

use std::time::Instant;

use candle_core::{Device, Tensor};

/// `(rows, in, out)`: q/o, k/v, gate/up, down, lm_head at 512 tokens; the MLP at 128.
const SHAPES: [(usize, usize, usize); 6] = [
    (512, 768, 768),
    (512, 768, 256),
    (512, 768, 2048),
    (512, 2048, 768),
    (512, 768, 32000),
    (128, 768, 2048),
];

/// GFLOP/s of `threads` threads each running 12 independent chains of 8-wide f32 FMAs.
#[cfg(target_arch = "x86_64")]
fn fma_peak(threads: usize) -> Option<f64> {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        return None;
    }
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2,fma")]
    fn chains(iters: u64) -> f32 {
        use std::arch::x86_64::{_mm256_cvtss_f32, _mm256_fmadd_ps, _mm256_set1_ps};
        let mut acc = [_mm256_set1_ps(0.0); 12];
        let (a, b) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(0.999_999_9));
        for _ in 0..iters {
            for x in &mut acc {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        acc.iter().map(|&x| _mm256_cvtss_f32(x)).sum()
    }
    let iters = 100_000_000u64;
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                // SAFETY: AVX2 and FMA were detected above.
                #[allow(unsafe_code)]
                unsafe {
                    chains(iters)
                }
            })
        })
        .collect();
    let sum: f32 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    std::hint::black_box(sum);
    let flops = threads as f64 * iters as f64 * 12.0 * 8.0 * 2.0;
    Some(flops / start.elapsed().as_secs_f64() / 1e9)
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_peak(_: usize) -> Option<f64> {
    None
}

fn main() {
    let threads: usize = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let peak = fma_peak(threads);
    match peak {
        Some(p) => println!("FMA peak, {threads} threads: {p:.1} GFLOP/s (AVX2, f32)"),
        None => println!("FMA peak: no AVX2/FMA on this machine"),
    }
    println!("| rows × in × out | candle matmul GFLOP/s (best of 10) | of peak |");
    println!("| --- | ---: | ---: |");
    for (m, k, n) in SHAPES {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        // As the model holds it: a transposed view of the `[out, in]` weight.
        let wt = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        let mut best = f64::INFINITY;
        for _ in 0..10 {
            let start = Instant::now();
            std::hint::black_box(x.matmul(&wt).unwrap());
            best = best.min(start.elapsed().as_secs_f64());
        }
        let gflops = 2.0 * (m * k * n) as f64 / best / 1e9;
        let share = peak.map_or("–".into(), |p| format!("{:.0}%", 100.0 * gflops / p));
        println!("| {m} × {k} × {n} | {gflops:.1} | {share} |");
    }
}
