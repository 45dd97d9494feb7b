//! Train a linear probe on one layer's activations.
//!
//! Does layer 1 still carry a concept written into layer 0's output? Each of 64 random
//! sequences gets +u/4 or -u/4 (u a fixed random direction) added to `model.layers.0` by an editing
//! function; a linear probe, registered as a trainable module, learns to read the sign back
//! from the captured output of `model.layers.1`. The model's weights stay frozen.
//!
//! `cargo run --release -p flexmodel --example train_probe`

use candle_nn::{Linear, Module, Optimizer, VarBuilder, VarMap};
use flexmodel::{DType, Device, FlexModel, HookCtx, HookFunction, LoadOptions, Tensor, load};

const ROWS: usize = 64;
const SEQ: usize = 16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let losses = train(200)?;
    for (step, loss) in losses.iter().enumerate().step_by(25) {
        println!("step {step:3}: loss {loss:.4}");
    }
    println!(
        "final loss {:.4} (from {:.4})",
        losses[losses.len() - 1],
        losses[0]
    );
    Ok(())
}

/// Trains the probe for `steps` full-batch AdamW steps; returns the loss before each step.
pub fn train(steps: usize) -> Result<Vec<f32>, Box<dyn std::error::Error>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/tiny-llama");
    let dev = Device::Cpu;
    let mut rng = Lcg(42);
    let ids: Vec<u32> = (0..ROWS * SEQ).map(|_| rng.next() % 512).collect();
    let ids = Tensor::from_vec(ids, (ROWS, SEQ), &dev)?;
    let labels: Vec<f32> = (0..ROWS).map(|r| (r % 2) as f32).collect();
    let u: Vec<f32> = (0..64).map(|_| rng.normal()).collect();
    let u = Tensor::from_vec(u, 64, &dev)?;
    // +u/4 for label 1, -u/4 for label 0, on every position of the row: [rows, 1, hidden].
    let signs = Tensor::from_vec(
        labels.iter().map(|l| 2.0 * l - 1.0).collect::<Vec<f32>>(),
        (ROWS, 1, 1),
        &dev,
    )?;
    let concept = (signs.broadcast_mul(&u.reshape((1, 1, 64))?)? * 0.25)?;

    let mut fm = FlexModel::new(load(dir, &LoadOptions::default())?);
    fm.register(
        HookFunction::new("model.layers.0")
            .capture(false)
            .edit(move |x: &Tensor, _: &mut HookCtx| Ok(x.broadcast_add(&concept)?)),
    )?;
    fm.register(HookFunction::new("model.layers.1"))?;
    fm.forward(&ids)?;
    let acts = fm
        .take_output()
        .remove("model.layers.1")
        .ok_or("not captured")?
        .remove(0); // [rows, seq, 64]
    let features = acts.mean(1)?; // [rows, 64]

    // A zero-initialised probe, so that the run is the same everywhere (loss starts at ln 2).
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("probe");
    let zeros = candle_nn::Init::Const(0.0);
    let probe = Linear::new(
        vb.get_with_hints((1, 64), "weight", zeros)?,
        Some(vb.get_with_hints(1, "bias", zeros)?),
    );
    fm.add_module("probe", probe, varmap.all_vars());
    let mut opt = candle_nn::AdamW::new(
        fm.trainable_vars()?,
        candle_nn::ParamsAdamW {
            lr: 0.01,
            ..Default::default()
        },
    )?;
    let targets = Tensor::from_vec(labels, (ROWS, 1), &dev)?;
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let logits = fm.modules().get::<Linear>("probe")?.forward(&features)?;
        let loss = candle_nn::loss::binary_cross_entropy_with_logit(&logits, &targets)?;
        losses.push(loss.to_scalar::<f32>()?);
        let grads = fm.backward(&loss)?;
        opt.step(&grads)?;
    }
    Ok(losses)
}

/// A small deterministic generator, so that the run is the same everywhere.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    /// Approximately standard normal (sum of 12 uniforms).
    fn normal(&mut self) -> f32 {
        (0..12)
            .map(|_| self.next() as f32 / (1u64 << 31) as f32)
            .sum::<f32>()
            - 6.0
    }
}
