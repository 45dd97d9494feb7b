"""flexmodel's exceptions. Every error the engine reports is one of these, with the message the
command line prints; an exception raised inside an editing function reaches the caller of the
pass as itself, traceback included."""


class FlexModelError(Exception):
    """Base class of flexmodel's errors."""


class _NamedKeyError(FlexModelError, KeyError):
    # KeyError's str() quotes its argument; these carry a sentence.
    __str__ = Exception.__str__


class UnknownSiteError(_NamedKeyError):
    """A site name or pattern the model does not have; the message lists the nearest names."""


class UnknownParameterError(_NamedKeyError):
    """A parameter name the model does not have; the message lists the nearest names."""


class UnknownGroupError(_NamedKeyError):
    """A hook group that was never created, or a hook that was removed already."""


class ShapeError(FlexModelError, ValueError):
    """An activation without the expected shape, or an edit that changed shape or dtype."""


class InputError(FlexModelError, ValueError):
    """Malformed model input or options."""


class LoadError(FlexModelError):
    """A model directory that cannot be loaded (missing file, unsupported option, ...)."""


class HookError(FlexModelError):
    """A hook failed inside the engine."""


class BackwardError(FlexModelError):
    """A backward pass that cannot run or reached no backward hook."""


class HarvestError(FlexModelError):
    """A harvest's data, options or output directory are not usable."""


class DistributedError(FlexModelError):
    """The job's ranks cannot run the layout (no MPI, a layout that does not fit the world)."""


__all__ = [
    "FlexModelError",
    "UnknownSiteError",
    "UnknownParameterError",
    "UnknownGroupError",
    "ShapeError",
    "InputError",
    "LoadError",
    "HookError",
    "BackwardError",
    "HarvestError",
    "DistributedError",
]
