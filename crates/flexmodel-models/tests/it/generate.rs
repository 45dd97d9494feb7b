//! Generation with a key/value cache: greedy tokens equal transformers' `generate`, every
//! decode step equals the full forward pass, steering equals an uncached loop.

use candle_core::{DType, Device, Tensor};
use flexmodel_core::{
    Dim, FlexModel, GenerateOptions, HookCtx, HookFunction, Input, Sampling, SiteTable, Steps,
};
use flexmodel_models::{LoadOptions, load};

use flexmodel_testkit::{assert_close, model_dir, reference};

fn wrapped(arch: &str) -> FlexModel {
    FlexModel::new(load(model_dir(arch), &LoadOptions::default()).unwrap())
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        ..Default::default()
    }
}

fn ids(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2().unwrap()
}

/// 12 greedy tokens from the fixture prompts, unpadded and left-padded.
pub fn check_greedy(arch: &str) {
    let refs = reference(arch);
    if !refs.contains_key("generate.greedy") {
        // Dynamic-NTK rope changes its frequencies with the sequence length, so cached and
        // uncached generation differ in transformers itself, which then wrote no reference.
        let why = flexmodel_testkit::reference_json(arch)["generate"]["error"].to_string();
        assert!(
            arch.contains("dynamic") && why.contains("gave other tokens"),
            "{arch}: {why}"
        );
        return;
    }
    let mut fm = wrapped(arch);
    let out = fm
        .generate(
            &Input::new(refs["input_ids"].clone()),
            &greedy(12),
            |_, _| false,
        )
        .unwrap();
    assert_eq!(
        ids(&out.sequences),
        ids(&refs["generate.greedy"]),
        "{arch} greedy"
    );
    assert_eq!(out.steps, 12);
    let padded = Input::with_mask(
        refs["generate.padded.input_ids"].clone(),
        refs["generate.padded.attention_mask"].clone(),
    );
    let out = fm.generate(&padded, &greedy(12), |_, _| false).unwrap();
    assert_eq!(
        ids(&out.sequences),
        ids(&refs["generate.padded.greedy"]),
        "{arch} left-padded greedy"
    );
}

/// The positions `start..start + len` of a capture laid out as `template` (flattened tokens
/// expanded to `[batch, seq]`), keys limited to `keys`.
fn positions(
    t: &Tensor,
    template: &[Dim],
    batch: usize,
    (start, len): (usize, usize),
    keys: usize,
) -> Tensor {
    let mut t = t.clone();
    let mut template = template.to_vec();
    if template.first() == Some(&Dim::Tokens) {
        let mut dims = vec![batch, t.dim(0).unwrap() / batch];
        dims.extend_from_slice(&t.dims()[1..]);
        t = t.reshape(dims).unwrap();
        template.splice(0..1, [Dim::Batch, Dim::Seq]);
    }
    for (d, dim) in template.iter().enumerate() {
        t = match dim {
            Dim::Seq => t.narrow(d, start, len).unwrap(),
            Dim::KeySeq => t.narrow(d, 0, keys).unwrap(),
            // Decode steps pass a mask (one position row per sequence); these prompts are
            // unpadded, so every row holds the same positions.
            Dim::PosBatch => t.narrow(d, 0, 1).unwrap(),
            _ => t,
        };
    }
    t
}

