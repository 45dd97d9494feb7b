//! Past 128 positions of an unpadded batch, attention runs its queries in chunks against the
//! keys each chunk can see, unless the attention probabilities are hooked (they are then built
//! whole). Both paths must compute the same thing: the whole path, forced by a hook on the
//! probabilities, is the reference for the chunked one. A left-padded batch (a mask per row)
//! must agree too.

use candle_core::{Device, Tensor};
use flexmodel_core::{FlexModel, HookFunction, Input};
use flexmodel_models::{LoadOptions, load};

use flexmodel_testkit::{assert_close, model_dir};

const SEQ: usize = 300;
const PAD: usize = 37;

#[test]
fn chunked_attention_equals_whole_attention() {
    // The rotary families: learned position tables stop at the fixtures' 128 positions.
    for arch in [
        "llama", "mistral", "qwen2", "gemma", "phi", "gpt_neox", "falcon",
    ] {
        for padded in [false, true] {
            check(arch, padded);
        }
    }
}

/// Whole against chunked attention on two rows of `SEQ` tokens.
fn check(arch: &str, padded: bool) {
    let model = load(model_dir(arch), &LoadOptions::default()).unwrap();
    let vocab = model.info().vocab_size as u32;
    let mut fm = FlexModel::new(model);
    let ids: Vec<u32> = (0..2 * SEQ as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let ids = Tensor::from_vec(ids, (2, SEQ), &Device::Cpu).unwrap();
    let input = if padded {
        // The second row left-padded.
        let mask: Vec<u32> = (0..2 * SEQ)
            .map(|i| u32::from(!(SEQ..SEQ + PAD).contains(&i)))
            .collect();
        Input::with_mask(ids, Tensor::from_vec(mask, (2, SEQ), &Device::Cpu).unwrap())
    } else {
        Input::new(ids)
    };

    fm.register(HookFunction::new("*.hook_head_out")).unwrap();
    let chunked = fm.forward_input(&input).unwrap();
    let chunked_out = fm.take_output();
    fm.register(HookFunction::new("*.hook_attn_probs").capture(false))
        .unwrap();
    let whole = fm.forward_input(&input).unwrap();
    let whole_out = fm.take_output();

    assert_close(
        &format!("{arch} (padded: {padded}) logits"),
        &chunked,
        &whole,
        1e-5,
    );
    assert!(!whole_out.is_empty(), "{arch}: no head_out captured");
    assert_eq!(chunked_out.len(), whole_out.len(), "{arch}");
    for (name, want) in whole_out.iter() {
        let got = chunked_out
            .last(name)
            .unwrap_or_else(|| panic!("{arch}: {name}"));
        assert_close(&format!("{arch} {name}"), got, &want[0], 1e-5);
    }
}
