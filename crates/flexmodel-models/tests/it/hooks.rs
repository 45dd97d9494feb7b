//! The hook surface on real models: gradient edits reaching the weights, pre-hooks, parameter
//! access, trainable modules.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use flexmodel_core::{Error, FlexModel, HookCtx, HookFunction, Input, causal_lm_loss};
use flexmodel_models::{LoadOptions, load};

use flexmodel_testkit::{assert_close, model_dir, reference};

fn wrapped(arch: &str, requires_grad: bool) -> FlexModel {
    let options = LoadOptions {
        requires_grad,
        ..Default::default()
    };
    FlexModel::new(load(model_dir(arch), &options).unwrap())
}

/// Gradient of every weight after a backward pass, with the gradient at `site` scaled by
/// `factor` (or untouched).
fn weight_grads(site: &str, factor: Option<f64>) -> HashMap<String, Tensor> {
    let mut fm = wrapped("llama", true);
    if let Some(f) = factor {
        fm.register(
            HookFunction::backward(site)
                .capture(false)
                .edit(move |g: &Tensor, _: &mut HookCtx| Ok((g * f)?)),
        )
        .unwrap();
    }
    let input = Input::new(reference("llama")["input_ids"].clone());
    let logits = fm.forward_input(&input).unwrap();
    let grads = fm
        .backward(&causal_lm_loss(&logits, &input).unwrap())
        .unwrap();
    fm.model()
        .parameters()
        .iter()
        .map(|(name, p)| {
            (
                name.to_string(),
                grads
                    .get(p)
                    .unwrap_or_else(|| panic!("no gradient for {name}"))
                    .clone(),
            )
        })
        .collect()
}

