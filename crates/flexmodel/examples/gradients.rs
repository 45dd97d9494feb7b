//! Gradients at sites: the gradient of the language-modelling loss at every decoder layer's
//! output, and gradient × activation attribution per position.
//!
//! `cargo run --release -p flexmodel --example gradients -- [MODEL_DIR] [PROMPT]`

use flexmodel::{
    Device, FlexModel, HookFunction, Input, LoadOptions, Tensor, Tokenizer, causal_lm_loss, load,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/tiny-llama").into());
    let prompt = args
        .next()
        .unwrap_or_else(|| "The capital of France is Paris".into());

    let model = load(&dir, &LoadOptions::default())?;
    let layers = model.info().decoder_layers.clone();
    let mut fm = FlexModel::new(model);
    for layer in &layers {
        fm.register(HookFunction::new(layer.as_str()))?; // the activation, as `<layer>`
        fm.register(HookFunction::backward(layer.as_str()))?; // its gradient, as `grad.<layer>`
    }
    let ids = Tokenizer::from_dir(&dir)?.encode(&prompt)?;
    let input = Input::new(Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?);
    let logits = fm.forward_input(&input)?;
    let loss = causal_lm_loss(&logits, &input)?;
    fm.backward(&loss)?;
    println!("loss {:.4}", loss.to_scalar::<f32>()?);

    for layer in &layers {
        let out = fm.output();
        let act = out.last(layer).ok_or("no activation")?;
        let grad = out.last(&format!("grad.{layer}")).ok_or("no gradient")?;
        // Attribution of each position: sum over features of gradient × activation. (It is ~0
        // at the last layer: the final RMSNorm ignores the scale of its input, so the gradient
        // there is orthogonal to the activation.)
        let attribution: Vec<f32> = (grad * act)?.sum(2)?.squeeze(0)?.to_vec1()?;
        let norms: Vec<f32> = grad.sqr()?.sum(2)?.sqrt()?.squeeze(0)?.to_vec1()?;
        let fmt = |v: &[f32]| {
            v.iter()
                .map(|a| format!("{a:+.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!("{layer}:\n  |grad| per position        [{}]", fmt(&norms));
        println!("  grad x act per position    [{}]", fmt(&attribution));
    }
    Ok(())
}
