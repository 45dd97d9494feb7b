//! Find a feature of the bundled model's SAE and steer with it: the feature most specific to
//! the position after `self.` (its activation there over its mean activation elsewhere), then
//! that feature clamped on at every position of an unrelated prompt, and the next-token
//! predictions before and after.
//!
//! `cargo run --release -p flexmodel --example sae_steer`

use flexmodel::sae::{self, FeatureEdit, Sae};
use flexmodel::{D, Device, FlexModel, LoadOptions, Tensor, Tokenizer, load};

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/stdlib-llama");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sae_dir = format!("{MODEL}/saes/model.layers.1");
    let sae = Sae::load(&sae_dir)?;
    let site = sae.hook_name().unwrap_or("model.layers.1").to_string();
    let tok = Tokenizer::from_dir(MODEL)?;
    let mut fm = FlexModel::new(load(MODEL, &LoadOptions::default())?);
    let ids = |text: &str| -> Result<Tensor, Box<dyn std::error::Error>> {
        Ok(Tensor::new(tok.encode(text)?.as_slice(), &Device::Cpu)?.unsqueeze(0)?)
    };

    // Features on a prompt that ends right after `self.`.
    let probe = "    def close(self):\n        self.";
    let handle = sae::attach(&mut fm, &site, sae.clone(), vec![])?;
    fm.forward(&ids(probe)?)?;
    fm.remove(handle)?;
    let features = fm
        .take_output()
        .last(&format!("{site}.sae"))
        .ok_or("no features captured")?
        .get(0)?; // [seq, d_sae]
    let seq = features.dim(0)?;
    let last = features.get(seq - 1)?;
    let elsewhere = features.narrow(0, 0, seq - 1)?.mean(0)?;
    let specificity = (&last - &elsewhere)?;
    let feature = specificity.argmax(D::Minus1)?.to_scalar::<u32>()? as usize;
    let value = last.get(feature)?.to_scalar::<f32>()?;
    println!(
        "feature {feature}: {value:.2} after `self.`, {:.2} on average before it",
        elsewhere.get(feature)?.to_scalar::<f32>()?
    );

    // Steer an unrelated prompt with it.
    let prompt = "    for item in";
    let top = |logits: &Tensor| -> Result<String, Box<dyn std::error::Error>> {
        let last = logits.get(0)?.get(logits.dim(1)? - 1)?;
        let probs = candle_nn::ops::softmax_last_dim(&last.unsqueeze(0)?)?.squeeze(0)?;
        let order = probs.arg_sort_last_dim(false)?.to_vec1::<u32>()?;
        let probs = probs.to_vec1::<f32>()?;
        Ok(order[..5]
            .iter()
            .map(|&i| {
                format!(
                    "{:?} {:.2}",
                    tok.decode(&[i]).unwrap_or_default(),
                    probs[i as usize]
                )
            })
            .collect::<Vec<_>>()
            .join(", "))
    };
    let plain = fm.forward(&ids(prompt)?)?;
    println!("{prompt:?} -> {}", top(&plain)?);
    let clamp = vec![FeatureEdit::Clamp {
        feature,
        value: 2.0 * value,
    }];
    sae::attach(&mut fm, &site, sae, clamp)?;
    let steered = fm.forward(&ids(prompt)?)?;
    println!(
        "with feature {feature} clamped to {:.2}: {}",
        2.0 * value,
        top(&steered)?
    );
    Ok(())
}
