//! Known results on the bundled trained model (`models/stdlib-llama`, its README has the
//! numbers): induction heads exist and carry in-context copying, and attribution patching ranks
//! the cells of a patching sweep as the exact sweep does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../examples/induction.rs"]
#[allow(dead_code)] // the example's `main` is not called here
mod induction;

use flexmodel::analysis::{self, Metric, SweepSite};
use flexmodel::{Device, FlexModel, Input, LoadOptions, Tensor, Tokenizer, load};

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/stdlib-llama");

/// The induction score a head must exceed: 0.3 of its attention on the one key the induction
/// pattern names, among 41 to 80 keys (uniform attention would give it 0.012 to 0.025; this
/// model's first-layer heads score 0.02). Measured: 0.91 (layer 3, head 2).
const INDUCTION_THRESHOLD: f32 = 0.3;

#[test]
fn induction_heads_exist_and_carry_copying() {
    let f = induction::measure(MODEL, 2).unwrap();
    let (layer, head, score) = f.top_induction[0];
    assert!(
        layer >= 1,
        "the best induction head L{layer}H{head} is in a layer after the first"
    );
    assert!(score > INDUCTION_THRESHOLD, "best induction score {score}");
    // an induction head needs a previous-token head before it
    let prev = f.previous_token[..layer]
        .iter()
        .flatten()
        .fold(0f32, |a, &b| a.max(b));
    assert!(
        prev > 0.3,
        "best previous-token score before layer {layer}: {prev}"
    );
    // the second copy is far easier than the first: in-context copying
    assert!(
        f.loss_second < f.loss_first - 2.0,
        "{} vs {}",
        f.loss_second,
        f.loss_first
    );
    // zeroing the top induction heads undoes much of that; as many other heads do not
    let hurt = f.loss_second_ablated - f.loss_second;
    assert!(
        hurt > 1.0,
        "ablating the induction heads raises the loss by {hurt}"
    );
    for r in &f.loss_second_random {
        let other = r - f.loss_second;
        assert!(
            other < hurt / 3.0,
            "ablating other heads raises it by {other} (induction: {hurt})"
        );
    }
}

/// Spearman's rank correlation of two equally long lists.
fn spearman(a: &[f32], b: &[f32]) -> f32 {
    let ranks = |v: &[f32]| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0f32; v.len()];
        for (rank, i) in idx.into_iter().enumerate() {
            r[i] = rank as f32;
        }
        r
    };
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f32;
    let mean = (n - 1.0) / 2.0;
    let cov: f32 = ra
        .iter()
        .zip(&rb)
        .map(|(x, y)| (x - mean) * (y - mean))
        .sum();
    let var: f32 = ra.iter().map(|x| (x - mean).powi(2)).sum();
    cov / var
}

#[test]
fn attribution_patching_ranks_cells_as_the_exact_sweep() {
    let mut fm = FlexModel::new(load(MODEL, &LoadOptions::default()).unwrap());
    let tok = Tokenizer::from_dir(MODEL).unwrap();
    let row = |text: &str| {
        let ids = tok.encode(text).unwrap();
        Input::new(
            Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
    };
    let (clean, corrupted) = (row(CLEAN), row(CORRUPTED));
    let right = tok.encode(RIGHT).unwrap()[0];
    let wrong = tok.encode(WRONG).unwrap()[0];
    let metric = Metric::LogitDiff { right, wrong };
    for (site, min_rho) in MIN_RHO {
        let exact = analysis::patching_sweep(&mut fm, &clean, &corrupted, metric, site, 16)
            .unwrap()
            .unwrap();
        assert!(
            exact.clean > 0.0 && exact.corrupted < 0.0,
            "{} {}",
            exact.clean,
            exact.corrupted
        );
        let est =
            analysis::attribution_patching(&mut fm, &clean, &corrupted, metric, site).unwrap();
        let a = exact
            .values
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = est.values.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let rho = spearman(&a, &b);
        assert!(rho > min_rho, "{site:?}: rank correlation {rho}");
    }
}

/// A copying task: the argument seen before is the one to repeat.
const CLEAN: &str = "total = compute(path)\nprint(total)\nresult = compute(";
const CORRUPTED: &str = "total = compute(node)\nprint(total)\nresult = compute(";
const RIGHT: &str = "path";
const WRONG: &str = "node";
/// Spearman's correlation between attribution and exact patching each grid must exceed
/// (measured: 0.92 over layers × positions, 0.70 over layers × heads, whose many near-zero
/// cells rank by noise).
const MIN_RHO: [(SweepSite, f32); 2] = [(SweepSite::Resid, 0.85), (SweepSite::Heads, 0.6)];
