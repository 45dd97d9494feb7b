"""Hooks from Python: zero-copy arrays, in-place edits, context and state, pre-hooks, groups,
steps, capture, run_with_cache, parameters, restore, and the errors of each."""

import numpy as np
import pytest

import flexmodel
from conftest import TINY, assert_close, model_dir, reference

IDS = np.array([[1, 5, 9, 2, 7, 3]])


def addr(a) -> int:
    return a.__array_interface__["data"][0]


def test_editing_functions_get_the_activation_itself():
    fm = flexmodel.load(TINY)
    seen = []

    def record(x, ctx):
        seen.append((addr(x), x.flags.writeable, x.flags.owndata))

    # Two editing hooks at one site: with a copy per hook each would see its own memory.
    for _ in range(2):
        fm.register_forward_hook(flexmodel.HookFunction("model.layers.0.mlp", editing_function=record))
    fm(IDS)
    (a, writable, owns), (b, _, _) = seen
    assert a == b and writable and not owns


def test_captures_share_the_activation_memory():
    fm = flexmodel.load(TINY)
    # A layer's output is the next layer's input: the same tensor, captured twice, no copy.
    fm.register_forward_hook(flexmodel.HookFunction("model.layers.0"))
    fm.register_forward_pre_hook(flexmodel.HookFunction("model.layers.1"))
    fm(IDS)
    out, inp = fm.output["model.layers.0"][0], fm.output["input.model.layers.1"][0]
    assert addr(out) == addr(inp)
    assert not out.flags.writeable
    np.testing.assert_array_equal(out, inp)


def test_in_place_edits_leave_every_capture_as_it_was():
    fm = flexmodel.load(TINY)
    fm.register_forward_hook(flexmodel.HookFunction("model.layers.0"))
    plain = fm(IDS)
    before = np.array(fm.output["model.layers.0"][0])
    fm.clear_output()

    def scale(x, ctx):
        x *= 3.0

    # The edit writes into the tensor that is also layer 0's output and layer 1's input.
    fm.register_forward_pre_hook(flexmodel.HookFunction("model.layers.1", editing_function=scale))
    edited = fm(IDS)
    np.testing.assert_array_equal(fm.output["model.layers.0"][0], before)
    np.testing.assert_array_equal(fm.output["input.model.layers.1"][0], before)
    assert np.abs(edited - plain).max() > 1e-3


def test_context_state_and_steps():
    fm = flexmodel.load(TINY)
    calls = []

    def note(x, ctx):
        calls.append((ctx.site, ctx.point, ctx.step, ctx.positions))
        ctx.state["n"] = ctx.state.get("n", 0) + 1

    fm.register_forward_hook(flexmodel.HookFunction("model.layers.*.mlp", editing_function=note, capture=False))
    fm(IDS)
    assert calls == [
        ("model.layers.0.mlp", "output", 0, range(0, 6)),
        ("model.layers.1.mlp", "output", 0, range(0, 6)),
    ]
    fm(IDS)
    assert fm.state["n"] == 4  # kept across passes
    calls.clear()
    fm.register_forward_hook(flexmodel.HookFunction("model.layers.1", steps="decode"))
    fm.generate(IDS, max_new_tokens=3)
    assert [c[2] for c in calls if c[0] == "model.layers.0.mlp"] == [0, 1, 2]
    assert [c[3] for c in calls if c[0] == "model.layers.0.mlp"][1:] == [range(6, 7), range(7, 8)]
    assert len(fm.output["model.layers.1"]) == 2  # decode steps only
    assert fm.output["model.layers.1"][0].shape == (1, 1, 64)


def test_groups_select_hooks_per_pass():
    fm = flexmodel.load(TINY)
    zero = flexmodel.HookFunction("model.layers.1.mlp", editing_function=lambda x, c: x * 0,
                                  capture=False, groups=["ablate"])
    fm.register_forward_hook(zero)
    capture = fm.register_forward_hook(flexmodel.HookFunction("model.layers.0"))
    fm.add_to_group("probe", capture)
    assert fm.groups() == ["ablate", "probe"]
    ablated = fm(IDS)
    plain = fm(IDS, exclude_groups=["ablate"])
    assert np.abs(ablated - plain).max() > 1e-3
    fm.clear_output()
    again = fm(IDS, groups=["ablate"])
    np.testing.assert_array_equal(again, ablated)
    assert "model.layers.0" not in fm.output  # the probe group did not run
    assert fm.remove_group("ablate") == 1
    np.testing.assert_array_equal(fm(IDS), plain)
    with pytest.raises(flexmodel.UnknownGroupError, match="no hook group `nope`"):
        fm(IDS, groups=["nope"])


