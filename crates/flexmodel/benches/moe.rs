//! What routing costs in a mixture-of-experts forward pass (BENCHMARKS.md, "Families"): the
//! share of the forward spent in the router (its product, softmax, top-k), dispatching tokens to
//! their experts and combining the experts' outputs, against the experts' own products.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p flexmodel --bench moe -- MODEL_DIR [4x128 ...]
//! cargo test -p flexmodel --bench moe       # smoke run on the Mixtral fixture
//! ```
//!
//! Per shape: the median of 7 plain forwards; then 7 forwards with timestamps taken by hooks at
//! each MoE block's input, after its routing (`hook_topk_weights`) and at the experts' combined
//! output (`experts`); then, for the token counts each expert received in those passes, the
//! median time of the same expert products (`gate`, `up`, the activation, `down`) on their own.
//! Routing = router + (experts' phase − products). The timing hooks pass tensors through
//! unchanged (a few µs per block).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails by panicking

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use flexmodel::{Device, FlexModel, HookCtx, HookFunction, LoadOptions, Tensor, load};

const REPEATS: usize = 7;

type Stamps = Arc<Mutex<Vec<(String, Instant)>>>;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// A hook that notes when `label` fires, passing the tensor through.
fn stamp(pattern: String, label: &str, stamps: &Stamps, pre: bool) -> HookFunction {
    let (label, stamps) = (label.to_string(), stamps.clone());
    let hook = if pre {
        HookFunction::pre(pattern)
    } else {
        HookFunction::new(pattern)
    };
    hook.capture(false)
        .edit(move |x: &Tensor, ctx: &mut HookCtx| {
            let site = ctx.site().to_string();
            stamps
                .lock()
                .unwrap()
                .push((format!("{site} {label}"), Instant::now()));
            Ok(x.clone())
        })
}

struct Sizes {
    hidden: usize,
    inter: usize,
    experts: usize,
}

fn sizes(dir: &Path) -> Sizes {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let get = |k: &str| cfg[k].as_u64().unwrap_or(0) as usize;
    let inter = match get("moe_intermediate_size") {
        0 => get("intermediate_size"),
        n => n,
    };
    let experts = match get("num_local_experts") {
        0 => get("num_experts"),
        n => n,
    };
    Sizes {
        hidden: get("hidden_size"),
        inter,
        experts,
    }
}

/// Seconds of one pass of every expert's products for `counts` tokens each.
fn products(s: &Sizes, counts: &[usize]) -> f64 {
    let dev = Device::Cpu;
    let w = |r, c| Tensor::randn(0f32, 0.02, (r, c), &dev).unwrap();
    let (gate, up, down) = (
        w(s.inter, s.hidden),
        w(s.inter, s.hidden),
        w(s.hidden, s.inter),
    );
    let xs: Vec<Tensor> = counts
        .iter()
        .filter(|&&n| n > 0)
        .map(|&n| w(n, s.hidden))
        .collect();
    let start = Instant::now();
    for x in &xs {
        let g = candle_nn::ops::silu(&x.matmul(&gate.t().unwrap()).unwrap()).unwrap();
        let u = x.matmul(&up.t().unwrap()).unwrap();
        let _ = (g * u).unwrap().matmul(&down.t().unwrap()).unwrap();
    }
    start.elapsed().as_secs_f64()
}

/// One shape: (plain forward, router, experts' phase, products), seconds per pass.
fn measure(dir: &Path, batch: usize, seq: usize, repeats: usize) -> [f64; 4] {
    let model = load(dir, &LoadOptions::default()).unwrap();
    let (layers, vocab) = (model.info().decoder_layers.clone(), model.info().vocab_size);
    let s = sizes(dir);
    let mut fm = FlexModel::new(model);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &Device::Cpu).unwrap();
    fm.forward(&ids).unwrap();
    let plain = median(
        (0..repeats)
            .map(|_| {
                let start = Instant::now();
                fm.forward(&ids).unwrap();
                start.elapsed().as_secs_f64()
            })
            .collect(),
    );
    let stamps: Stamps = Arc::default();
    for layer in &layers {
        let moe = format!("{layer}.mlp");
        fm.register(stamp(moe.clone(), "in", &stamps, true))
            .unwrap();
        fm.register(stamp(
            format!("{moe}.hook_topk_weights"),
            "routed",
            &stamps,
            false,
        ))
        .unwrap();
        fm.register(stamp(format!("{moe}.experts"), "combined", &stamps, false))
            .unwrap();
        fm.register(HookFunction::new(format!("{moe}.hook_topk_experts")))
            .unwrap();
    }
    let (mut router, mut phase, mut prods) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeats {
        stamps.lock().unwrap().clear();
        fm.clear_output();
        fm.forward(&ids).unwrap();
        let st = stamps.lock().unwrap().clone();
        // Per block: in, routed, combined, in firing order.
        let (mut r, mut p) = (0.0, 0.0);
        for w in st.chunks(3) {
            r += (w[1].1 - w[0].1).as_secs_f64();
            p += (w[2].1 - w[1].1).as_secs_f64();
        }
        router.push(r);
        phase.push(p);
        let mut total = 0.0;
        for layer in &layers {
            let chosen: Vec<u32> = fm
                .output()
                .last(&format!("{layer}.mlp.hook_topk_experts"))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut counts = vec![0; s.experts];
            for e in chosen {
                counts[e as usize] += 1;
            }
            total += products(&s, &counts);
        }
        prods.push(total);
    }
    [plain, median(router), median(phase), median(prods)]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench = args.iter().any(|a| a == "--bench");
    let rest: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let (dir, shapes, repeats) = match rest.split_first() {
        Some((dir, shapes)) if bench => {
            let shapes: Vec<(usize, usize)> = if shapes.is_empty() {
                vec![(1, 128), (4, 128), (1, 512)]
            } else {
                shapes
                    .iter()
                    .map(|s| {
                        let (b, t) = s.split_once('x').expect("shapes as BATCHxSEQ");
                        (b.parse().unwrap(), t.parse().unwrap())
                    })
                    .collect()
            };
            (Path::new(dir.as_str()).to_path_buf(), shapes, REPEATS)
        }
        _ => (
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/families/models/mixtral"),
            vec![(2, 16)],
            1,
        ),
    };
    println!(
        "| shape | forward | router | experts' phase | their products alone | routing share |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (batch, seq) in shapes {
        let [plain, router, phase, prods] = measure(&dir, batch, seq, repeats);
        // Dispatch and combine: what the phase spends beyond the products (none where the
        // products alone measured as long as the phase).
        let routing = router + (phase - prods).max(0.0);
        println!(
            "| {batch}x{seq} | {:.1} ms | {:.2} ms | {:.1} ms | {:.1} ms | {:.1}% |",
            plain * 1e3,
            router * 1e3,
            phase * 1e3,
            prods * 1e3,
            100.0 * routing / plain
        );
        assert!(plain > 0.0 && prods > 0.0 && phase > 0.0);
    }
}
