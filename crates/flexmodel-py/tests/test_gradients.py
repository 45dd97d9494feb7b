"""Gradients through editing functions written in torch: the gradient flows back through the
edit (torch autograd's vector-Jacobian product), so torch parameters used inside an edit get
their gradient, compared with the Rust path's gradients."""

import subprocess

import numpy as np
import pytest

import flexmodel
from conftest import TINY, assert_close, cli

torch = pytest.importorskip("torch")
PROMPT = "The capital of France is"
SITE = "model.layers.1.mlp"


def test_a_steering_vector_gets_the_gradient_of_its_site():
    fm = flexmodel.load(TINY, framework="torch")
    ids, _ = fm.tokenizer([PROMPT])
    steer = torch.nn.Parameter(torch.linspace(-1, 1, 64))
    fm.register_forward_hook(flexmodel.HookFunction(SITE, editing_function=lambda x, c: x + steer))
    # dL/d(site output), computed by candle's backward pass.
    fm.register_full_backward_hook(flexmodel.HookFunction(SITE))
    result = fm.lm_backward(ids)
    grad_site = fm.output[f"grad.{SITE}"][-1]
    # y = x + v: dL/dv is dL/dy summed over batch and positions.
    assert_close("steering gradient", steer.grad, grad_site.sum(dim=(0, 1)), 1e-5)
    assert float(steer.grad.abs().max()) > 0
    # The loss is the one of the same edit as a constant.
    plain = flexmodel.load(TINY)
    plain.register_forward_hook(flexmodel.HookFunction(SITE, editing_function=lambda x, c: x + steer.detach().numpy()))
    assert abs(plain.lm_backward(ids).loss - result.loss) <= 1e-6 * result.loss


def test_a_torch_edit_passes_the_gradient_on_as_the_rust_edit_does(tmp_path):
    # The Rust path: the CLI's scale edit, differentiated by candle.
    out = tmp_path / "rust.safetensors"
    subprocess.run(
        [str(cli()), "run", "--model", str(TINY), "--prompt", PROMPT, "--edit", f"{SITE}=scale:0.5",
         "--grad", "model.layers.0", "--out", str(out)],
        check=True, capture_output=True,
    )
    rust = flexmodel.read_safetensors(out)
    fm = flexmodel.load(TINY, framework="torch")
    ids, _ = fm.tokenizer([PROMPT])
    fm.register_forward_hook(flexmodel.HookFunction(SITE, editing_function=lambda x, c: x * 0.5))
    fm.register_full_backward_hook(flexmodel.HookFunction("model.layers.0"))
    result = fm.lm_backward(ids)
    assert abs(result.loss - float(rust["loss"])) <= 1e-6 * float(rust["loss"])
    assert_close("grad through the torch edit", fm.output["grad.model.layers.0"][-1],
                 rust["grad.model.layers.0"], 1e-5)


def test_a_probe_trains_with_a_torch_optimizer():
    fm = flexmodel.load(TINY, framework="torch")
    ids, _ = fm.tokenizer([PROMPT])
    torch.manual_seed(0)
    probe = torch.nn.Linear(64, 64)
    with torch.no_grad():
        probe.weight.zero_()
        probe.bias.zero_()
    fm.register_forward_hook(flexmodel.HookFunction(SITE, editing_function=lambda x, c: x + probe(x)))
    fm.register_full_backward_hook(flexmodel.HookFunction(SITE, capture=False))
    opt = torch.optim.SGD(probe.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        losses.append(fm.lm_backward(ids).loss)
        opt.step()
    assert losses[-1] < losses[0] - 1e-3, losses


def test_numpy_edits_are_constants_and_pass_throughs_keep_the_gradient():
    ref = flexmodel.load(TINY)
    ids, _ = ref.tokenizer([PROMPT])
    ref.register_full_backward_hook(flexmodel.HookFunction("model.layers.0"))
    ref.lm_backward(ids)
    fm = flexmodel.load(TINY)
    fm.register_forward_hook(flexmodel.HookFunction(SITE, editing_function=lambda x, c: x))
    fm.register_full_backward_hook(flexmodel.HookFunction("model.layers.0"))
    fm.lm_backward(ids)
    np.testing.assert_array_equal(fm.output["grad.model.layers.0"][-1], ref.output["grad.model.layers.0"][-1])


def test_backward_hooks_edit_the_gradient():
    ref = flexmodel.load(TINY)
    ids, _ = ref.tokenizer([PROMPT])
    ref.register_full_backward_hook(flexmodel.HookFunction("model.layers.0"))
    ref.lm_backward(ids)
    fm = flexmodel.load(TINY)
    fm.register_full_backward_hook(flexmodel.HookFunction("model.layers.0"))
    # Halving the gradient at layer 1's output halves what reaches layer 0 through layer 1's
    # residual branch too: all of it.
    fm.register_full_backward_hook(flexmodel.HookFunction("model.layers.1", editing_function=lambda g, c: g * 0.5))
    fm.lm_backward(ids)
    assert_close("halved", fm.output["grad.model.layers.0"][-1],
                 ref.output["grad.model.layers.0"][-1] * 0.5, 1e-6)


def test_a_loss_of_your_own_backpropagates_through_the_engine():
    ids = np.array([[1, 5, 9, 2, 7, 3, 8]])
    ref = flexmodel.load(TINY)
    ref.register_full_backward_hook(flexmodel.HookFunction("model.layers.0"))
    want = ref.lm_backward(ids)
    fm = flexmodel.load(TINY, framework="torch", requires_grad=True)
    fm.register_full_backward_hook(flexmodel.HookFunction("model.layers.0"))
    logits = fm(ids, grad=True)
    # transformers' causal-LM loss, written in torch on the engine's logits.
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[0, 1:]))
    grads = fm.backward(loss)
    assert abs(float(loss.detach()) - want.loss) <= 1e-6 * want.loss
    assert_close("grad through a torch loss", fm.output["grad.model.layers.0"][-1],
                 ref.output["grad.model.layers.0"][-1], 1e-5)
    assert grads["model.layers.0.mlp.up_proj.weight"].shape == (128, 64)
    # The same loss's gradient with respect to the logits, given as an array.
    np_fm = flexmodel.load(TINY)
    np_fm.register_full_backward_hook(flexmodel.HookFunction("model.layers.0"))
    lg = np_fm(ids, grad=True)
    p = np.exp(lg[0, :-1] - lg[0, :-1].max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(6), ids[0, 1:]] -= 1
    dlogits = np.zeros_like(lg)
    dlogits[0, :-1] = p / 6
    np_fm.backward(dlogits)
    assert_close("grad from an array", np_fm.output["grad.model.layers.0"][-1],
                 ref.output["grad.model.layers.0"][-1], 1e-5)
    with pytest.raises(flexmodel.BackwardError, match="no recorded forward pass"):
        np_fm.backward(dlogits)
