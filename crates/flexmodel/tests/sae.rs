//! SAEs in SAELens's format: the three architectures against torch's features and
//! reconstructions (`scripts/train_sae.py`), and an SAE attached to the trained model leaves its
//! output unchanged until a feature is edited.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use flexmodel::sae::{self, Architecture, FeatureEdit, Sae};
use flexmodel::{Device, FlexModel, HookFunction, Input, LoadOptions, Tensor, Tokenizer, load};
use flexmodel_testkit::{error_chain, max_abs_diff};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

#[test]
fn every_architecture_matches_torch() {
    for (arch, want) in [
        ("standard", Architecture::Standard),
        ("jumprelu", Architecture::JumpRelu),
        ("topk", Architecture::TopK { k: 8 }),
    ] {
        let dir = repo("fixtures/saes").join(arch);
        let sae = Sae::load(&dir).unwrap();
        assert_eq!(sae.architecture(), want);
        assert_eq!(sae.hook_name(), Some("model.layers.1"));
        let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
            .unwrap();
        let features = sae.encode(&r["x"]).unwrap();
        assert!(
            max_abs_diff(&features, &r["features"]) < 1e-4,
            "{arch} features"
        );
        let recon = sae.decode(&features).unwrap();
        assert!(
            max_abs_diff(&recon, &r["reconstruction"]) < 1e-4,
            "{arch} reconstruction"
        );
        let active = features
            .gt(0f32)
            .unwrap()
            .to_dtype(flexmodel::DType::F32)
            .unwrap();
        let l0 = active
            .sum(1)
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            l0 > 0.0 && l0 < sae.d_sae() as f32 / 2.0,
            "{arch}: sparse, max L0 {l0}"
        );
        if let Architecture::TopK { k } = want {
            assert!(l0 <= k as f32);
        }
    }
}

fn trained() -> (FlexModel, Input) {
    let dir = repo("models/stdlib-llama");
    let fm = FlexModel::new(load(&dir, &LoadOptions::default()).unwrap());
    let ids = Tokenizer::from_dir(&dir)
        .unwrap()
        .encode("def __init__(self, name):\n        self.name = name\n")
        .unwrap();
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    (fm, Input::new(ids))
}

#[test]
fn an_attached_sae_changes_nothing_until_a_feature_is_edited() {
    let (mut fm, input) = trained();
    let sae = Sae::load(repo("models/stdlib-llama/saes/model.layers.1")).unwrap();
    let site = sae.hook_name().unwrap().to_string();
    let plain = fm.forward_input(&input).unwrap();

    fm.register(HookFunction::new(site.as_str())).unwrap();
    let h = sae::attach(&mut fm, &site, sae.clone(), vec![]).unwrap();
    let logits = fm.forward_input(&input).unwrap();
    fm.remove(h).unwrap();
    assert!(max_abs_diff(&logits, &plain) < 1e-5);
    let acts = fm.output().last(&site).unwrap().clone();
    let features = fm.output().last(&format!("{site}.sae")).unwrap().clone();
    assert_eq!(features.dims()[2], sae.d_sae());
    assert!(max_abs_diff(&features, &sae.encode(&acts).unwrap()) < 1e-6);

    // the edit path: decode(features) + the reconstruction error is the activation again
    let noop = vec![FeatureEdit::Scale {
        feature: 0,
        factor: 1.0,
    }];
    let h = sae::attach(&mut fm, &site, sae.clone(), noop).unwrap();
    let logits = fm.forward_input(&input).unwrap();
    fm.remove(h).unwrap();
    assert!(
        max_abs_diff(&logits, &plain) < 1e-5,
        "{}",
        max_abs_diff(&logits, &plain)
    );

    // zeroing the most active feature changes the output by its decoder direction
    let totals = features
        .sum(1)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (top, _) = totals
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap();
    let h = sae::attach(&mut fm, &site, sae.clone(), vec![FeatureEdit::Zero(top)]).unwrap();
    fm.register(HookFunction::new("model.layers.2")).unwrap();
    let ablated = fm.forward_input(&input).unwrap();
    fm.remove(h).unwrap();
    assert!(
        max_abs_diff(&ablated, &plain) > 1e-3,
        "zeroing feature {top} changes the logits"
    );
    // the edited site value is acts - f_top * W_dec[top]
    let f_top = features.get(0).unwrap().narrow(1, top, 1).unwrap(); // [seq, 1]
    let want = acts
        .get(0)
        .unwrap()
        .broadcast_sub(
            &f_top
                .broadcast_mul(&sae.direction(top).unwrap().unsqueeze(0).unwrap())
                .unwrap(),
        )
        .unwrap();
    let mut check =
        FlexModel::new(load(repo("models/stdlib-llama"), &LoadOptions::default()).unwrap());
    let w = want.unsqueeze(0).unwrap();
    check
        .register(
            HookFunction::new(site.as_str())
                .capture(false)
                .edit(move |_: &Tensor, _: &mut flexmodel::HookCtx| Ok(w.clone())),
        )
        .unwrap();
    let by_hand = check.forward_input(&input).unwrap();
    assert!(max_abs_diff(&ablated, &by_hand) < 1e-4);

    // bad input
    let err = sae::attach(
        &mut fm,
        &site,
        sae.clone(),
        vec![FeatureEdit::Zero(sae.d_sae())],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("does not exist"), "{err}");
    let h = sae::attach(&mut fm, "model.layers.1.mlp.act_fn", sae, vec![]).unwrap();
    let err = fm.forward_input(&input).unwrap_err();
    let chain = error_chain(&err);
    assert!(chain.contains("the SAE reads"), "{chain}");
    fm.remove(h).unwrap();
}

#[test]
fn unsupported_saes_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = repo("fixtures/saes/standard");
    std::fs::copy(
        src.join("sae_weights.safetensors"),
        tmp.path().join("sae_weights.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(src.join("cfg.json")).unwrap();
    for (from, to, message) in [
        (
            "\"standard\"",
            "\"gated\"",
            "architecture \"gated\" is not supported",
        ),
        (
            "\"none\"",
            "\"expected_average_only_in\"",
            "normalize_activations",
        ),
        ("\"d_sae\": 512", "\"d_sae\": 100", "expected [128, 100]"),
    ] {
        std::fs::write(tmp.path().join("cfg.json"), cfg.replace(from, to)).unwrap();
        let err = Sae::load(tmp.path()).unwrap_err().to_string();
        assert!(err.contains(message), "{err}");
    }
    let err = Sae::load(tmp.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cfg.json"), "{err}");
}
