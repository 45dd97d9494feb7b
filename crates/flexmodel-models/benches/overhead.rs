//! Hook overhead on a random ≈125M-parameter Llama (12 layers, hidden 768, 12 heads, 4 KV
//! heads, intermediate 2048, vocab 32000: the shape of `shared/tools/peers/cpu_baseline.py`).
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p flexmodel-models --bench overhead [-- --repeats N --smoke]
//! ```
//!
//! Variants run round-robin (every round times each variant once, so all see the same machine
//! load) after one warm-up round; the table reports the median and each variant's ratio to the
//! plain forward of the same round set. Only the forward call is timed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails by panicking

mod common;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use flexmodel_core::{
    Dim, FlexModel, HookCtx, HookFunction, HookHandle, Input, Layout, Model, ModelInfo, Parameters,
    Run, SiteId, SiteTable,
};
use flexmodel_models::{LoadOptions, load};

use common::checkpoint_dir;
use flexmodel_models::random::{LLAMA_125M, SMOKE, token_ids};

/// A set of hooks to time, registered before and removed after its forward call.
struct Variant {
    name: &'static str,
    register: fn(&mut FlexModel) -> Vec<HookHandle>,
}

fn identity(x: &Tensor, _: &mut HookCtx) -> flexmodel_core::Result<Tensor> {
    Ok(x.clone())
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "plain forward",
        register: |_| Vec::new(),
    },
    Variant {
        name: "one capture (lm_head), every other site un-hooked",
        register: |fm| vec![fm.register(HookFunction::new("lm_head")).unwrap()],
    },
    Variant {
        name: "every site, pass-through hook (no capture)",
        register: |fm| {
            vec![
                fm.register(HookFunction::new("*").capture(false).edit(identity))
                    .unwrap(),
            ]
        },
    },
    Variant {
        name: "capture every decoder layer",
        register: |fm| {
            let layers = fm.model().info().decoder_layers.clone();
            layers
                .into_iter()
                .map(|l| fm.register(HookFunction::new(l)).unwrap())
                .collect()
        },
    },
    Variant {
        name: "capture every site",
        register: |fm| vec![fm.register(HookFunction::new("*")).unwrap()],
    },
];

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A model whose forward pass is nothing but `CALLS` passes through one site: it times what
/// a site costs, un-hooked or hooked, through the public API.
struct SiteLoop {
    sites: SiteTable,
    params: Parameters,
    info: ModelInfo,
    device: Device,
    probe: SiteId,
}

const CALLS: usize = 1_000_000;

impl SiteLoop {
    fn new() -> Self {
        let mut sites = SiteTable::new();
        let shape = vec![Dim::Batch, Dim::Seq, Dim::Size(768)];
        let probe = sites
            .module("probe", shape.clone(), Layout::Replicated)
            .unwrap();
        sites
            .module("elsewhere", shape, Layout::Replicated)
            .unwrap();
        let info = ModelInfo {
            model_type: "site-loop".into(),
            vocab_size: 0,
            hidden_size: 768,
            decoder_layers: Vec::new(),
            dtype: DType::F32,
            unembed: None,
        };
        Self {
            sites,
            params: Parameters::default(),
            info,
            device: Device::Cpu,
            probe,
        }
    }
}

