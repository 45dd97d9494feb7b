//! What an attached SAE costs (README, "Sparse autoencoders"): a forward pass of `TOKENS`
//! tokens with and without an SAE at the middle decoder layer, expansion 16 (random weights:
//! the cost does not depend on them). The SAE runs on rank 0's full activation, so under
//! tensor parallelism its time does not shrink with the ranks while the forward's does.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p flexmodel --bench sae -- MODEL_DIR [TOKENS]
//! cargo test -p flexmodel --bench sae       # smoke run on the bundled model
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails by panicking

use std::time::Instant;

use flexmodel::sae::{self, Sae};
use flexmodel::{DType, Device, FlexModel, LoadOptions, Tensor, load};

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let smoke = args.is_empty();
    let dir = args.first().cloned().unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/stdlib-llama").to_string()
    });
    let tokens: usize = args.get(1).map_or(16, |t| t.parse().unwrap());
    let mut fm = FlexModel::new(load(&dir, &LoadOptions::default()).unwrap());
    let info = fm.model().info().clone();
    let (d_in, d_sae) = (info.hidden_size, 16 * info.hidden_size);
    let site = info.decoder_layers[info.decoder_layers.len() / 2].clone();

    // a random SAE in SAELens's format, in a temporary directory
    let tmp = tempfile::tempdir().unwrap();
    let randn = |shape: &[usize]| Tensor::randn(0f32, 0.02, shape, &Device::Cpu).unwrap();
    let weights = [
        ("W_enc", randn(&[d_in, d_sae])),
        (
            "b_enc",
            Tensor::zeros(d_sae, DType::F32, &Device::Cpu).unwrap(),
        ),
        ("W_dec", randn(&[d_sae, d_in])),
        (
            "b_dec",
            Tensor::zeros(d_in, DType::F32, &Device::Cpu).unwrap(),
        ),
    ];
    candle_core::safetensors::save(
        &weights
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        tmp.path().join("sae_weights.safetensors"),
    )
    .unwrap();
    let cfg = format!(
        "{{\"architecture\": \"standard\", \"d_in\": {d_in}, \"d_sae\": {d_sae}, \
         \"apply_b_dec_to_input\": true, \"normalize_activations\": \"none\"}}"
    );
    std::fs::write(tmp.path().join("cfg.json"), cfg).unwrap();
    let sae = Sae::load(tmp.path()).unwrap();

    let ids = Tensor::new(
        (0..tokens as u32)
            .map(|i| 1 + i % 100)
            .collect::<Vec<_>>()
            .as_slice(),
        &Device::Cpu,
    )
    .unwrap()
    .unsqueeze(0)
    .unwrap();
    let repeats = if smoke { 1 } else { 7 };
    let time = |fm: &mut FlexModel| {
        fm.forward(&ids).unwrap();
        median(
            (0..repeats)
                .map(|_| {
                    let start = Instant::now();
                    fm.forward(&ids).unwrap();
                    fm.clear_output();
                    start.elapsed().as_secs_f64()
                })
                .collect(),
        )
    };
    let plain = time(&mut fm);
    sae::attach(&mut fm, &site, sae, vec![]).unwrap();
    let with_sae = time(&mut fm);
    println!(
        "{{\"model\": {dir:?}, \"tokens\": {tokens}, \"site\": {site:?}, \"d_in\": {d_in}, \"d_sae\": {d_sae}, \"forward_s\": {plain:.4}, \"with_sae_s\": {with_sae:.4}, \"sae_share\": {:.3}}}",
        (with_sae - plain) / plain
    );
}