/// Every capture at decode step t equals position `prompt + t - 1` of one forward pass over the
/// final sequence (the prefill equals its prompt positions).
pub fn check_cache(arch: &str) {
    if arch.contains("dynamic") {
        // Keys cached under earlier (shorter-sequence) frequencies differ from a full pass
        // by design; see `check_greedy`.
        return;
    }
    let refs = reference(arch);
    let mut fm = wrapped(arch);
    let sites: SiteTable = fm.model().sites().clone();
    fm.register(HookFunction::new("*")).unwrap();
    let (batch, prompt) = refs["input_ids"].dims2().unwrap();
    let n = 6;
    let out = fm
        .generate(
            &Input::new(refs["input_ids"].clone()),
            &greedy(n),
            |_, _| false,
        )
        .unwrap();
    let stepwise = fm.take_output();
    fm.forward(&out.sequences).unwrap();
    let full = fm.take_output();
    let mut compared = 0;
    for (_, info) in sites.iter() {
        let (Some(steps), Some(whole)) = (stepwise.get(&info.name), full.get(&info.name)) else {
            continue;
        };
        if info.shape.contains(&Dim::Routed) {
            // An expert's rows differ from step to step; the block's output is compared.
            continue;
        }
        let per_pass = steps.len() / n; // sites that fire k times per pass
        for (i, t) in steps.iter().enumerate() {
            let (step, call) = (i / per_pass, i % per_pass);
            let (start, len) = if step == 0 {
                (0, prompt)
            } else {
                (prompt + step - 1, 1)
            };
            let keys = start + len;
            if info.name.as_ref() == "lm_head" {
                // Generation computes the last position's logits only, as transformers.
                let want = whole[call].narrow(1, keys - 1, 1).unwrap();
                assert_close(&format!("{arch} step {step} lm_head"), t, &want, 1e-4);
                continue;
            }
            let got = positions(t, &info.shape, batch, (0, len), keys);
            let want = positions(&whole[call], &info.shape, batch, (start, len), keys);
            assert_close(
                &format!("{arch} step {step} {}", info.name),
                &got,
                &want,
                1e-4,
            );
            compared += 1;
        }
    }
    assert!(compared > 100, "{arch}: compared {compared}");
}

/// Steering during cached generation gives the tokens of a loop that re-runs the whole
/// sequence with the same edit at every step.
fn check_steering(arch: &str, site: &str) {
    let refs = reference(arch);
    let hidden = refs[site].dim(2).unwrap();
    let v = (Tensor::arange(0f32, hidden as f32, &Device::Cpu).unwrap() / hidden as f64)
        .unwrap()
        .sin()
        .unwrap();
    let v = (v * 3.0).unwrap();
    let steer = move |x: &Tensor, _: &mut HookCtx| Ok(x.broadcast_add(&v)?);
    let mut fm = wrapped(arch);
    fm.register(HookFunction::new(site).capture(false).edit(steer.clone()))
        .unwrap();
    let cached = fm
        .generate(
            &Input::new(refs["input_ids"].clone()),
            &greedy(8),
            |_, _| false,
        )
        .unwrap();

    let mut seq = refs["input_ids"].to_dtype(DType::U32).unwrap();
    for _ in 0..8 {
        let logits = fm.forward(&seq).unwrap();
        let last = logits.narrow(1, seq.dim(1).unwrap() - 1, 1).unwrap();
        let next = last
            .argmax_keepdim(2)
            .unwrap()
            .squeeze(2)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap();
        seq = Tensor::cat(&[&seq, &next], 1).unwrap();
    }
    assert_eq!(ids(&cached.sequences), ids(&seq), "{arch}: cached steering");
    let plain = wrapped(arch)
        .generate(
            &Input::new(refs["input_ids"].clone()),
            &greedy(8),
            |_, _| false,
        )
        .unwrap();
    assert_ne!(
        ids(&plain.sequences),
        ids(&seq),
        "{arch}: the steering vector must change the tokens"
    );
}

#[test]
fn steering_while_generating_equals_an_uncached_loop() {
    check_steering("llama", "model.layers.0");
    check_steering("gpt2", "transformer.h.0");
    check_steering("opt", "model.decoder.layers.0");
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let refs = reference("llama");
    let sample = |seed| {
        let options = GenerateOptions {
            max_new_tokens: 10,
            sampling: Sampling::Sample {
                temperature: 1.5,
                top_k: Some(50),
                top_p: Some(0.95),
                seed,
            },
            ..Default::default()
        };
        ids(&wrapped("llama")
            .generate(&Input::new(refs["input_ids"].clone()), &options, |_, _| {
                false
            })
            .unwrap()
            .sequences)
    };
    assert_eq!(sample(7), sample(7));
    assert_ne!(sample(7), sample(8));
    assert_ne!(
        sample(7),
        ids(&refs["generate.greedy"])
            .iter()
            .map(|r| r[..26].to_vec())
            .collect::<Vec<_>>()
    );
}

