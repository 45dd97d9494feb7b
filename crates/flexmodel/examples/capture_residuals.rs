//! Capture the residual stream after every decoder layer and print its norm per position.
//!
//! `cargo run --release -p flexmodel --example capture_residuals -- [MODEL_DIR] [PROMPT]`

use flexmodel::{Device, FlexModel, HookFunction, LoadOptions, Tensor, Tokenizer, load};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/tiny-llama").into());
    let prompt = args
        .next()
        .unwrap_or_else(|| "The capital of France is".into());

    let model = load(&dir, &LoadOptions::default())?;
    let layers = model.info().decoder_layers.clone();
    let mut fm = FlexModel::new(model);
    for layer in &layers {
        fm.register(HookFunction::new(layer.as_str()))?;
    }
    let ids = Tokenizer::from_dir(&dir)?.encode(&prompt)?;
    fm.forward(&Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?;

    for layer in &layers {
        let h = fm.output().last(layer).ok_or("layer not captured")?; // [1, seq, hidden]
        let norms: Vec<f32> = h.sqr()?.sum(2)?.sqrt()?.squeeze(0)?.to_vec1()?;
        let norms: Vec<String> = norms.iter().map(|n| format!("{n:.2}")).collect();
        println!("{layer}: |h| per position = [{}]", norms.join(", "));
    }
    Ok(())
}
