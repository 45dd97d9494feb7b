//! Every module output and the logits of every fixture architecture equal transformers'.

use candle_core::Tensor;
use flexmodel_core::{FlexModel, HookFunction, Input, SiteKind, causal_lm_loss};
use flexmodel_models::{LoadOptions, load};

use flexmodel_testkit::{ARCHS, assert_close, model_dir, reference, reference_json};

/// Site name and firing index of a reference key (`name#k` is the k-th call).
fn site_and_call(key: &str) -> (&str, usize) {
    match key.split_once('#') {
        Some((name, k)) => (name, k.parse().expect("call index")),
        None => (key, 0),
    }
}

fn module_keys(arch: &str) -> Vec<String> {
    let json = reference_json(arch);
    let keys = json["keys"].as_object().expect("keys");
    keys.iter()
        .filter(|(_, v)| v["kind"] == "module_output")
        .map(|(k, _)| k.clone())
        .collect()
}

fn check_arch(arch: &str) {
    let refs = reference(arch);
    let model = load(model_dir(arch), &LoadOptions::default()).unwrap();
    let mut fm = FlexModel::new(model);
    fm.register(HookFunction::new("*")).unwrap();
    let logits = fm.forward(&refs["input_ids"]).unwrap();
    assert_close(&format!("{arch} logits"), &logits, &refs["logits"], 1e-4);
    let keys = module_keys(arch);
    assert!(keys.len() >= 20, "{arch}: only {} module keys", keys.len());
    for key in keys {
        let (site, call) = site_and_call(&key);
        let captured = fm
            .output()
            .get(site)
            .unwrap_or_else(|| panic!("{arch}: site {site} never fired"));
        let want = match site.strip_suffix(".experts.act_fn") {
            Some(moe) => token_order(&refs[&key], fm.output(), moe, call),
            None => refs[&key].clone(),
        };
        assert_close(&format!("{arch} {key}"), &captured[call], &want, 1e-4);
    }
}

/// transformers' eager experts loop runs the `call`-th expert that has tokens on the tokens
/// whose first choice it is, then on those whose second choice it is, ...; flexmodel on its
/// tokens in token order. The reference rows of `experts.act_fn` reordered by token, read off
/// the routing flexmodel captured (which the block's output checks).
fn token_order(
    rows: &Tensor,
    output: &flexmodel_core::OutputMap,
    moe: &str,
    call: usize,
) -> Tensor {
    let chosen: Vec<Vec<u32>> = output.get(&format!("{moe}.hook_topk_experts")).unwrap()[0]
        .to_vec2()
        .unwrap();
    let mut hit: Vec<u32> = chosen.iter().flatten().copied().collect();
    hit.sort_unstable();
    hit.dedup();
    let e = hit[call];
    let k = chosen[0].len();
    // (token, row in transformers' order) for expert e.
    let mut hf: Vec<(usize, u32)> = (0..k)
        .flat_map(|j| (0..chosen.len()).map(move |t| (j, t)))
        .filter(|&(j, t)| chosen[t][j] == e)
        .enumerate()
        .map(|(row, (_, t))| (t, row as u32))
        .collect();
    hf.sort_unstable();
    let order: Vec<u32> = hf.into_iter().map(|(_, row)| row).collect();
    let n = order.len();
    rows.index_select(&Tensor::from_vec(order, n, rows.device()).unwrap(), 0)
        .unwrap()
}

fn check_site_list(arch: &str) {
    let sites = flexmodel_models::sites(model_dir(arch)).unwrap();
    for key in module_keys(arch) {
        let (site, _) = site_and_call(&key);
        let id = sites
            .id(site)
            .unwrap_or_else(|| panic!("{arch}: no site {site}"));
        assert_eq!(sites.get(id).kind, SiteKind::Module, "{arch}: {site}");
    }
    let json = reference_json(arch);
    let layers = json["num_layers"].as_u64().unwrap();
    let prefix = json["decoder_layers"].as_str().unwrap();
    // And the other way round: every module site is a module transformers calls.
    let called: Vec<String> = module_keys(arch)
        .iter()
        .map(|k| site_and_call(k).0.to_string())
        .collect();
    for (_, info) in sites.iter() {
        match info.kind {
            SiteKind::Internal => assert!(info.name.contains(".hook_"), "{arch}: {}", info.name),
            _ => assert!(
                called.iter().any(|c| **c == *info.name),
                "{arch}: {} is not a called HF module",
                info.name
            ),
        }
    }
    for layer in 0..layers {
        let attn = sites
            .iter()
            .map(|(_, s)| s.name.to_string())
            .find(|n| {
                n.starts_with(&format!("{prefix}.{layer}.")) && n.ends_with(".hook_attn_probs")
            })
            .unwrap_or_else(|| panic!("{arch}: layer {layer} has no hook_attn_probs"));
        let module = attn.trim_end_matches(".hook_attn_probs");
        for extra in [
            "hook_q",
            "hook_k",
            "hook_v",
            "hook_attn_probs",
            "hook_head_out",
        ] {
            let name = format!("{module}.{extra}");
            let id = sites
                .id(&name)
                .unwrap_or_else(|| panic!("{arch}: no {name}"));
            assert_eq!(sites.get(id).kind, SiteKind::Internal);
        }
    }
}