def test_hooks_for_a_with_block():
    fm = flexmodel.load(TINY)
    plain = fm(IDS)
    zero = flexmodel.HookFunction("model.layers.1.mlp", editing_function=lambda x, c: x * 0)
    grad = flexmodel.HookFunction("model.layers.0", hook_type="backward")
    with fm.hooks([zero, grad]) as handles:
        assert len(handles) == 2 and fm._native.hook_count == 2
        ablated = fm(IDS)
        fm.lm_backward(IDS)
    assert fm._native.hook_count == 0
    assert np.abs(ablated - plain).max() > 1e-3
    assert "grad.model.layers.0" in fm.output
    np.testing.assert_array_equal(fm(IDS), plain)


def test_capture_stops_after_the_last_needed_layer():
    fm = flexmodel.load(TINY)
    fm.register_forward_hook(flexmodel.HookFunction("model.layers.0.mlp"))
    assert fm.capture(IDS) == 0
    full = flexmodel.load(TINY)
    full.register_forward_hook(flexmodel.HookFunction("model.layers.0.mlp"))
    full(IDS)
    np.testing.assert_array_equal(fm.output["model.layers.0.mlp"][0], full.output["model.layers.0.mlp"][0])


def test_run_with_cache_holds_every_site():
    fm = flexmodel.load(model_dir("llama"))
    refs = reference("llama")
    logits, cache = fm.run_with_cache(refs["input_ids"])
    assert_close("logits", logits, refs["logits"], 1e-4)
    assert_close("mlp", cache["model.layers.1.mlp"], refs["model.layers.1.mlp"], 1e-4)
    assert "model.layers.0.self_attn.hook_attn_probs" in cache
    assert len(fm.output) == 0 and fm._native.hook_count == 0
    _, some = fm.run_with_cache(refs["input_ids"], names_filter=lambda n: n.endswith("mlp"))
    assert sorted(some) == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_sites_parameters_and_repr():
    fm = flexmodel.load(TINY)
    sites = fm.sites("model.layers.0.self_attn.hook_*")
    assert [s.name.rsplit(".", 1)[1] for s in sites] == [
        "hook_q", "hook_k", "hook_v", "hook_attn_probs", "hook_head_out"]
    assert sites[0].shape == ("batch", "seq", 4, 16) and sites[0].kind == "internal"
    w = fm.parameter("model.layers.0.mlp.up_proj.weight")
    assert w.shape == (128, 64) and w.dtype == np.float32
    assert "lm_head.weight" in fm.parameter_names() or "model.embed_tokens.weight" in fm.parameter_names()
    fm.register_forward_hook(flexmodel.HookFunction("model.layers.0"))
    assert repr(fm).startswith(
        "FlexModel(llama, float32, cpu, tp=1 pp=1 dp=1 fsdp=1, 2 layers, 1 hooks")


def test_restore_gives_the_untouched_model():
    fm = flexmodel.load(TINY)
    plain = fm(IDS)
    fm.register_forward_hook(flexmodel.HookFunction("model.layers.0.mlp", editing_function=lambda x, c: x * 0))
    assert np.abs(fm(IDS) - plain).max() > 1e-3
    model = fm.restore()
    np.testing.assert_array_equal(model(IDS), plain)
    assert len(model.output) == 0
    with pytest.raises(RuntimeError, match="no longer holds a model"):
        fm(IDS)


def test_unknown_sites_are_key_errors_with_the_nearest_names():
    fm = flexmodel.load(TINY)
    with pytest.raises(flexmodel.UnknownSiteError) as e:
        fm.register_forward_hook(flexmodel.HookFunction("model.layers.0.mpl"))
    assert isinstance(e.value, KeyError)
    # The CLI's message.
    assert str(e.value).startswith(
        "unknown site `model.layers.0.mpl`; did you mean `model.layers.0.mlp`, ")
    with pytest.raises(flexmodel.UnknownSiteError, match="matches no site"):
        fm.register_forward_hook(flexmodel.HookFunction("decoder.*"))
    with pytest.raises(flexmodel.UnknownParameterError, match="did you mean"):
        fm.parameter("model.layers.0.mlp.up_proj.weights")


def test_flexmodel_style_expected_shapes_with_any_size():
    fm = flexmodel.load(TINY)
    # FlexModel's HookFunction takes None for a dimension of any size.
    fm.register_forward_hook(flexmodel.HookFunction("model.layers.0", (None, None, 64)))
    assert fm(IDS).shape == (1, 6, 512)
    fm.register_forward_hook(flexmodel.HookFunction("model.layers.1", (None, 5, None)))
    with pytest.raises(flexmodel.ShapeError, match=r"expected shape \[any, 5, any\], got \[1, 6, 64\]"):
        fm(IDS)


