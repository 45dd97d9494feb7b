//! Bad input gives a clear error naming the problem and what would be accepted, never a panic.

use std::path::Path;

use candle_core::{Device, Tensor};
use flexmodel_core::{Error as CoreError, FlexModel, HookCtx, HookFunction, Input};
use flexmodel_models::{Error, LoadOptions, Tokenizer, load};

use flexmodel_testkit::{max_abs_diff, model_dir, reference};

fn llama() -> FlexModel {
    FlexModel::new(load(model_dir("llama"), &LoadOptions::default()).unwrap())
}

fn ids() -> Tensor {
    reference("llama")["input_ids"].clone()
}

/// A copy of the llama fixture in a temporary directory, to break on purpose.
fn copy_llama() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model_dir("llama").join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut json);
    std::fs::write(path, json.to_string()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_site_suggests_nearest_names() {
    let err = llama()
        .register(HookFunction::new("model.layers.0.mpl"))
        .unwrap_err();
    assert!(
        matches!(&err, CoreError::UnknownSite { suggestions, .. } if suggestions[0] == "model.layers.0.mlp"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("did you mean `model.layers.0.mlp`"),
        "{err}"
    );
}

#[test]
fn pattern_with_no_match_is_an_error() {
    let err = llama()
        .register(HookFunction::new("model.layers.*.attn"))
        .unwrap_err();
    assert!(matches!(err, CoreError::NoMatch { .. }), "{err}");
    assert!(err.to_string().contains("matches no site"), "{err}");
}

#[test]
fn wrong_expected_shape_names_both_shapes() {
    let mut fm = llama();
    fm.register(HookFunction::new("model.layers.0").expected_shape(&[2, 16, 65]))
        .unwrap();
    let err = fm.forward(&ids()).unwrap_err().to_string();
    assert_eq!(
        err,
        "site `model.layers.0`: expected shape [2, 16, 65], got [2, 16, 64]"
    );
}

#[test]
fn expected_dims_match_any_size_where_none_is_given() {
    let mut fm = llama();
    fm.register(HookFunction::new("model.layers.0").expected_dims(&[None, None, Some(64)]))
        .unwrap();
    fm.forward(&ids()).unwrap();
    fm.register(HookFunction::new("model.layers.1").expected_dims(&[None, Some(8), Some(64)]))
        .unwrap();
    let err = fm.forward(&ids()).unwrap_err().to_string();
    assert_eq!(
        err,
        "site `model.layers.1`: expected shape [any, 8, 64], got [2, 16, 64]"
    );
    let mut fm = llama();
    fm.register(HookFunction::new("model.layers.0").expected_dims(&[None, None]))
        .unwrap();
    assert!(
        fm.forward(&ids()).is_err(),
        "a rank-3 activation against 2 dimensions"
    );
}

#[test]
fn edit_returning_wrong_shape_names_site_and_shapes() {
    let mut fm = llama();
    fm.register(
        HookFunction::new("model.layers.1.mlp")
            .edit(|x: &Tensor, _: &mut HookCtx| Ok(x.narrow(2, 0, 10)?)),
    )
    .unwrap();
    let err = fm.forward(&ids()).unwrap_err().to_string();
    assert!(
        err.contains("site `model.layers.1.mlp`")
            && err.contains("[2, 16, 10]")
            && err.contains("[2, 16, 64]"),
        "{err}"
    );
}

#[test]
fn edit_returning_wrong_dtype_is_an_error() {
    let mut fm = llama();
    fm.register(
        HookFunction::new("model.norm")
            .edit(|x: &Tensor, _: &mut HookCtx| Ok(x.to_dtype(candle_core::DType::F16)?)),
    )
    .unwrap();
    let err = fm.forward(&ids()).unwrap_err().to_string();
    assert!(
        err.contains("F16") && err.contains("F32") && err.contains("model.norm"),
        "{err}"
    );
}

#[test]
fn failing_hook_reports_its_site() {
    let mut fm = llama();
    fm.register(
        HookFunction::new("lm_head")
            .edit(|_: &Tensor, _: &mut HookCtx| Err(CoreError::msg("probe not trained"))),
    )
    .unwrap();
    let err = fm.forward(&ids()).unwrap_err();
    assert_eq!(err.to_string(), "hook at site `lm_head` failed");
    assert_eq!(
        std::error::Error::source(&err).unwrap().to_string(),
        "probe not trained"
    );
}

#[test]
fn removed_hook_stops_firing_and_restore_gives_the_plain_model() {
    let mut fm = llama();
    let h = fm
        .register(
            HookFunction::new("model.layers.1.mlp")
                .edit(|x: &Tensor, _: &mut HookCtx| Ok(x.zeros_like()?)),
        )
        .unwrap();
    let edited = fm.forward(&ids()).unwrap();
    fm.remove(h).unwrap();
    assert!(matches!(fm.remove(h), Err(CoreError::UnknownHook(_))));
    let plain = fm.forward(&ids()).unwrap();
    let model = fm.restore();
    let restored = model.forward(&ids()).unwrap();
    assert_eq!(max_abs_diff(&plain, &restored), 0.0);
    assert!(max_abs_diff(&edited, &plain) > 1e-3);
}

#[test]
fn missing_tensor_is_named_with_nearest_names() {
    let dir = copy_llama();
    let path = dir.path().join("model.safetensors");
    let mut weights = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    weights.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&weights, &path).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.starts_with(
            "tensor `model.layers.1.mlp.up_proj.weight` is missing from the checkpoint"
        ),
        "{err}"
    );
    assert!(err.contains("model.layers.0.mlp.up_proj.weight"), "{err}");
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = copy_llama();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn weight_with_wrong_shape_is_reported() {
    let dir = copy_llama();
    edit_config(dir.path(), |c| c["intermediate_size"] = 96.into());
    let err = load_err(dir.path());
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight")
            && err.contains("[128, 64]")
            && err.contains("[96, 64]"),
        "{err}"
    );
}