fn check_edit(arch: &str) {
    let refs = reference(arch);
    let json = reference_json(arch);
    let module = json["edit"]["module"].as_str().unwrap();
    let mut fm = FlexModel::new(load(model_dir(arch), &LoadOptions::default()).unwrap());
    fm.register(
        HookFunction::new(module)
            .edit(|x: &Tensor, _: &mut flexmodel_core::HookCtx| Ok((x * 0.0)?)),
    )
    .unwrap();
    let logits = fm.forward(&refs["input_ids"]).unwrap();
    assert_close(
        &format!("{arch} edit.mlp_zero.logits"),
        &logits,
        &refs["edit.mlp_zero.logits"],
        1e-4,
    );
    // The capture is the value before the edit.
    assert_close(
        &format!("{arch} pre-edit capture"),
        fm.output().last(module).unwrap(),
        &refs[module],
        1e-4,
    );
}

/// `grad.loss` and the gradient of the loss at every decoder layer's output.
fn check_gradients(arch: &str) {
    let refs = reference(arch);
    let model = load(model_dir(arch), &LoadOptions::default()).unwrap();
    let layers = model.info().decoder_layers.clone();
    let mut fm = FlexModel::new(model);
    for layer in &layers {
        fm.register(HookFunction::backward(layer.as_str())).unwrap();
    }
    let input = Input::new(refs["input_ids"].clone());
    let logits = fm.forward_input(&input).unwrap();
    let loss = causal_lm_loss(&logits, &input).unwrap();
    assert_close(&format!("{arch} loss"), &loss, &refs["grad.loss"], 1e-5);
    fm.backward(&loss).unwrap();
    for layer in &layers {
        let key = format!("grad.{layer}");
        let got = fm
            .output()
            .last(&key)
            .unwrap_or_else(|| panic!("{arch}: no {key}"))
            .clone();
        assert_close(&format!("{arch} {key}"), &got, &refs[&key], 1e-4);
    }
}

macro_rules! arch_tests {
    ($($arch:ident),*) => {$(
        mod $arch {
            #[test]
            fn matches_reference() {
                super::check_arch(stringify!($arch));
            }
            #[test]
            fn site_list_has_every_module() {
                super::check_site_list(stringify!($arch));
            }
            #[test]
            fn edit_reproduces_mlp_zero() {
                super::check_edit(stringify!($arch));
            }
            #[test]
            fn gradients_match_reference() {
                super::check_gradients(stringify!($arch));
            }
            #[test]
            fn greedy_generation_matches_reference() {
                crate::generate::check_greedy(stringify!($arch));
            }
            #[test]
            fn every_decode_step_equals_the_full_forward() {
                crate::generate::check_cache(stringify!($arch));
            }
        }
    )*};
}

arch_tests!(
    llama, mistral, qwen2, gemma, phi, gpt2, gpt_neox, falcon, opt
);

// Config options the base fixtures do not use (fixtures/variants.py says what each turns on).
arch_tests!(
    llama_rope_llama3,
    llama_rope_linear,
    llama_rope_dynamic,
    qwen2_rope_yarn,
    llama_bias_tied_mqa,
    mistral_sliding,
    qwen2_sliding,
    gpt_neox_sequential,
    falcon_new_arch,
    falcon_sequential,
    opt_post_ln_proj,
    phi_qk_layernorm,
    gpt2_inverse_layer_idx
);

// The later families (fixtures/families.py says what the variants turn on).
arch_tests!(
    qwen3,
    gemma2,
    gemma3_text,
    olmo2,
    phi3,
    mixtral,
    qwen2_moe,
    qwen3_moe,
    qwen3_sliding,
    phi3_longrope,
    qwen2_moe_dense_layer
);

#[test]
fn fixture_list_is_complete() {
    assert_eq!(ARCHS.len(), 9);
}
