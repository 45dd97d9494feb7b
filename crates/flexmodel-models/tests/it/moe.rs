//! Mixture-of-experts routing, read and edited at its sites, against the experts computed by
//! hand from the checkpoint's weights.

use candle_core::{D, DType, Device, Tensor};
use flexmodel_core::{FlexModel, HookCtx, HookFunction};
use flexmodel_models::{LoadOptions, load};
use flexmodel_testkit::{assert_close, model_dir, reference};

/// Mixtral's expert `e` of layer `layer` on `x` `[tokens, hidden]`:
/// `(silu(x w1^T) * x w3^T) w2^T`, from the weights as stored.
fn expert(layer: usize, e: usize, x: &Tensor) -> Tensor {
    let weights = candle_core::safetensors::load(
        model_dir("mixtral").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let w = |m: &str| {
        weights[&format!("model.layers.{layer}.block_sparse_moe.experts.{e}.{m}.weight")]
            .t()
            .unwrap()
    };
    let gate = candle_nn::ops::silu(&x.matmul(&w("w1")).unwrap()).unwrap();
    let up = x.matmul(&w("w3")).unwrap();
    (gate * up).unwrap().matmul(&w("w2")).unwrap()
}

/// Routing every token to experts 2 and 0 with weights 1 and 0 makes the block's `experts`
/// output expert 2 alone; the captured routing is the router's top-2 before the edit.
#[test]
fn edited_routing_sends_every_token_to_the_chosen_expert() {
    let refs = reference("mixtral");
    let mut fm = FlexModel::new(load(model_dir("mixtral"), &LoadOptions::default()).unwrap());
    let moe = "model.layers.1.mlp";
    fm.register(HookFunction::new(format!("{moe}.hook_topk_experts")).edit(
        |x: &Tensor, _: &mut HookCtx| {
            let (t, _) = x.dims2()?;
            let row = Tensor::new(&[2u32, 0], x.device())?;
            Ok(row.unsqueeze(0)?.repeat((t, 1))?)
        },
    ))
    .unwrap();
    fm.register(HookFunction::new(format!("{moe}.hook_topk_weights")).edit(
        |x: &Tensor, _: &mut HookCtx| {
            let (t, _) = x.dims2()?;
            let row = Tensor::new(&[1f32, 0.0], x.device())?;
            Ok(row.unsqueeze(0)?.repeat((t, 1))?.to_dtype(x.dtype())?)
        },
    ))
    .unwrap();
    for site in [
        "model.layers.1.post_attention_layernorm",
        "model.layers.1.mlp.experts",
        "model.layers.1.mlp.hook_router_probs",
    ] {
        fm.register(HookFunction::new(site)).unwrap();
    }
    fm.forward(&refs["input_ids"]).unwrap();
    let out = fm.output();
    let x = out.last("model.layers.1.post_attention_layernorm").unwrap();
    let x = x
        .reshape((x.elem_count() / x.dim(2).unwrap(), x.dim(2).unwrap()))
        .unwrap();
    let got = out.last("model.layers.1.mlp.experts").unwrap();
    assert_close("routed to expert 2", got, &expert(1, 2, &x), 1e-5);
    // Not vacuous: expert 2 alone differs from expert 0 alone.
    assert!(flexmodel_testkit::rel_err(&expert(1, 0, &x), got) > 1e-2);

    // The router's probabilities: softmax of the router's logits by hand.
    let weights = candle_core::safetensors::load(
        model_dir("mixtral").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let router = &weights["model.layers.1.block_sparse_moe.gate.weight"];
    let logits = x.matmul(&router.t().unwrap()).unwrap();
    let probs = candle_nn::ops::softmax(&logits.to_dtype(DType::F32).unwrap(), D::Minus1).unwrap();
    assert_close(
        "router probabilities",
        out.last("model.layers.1.mlp.hook_router_probs").unwrap(),
        &probs,
        1e-5,
    );
}

/// A chosen expert outside the model is an input error naming the count.
#[test]
fn routing_to_a_missing_expert_is_an_error() {
    let refs = reference("mixtral");
    let mut fm = FlexModel::new(load(model_dir("mixtral"), &LoadOptions::default()).unwrap());
    fm.register(
        HookFunction::new("model.layers.0.mlp.hook_topk_experts")
            .edit(|x: &Tensor, _: &mut HookCtx| Ok((x.ones_like()? * 7.0)?)),
    )
    .unwrap();
    let err = fm.forward(&refs["input_ids"]).unwrap_err().to_string();
    assert!(err.contains("expert 7 chosen, the model has 4"), "{err}");
}

/// Capturing every site inside the experts changes nothing: the block's outputs equal the
/// plain forward's (the experts' outputs are assembled per choice, then weighted).
#[test]
fn hooking_the_experts_leaves_the_output_unchanged() {
    let refs = reference("qwen2_moe");
    let mut fm = FlexModel::new(load(model_dir("qwen2_moe"), &LoadOptions::default()).unwrap());
    let plain = fm.forward(&refs["input_ids"]).unwrap();
    fm.register(HookFunction::new("*.mlp.experts.*")).unwrap();
    let hooked = fm.forward(&refs["input_ids"]).unwrap();
    assert_close("hooked experts", &hooked, &plain, 1e-6);
    assert_close("logits", &plain, &refs["logits"], 1e-4);
    // Each choice's output, weighted and summed, is the experts' output.
    let out = fm.output();
    let each = out
        .last("model.layers.0.mlp.experts.hook_expert_out")
        .unwrap();
    assert_eq!(each.dims(), &[32, 2, 64]);
    assert!(out.get("model.layers.0.mlp.experts.act_fn").unwrap().len() >= 2);
}
