"""flexmodel: read and edit any activation of a language model, sharded or not.

    import flexmodel
    fm = flexmodel.load("models/tiny-llama")
    ids = fm.tokenizer(["The capital of France is"])[0]
    fm.register_forward_hook(flexmodel.HookFunction("model.layers.*.mlp"))
    fm.register_forward_hook(flexmodel.HookFunction(
        "model.layers.1.mlp", editing_function=lambda x, ctx: x * 0))
    logits = fm(ids)                      # [batch, seq, vocab], as the plain model's forward
    mlp0 = fm.output["model.layers.0.mlp"][-1]   # captured before any edit, on the host

Under ``mpirun -n N python script.py`` (a build with MPI) the same script runs on every rank;
editing functions run once, on rank 0, on the full activation, and captures land there.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import sys
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from . import _flexmodel as _native
from . import errors as _errors
from .errors import *  # noqa: F401,F403  (every exception, as flexmodel.<Name>)
from .errors import InputError

__all__ = [
    "load",
    "model_dir",
    "HUB_FILES",
    "FlexModel",
    "HookFunction",
    "HookContext",
    "HookHandle",
    "Site",
    "Backward",
    "OutputMap",
    "Tokenizer",
    "harvest",
    "sae_encode",
    "read_harvest",
    "Harvest",
    "read_safetensors",
    "rank",
    "world_size",
    "is_main",
    "Job",
    "SUPPORTED",
    "HAS_MPI",
    "HAS_CUDA",
] + _errors.__all__

__version__: str = importlib.metadata.version("flexmodel")
#: The ``model_type`` values flexmodel loads.
SUPPORTED: list = list(_native.SUPPORTED)
#: Whether this build runs under ``mpirun`` (built with ``--features mpi``).
HAS_MPI: bool = _native.has_mpi()
#: Whether this build runs on CUDA devices.
HAS_CUDA: bool = _native.HAS_CUDA

Array = Any  # a numpy array or a torch tensor


# --- arrays across the boundary ------------------------------------------------------------

def _bfloat16():
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - depends on the environment
        raise InputError(
            "bfloat16 arrays in numpy need the ml_dtypes package (pip install ml-dtypes), "
            "or use framework='torch'"
        ) from None
    return ml_dtypes.bfloat16


def _check_framework(framework: str) -> None:
    if framework not in ("numpy", "torch"):
        raise InputError(f"framework {framework!r}: use 'numpy' or 'torch'")


def _from_raw(raw, framework: str) -> Array:
    """The array over a native tensor's memory (no copy)."""
    a = np.asarray(raw)
    # uint16 buffers are bfloat16 bits: the engine has no other 16-bit integer dtype.
    bf16 = a.dtype.char == "H"
    if framework == "torch":
        import torch

        t = torch.from_numpy(a) if a.flags.writeable else _torch_read_only(a)
        return t.view(torch.bfloat16) if bf16 else t
    return a.view(_bfloat16()) if bf16 else a


def _torch_read_only(a: np.ndarray):
    import warnings

    import torch

    # torch has no read-only tensors; a capture must not be written through.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _to_parts(y: Array):
    """(bytes in C order, dtype name, shape) of an array or tensor."""
    if type(y).__module__.startswith("torch"):
        import torch

        t = y.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:
            a = t.contiguous().view(torch.int16).numpy()
            return a.tobytes(), "bfloat16", tuple(t.shape)
        a = t.contiguous().numpy()
    elif isinstance(y, np.ndarray):
        a = np.ascontiguousarray(y)
    else:
        raise TypeError(
            f"an editing function must return a numpy array, a torch tensor or None "
            f"(None: the given array, edited in place), got {type(y).__name__}"
        )
    name = a.dtype.name
    if name == "bfloat16":
        return a.view(np.uint16).tobytes(), "bfloat16", a.shape
    return a.tobytes(), name, a.shape


def _same_memory(x: Array, y: Array) -> bool:
    """Whether `y` is `x` or a view of exactly the same memory (an in-place edit)."""
    if y is x:
        return True
    if isinstance(x, np.ndarray) and isinstance(y, np.ndarray):
        xi, yi = x.__array_interface__, y.__array_interface__
        return (
            xi["data"][0] == yi["data"][0]
            and x.shape == y.shape
            and x.strides == y.strides
            and x.dtype == y.dtype
        )
    if type(y).__module__.startswith("torch") and type(x).__module__.startswith("torch"):
        return (
            y.data_ptr() == x.data_ptr()
            and tuple(y.shape) == tuple(x.shape)
            and y.stride() == x.stride()
            and y.dtype == x.dtype
            and not y.requires_grad
        )
    return False