#[test]
fn unsupported_config_options_fail_at_load() {
    let dir = copy_llama();
    edit_config(dir.path(), |c| {
        c["rope_parameters"]["rope_type"] = "mrope".into()
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("rope_type") && err.contains("mrope") && err.contains("longrope"),
        "{err}"
    );

    edit_config(dir.path(), |c| {
        c["rope_parameters"]["rope_type"] = "default".into();
        c["hidden_act"] = "mish".into();
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("hidden_act") && err.contains("mish") && err.contains("silu"),
        "{err}"
    );

    edit_config(dir.path(), |c| {
        c["hidden_act"] = "silu".into();
        c["final_logit_softcapping"] = 30.0.into();
    });
    let err = load_err(dir.path());
    assert!(err.contains("final_logit_softcapping = 30.0"), "{err}");

    edit_config(dir.path(), |c| c["model_type"] = "mamba".into());
    let err = load_err(dir.path());
    assert!(
        err.contains("unsupported model_type `mamba`") && err.contains("llama"),
        "{err}"
    );
}

/// A copy of a fixture's config and weights, to edit.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model_dir(name).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

#[test]
fn options_of_the_later_families_are_checked() {
    let dir = copy_fixture("gemma2");
    edit_config(dir.path(), |c| {
        c["use_bidirectional_attention"] = true.into()
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("use_bidirectional_attention") && err.contains("causal"),
        "{err}"
    );

    let dir = copy_fixture("phi3_longrope");
    edit_config(dir.path(), |c| {
        c["rope_parameters"]["long_factor"] = serde_json::json!([1.0, 2.0]);
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("long_factor") && err.contains("a list of 4 numbers"),
        "{err}"
    );

    // A Gemma 2 option in a family without it is still foreign.
    let dir = copy_fixture("qwen3");
    edit_config(dir.path(), |c| c["attn_logit_softcapping"] = 50.0.into());
    let err = load_err(dir.path());
    assert!(err.contains("attn_logit_softcapping = 50.0"), "{err}");
}

#[test]
fn alibi_falcon_is_rejected() {
    let dir = copy_fixture("falcon");
    edit_config(dir.path(), |c| c["alibi"] = true.into());
    let err = load_err(dir.path());
    assert!(err.contains("alibi") && err.contains("rotary"), "{err}");
}

#[test]
fn missing_directory_and_weights_are_reported() {
    let err = load_err(Path::new("/nonexistent/model"));
    assert!(
        err.contains("`/nonexistent/model` is not a model directory: pass a directory"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("No such file"),
        "{err}"
    );
    std::fs::copy(
        model_dir("llama").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    assert!(
        load_err(dir.path()).contains("expected model.safetensors or model.safetensors.index.json")
    );
}

#[test]
fn prompt_without_tokenizer_is_a_clear_error() {
    let dir = copy_llama();
    let err = Tokenizer::from_dir(dir.path()).err().unwrap();
    assert!(matches!(err, Error::NoTokenizer { .. }));
    assert!(
        err.to_string().contains("has no tokenizer.json")
            && err.to_string().contains("--input-ids"),
        "{err}"
    );
}

#[test]
fn malformed_inputs_are_rejected() {
    let mut fm = llama();
    let flat = Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap();
    let err = fm.forward(&flat).unwrap_err().to_string();
    assert!(err.contains("input_ids must be [batch, seq]"), "{err}");
    let mask = Tensor::ones((2, 3), candle_core::DType::U32, &Device::Cpu).unwrap();
    let err = fm
        .forward_input(&Input::with_mask(ids(), mask))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("attention_mask shape [2, 3] differs from input_ids shape [2, 16]"),
        "{err}"
    );
    let floats = ids().to_dtype(candle_core::DType::F32).unwrap();
    assert!(
        fm.forward(&floats)
            .unwrap_err()
            .to_string()
            .contains("must be integers")
    );
}

#[test]
fn token_id_beyond_vocabulary_is_an_error_not_a_panic() {
    let mut fm = llama();
    let ids = Tensor::new(&[[1u32, 512]], &Device::Cpu).unwrap();
    assert!(fm.forward(&ids).is_err());
}

#[test]
fn tokenizer_round_trips_fixture_prompts() {
    let json = flexmodel_testkit::reference_json("llama");
    let tok = Tokenizer::from_dir(model_dir("llama")).unwrap();
    for (prompt, ids) in json["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(json["input_ids"].as_array().unwrap())
    {
        let want: Vec<u32> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(prompt.as_str().unwrap()).unwrap(), want);
    }
}
