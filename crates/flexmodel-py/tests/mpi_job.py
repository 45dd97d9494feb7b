"""A script the MPI tests run on every rank (``mpirun -n N python mpi_job.py ...``).

    mpi_job.py compare TP PP DP EXPECTED.npz [K=V,...]
                                               captures, an edit and gradients of a layout,
                                               compared on rank 0 with a single process's;
                                               K=V: more load options (fsdp=2, offload=disk)
    mpi_job.py torch TP PP DP EXPECTED.npz     a torch edit's gradients (a steering vector's
                                               .grad, a backward hook's capture), likewise
    mpi_job.py raise TP PP DP SITE             an editing function that raises at SITE
"""

import sys

import numpy as np

import flexmodel
from conftest import model_dir, reference

MODEL = model_dir("llama")
CAPTURED = ["model.layers.0", "model.layers.1.mlp", "model.layers.1.self_attn.hook_attn_probs"]
EDITED = "model.layers.1.self_attn.hook_head_out"


def job(fm):
    """The hooks and passes whose results every layout must equal: returns what rank 0 got."""
    ids = reference("llama")["input_ids"]
    for site in CAPTURED:
        fm.register_forward_hook(flexmodel.HookFunction(site))

    def edit(x, ctx):
        ctx.state["calls"] = ctx.state.get("calls", 0) + 1
        x[:, :, 1] *= -2.0  # one head, in place

    fm.register_forward_hook(flexmodel.HookFunction(EDITED, editing_function=edit, capture=False))
    fm.register_full_backward_hook(flexmodel.HookFunction("model.layers.0"))
    logits = fm(ids)
    backward = fm.lm_backward(ids)
    if not flexmodel.is_main():
        return None
    out = {f"capture {k}": v[0] for k, v in fm.output.items() if not k.startswith("grad.")}
    out["logits"] = logits
    out["grad model.layers.0"] = fm.output["grad.model.layers.0"][-1]
    out["loss"] = np.float32(backward.loss)
    out["calls"] = np.int64(fm.state["calls"])
    return out


def torch_job(fm):
    """A steering vector added by a torch edit, trained through lm_backward: its gradient and
    the gradient that passes through it, on rank 0."""
    import torch

    ids = reference("llama")["input_ids"]
    steer = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 64))
    fm.register_forward_hook(flexmodel.HookFunction(
        "model.layers.1.mlp", editing_function=lambda x, ctx: x * 1.5 + steer))
    fm.register_full_backward_hook(flexmodel.HookFunction("model.layers.0"))
    backward = fm.lm_backward(ids)
    if not flexmodel.is_main():
        return None
    return {
        "steer grad": steer.grad.numpy(),
        "grad model.layers.0": np.asarray(fm.output["grad.model.layers.0"][-1]),
        "loss": np.float32(backward.loss),
    }


def compare(got, path):
    want = np.load(path)
    assert sorted(got) == sorted(want.files), (sorted(got), want.files)
    for key in want.files:
        a, b = np.asarray(got[key], np.float64), want[key].astype(np.float64)
        err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
        assert err <= 1e-5, f"{key}: relative error {err:.2e}"
    print(f"rank 0 of {flexmodel.world_size()}: {len(want.files)} results equal one process's")


def main():
    mode, tp, pp, dp, arg = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
    extra = dict(kv.split("=") for kv in sys.argv[6].split(",")) if len(sys.argv) > 6 else {}
    if "fsdp" in extra:
        extra["fsdp"] = int(extra["fsdp"])
    fm = flexmodel.load(MODEL, tp=tp, pp=pp, dp=dp,
                        framework="torch" if mode == "torch" else "numpy", **extra)
    if mode in ("compare", "torch"):
        got = (job if mode == "compare" else torch_job)(fm)
        if flexmodel.is_main():
            compare(got, arg)
    elif mode == "raise":
        def explode(x, ctx):
            raise RuntimeError(f"editing function failed at {ctx.site}")

        fm.register_forward_hook(flexmodel.HookFunction(arg, editing_function=explode))
        fm(reference("llama")["input_ids"])
        print(f"rank {flexmodel.rank()}: the pass returned", flush=True)


if __name__ == "__main__":
    main()