def _ids(a, name: str = "input_ids") -> np.ndarray:
    """Token ids (or a mask) as uint32 [batch, seq] in C order."""
    if type(a).__module__.startswith("torch"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.dtype.kind not in "iub":
        raise InputError(f"{name} must be integers of shape [batch, seq], got {a.dtype} {a.shape}")
    if a.size and a.min() < 0:
        raise InputError(f"{name} has negative values")
    return np.ascontiguousarray(a, dtype=np.uint32)


def _input(input_ids, attention_mask):
    ids = _ids(input_ids)
    if attention_mask is None:
        return ids.tobytes(), ids.shape, None
    mask = _ids(attention_mask, "attention_mask")
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
    return ids.tobytes(), ids.shape, mask.tobytes()


# --- hooks ---------------------------------------------------------------------------------

class HookContext:
    """What an editing function knows besides the activation."""

    __slots__ = ("site", "point", "step", "positions", "state")

    def __init__(self, site: str, point: str, step: int, positions: range, state: dict):
        #: The site that fired (useful when the hook was registered with a pattern).
        self.site = site
        #: "output" (forward hook), "input" (pre-hook) or "grad" (backward hook).
        self.point = point
        #: The generation step: 0 for a plain forward pass and for the prompt, then 1, 2, ...
        self.step = step
        #: The sequence positions this pass processes.
        self.positions = positions
        #: State shared by every hook of the wrapper, kept across passes (``fm.state``).
        self.state = state

    def __repr__(self) -> str:
        return (f"HookContext(site={self.site!r}, point={self.point!r}, step={self.step}, "
                f"positions={self.positions!r})")


_HOOK_TYPES = {
    "forward": "output",
    "forward_pre": "input",
    "pre": "input",
    "backward": "grad",
    "full_backward": "grad",
}


class HookFunction:
    """A hook at every site ``module_name`` selects (a site name, or a glob where ``*`` matches
    any characters, dots included; it must match whole names).

    By default it captures the activation (before any edit) into ``fm.output``.
    ``editing_function(activation, ctx)`` may run any Python code and returns the tensor that
    replaces the activation: a new array, or the given one modified in place (or ``None``,
    the same). It must keep shape and dtype. ``expected_shape`` fails the pass if the activation
    has another shape.

    Args:
        module_name: site name or pattern.
        expected_shape: the shape the activation must have; ``None`` for a dimension matches
            any size (FlexModel's ``(None, None, 64)``).
        editing_function: ``f(activation, ctx) -> activation``.
        capture: store the activation in the output map.
        hook_type: "forward" (the site's output), "forward_pre" (the module's input) or
            "backward" (the gradient of the loss with respect to the output).
        groups: hook groups this hook belongs to.
        steps: generation steps it runs at: "all", "prompt", "decode" or a (start, end) range.
        framework: "numpy" or "torch" arrays for the editing function (default: the model's).
    """

    def __init__(
        self,
        module_name: str,
        expected_shape: Optional[Sequence[Optional[int]]] = None,
        editing_function: Optional[Callable[[Array, HookContext], Optional[Array]]] = None,
        *,
        capture: bool = True,
        hook_type: str = "forward",
        groups: Sequence[str] = (),
        steps: Union[str, tuple] = "all",
        framework: Optional[str] = None,
    ):
        if hook_type not in _HOOK_TYPES:
            raise InputError(f"hook_type {hook_type!r}: use one of {sorted(_HOOK_TYPES)}")
        if framework is not None:
            _check_framework(framework)
        if expected_shape is not None:
            expected_shape = [None if d is None else int(d) for d in expected_shape]
        self.module_name = module_name
        self.expected_shape = expected_shape
        self.editing_function = editing_function
        self.capture = capture
        self.hook_type = hook_type
        self.groups = list(groups)
        self.steps = steps
        self.framework = framework

    def __repr__(self) -> str:
        parts = [repr(self.module_name)]
        if self.hook_type != "forward":
            parts.append(f"hook_type={self.hook_type!r}")
        if self.expected_shape is not None:
            parts.append(f"expected_shape={tuple(self.expected_shape)}")
        if self.editing_function is not None:
            name = getattr(self.editing_function, "__name__", "function")
            parts.append(f"editing_function={name}")
        if not self.capture:
            parts.append("capture=False")
        if self.groups:
            parts.append(f"groups={self.groups}")
        if self.steps != "all":
            parts.append(f"steps={self.steps!r}")
        return f"HookFunction({', '.join(parts)})"


class HookHandle:
    """A registered hook: ``remove()`` unregisters it."""

    def __init__(self, fm: "FlexModel", id: int, hook: HookFunction):
        self._fm = fm
        self.id = id
        self.hook = hook

    def remove(self) -> None:
        """Unregisters the hook from every site it was registered at, and from its groups."""
        self._fm._native.remove(self.id)

    def __repr__(self) -> str:
        return f"HookHandle({self.id}, {self.hook!r})"


def _steps(steps) -> tuple:
    if isinstance(steps, str):
        return steps, 0, 0
    if isinstance(steps, range):
        return "range", steps.start, steps.stop
    start, end = steps
    return "range", int(start), int(end)


def _torch_vjp(x, y):
    """The backward of a torch edit ``y = f(x)``: given dL/dy, torch autograd accumulates the
    parameters' ``.grad`` and gives dL/dx (None: y does not depend on x). A probe (across
    ranks, rank 0 first asks what y depends on) gives dL/dx alone and keeps torch's graph."""
    import torch

    def vjp(graw, probe):
        g = _from_raw(graw, "torch").to(y.dtype)
        if probe:
            (gx,) = torch.autograd.grad(y, x, g, retain_graph=True, allow_unused=True)
            return None if gx is None else _to_parts(gx)
        torch.autograd.backward(y, g)
        return None if x.grad is None else _to_parts(x.grad)

    return vjp


def _trampoline(fn, state: dict, framework: str):
    """The callable the engine calls at a site: builds the context, converts arrays, and tells
    the engine what came back (None: the given memory, edited in place or not)."""

    def call(raw, site, point, step, start, end, grad):
        x = _from_raw(raw, framework)
        torch_grad = grad and framework == "torch"
        if torch_grad:
            x.requires_grad_(True)
        y = fn(x, HookContext(site, point, step, range(start, end), state))
        if y is None or _same_memory(x, y):
            return None
        data, dtype, shape = _to_parts(y)
        vjp = _torch_vjp(x, y) if torch_grad and getattr(y, "requires_grad", False) else None
        return data, dtype, shape, vjp

    return call


def _recorded_logits(fm, logits):
    """The logits of a recorded pass as a torch tensor whose backward runs the engine's."""
    import torch

    class EngineBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            fm._backward_from(g)
            return None

    return EngineBackward.apply(logits.requires_grad_(True))


# --- the wrapper ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Site:
    """A hook site: its name, what it is, its shape template and how it is split over ranks."""

    name: str
    #: "module" (a Hugging Face module's output) or "internal" (inside attention).
    kind: str
    #: Dimensions: ints, or "batch", "seq", "key_seq", "tokens", "pos_batch".
    shape: tuple
    #: How the activation is split over tensor-parallel ranks.
    layout: Any
    #: How the module's input is split.
    input_layout: Any


@dataclasses.dataclass
class Backward:
    """The result of ``fm.lm_backward``."""

    #: transformers' causal-LM loss (labels = input_ids) of the whole batch.
    loss: float
    #: The logits of the forward pass.
    logits: Array
    #: Gradients of the model's weights by name (a model loaded with requires_grad=True).
    grads: dict


class OutputMap(Mapping):
    """Captures by key, each a list of arrays (one per firing, oldest first), as FlexModel's
    output_dict: a forward hook's under the site name, a pre-hook's under ``input.<site>``, a
    backward hook's under ``grad.<site>``. The arrays share the captured tensors' memory and
    are read-only."""

    def __init__(self, fm: "FlexModel"):
        self._fm = fm

    def __getitem__(self, key: str) -> list:
        got = self._fm._native.output_get(key)
        if got is None:
            raise KeyError(key)
        return [_from_raw(r, self._fm.framework) for r in got]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fm._native.output_keys())

    def __len__(self) -> int:
        return len(self._fm._native.output_keys())

    def last(self, key: str) -> Array:
        """The most recent capture of ``key``."""
        return self[key][-1]

    def clear(self) -> None:
        """Forgets every capture."""
        self._fm._native.clear_output()

    def __repr__(self) -> str:
        keys = list(self)
        return f"OutputMap({len(keys)} keys: {keys[:4]}{' ...' if len(keys) > 4 else ''})"


