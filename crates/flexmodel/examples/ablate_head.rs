//! Zero one attention head's output in every layer and report how much each layer's ablation
//! moves the next-token distribution (KL divergence from the clean run).
//!
//! `cargo run --release -p flexmodel --example ablate_head -- [MODEL_DIR] [HEAD]`

use flexmodel::{
    D, Device, FlexModel, HookCtx, HookFunction, LoadOptions, Tensor, Tokenizer, load,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/tiny-llama").into());
    let head: usize = args.next().map_or(Ok(0), |h| h.parse())?;

    let mut fm = FlexModel::new(load(&dir, &LoadOptions::default())?);
    let ids = Tokenizer::from_dir(&dir)?.encode("def forward(self, x):")?;
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let clean = last_log_probs(&fm.forward(&ids)?)?;

    let sites: Vec<String> = fm
        .model()
        .sites()
        .iter()
        .map(|(_, s)| s.name.to_string())
        .filter(|n| n.ends_with(".hook_head_out"))
        .collect();
    for site in sites {
        // hook_head_out is [batch, seq, heads, head_dim]: zero one slice of dim 2.
        let ablate = move |x: &Tensor, _: &mut HookCtx| -> flexmodel::Result<Tensor> {
            let heads = x.dim(2)?;
            let keep: Vec<f32> = (0..heads)
                .map(|h| if h == head { 0.0 } else { 1.0 })
                .collect();
            let keep = Tensor::from_vec(keep, (1, 1, heads, 1), x.device())?.to_dtype(x.dtype())?;
            Ok(x.broadcast_mul(&keep)?)
        };
        let handle = fm.register(HookFunction::new(site.as_str()).capture(false).edit(ablate))?;
        let ablated = last_log_probs(&fm.forward(&ids)?)?;
        fm.remove(handle)?;
        // KL(clean || ablated) = sum p (log p - log q)
        let kl = (clean.exp()? * (&clean - &ablated)?)?
            .sum_all()?
            .to_scalar::<f32>()?;
        println!("{site} head {head}: KL = {kl:.5}");
    }
    Ok(())
}

/// Log-probabilities of the next token after the last position.
fn last_log_probs(logits: &Tensor) -> flexmodel::Result<Tensor> {
    let last = logits.get(0)?.get(logits.dim(1)? - 1)?;
    log_softmax(&last)
}

fn log_softmax(x: &Tensor) -> flexmodel::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}
