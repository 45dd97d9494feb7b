//! Induction heads in the bundled trained model: score every head on repeated random tokens,
//! then zero-ablate the top induction heads and, for comparison, as many other heads, and
//! measure the loss on the second copy (which only in-context copying can predict).
//!
//! `cargo run --release -p flexmodel --example induction -- [MODEL_DIR] [HEADS]`

use flexmodel::analysis::{self, ablate, ablate::Ablation};
use flexmodel::rng::SplitMix64;
use flexmodel::{D, FlexModel, Input, LoadOptions, load};

/// What the example measures.
pub struct Findings {
    /// Previous-token score of every head, `[layers, heads]`.
    pub previous_token: Vec<Vec<f32>>,
    /// Induction score of every head, `[layers, heads]`.
    pub induction: Vec<Vec<f32>>,
    /// The heads ablated, `(layer, head, induction score)`, best first.
    pub top_induction: Vec<(usize, usize, f32)>,
    /// Mean loss on the first copy, unablated.
    pub loss_first: f32,
    /// Mean loss on the second copy, unablated.
    pub loss_second: f32,
    /// Loss on the second copy with the top induction heads zeroed.
    pub loss_second_ablated: f32,
    /// Loss on the second copy with as many other heads zeroed, for each of several draws.
    pub loss_second_random: Vec<f32>,
}

/// Tokens per copy.
const HALF: usize = 40;
/// Rows of repeated random tokens.
const ROWS: usize = 16;

/// Scores every head and ablates the top `n_heads` induction heads of the model in `dir`.
pub fn measure(dir: &str, n_heads: usize) -> Result<Findings, Box<dyn std::error::Error>> {
    let mut fm = FlexModel::new(load(dir, &LoadOptions::default())?);
    let vocab = fm.model().info().vocab_size as u32;
    let ids = analysis::repeated_tokens(vocab, 1, HALF, ROWS, 7, Some(0))?;
    let input = Input::new(ids.clone());
    let scores = analysis::head_scores(&mut fm, &input, HALF)?.ok_or("not rank 0")?;
    let induction = scores.induction.to_vec2::<f32>()?;
    let previous_token = scores.previous_token.to_vec2::<f32>()?;

    let mut ranked: Vec<(usize, usize, f32)> = induction
        .iter()
        .enumerate()
        .flat_map(|(l, row)| row.iter().enumerate().map(move |(h, &s)| (l, h, s)))
        .collect();
    ranked.sort_by(|a, b| b.2.total_cmp(&a.2));
    let top: Vec<(usize, usize, f32)> = ranked[..n_heads].to_vec();
    let others: Vec<(usize, usize)> = ranked[n_heads..].iter().map(|&(l, h, _)| (l, h)).collect();

    let (loss_first, loss_second) = halves_loss(&mut fm, &input, &[], &scores.layers)?;
    let chosen: Vec<(usize, usize)> = top.iter().map(|&(l, h, _)| (l, h)).collect();
    let (_, loss_second_ablated) = halves_loss(&mut fm, &input, &chosen, &scores.layers)?;
    let mut rng = SplitMix64::new(1);
    let mut loss_second_random = Vec::new();
    for _ in 0..5 {
        let mut pool = others.clone();
        let mut pick = Vec::new();
        for _ in 0..n_heads {
            let i = (rng.next_u64() % pool.len() as u64) as usize;
            pick.push(pool.swap_remove(i));
        }
        loss_second_random.push(halves_loss(&mut fm, &input, &pick, &scores.layers)?.1);
    }
    Ok(Findings {
        previous_token,
        induction,
        top_induction: top,
        loss_first,
        loss_second,
        loss_second_ablated,
        loss_second_random,
    })
}

/// Mean next-token loss on the first and on the second copy, with `(layer, head)`s zeroed.
fn halves_loss(
    fm: &mut FlexModel,
    input: &Input,
    zeroed: &[(usize, usize)],
    attention: &[String],
) -> Result<(f32, f32), Box<dyn std::error::Error>> {
    let mut handles = Vec::new();
    for (layer, attn) in attention.iter().enumerate() {
        let heads: Vec<usize> = zeroed
            .iter()
            .filter(|z| z.0 == layer)
            .map(|z| z.1)
            .collect();
        if !heads.is_empty() {
            let site = format!("{attn}.hook_head_out");
            handles.push(fm.register(ablate::heads(&site, &heads, Ablation::Zero))?);
        }
    }
    let logits = fm.forward_input(input);
    for h in handles {
        fm.remove(h)?;
    }
    let logits = logits?;
    // loss at position p predicts token p + 1: [rows, seq - 1]
    let seq = input.input_ids.dim(1)?;
    let targets = input
        .input_ids
        .narrow(1, 1, seq - 1)?
        .to_dtype(flexmodel::DType::U32)?;
    let logp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, seq - 1)?, D::Minus1)?;
    let nll = logp
        .gather(&targets.unsqueeze(2)?.contiguous()?, D::Minus1)?
        .squeeze(2)?
        .neg()?;
    // predictions of the first copy's tokens 1.. (positions 1..HALF) and of the second copy's
    let first = nll.narrow(1, 1, HALF - 1)?.mean_all()?.to_scalar::<f32>()?;
    let second = nll
        .narrow(1, HALF + 1, HALF - 1)?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok((first, second))
}

#[allow(dead_code)] // the known-results test includes this file and calls `measure`
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/stdlib-llama").into()
    });
    let n: usize = args.next().map_or(Ok(2), |h| h.parse())?;
    let f = measure(&dir, n)?;
    println!("induction score (layer × head), on {ROWS} rows of {HALF} random tokens twice:");
    for (l, row) in f.induction.iter().enumerate() {
        let row: Vec<String> = row.iter().map(|s| format!("{s:.2}")).collect();
        println!("  layer {l}: {}", row.join(" "));
    }
    println!("previous-token score:");
    for (l, row) in f.previous_token.iter().enumerate() {
        let row: Vec<String> = row.iter().map(|s| format!("{s:.2}")).collect();
        println!("  layer {l}: {}", row.join(" "));
    }
    let top: Vec<String> = f
        .top_induction
        .iter()
        .map(|(l, h, s)| format!("L{l}H{h} ({s:.2})"))
        .collect();
    println!("top induction heads: {}", top.join(", "));
    println!(
        "loss on the first copy {:.2}, on the second {:.2}",
        f.loss_first, f.loss_second
    );
    println!(
        "second copy with the top {n} induction heads zeroed: {:.2}",
        f.loss_second_ablated
    );
    let random: Vec<String> = f
        .loss_second_random
        .iter()
        .map(|l| format!("{l:.2}"))
        .collect();
    println!(
        "second copy with {n} other heads zeroed (5 draws): {}",
        random.join(" ")
    );
    Ok(())
}