class FlexModel:
    """A model with hooks. It keeps the model's forward call (``fm(input_ids)`` returns the
    logits), collects captures in ``fm.output`` and gives the untouched model back with
    ``restore()``. Made by :func:`load`."""

    def __init__(self, native, framework: str = "numpy"):
        self._native = native
        #: "numpy" or "torch": what hooks receive and what captures and logits are.
        self.framework = framework
        #: State shared by every editing function (``ctx.state``), kept across passes.
        self.state: dict = {}
        self._tokenizer = None
        self._weight_grads: dict = {}
        self._sites: Optional[list] = None

    # what the model is

    @property
    def model_type(self) -> str:
        """The family (``model_type`` of config.json)."""
        return self._native.model_type

    @property
    def dtype(self) -> str:
        return self._native.dtype

    @property
    def device(self) -> str:
        return self._native.device

    @property
    def layout(self) -> dict:
        """The parallel layout: {"tp": .., "pp": .., "dp": .., "fsdp": ..} (``dp`` replicas of
        ``fsdp`` sharded ranks)."""
        tp, pp, dp, fsdp = self._native.layout
        return {"tp": tp, "pp": pp, "dp": dp // fsdp, "fsdp": fsdp}

    @property
    def decoder_layers(self) -> list:
        """The decoder layers' site names (``model.layers.0``, ...)."""
        return self._native.decoder_layers

    @property
    def vocab_size(self) -> int:
        return self._native.vocab_size

    @property
    def hidden_size(self) -> int:
        return self._native.hidden_size

    def __repr__(self) -> str:
        layout = " ".join(f"{k}={v}" for k, v in self.layout.items())
        return (
            f"FlexModel({self.model_type}, {self.dtype}, {self.device}, {layout}, "
            f"{len(self.decoder_layers)} layers, {self._native.hook_count} hooks, "
            f"arrays={self.framework}, dir={str(self._native.dir)!r})"
        )

    def sites(self, pattern: Optional[str] = None) -> list:
        """Every hook site, in Hugging Face module order (those ``pattern`` matches, if given:
        ``*`` matches any characters)."""
        import fnmatch

        if self._sites is None:
            self._sites = [
                Site(s["name"], s["kind"], tuple(s["shape"]), s["layout"], s["input_layout"])
                for s in json.loads(self._native.sites_json())
            ]
        if pattern is None:
            return list(self._sites)
        return [s for s in self._sites if fnmatch.fnmatchcase(s.name, pattern)]

    # hooks

    def _register(self, hook: HookFunction, point: str) -> HookHandle:
        if not isinstance(hook, HookFunction):
            raise TypeError(f"expected a flexmodel.HookFunction, got {type(hook).__name__}")
        edit = None
        if hook.editing_function is not None:
            edit = _trampoline(hook.editing_function, self.state, hook.framework or self.framework)
        kind, start, end = _steps(hook.steps)
        id = self._native.register(
            hook.module_name, point, hook.expected_shape, edit, hook.capture,
            hook.groups, kind, start, end,
        )
        return HookHandle(self, id, hook)

    def register_hook(self, hook: HookFunction) -> HookHandle:
        """Registers ``hook`` at the point its ``hook_type`` names."""
        return self._register(hook, _HOOK_TYPES[hook.hook_type])

    def register_forward_hook(self, hook: HookFunction) -> HookHandle:
        """Registers a hook on the output of every site ``hook.module_name`` selects."""
        return self._register(hook, "output")

    def register_forward_pre_hook(self, hook: HookFunction) -> HookHandle:
        """Registers a hook on the input of every module ``hook.module_name`` selects (its
        first argument, as PyTorch's register_forward_pre_hook); captured as ``input.<site>``."""
        return self._register(hook, "input")

    def register_full_backward_hook(self, hook: HookFunction) -> HookHandle:
        """Registers a hook on the gradient of the loss with respect to the output of every site
        selected; it runs in ``lm_backward`` (captured as ``grad.<site>``), and an editing
        function's result is the gradient that flows on to earlier layers."""
        return self._register(hook, "grad")

    def remove_hook(self, handle: HookHandle) -> None:
        """Unregisters a hook."""
        handle.remove()

    @contextlib.contextmanager
    def hooks(self, hooks: Sequence[HookFunction]):
        """Registers ``hooks`` (each at the point its ``hook_type`` names) for the ``with``
        block and removes them after, as TransformerLens's ``model.hooks(...)``::

            with fm.hooks([HookFunction("model.layers.1.mlp", editing_function=zero)]):
                ablated = fm(ids)
        """
        handles = [self.register_hook(h) for h in hooks]
        try:
            yield handles
        finally:
            for h in handles:
                h.remove()

    # groups

    def create_group(self, name: str) -> None:
        """Creates an empty hook group."""
        self._native.create_group(name)

    def add_to_group(self, name: str, handle: HookHandle) -> None:
        """Adds a registered hook to group ``name`` (created if needed)."""
        self._native.add_to_group(name, handle.id)

    def remove_from_group(self, name: str, handle: HookHandle) -> None:
        """Takes a hook out of a group (it stays registered)."""
        self._native.remove_from_group(name, handle.id)

    def remove_group(self, name: str) -> int:
        """Removes group ``name`` and unregisters its hooks; returns how many."""
        return self._native.remove_group(name)

    def groups(self) -> list:
        """Every group name."""
        return self._native.groups()

    # passes

    def __call__(self, input_ids, attention_mask=None, *, groups=None, exclude_groups=None,
                 grad=False):
        """The forward pass with every hook applied (or those of ``groups``, or all but those of
        ``exclude_groups``, for this pass). Returns the logits [batch, seq, vocab] (on rank 0;
        None on the other ranks of a multi-rank job).

        With ``grad=True`` (one process) the pass records the autograd graph, and
        :meth:`backward` differentiates a loss of your own computed from these logits: with
        ``framework="torch"`` they are a torch tensor in torch's graph, so ``loss.backward()``
        (or ``fm.backward(loss)``) runs the backward hooks and the torch edits' gradients."""
        ids, shape, mask = _input(input_ids, attention_mask)
        only = list(groups) if groups is not None else None
        except_ = list(exclude_groups) if exclude_groups is not None else None
        raw = self._native.forward(ids, shape, mask, only, except_, grad)
        logits = None if raw is None else _from_raw(raw, self.framework)
        if grad and self.framework == "torch":
            return _recorded_logits(self, logits)
        return logits

    def backward(self, loss) -> dict:
        """The backward pass of the last ``fm(ids, grad=True)``: ``loss`` is a torch scalar
        computed from its logits (``framework="torch"``), or the gradient of your loss with
        respect to the logits as an array of their shape. Backward hooks run on the way
        (captures as ``grad.<site>``). Returns the weights' gradients by name (a model loaded
        with requires_grad=True; else empty)."""
        self._weight_grads = {}
        if type(loss).__module__.startswith("torch") and loss.numel() == 1:
            loss.backward()
        else:
            self._backward_from(loss)
        return self._weight_grads

    def _backward_from(self, grad) -> None:
        data, dtype, shape = _to_parts(grad)
        grads = self._native.backward(data, dtype, list(shape))
        self._weight_grads = {n: _from_raw(g, self.framework) for n, g in grads}

    forward = __call__

    def capture(self, input_ids, attention_mask=None) -> Optional[int]:
        """A pass for the hooks alone: captures land in ``fm.output`` and edits apply, but no
        logits are computed, so the pass stops after the last decoder layer a hook needs
        (TransformerLens's stop_at_layer, found from the hooks). Returns that layer's index, or
        None when the pass ran to the end."""
        ids, shape, mask = _input(input_ids, attention_mask)
        return self._native.capture(ids, shape, mask)

    def run_with_cache(self, input_ids, attention_mask=None, names_filter=None):
        """TransformerLens's run_with_cache: the logits and a dict of every activation
        ``names_filter`` selects (a pattern, a list of names or patterns, or a predicate on the
        name; default every site), one array per site (its last firing). The hooks are removed
        after. When the output map was empty before the call it is empty after (the cache holds
        the arrays); otherwise this pass's captures are appended to it as any pass's are."""
        names = [s.name for s in self.sites()]
        if names_filter is None:
            chosen = names
        elif isinstance(names_filter, str):
            chosen = [names_filter]
        elif callable(names_filter):
            chosen = [n for n in names if names_filter(n)]
        else:
            chosen = list(names_filter)
        before = {k: len(v) for k, v in self.output.items()}
        handles = [self.register_forward_hook(HookFunction(n)) for n in chosen]
        try:
            logits = self(input_ids, attention_mask)
        finally:
            for h in handles:
                h.remove()
        cache = {}
        for key, firings in self.output.items():
            if len(firings) > before.get(key, 0):
                cache[key] = firings[-1]
        if not before:
            self._native.clear_output()
        return logits, cache

    def generate(
        self,
        input_ids,
        attention_mask=None,
        *,
        max_new_tokens: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: int = 0,
        eos_token_id: Union[None, int, Sequence[int]] = None,
        pad_token_id: int = 0,
    ):
        """Generates up to ``max_new_tokens`` tokens after each prompt with a key/value cache,
        greedy or sampled (temperature, top-k, top-p; the same seed gives the same tokens), with
        every hook firing at every step (limit one with ``HookFunction(steps=...)``). A
        left-padded batch (``attention_mask``) generates what each prompt generates alone.
        Returns the sequences [batch, prompt + new] (int64), on every rank."""
        ids, shape, mask = _input(input_ids, attention_mask)
        if eos_token_id is None:
            eos = []
        elif isinstance(eos_token_id, int):
            eos = [eos_token_id]
        else:
            eos = list(eos_token_id)
        raw, _steps_run = self._native.generate(
            ids, shape, mask, max_new_tokens, do_sample, temperature, top_k, top_p, seed,
            eos, pad_token_id,
        )
        return _from_raw(raw, self.framework)

    def lm_backward(self, input_ids, attention_mask=None) -> Optional[Backward]:
        """The forward and backward pass of transformers' causal-LM loss (labels = input_ids,
        padding excluded) on any layout. Backward hooks run on the full gradients and their
        captures land in ``fm.output`` as ``grad.<site>``; torch editing functions pass the
        gradient through (torch parameters they use get ``.grad``). Returns the loss, the logits
        and, for a model loaded with requires_grad=True, the weights' gradients (on rank 0;
        None on the other ranks)."""
        ids, shape, mask = _input(input_ids, attention_mask)
        loss, logits, grads = self._native.lm_backward(ids, shape, mask)
        if loss is None:
            return None
        grads = {n: _from_raw(g, self.framework) for n, g in grads}
        return Backward(loss, _from_raw(logits, self.framework), grads)

    # results

    @property
    def output(self) -> OutputMap:
        """The captures (FlexModel's output_dict): key -> list of arrays."""
        return OutputMap(self)

    def take_output(self) -> dict:
        """Takes every capture (key -> list of arrays), leaving the output map empty."""
        return {k: [_from_raw(r, self.framework) for r in v] for k, v in self._native.take_output()}

    def clear_output(self) -> None:
        """Forgets every capture."""
        self._native.clear_output()

    def parameter(self, name: str) -> Array:
        """The full tensor of parameter ``name`` (a Hugging Face name), gathered from every rank
        that holds a piece of it (every rank must call it; rank 0 gets the full tensor)."""
        return _from_raw(self._native.parameter(name), self.framework)

    get_module_parameter = parameter

    def parameter_names(self) -> list:
        """Every parameter's Hugging Face name."""
        return self._native.parameter_names()

    @property
    def tokenizer(self) -> "Tokenizer":
        """The model directory's tokenizer."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self._native.dir)
        return self._tokenizer

    # -- analyses (flexmodel::analysis; every rank calls them, rank 0 gets the result) --------

    def _token(self, token) -> int:
        """A token id, or the id of a text that is exactly one token."""
        if isinstance(token, (int, np.integer)):
            return int(token)
        ids = self.tokenizer.encode(token)
        if len(ids) != 1:
            raise InputError(
                f"{token!r} is {len(ids)} tokens {ids}, not one (mind the leading space); "
                "give a single token or its id")
        return ids[0]

    def _arrays(self, d: Optional[dict]) -> Optional[dict]:
        if d is None:
            return None
        return {k: (_from_raw(v, self.framework) if isinstance(v, _native.RawTensor) else v)
                for k, v in d.items()}

    def logit_lens(self, input_ids, attention_mask=None, *, top_k: int = 5,
                   target=None) -> Optional[dict]:
        """Every layer's residual stream decoded through the final norm and head. Returns
        ``points`` (``embed``, then each decoder layer), ``top_ids`` / ``top_probs``
        [points, batch, seq, top_k], ``final_token_probs`` [points, batch, seq] (the probability
        of the model's final prediction at each layer) and, with ``target`` (an id or a
        one-token text), ``target_probs`` / ``target_ranks`` [points, batch, seq]."""
        ids, shape, mask = _input(input_ids, attention_mask)
        target = None if target is None else self._token(target)
        return self._arrays(_native.logit_lens(self._native, ids, shape, mask, top_k, target))

    def direct_logit_attribution(self, input_ids, token, *, versus=None,
                                 attention_mask=None) -> Optional[dict]:
        """Each head's, MLP's and the embeddings' share of ``token``'s logit (or of
        ``token - versus``) at each row's last position, through the frozen final norm:
        ``components`` (names), ``values`` [batch, components], ``bias`` and ``logit`` [batch];
        values summed plus bias equal the logit."""
        ids, shape, mask = _input(input_ids, attention_mask)
        versus = None if versus is None else self._token(versus)
        return self._arrays(_native.direct_logit_attribution(
            self._native, ids, shape, mask, self._token(token), versus))

    def patching_sweep(self, clean_ids, corrupted_ids, *, right=None, wrong=None,
                       site: str = "resid", attribution: bool = False,
                       cells_per_pass: int = 16) -> Optional[dict]:
        """Patches each (layer, position) of ``site`` ("resid", "attn", "mlp"; or each head,
        "heads") from the clean run into the corrupted one and measures the logit difference
        ``right - wrong`` at the last position (or, without them, the loss). ``attribution``:
        the gradient approximation (one process). Returns ``sites``, ``values`` and
        ``normalized`` [layers, positions or heads] (1 = the clean metric restored), ``clean``,
        ``corrupted``."""
        clean, shape, _ = _input(clean_ids, None)
        corrupted, shape2, _ = _input(corrupted_ids, None)
        if shape != shape2:
            raise InputError(f"clean ids {shape} and corrupted ids {shape2} differ in shape")
        right = None if right is None else self._token(right)
        wrong = None if wrong is None else self._token(wrong)
        return self._arrays(_native.patching_sweep(
            self._native, clean, corrupted, shape, right, wrong, site, attribution,
            cells_per_pass))

    def head_scores(self, *, half: int = 40, batch: int = 8, seed: int = 0) -> Optional[dict]:
        """Previous-token, induction and duplicate-token scores [layers, heads] of every head,
        on ``batch`` rows of ``half`` random tokens repeated twice."""
        return self._arrays(_native.head_scores(self._native, half, batch, seed))

    def attach_sae(self, path, *, site: Optional[str] = None, edits=()) -> HookHandle:
        """Attaches the SAELens-format SAE in ``path`` at ``site`` (default: its cfg's
        hook_name). Its features are captured as ``<site>.sae``; ``edits`` are tuples
        ``("zero", feature)``, ``("clamp", feature, value)``, ``("scale", feature, factor)``;
        the reconstruction error is added back, so without edits the output is unchanged.
        ``remove()`` the handle to detach it."""
        parsed = []
        for e in edits:
            op, feature, *rest = e
            parsed.append((op, int(feature), float(rest[0]) if rest else 0.0))
        id, site = _native.attach_sae(self._native, os.fspath(path), site, parsed)
        return HookHandle(self, id, HookFunction(site, capture=False))

    def restore(self) -> "FlexModel":
        """The untouched model, in a new wrapper with no hook, group, capture or state; this
        wrapper is empty after (FlexModel's restore)."""
        return FlexModel(self._native.restore(), self.framework)


def sae_encode(path, x) -> tuple:
    """Feature activations and reconstruction of activations ``x`` [..., d_in] under the
    SAELens-format SAE in ``path`` (numpy float32)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    f, r = _native.sae_encode(os.fspath(path), x.tobytes(), list(x.shape))
    return np.asarray(f), np.asarray(r)


def load(
    dir: Union[str, os.PathLike],
    *,
    dtype: str = "float32",
    device: str = "cpu",
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    fsdp: int = 1,
    offload: Optional[str] = None,
    micro_batches: int = 0,
    requires_grad: bool = False,
    framework: str = "numpy",
) -> FlexModel:
    """Loads a Hugging Face model and wraps it for hooks.

    ``dir`` is a model directory (config.json, *.safetensors, tokenizer.json) or a Hub name
    (``"gpt2"``, ``"org/name"``, ``"org/name@revision"``): found in the local Hugging Face cache
    (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``), else downloaded there
    through ``huggingface_hub`` when it is installed (its configuration applies: ``HF_TOKEN``
    for gated models, ``HF_HUB_OFFLINE``); only the JSON and safetensors files are fetched.

    Args:
        dtype: what it computes in: "float32" (the fast choice on CPUs), "float16", "bfloat16".
        device: "cpu", "cuda", "cuda:N" (a CUDA build).
        tp, pp, dp: tensor-parallel ranks, pipeline stages, data-parallel replicas; their
            product (times ``fsdp``) is the number of processes of the ``mpirun`` job (a build
            with MPI).
        fsdp: fully sharded data parallelism (ZeRO-3): the batch is split by rows over
            ``fsdp`` ranks that each hold 1/fsdp of every weight; each layer's weights are
            all-gathered just before it runs and dropped after (the embeddings and head go
            by blocks of rows).
        offload: None, "cpu" or "disk": keep only the layers being computed in memory, each
            read from the checkpoint as the pass reaches it ("disk" also drops it from the
            page cache: models larger than memory). Peak memory is about two layers plus the
            embeddings, head and activations. With ``fsdp``, each rank reads its shard of a
            layer from the checkpoint just before the layer is gathered, and keeps none.
        micro_batches: micro-batches each pipeline (``pp`` > 1) splits a batch into, so that
            its stages compute at the same time (GPipe); 0: four per stage. Passes with an
            enabled hook run the whole batch at once.
        requires_grad: load the weights as variables, so that ``lm_backward`` returns their
            gradients.
        framework: "numpy" or "torch": what editing functions receive and what captures and
            logits are.
    """
    _check_framework(framework)  # before any weight is read
    native = _native.load(
        model_dir(dir), dtype, device, tp, pp, dp, fsdp, offload, micro_batches, requires_grad
    )
    return FlexModel(native, framework)


#: The files of a Hub model that loading reads (no PyTorch, TensorFlow or ONNX weights).
HUB_FILES = ["*.json", "*.safetensors"]


def model_dir(model: Union[str, os.PathLike]) -> str:
    """The directory of ``model``: itself when it is a directory, else the Hub model's
    snapshot in the local Hugging Face cache, downloaded first (``HUB_FILES`` only) through
    ``huggingface_hub`` when it is not there and that package is installed. Under ``mpirun``
    every rank may call it: huggingface_hub locks the cache's files while it downloads."""
    path = os.fspath(model)
    try:
        return os.fspath(_native.resolve(path))
    except _errors.LoadError as not_found:
        hub = _native.hub_name(path)
        if hub is None:
            raise
        try:
            import huggingface_hub
        except ImportError:
            raise not_found from None
        repo, revision = hub
        try:
            return huggingface_hub.snapshot_download(
                repo, revision=revision, allow_patterns=HUB_FILES
            )
        except Exception as e:
            raise _errors.LoadError(
                f"`{path}` is not a model directory, and downloading {repo}@{revision} from the "
                f"Hugging Face Hub failed: {type(e).__name__}: {e}"
            ) from e


class Tokenizer:
    """A model's tokenizer (tokenizer.json), of a directory or a Hub name as ``load`` takes."""

    def __init__(self, dir: Union[str, os.PathLike]):
        self._native = _native.Tokenizer(model_dir(dir))

    def encode(self, text: str) -> list:
        """The token ids of ``text``."""
        return self._native.encode(text)

    def decode(self, ids) -> str:
        """The text of ``ids``."""
        return self._native.decode([int(i) for i in np.asarray(ids).ravel()])

    def __call__(self, texts: Union[str, Sequence[str]], padding: str = "right", pad_id: int = 0):
        """A batch: (input_ids, attention_mask) as int64 arrays [batch, seq], padded on the
        right (a forward pass) or on the left (generation) to the longest text."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.encode(t) for t in texts]
        width = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            if padding == "right":
                ids[i, : len(r)], mask[i, : len(r)] = r, 1
            elif padding == "left":
                ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
            else:
                raise InputError(f"padding {padding!r}: use 'right' or 'left'")
        return ids, mask


# --- harvest -------------------------------------------------------------------------------

def harvest(
    model: Union[FlexModel, str, os.PathLike],
    data: Union[str, os.PathLike],
    sites: Sequence[str],
    out: Union[str, os.PathLike],
    *,
    text_field: str = "text",
    seq_len: int = 128,
    packing: bool = False,
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
    dtype: str = "float32",
    positions: str = "real",
    shard_tokens: Optional[int] = None,
    stats: bool = False,
    raw: bool = True,
    top_k: int = 10,
    context: int = 8,
    covariance: bool = False,
    memory_budget_mb: Optional[int] = None,
    resume: bool = False,
    progress: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Stores the activations of ``sites`` over the documents of ``data`` (.txt: one per line,
    .jsonl: ``text_field`` of each line, .safetensors: integer input_ids) as safetensors shards
    and a manifest in ``out``: the CLI's ``flexmodel harvest``, with the same options, bounded
    in memory and resumable. Read the result with :func:`read_harvest`. Hooks registered on
    ``model`` apply (a harvest under an ablation). ``progress(p)`` is called after each batch
    with rows, tokens, stored_tokens, shards, seconds and fraction (0 to 1), on rank 0; Ctrl-C
    ends the harvest after the batch, resumable. Returns the summary."""
    fm = model if isinstance(model, FlexModel) else load(model)
    budget = None if memory_budget_mb is None else int(memory_budget_mb) * 1_000_000
    summary = fm._native.harvest(
        os.fspath(data), text_field, list(sites), os.fspath(out), seq_len, packing, batch_size,
        max_tokens, dtype, positions, shard_tokens, stats, raw, top_k, context, covariance,
        budget, resume, progress,
    )
    return {k: (v if k == "seconds" else int(v)) for k, v in summary}


class Harvest:
    """A harvest directory: its manifest and its tensors, each the rows of every shard in
    order (one per stored token: ``input_ids``, ``doc``, ``position`` and every site)."""

    def __init__(self, dir: Union[str, os.PathLike], framework: str = "numpy"):
        self.dir = os.fspath(dir)
        with open(os.path.join(self.dir, "manifest.json")) as f:
            #: manifest.json as a dict.
            self.manifest: dict = json.load(f)
        self.framework = framework

    @property
    def names(self) -> list:
        """The stored tensors' names."""
        return sorted(self.manifest["tensors"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def shards(self) -> Iterator[dict]:
        """Each shard's tensors, in order."""
        for shard in self.manifest["shards"]:
            if shard.get("file"):
                yield read_safetensors(os.path.join(self.dir, shard["file"]), self.framework)

    def __getitem__(self, name: str) -> Array:
        """Tensor ``name`` over every shard, [tokens, ...]."""
        if name not in self.manifest["tensors"]:
            raise KeyError(f"{name!r} is not in this harvest (it holds {self.names})")
        parts = [np.asarray(s[name]) if self.framework == "numpy" else s[name] for s in self.shards()]
        if self.framework == "torch":
            import torch

            return torch.cat(parts)
        return np.concatenate(parts)

    def __repr__(self) -> str:
        return f"Harvest({self.dir!r}, {len(self.manifest['shards'])} shards, {self.names})"


def read_harvest(dir: Union[str, os.PathLike], framework: str = "numpy") -> Harvest:
    """Opens a harvest directory (what :func:`harvest` or ``flexmodel harvest`` wrote)."""
    return Harvest(dir, framework)


def read_safetensors(path: Union[str, os.PathLike], framework: str = "numpy") -> dict:
    """Every tensor of a safetensors file (an activations file of ``flexmodel run``, a shard)."""
    return {n: _from_raw(r, framework) for n, r in _native.read_safetensors(os.fspath(path))}


# --- the job -------------------------------------------------------------------------------

def rank() -> int:
    """This process's rank in the job (0 outside ``mpirun``)."""
    return _native.rank()


def world_size() -> int:
    """The number of processes in the job."""
    return _native.world_size()


def is_main() -> bool:
    """Whether this is rank 0, where captures, logits and editing functions live."""
    return rank() == 0


def _end_job_on_uncaught(default_hook):
    def hook(kind, value, tb):
        default_hook(kind, value, tb)
        sys.stderr.flush()
        # The other ranks may wait in a collective for this one: end them all.
        _native.abort(1)

    return hook


from .job import Job  # noqa: E402  (after the names a job's ranks use)

# Outside an MPI launcher the world is this process alone (MPI does not start).
if _native.has_mpi() and world_size() > 1:
    sys.excepthook = _end_job_on_uncaught(sys.excepthook)
atexit.register(_native.shutdown)