impl Model for SiteLoop {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn sites(&self) -> &SiteTable {
        &self.sites
    }
    fn parameters(&self) -> &Parameters {
        &self.params
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn forward_with(&self, input: &Input, run: &mut Run<'_>) -> flexmodel_core::Result<Tensor> {
        let mut x = input.input_ids.clone();
        for _ in 0..CALLS {
            x = run.site(self.probe, x)?;
        }
        Ok(x)
    }
}

/// Nanoseconds per site call for: un-hooked (a hook elsewhere), pass-through edit, capture.
fn site_costs() -> [f64; 3] {
    let mut fm = FlexModel::new(SiteLoop::new());
    let x = Tensor::zeros((1, 128, 768), DType::F32, &Device::Cpu).unwrap();
    let setups: [fn(&mut FlexModel<SiteLoop>) -> HookHandle; 3] = [
        |fm| fm.register(HookFunction::new("elsewhere")).unwrap(),
        |fm| {
            fm.register(HookFunction::new("probe").capture(false).edit(identity))
                .unwrap()
        },
        |fm| fm.register(HookFunction::new("probe")).unwrap(),
    ];
    let mut best = [f64::INFINITY; 3];
    for _ in 0..5 {
        for (i, setup) in setups.iter().enumerate() {
            let h = setup(&mut fm);
            let start = Instant::now();
            fm.forward(&x).unwrap();
            let ns = start.elapsed().as_secs_f64() * 1e9 / CALLS as f64;
            best[i] = best[i].min(ns);
            fm.remove(h).unwrap();
            fm.clear_output();
        }
    }
    best
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let repeats: usize = args
        .iter()
        .position(|a| a == "--repeats")
        .map(|i| args[i + 1].parse().unwrap())
        .unwrap_or(if smoke { 1 } else { 5 });
    let (shape, shapes, name) = if smoke {
        (&SMOKE, vec![(1, 8)], "smoke")
    } else {
        (&LLAMA_125M, vec![(1, 128), (4, 128)], "llama-125m")
    };
    let dir = checkpoint_dir(name);
    shape.write(&dir).unwrap();
    let model = load(&dir, &LoadOptions::default()).unwrap();
    let params = shape.params();
    println!(
        "model: {name} ({:.1}M parameters, {} sites), threads: {}, repeats: {repeats} (+1 warm-up)",
        params as f64 / 1e6,
        model.sites().len(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into())
    );
    let mut fm = FlexModel::new(model);
    let mut plain_times = Vec::new();
    for (batch, seq) in shapes {
        let ids = Tensor::from_vec(
            token_ids(batch * seq, shape.vocab, 0),
            (batch, seq),
            &Device::Cpu,
        )
        .unwrap();
        let mut times = vec![Vec::new(); VARIANTS.len()];
        for round in 0..=repeats {
            for (v, variant) in VARIANTS.iter().enumerate() {
                let handles = (variant.register)(&mut fm);
                let start = Instant::now();
                let logits = fm.forward(&ids).unwrap();
                let elapsed = start.elapsed().as_secs_f64();
                assert_eq!(logits.dims(), &[batch, seq, shape.vocab]);
                for h in handles {
                    fm.remove(h).unwrap();
                }
                fm.clear_output();
                if round > 0 {
                    times[v].push(elapsed);
                }
            }
        }
        let mins: Vec<f64> = times
            .iter()
            .map(|t| t.iter().copied().fold(f64::INFINITY, f64::min))
            .collect();
        let medians: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        println!("\nbatch {batch} x seq {seq}: wall clock, round-robin");
        println!("| variant | median s | min s | median / plain | min / plain |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for ((variant, m), lo) in VARIANTS.iter().zip(&medians).zip(&mins) {
            println!(
                "| {} | {m:.4} | {lo:.4} | {:.3} | {:.3} |",
                variant.name,
                m / medians[0],
                lo / mins[0]
            );
        }
        plain_times.push(((batch, seq), medians[0]));
    }

    // Wall-clock ratios on a shared 2-core machine are noisy to a few percent; the cost of the
    // hook machinery itself is measured directly and set against the forward time.
    let [unhooked, passthrough, capture] = site_costs();
    let sites = fm.model().sites().len() as f64;
    let layers = fm.model().info().decoder_layers.len() as f64;
    println!(
        "\nsite costs (best of 5 x {CALLS} calls): un-hooked {unhooked:.1} ns, pass-through edit {passthrough:.1} ns, capture {capture:.1} ns"
    );
    println!(
        "| batch x seq | plain s | un-hooked sites ({sites}) | every decoder layer captured ({layers}) | every site pass-through |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    for ((batch, seq), plain) in plain_times {
        let pct = |ns: f64| 100.0 * ns * 1e-9 / plain;
        println!(
            "| {batch} x {seq} | {plain:.4} | {:.5}% | {:.5}% | {:.5}% |",
            pct(sites * unhooked),
            pct(layers * capture + (sites - layers) * unhooked),
            pct(sites * passthrough)
        );
    }
}