#[test]
fn eos_and_stop_callbacks_end_rows_independently() {
    let refs = reference("llama");
    let greedy_ids = ids(&refs["generate.greedy"]);
    let prompt = 16;
    let (new0, new1) = (&greedy_ids[0][prompt..], &greedy_ids[1][prompt..]);
    // An EOS token that row 0 produces first at new position k, and row 1 not in its first 5.
    let k = (1..new0.len())
        .find(|&k| !new0[..k].contains(&new0[k]) && !new1[..5].contains(&new0[k]))
        .expect("a usable token");
    let options = GenerateOptions {
        max_new_tokens: 12,
        eos_token_ids: vec![new0[k] as u32],
        pad_token_id: 0,
        ..Default::default()
    };
    // Row 1 stops at its 5th new token through the callback (a stop string, say).
    let mut seen = [0usize; 2];
    let out = wrapped("llama")
        .generate(
            &Input::new(refs["input_ids"].clone()),
            &options,
            |row, _| {
                seen[row] += 1;
                row == 1 && seen[row] == 5
            },
        )
        .unwrap();
    let got = ids(&out.sequences);
    let width = prompt + k.max(4) + 1;
    assert_eq!(got[0].len(), width, "generation ends when every row has");
    assert_eq!(got[0][..prompt + k + 1], greedy_ids[0][..prompt + k + 1]);
    assert!(
        got[0][prompt + k + 1..].iter().all(|&t| t == 0),
        "finished rows are padded"
    );
    assert_eq!(got[1][..prompt + 5], greedy_ids[1][..prompt + 5]);
    assert!(got[1][prompt + 5..].iter().all(|&t| t == 0));
    assert_eq!(
        seen,
        [k + 1, 5],
        "the callback sees each row's tokens until it ends"
    );
}

#[test]
fn hooks_can_be_limited_to_steps_and_see_their_positions() {
    let refs = reference("llama");
    let mut fm = wrapped("llama");
    fm.register(HookFunction::new("model.layers.0").steps(Steps::Prompt))
        .unwrap();
    fm.register(HookFunction::new("model.layers.1").steps(Steps::Decode))
        .unwrap();
    fm.register(
        HookFunction::new("model.norm")
            .steps(Steps::Range(2, 4))
            .edit(|x: &Tensor, cx: &mut HookCtx| {
                let entry = (cx.step(), cx.positions().start, cx.positions().end);
                cx.state
                    .get_or_insert_with("seen", Vec::<(usize, usize, usize)>::new)?
                    .push(entry);
                Ok(x.clone())
            }),
    )
    .unwrap();
    fm.generate(
        &Input::new(refs["input_ids"].clone()),
        &greedy(5),
        |_, _| false,
    )
    .unwrap();
    assert_eq!(fm.output().get("model.layers.0").unwrap().len(), 1);
    assert_eq!(
        fm.output().get("model.layers.0").unwrap()[0].dims(),
        &[2, 16, 64]
    );
    assert_eq!(fm.output().get("model.layers.1").unwrap().len(), 4);
    assert_eq!(
        fm.output().get("model.layers.1").unwrap()[0].dims(),
        &[2, 1, 64]
    );
    assert_eq!(fm.output().get("model.norm").unwrap().len(), 2);
    assert_eq!(
        *fm.state()
            .get::<Vec<(usize, usize, usize)>>("seen")
            .unwrap(),
        [(2, 17, 18), (3, 18, 19)]
    );
}