fn norm(t: &Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Parameters that feed `model.layers.0` (the embedding and layer 0) are below it.
fn below_layer0(name: &str) -> bool {
    name.starts_with("model.embed_tokens") || name.starts_with("model.layers.0.")
}

#[test]
fn zeroed_gradient_at_a_layer_zeroes_every_weight_gradient_below_it() {
    let clean = weight_grads("model.layers.0", None);
    let zeroed = weight_grads("model.layers.0", Some(0.0));
    assert_eq!(clean.len(), zeroed.len());
    assert!(clean.len() > 10);
    for (name, g) in &zeroed {
        if below_layer0(name) {
            assert_eq!(norm(g), 0.0, "{name} should get no gradient");
            assert!(
                norm(&clean[name]) > 0.0,
                "{name} had a gradient without the edit"
            );
        } else {
            assert_close(name, g, &clean[name], 1e-6);
        }
    }
}

#[test]
fn doubled_gradient_at_a_layer_doubles_every_weight_gradient_below_it() {
    let clean = weight_grads("model.layers.0", None);
    let doubled = weight_grads("model.layers.0", Some(2.0));
    for (name, g) in &doubled {
        let want = if below_layer0(name) {
            (&clean[name] * 2.0).unwrap()
        } else {
            clean[name].clone()
        };
        assert_close(name, g, &want, 1e-5);
    }
}

#[test]
fn pre_hook_sees_the_previous_layer_output() {
    for arch in ["llama", "gpt2", "opt"] {
        let mut fm = wrapped(arch, false);
        let layers = fm.model().info().decoder_layers.clone();
        fm.register(HookFunction::new(layers[0].as_str())).unwrap();
        fm.register(HookFunction::pre(layers[1].as_str())).unwrap();
        let ids = reference(arch)["input_ids"].clone();
        fm.forward(&ids).unwrap();
        let out = fm.output();
        let input = out.last(&format!("input.{}", layers[1])).unwrap();
        assert_close(
            &format!("{arch} input of layer 1"),
            input,
            out.last(&layers[0]).unwrap(),
            0.0,
        );
    }
}

#[test]
fn pre_hook_edit_equals_post_hook_edit_of_the_previous_layer() {
    let steer = |x: &Tensor, _: &mut HookCtx| Ok(((x * 0.5)? + 1.0)?);
    let ids = reference("llama")["input_ids"].clone();
    let mut pre = wrapped("llama", false);
    pre.register(HookFunction::pre("model.layers.1").edit(steer))
        .unwrap();
    let mut post = wrapped("llama", false);
    post.register(HookFunction::new("model.layers.0").edit(steer))
        .unwrap();
    let (a, b) = (pre.forward(&ids).unwrap(), post.forward(&ids).unwrap());
    assert_close("pre vs post edit", &a, &b, 0.0);
    assert!(
        flexmodel_testkit::rel_err(&a, &reference("llama")["logits"]) > 1e-2,
        "the edit must change the logits"
    );
}

#[test]
fn pre_hook_on_an_attention_internal_is_an_error() {
    let mut fm = wrapped("llama", false);
    let err = fm
        .register(HookFunction::pre("model.layers.0.self_attn.hook_q"))
        .unwrap_err();
    assert!(matches!(err, Error::NotAModule(_)), "{err}");
}

#[test]
fn parameters_by_hugging_face_name() {
    let weights = candle_core::safetensors::load(
        model_dir("gpt_neox").join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let fm = wrapped("gpt_neox", false);
    let name = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight";
    assert_close(name, &fm.parameter(name).unwrap(), &weights[name], 0.0);
    // transformers 5 calls the head lm_head; the checkpoint stores embed_out.
    assert_close(
        "lm_head.weight",
        &fm.parameter("lm_head.weight").unwrap(),
        &weights["embed_out.weight"],
        0.0,
    );
    // A tied head is the embedding.
    let gpt2 = wrapped("gpt2", false);
    assert_close(
        "tied",
        &gpt2.parameter("lm_head.weight").unwrap(),
        &gpt2.parameter("transformer.wte.weight").unwrap(),
        0.0,
    );
    let err = fm
        .parameter("gpt_neox.layers.1.mlp.dense_h_to_4h.wieght")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("did you mean `gpt_neox.layers.1.mlp.dense_h_to_4h.weight`"),
        "{err}"
    );
}

/// A steering vector trained through an editing function: it learns to make the model predict
/// token 7 after every position, while the model's weights stay frozen.
#[test]
fn trainable_module_in_an_edit_learns_from_the_model_output() {
    let mut fm = wrapped("llama", false);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &candle_core::Device::Cpu);
    let steer = vb
        .get_with_hints(64, "steer", candle_nn::Init::Const(0.0))
        .unwrap();
    fm.add_module("steer", steer, varmap.all_vars());
    fm.register(HookFunction::new("model.layers.0").capture(false).edit(
        |x: &Tensor, cx: &mut HookCtx| {
            let v = cx.modules.get::<Tensor>("steer")?;
            Ok(x.broadcast_add(v)?)
        },
    ))
    .unwrap();
    let frozen = fm.parameter("model.layers.1.mlp.up_proj.weight").unwrap();
    let before = frozen.to_vec2::<f32>().unwrap();
    let ids = reference("llama")["input_ids"].clone();
    let target = Tensor::full(7u32, (2, 16), &candle_core::Device::Cpu).unwrap();
    let mut opt = candle_nn::AdamW::new(
        fm.trainable_vars().unwrap(),
        candle_nn::ParamsAdamW {
            lr: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    let mut losses = Vec::new();
    for _ in 0..30 {
        let logits = fm.forward(&ids).unwrap();
        let loss = candle_nn::loss::cross_entropy(
            &logits.reshape((32, 512)).unwrap(),
            &target.flatten_all().unwrap(),
        )
        .unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let grads = fm.backward(&loss).unwrap();
        assert!(
            grads.get(&frozen).is_none(),
            "model weights must stay frozen"
        );
        opt.step(&grads).unwrap();
    }
    assert!(
        losses[29] < losses[0] / 2.0,
        "loss {} -> {}",
        losses[0],
        losses[29]
    );
    assert_eq!(frozen.to_vec2::<f32>().unwrap(), before);
}

/// `capture` stops after the last decoder layer its hooks need, and its captures and edits
/// are those of the whole forward pass; a hook after the layers makes it run to the end.
#[test]
fn capture_stops_after_the_last_hooked_layer_with_the_same_captures() {
    let final_norms = [
        ("llama", "model.norm"),
        ("gpt2", "transformer.ln_f"),
        ("opt", "model.decoder.final_layer_norm"),
        ("falcon", "transformer.ln_f"),
    ];
    for (arch, after) in final_norms {
        let refs = reference(arch);
        let input = Input::new(refs["input_ids"].clone());
        let mut fm = wrapped(arch, false);
        let layers = fm.model().info().decoder_layers.clone();
        let (first, last) = (&layers[0], &layers[layers.len() - 1]);
        let embed = fm
            .model()
            .sites()
            .iter()
            .map(|(_, s)| s.name.to_string())
            .find(|n| {
                n.ends_with("embed_tokens") || n.ends_with(".wte") || n.ends_with("word_embeddings")
            });
        let embed = embed.unwrap_or_else(|| panic!("{arch}: no embedding site"));
        let cases: Vec<(Vec<String>, Option<usize>)> = vec![
            (vec![first.clone()], Some(0)),
            (vec![embed], Some(0)),
            (
                vec![format!("{first}.*"), format!("{last}")],
                Some(layers.len() - 1),
            ),
            (vec![first.clone(), after.to_string()], None),
            (vec!["lm_head".into()], None),
        ];
        for (patterns, stop) in cases {
            let handles: Vec<_> = patterns
                .iter()
                .map(|p| fm.register(HookFunction::new(p.as_str())).unwrap())
                .collect();
            // An edit in the first layer: later captures see it in both passes.
            let edit = fm
                .register(
                    HookFunction::new(first.as_str())
                        .capture(false)
                        .edit(|x: &Tensor, _: &mut HookCtx| Ok((x * 0.5)?)),
                )
                .unwrap();
            fm.forward_input(&input).unwrap();
            let whole = fm.take_output();
            let stopped = fm.capture(&input).unwrap();
            let part = fm.take_output();
            assert_eq!(stopped, stop, "{arch} {patterns:?}");
            let keys = |m: &flexmodel_core::OutputMap| {
                m.iter()
                    .map(|(k, v)| (k.to_string(), v.len()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(keys(&part), keys(&whole), "{arch} {patterns:?}");
            for (key, got) in part.iter() {
                let want = whole.get(key).unwrap();
                for (g, w) in got.iter().zip(want) {
                    assert_close(&format!("{arch} {key}"), g, w, 0.0);
                }
            }
            for h in handles.into_iter().chain([edit]) {
                fm.remove(h).unwrap();
            }
        }
    }
}
