//! Steer with a vector: the difference of the mean residual streams of two prompts at one
//! layer, added (scaled) to every position of a third prompt; prints how the top next tokens
//! change.
//!
//! `cargo run --release -p flexmodel --example steer -- [MODEL_DIR] [LAYER] [SCALE]`

use flexmodel::{Device, FlexModel, HookCtx, HookFunction, LoadOptions, Tensor, Tokenizer, load};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/tiny-llama").into());
    let layer: usize = args.next().map_or(Ok(0), |l| l.parse())?;
    let scale: f64 = args.next().map_or(Ok(4.0), |s| s.parse())?;

    let model = load(&dir, &LoadOptions::default())?;
    let site = model.info().decoder_layers[layer].clone();
    let tok = Tokenizer::from_dir(&dir)?;
    let ids = |text: &str| -> Result<Tensor, Box<dyn std::error::Error>> {
        Ok(Tensor::new(tok.encode(text)?.as_slice(), &Device::Cpu)?.unsqueeze(0)?)
    };
    let mut fm = FlexModel::new(model);

    // The steering vector: mean activation on "love" minus mean activation on "hate".
    let capture = fm.register(HookFunction::new(site.as_str()))?;
    let mut means = Vec::new();
    for text in ["I love this, wonderful", "I hate this, terrible"] {
        fm.forward(&ids(text)?)?;
        let h = fm
            .take_output()
            .remove(&site)
            .ok_or("not captured")?
            .remove(0); // [1, seq, hidden]
        means.push(h.mean(1)?.squeeze(0)?);
    }
    fm.remove(capture)?;
    let steer = ((&means[0] - &means[1])? * scale)?;

    let prompt = ids("The movie was")?;
    let before = top5(&fm.forward(&prompt)?, &tok)?;
    fm.register(
        HookFunction::new(site.as_str())
            .capture(false)
            .edit(move |x: &Tensor, _: &mut HookCtx| Ok(x.broadcast_add(&steer)?)),
    )?;
    let after = top5(&fm.forward(&prompt)?, &tok)?;
    println!(
        "steering {site} by {scale} x (love - hate)\n  before: {before:?}\n  after:  {after:?}"
    );
    Ok(())
}

fn top5(logits: &Tensor, tok: &Tokenizer) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let last: Vec<f32> = logits.get(0)?.get(logits.dim(1)? - 1)?.to_vec1()?;
    let mut ranked: Vec<(usize, f32)> = last.into_iter().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked
        .iter()
        .take(5)
        .map(|&(id, _)| Ok(tok.decode(&[id as u32])?))
        .collect()
}
