//! Gradient hooks against gradients derived by hand. With loss L = sum(y), y = h², h = 2x:
//! dL/dy = 1, dL/dh = 2h = 4x, dL/dx = 2 · dL/dh = 8x.

use candle_core::Tensor;
use flexmodel_core::{Error, FlexModel, HookCtx, HookFunction};

use crate::toy::{Toy, ids, values};

fn loss(logits: &Tensor) -> Tensor {
    logits.sum_all().unwrap()
}

#[test]
fn gradients_at_every_site_match_hand_derivation() {
    let mut fm = FlexModel::new(Toy::new());
    fm.register(HookFunction::backward("*")).unwrap();
    let logits = fm.forward(&ids()).unwrap();
    fm.backward(&loss(&logits)).unwrap();
    let out = fm.output();
    assert_eq!(values(out.last("grad.square").unwrap()), [1.0, 1.0, 1.0]);
    assert_eq!(values(out.last("grad.double").unwrap()), [4.0, 8.0, 12.0]); // 4x
    assert_eq!(values(out.last("grad.embed").unwrap()), [8.0, 16.0, 24.0]); // 8x
    // Forward captures are keyed apart: none was asked for.
    assert!(out.get("square").is_none());
}

#[test]
fn edited_gradient_flows_to_earlier_sites() {
    let mut fm = FlexModel::new(Toy::new());
    // Triple dL/dy: every earlier gradient triples.
    fm.register(
        HookFunction::backward("square")
            .capture(false)
            .edit(|g: &Tensor, _: &mut HookCtx| Ok((g * 3.0)?)),
    )
    .unwrap();
    fm.register(HookFunction::backward("double")).unwrap();
    fm.register(HookFunction::backward("embed")).unwrap();
    let logits = fm.forward(&ids()).unwrap();
    fm.backward(&loss(&logits)).unwrap();
    assert_eq!(
        values(fm.output().last("grad.double").unwrap()),
        [12.0, 24.0, 36.0]
    );
    assert_eq!(
        values(fm.output().last("grad.embed").unwrap()),
        [24.0, 48.0, 72.0]
    );

    // A capture at the same site sees the gradient before that site's edit.
    let mut fm = FlexModel::new(Toy::new());
    fm.register(
        HookFunction::backward("double").edit(|g: &Tensor, _: &mut HookCtx| Ok(g.zeros_like()?)),
    )
    .unwrap();
    fm.register(HookFunction::backward("embed")).unwrap();
    let logits = fm.forward(&ids()).unwrap();
    fm.backward(&loss(&logits)).unwrap();
    assert_eq!(
        values(fm.output().last("grad.double").unwrap()),
        [4.0, 8.0, 12.0]
    );
    assert_eq!(
        values(fm.output().last("grad.embed").unwrap()),
        [0.0, 0.0, 0.0]
    );
}

#[test]
fn forward_and_backward_hooks_coexist() {
    let mut fm = FlexModel::new(Toy::new());
    fm.register(HookFunction::new("double")).unwrap();
    fm.register(HookFunction::backward("double")).unwrap();
    let logits = fm.forward(&ids()).unwrap();
    assert_eq!(values(&logits), [4.0, 16.0, 36.0]);
    fm.backward(&loss(&logits)).unwrap();
    assert_eq!(values(fm.output().last("double").unwrap()), [2.0, 4.0, 6.0]);
    assert_eq!(
        values(fm.output().last("grad.double").unwrap()),
        [4.0, 8.0, 12.0]
    );
}

#[test]
fn pre_hooks_see_and_edit_module_inputs() {
    let mut fm = FlexModel::new(Toy::new());
    fm.register(HookFunction::pre("square")).unwrap();
    fm.register(HookFunction::new("double")).unwrap();
    let logits = fm.forward(&ids()).unwrap();
    // The input of `square` is the output of `double`.
    assert_eq!(
        values(fm.output().last("input.square").unwrap()),
        values(fm.output().last("double").unwrap())
    );

    // Editing the input of `square` equals editing the output of `double`.
    let half = |x: &Tensor, _: &mut HookCtx| Ok((x * 0.5)?);
    let mut pre = FlexModel::new(Toy::new());
    pre.register(HookFunction::pre("square").edit(half))
        .unwrap();
    let mut post = FlexModel::new(Toy::new());
    post.register(HookFunction::new("double").edit(half))
        .unwrap();
    let (a, b) = (pre.forward(&ids()).unwrap(), post.forward(&ids()).unwrap());
    assert_eq!(values(&a), values(&b));
    assert_ne!(values(&a), values(&logits));
}

#[test]
fn backward_errors_are_clear() {
    let mut fm = FlexModel::new(Toy::new());
    // A loss that is not a scalar.
    fm.register(HookFunction::backward("double")).unwrap();
    let logits = fm.forward(&ids()).unwrap();
    let err = fm.backward(&logits).unwrap_err().to_string();
    assert!(
        err.contains("the loss must be a scalar, got shape [1, 3]"),
        "{err}"
    );

    // No backward hook, nothing trainable: the loss does not depend on anything differentiable.
    let mut plain = FlexModel::new(Toy::new());
    let logits = plain.forward(&ids()).unwrap();
    let err = plain.backward(&loss(&logits)).unwrap_err().to_string();
    assert!(
        err.contains("does not depend on anything differentiable"),
        "{err}"
    );

    // An edited gradient of the wrong shape names the site and both shapes.
    let mut fm = FlexModel::new(Toy::new());
    fm.register(
        HookFunction::backward("double").edit(|g: &Tensor, _: &mut HookCtx| Ok(g.narrow(1, 0, 2)?)),
    )
    .unwrap();
    let logits = fm.forward(&ids()).unwrap();
    let err = fm.backward(&loss(&logits)).unwrap_err();
    assert!(matches!(err, Error::BadEdit { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("grad.double") && msg.contains("[1, 2]") && msg.contains("[1, 3]"),
        "{msg}"
    );

    // A failing gradient hook reports its site and its own error.
    let mut fm = FlexModel::new(Toy::new());
    fm.register(
        HookFunction::backward("square")
            .edit(|_: &Tensor, _: &mut HookCtx| Err(Error::msg("nope"))),
    )
    .unwrap();
    let logits = fm.forward(&ids()).unwrap();
    let err = fm.backward(&loss(&logits)).unwrap_err();
    assert_eq!(err.to_string(), "hook at site `grad.square` failed");

    // Training without trainable parameters.
    let err = fm.trainable_vars().unwrap_err().to_string();
    assert!(err.contains("no trainable parameters"), "{err}");
}
