"""Forward hooks that capture one intermediate feature of a model, removed on exit.

A layer is named as in `model.named_modules()`: "layer3" captures that module's OUTPUT, "fc:in" its
(first) INPUT, e.g. the features entering a classifier head. `default_layer` picks one when none is named.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from kdfast.errors import InvalidArgumentError

INPUT_SUFFIX = ":in"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / torch.compile wrapper (hooks go on its modules)."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and type(model).__name__ in ("DistributedDataParallel", "OptimizedModule"):
            return unwrap(inner)
    return model


def _split(layer: str) -> tuple[str, bool]:
    if not isinstance(layer, str) or not layer:
        raise InvalidArgumentError(f"kd_terms: a layer must be a module name (optionally ending in "
                                   f"{INPUT_SUFFIX!r}), got {layer!r}")
    return (layer[: -len(INPUT_SUFFIX)], True) if layer.endswith(INPUT_SUFFIX) else (layer, False)


def find_module(model: nn.Module, layer: str, role: str) -> tuple[nn.Module, bool]:
    """(module, capture_input) for a layer name; InvalidArgumentError listing some valid names otherwise."""
    name, want_input = _split(layer)
    modules = dict(unwrap(model).named_modules())
    if name not in modules or name == "":
        names = [n for n in modules if n]
        raise InvalidArgumentError(f"kd_terms: {role} layer {layer!r} is not a module of {type(model).__name__}; "
                                   f"expected one of {', '.join(names[:12])}{', ...' if len(names) > 12 else ''} "
                                   f"(append {INPUT_SUFFIX!r} to capture a module's input)")
    return modules[name], want_input


class Captured:
    """Holds the feature a hook saw in the last forward pass (None before one ran)."""

    def __init__(self, layer: str, role: str):
        self.layer, self.role, self.value = layer, role, None

    def get(self) -> torch.Tensor:
        if self.value is None:
            raise InvalidArgumentError(f"kd_terms: {self.role} layer {self.layer!r} did not run in the forward pass; "
                                       "name a module the model calls")
        return self.value


@contextlib.contextmanager
def capture(model: nn.Module, layer: str, role: str = "model"):
    """Yields a Captured filled by every forward pass of `model` inside the block; the hook is removed on exit."""
    module, want_input = find_module(model, layer, role)
    holder = Captured(layer, role)

    def hook(_module, inputs, output):
        value = inputs[0] if want_input else output
        if not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(f"kd_terms: {role} layer {layer!r} gives a {type(value).__name__}, "
                                       "not a tensor; name another layer")
        holder.value = value

    handle = module.register_forward_hook(hook)
    try:
        yield holder
    finally:
        handle.remove()
        holder.value = None  # no captured activations outlive the block


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """A probe pass must leave BatchNorm statistics and the model's mode as they were."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@torch.no_grad()
def probe_shape(model: nn.Module, layer: str, example_input: torch.Tensor, role: str) -> tuple[int, ...]:
    """Shape of the layer's feature on `example_input` (one no-grad, eval-mode pass)."""
    with _eval_mode(model), capture(model, layer, role) as holder:
        model(example_input)
        return tuple(holder.get().shape)


@torch.no_grad()
def default_layer(model: nn.Module, example_input: torch.Tensor, kind: str) -> str:
    """A layer to distill when none is named.

    kind "head": the input of the last nn.Linear the forward pass runs (the classifier head's features).
    kind "spatial": the last module to finish whose output is a (B, C, H, W) map with H * W > 1 (the last
    convolutional stage, before global pooling).
    """
    inner = unwrap(model)
    seen: list[tuple[str, nn.Module, tuple]] = []
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: seen.append((name, mod, tuple(
        getattr(o, "shape", ()))))) for name, m in inner.named_modules() if name]
    try:
        with _eval_mode(inner):
            inner(example_input)
    finally:
        for h in handles:
            h.remove()
    if kind == "head":
        linear = [name for name, mod, _ in seen if isinstance(mod, nn.Linear)]
        if linear:
            return linear[-1] + INPUT_SUFFIX
        raise InvalidArgumentError(f"kd_terms: {type(inner).__name__} runs no nn.Linear, so there is no classifier "
                                   "head to take features from; name the layer (student_layer=/teacher_layer=)")
    spatial = [name for name, _, shape in seen if len(shape) == 4 and shape[2] * shape[3] > 1]
    if spatial:
        return spatial[-1]
    raise InvalidArgumentError(f"kd_terms: {type(inner).__name__} has no layer with a (B, C, H, W) output and "
                               "H * W > 1; attention transfer needs spatial maps: name the layer")
