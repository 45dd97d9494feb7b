"""The analyses and SAEs from Python, checked against what the model computes itself: the lens's
last layer is the model's distribution, attributions sum to its logit, a sweep cell is the same
patch made with a Python editing function, an attached SAE changes nothing until a feature is
edited, and the SAE's features are torch's (fixtures/saes)."""

import numpy as np
import pytest

import flexmodel
from conftest import ROOT, model_dir

TRAINED = ROOT / "models" / "stdlib-llama"
SAE = TRAINED / "saes" / "model.layers.1"


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def fm():
    return flexmodel.load(model_dir("gpt2"))


IDS = np.array([[3, 17, 42, 9, 11, 5]])


def test_lens_last_layer_is_the_model(fm):
    logits = fm(IDS)
    lens = fm.logit_lens(IDS, top_k=2, target=9)
    assert lens["points"][0] == "embed" and len(lens["points"]) == len(fm.decoder_layers) + 1
    p = softmax(logits.astype(np.float64))
    np.testing.assert_allclose(lens["target_probs"][-1], p[..., 9], atol=1e-5)
    np.testing.assert_array_equal(lens["top_ids"][-1][..., 0], p.argmax(-1))
    np.testing.assert_allclose(lens["final_token_probs"][-1], p.max(-1), atol=1e-5)


def test_attributions_sum_to_the_logit(fm):
    logits = fm(IDS)
    dla = fm.direct_logit_attribution(IDS, 9, versus=20)
    want = logits[0, -1, 9] - logits[0, -1, 20]
    np.testing.assert_allclose(dla["logit"][0], want, atol=1e-4)
    np.testing.assert_allclose(dla["values"].sum(1)[0] + dla["bias"][0], want, atol=1e-4)
    assert dla["components"][0] == "embed" and len(dla["components"]) == dla["values"].shape[1]
    with pytest.raises(flexmodel.InputError, match="not one"):
        fm.direct_logit_attribution(IDS, "two tokens here")


def test_a_sweep_cell_is_the_patch_made_by_hand(fm):
    clean, corrupted = IDS, np.array([[3, 17, 50, 9, 11, 5]])
    sweep = fm.patching_sweep(clean, corrupted, right=9, wrong=20, site="resid",
                              cells_per_pass=5)
    assert sweep["values"].shape == (len(fm.decoder_layers), 6)
    layer = fm.decoder_layers[0]
    fm.register_forward_hook(flexmodel.HookFunction(layer))
    fm(clean)
    source = fm.take_output()[layer][0].copy()

    def patch(x, ctx):
        x[:, 2] = source[:, 2]

    h = fm.register_forward_hook(flexmodel.HookFunction(layer, editing_function=patch,
                                                        capture=False))
    logits = fm(corrupted)
    h.remove()
    np.testing.assert_allclose(sweep["values"][0, 2], logits[0, -1, 9] - logits[0, -1, 20],
                               atol=1e-4)
    est = fm.patching_sweep(clean, corrupted, right=9, wrong=20, attribution=True)
    assert est["values"].shape == sweep["values"].shape
    assert abs(est["corrupted"] - sweep["corrupted"]) < 1e-5


def test_head_scores_shape(fm):
    s = fm.head_scores(half=5, batch=2)
    assert s["induction"].shape == (len(fm.decoder_layers), 4)
    assert ((s["previous_token"] >= 0) & (s["previous_token"] <= 1)).all()


def test_sae_attached_and_encoded():
    fm = flexmodel.load(TRAINED)
    ids = np.array([fm.tokenizer.encode("def f(self, x):\n    return self.x")])
    plain = fm(ids)
    fm.register_forward_hook(flexmodel.HookFunction("model.layers.1"))
    h = fm.attach_sae(SAE, edits=[("scale", 0, 1.0)])
    logits = fm(ids)
    h.remove()
    np.testing.assert_allclose(logits, plain, atol=1e-5)
    feats = fm.output["model.layers.1.sae"][0]
    acts = fm.output["model.layers.1"][0]
    f, recon = flexmodel.sae_encode(SAE, acts)
    np.testing.assert_allclose(feats, f, atol=1e-6)
    assert np.abs(recon - acts).mean() < np.abs(acts).mean()
    ref = flexmodel.read_safetensors(ROOT / "fixtures" / "saes" / "jumprelu" / "reference.safetensors")
    f, _ = flexmodel.sae_encode(ROOT / "fixtures" / "saes" / "jumprelu", ref["x"])
    np.testing.assert_allclose(f, ref["features"], atol=1e-4)
    top = int(feats[0].sum(0).argmax())
    h = fm.attach_sae(SAE, edits=[("zero", top)])
    assert np.abs(fm(ids) - plain).max() > 1e-3
    h.remove()