def test_shape_and_dtype_errors_name_both():
    fm = flexmodel.load(TINY)
    fm.register_forward_hook(flexmodel.HookFunction("model.layers.0", expected_shape=(1, 5, 64)))
    with pytest.raises(flexmodel.ShapeError, match=r"expected shape \[1, 5, 64\], got \[1, 6, 64\]"):
        fm(IDS)
    fm = flexmodel.load(TINY)
    fm.register_forward_hook(flexmodel.HookFunction("model.layers.0.mlp", editing_function=lambda x, c: x[:, :1]))
    with pytest.raises(flexmodel.ShapeError, match=r"returned shape \[1, 1, 64\] F32, the activation is \[1, 6, 64\] F32"):
        fm(IDS)
    fm = flexmodel.load(TINY)
    fm.register_forward_hook(flexmodel.HookFunction("model.layers.0.mlp", editing_function=lambda x, c: x.astype(np.float64)))
    with pytest.raises(flexmodel.ShapeError, match=r"F64, the activation is \[1, 6, 64\] F32"):
        fm(IDS)
    with pytest.raises(flexmodel.InputError, match="integers of shape"):
        fm(np.zeros((1, 2, 3), dtype=np.int64))


def test_load_errors():
    with pytest.raises(flexmodel.LoadError, match="nope` is not a model directory: pass a "
                       "directory holding config.json"):
        flexmodel.load(TINY.parent / "nope")
    with pytest.raises(flexmodel.LoadError, match="cannot read .*config.json") as e:
        flexmodel.load(TINY.parent)  # a directory, without config.json
    assert str(e.value).count("No such file") == 1
    with pytest.raises(flexmodel.InputError, match="float32, float16 or bfloat16, not int64"):
        flexmodel.load(TINY, dtype="int64")
    # A layout without its ranks, in one process.
    with pytest.raises(flexmodel.DistributedError, match="needs 2 ranks, the job has 1"):
        flexmodel.load(TINY, tp=2)


def test_an_exception_in_an_editing_function_reaches_the_caller():
    fm = flexmodel.load(TINY)

    class Boom(Exception):
        pass

    def explode(x, ctx):
        raise Boom(f"at {ctx.site}")

    handle = fm.register_forward_hook(flexmodel.HookFunction("model.layers.1.mlp", editing_function=explode))
    with pytest.raises(Boom, match="at model.layers.1.mlp") as e:
        fm(IDS)
    assert any(frame.name == "explode" for frame in e.traceback)
    # The model stays usable.
    handle.remove()
    assert fm(IDS).shape == (1, 6, 512)


def test_editing_functions_cannot_call_their_model():
    fm = flexmodel.load(TINY)
    fm.register_forward_hook(flexmodel.HookFunction("model.layers.0", editing_function=lambda x, c: fm(IDS)))
    with pytest.raises(RuntimeError, match="running a pass"):
        fm(IDS)


def test_torch_tensors_in_and_out():
    torch = pytest.importorskip("torch")
    fm = flexmodel.load(TINY, framework="torch")
    seen = []

    def steer(x, ctx):
        seen.append(type(x))
        return x + 1.0

    fm.register_forward_hook(flexmodel.HookFunction("model.layers.0.mlp", editing_function=steer))
    logits = fm(torch.tensor(IDS))
    assert isinstance(logits, torch.Tensor) and seen == [torch.Tensor]
    ref = flexmodel.load(TINY)
    ref.register_forward_hook(flexmodel.HookFunction("model.layers.0.mlp", editing_function=lambda x, c: x + 1.0))
    np.testing.assert_array_equal(logits.numpy(), ref(IDS))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_hand_out_half_precision_arrays(dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    want = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    fm = flexmodel.load(TINY, dtype=dtype)
    seen = []

    def double(x, ctx):
        seen.append(x.dtype)
        return x * 2

    fm.register_forward_hook(flexmodel.HookFunction("model.layers.0.mlp", editing_function=double))
    logits = fm(IDS)
    assert logits.dtype == want and seen == [want]
    assert fm.output["model.layers.0.mlp"][0].dtype == want
    f32 = flexmodel.load(TINY)
    f32.register_forward_hook(flexmodel.HookFunction("model.layers.0.mlp", editing_function=lambda x, c: x * 2))
    assert_close(f"{dtype} logits", logits.astype(np.float32), f32(IDS), 3e-2)


def test_half_precision_torch_edits():
    torch = pytest.importorskip("torch")
    fm = flexmodel.load(TINY, dtype="bfloat16", framework="torch")
    seen = []

    def double(x, ctx):
        seen.append(x.dtype)
        return x * 2

    fm.register_forward_hook(flexmodel.HookFunction("model.layers.0.mlp", editing_function=double))
    logits = fm(IDS)
    assert logits.dtype == torch.bfloat16 and seen == [torch.bfloat16]
    ref = flexmodel.load(TINY, dtype="bfloat16")
    ref.register_forward_hook(flexmodel.HookFunction("model.layers.0.mlp", editing_function=lambda x, c: x * 2))
    np.testing.assert_array_equal(logits.float().numpy(), ref(IDS).astype(np.float32))
