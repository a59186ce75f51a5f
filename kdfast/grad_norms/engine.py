"""Exact per-example gradient norms of a whole network at the cost of about one forward and one backward.

    norms = per_example_grad_norms(model, inputs, targets, loss="ce")      # (B,)

How:
  1. Forward hooks on every module holding trainable parameters save its input (detached).
  2. Parameters stop requiring grad for the duration (restored on exit, also after an exception), so the
     backward computes gradients w.r.t. activations only: no weight-gradient GEMM runs, no .grad is
     touched. Layers with no trainable path behind them get their output tied to a zero "anchor" leaf so
     the backward reaches them.
  3. The loss is the SUM of per-example losses: examples are independent (eval-mode semantics), so the
     gradient of the sum w.r.t. a layer's output holds each example's own output gradient.
  4. A tensor hook on each captured output receives that gradient during the backward (before any
     in-place op that later rewrote the output, as autograd guarantees for hooks registered earlier),
     applies the layer's rule (input, output gradient) -> per-example squared norms, and frees the input.
The squared norms of all parameters add up to the squared norm of the whole gradient.

Refused with an explanation, since no rule sees the needed quantities: BatchNorm using batch statistics;
a module called twice in one forward or parameters tied between modules (cross terms between the uses);
a layer whose output is not batch-first (e.g. positional embeddings of arange(T) shared by the batch);
an input modified in place after the layer consumed it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..dispatch import resolve_backend
from ..errors import BackendUnavailableError, InvalidArgumentError, UnsupportedModuleError
from . import rules  # noqa: F401  (registers the built-in rules)
from .fallback import fallback_sqnorms, log_fallback_once
from .registry import Rule, find_rule

LOSSES = ("ce", "kd")
ON_MISSING = ("error", "fallback")


@dataclass
class _Layer:
    name: str
    module: nn.Module
    rule: Rule | None                  # None: the torch.func fallback
    want: tuple[str, ...]              # own parameters requiring grad, in registration order
    inner: list = field(default_factory=list)  # fallback only: the layers nested in this module
    args: tuple | None = None
    kwargs: dict | None = None
    versions: tuple = ()
    slots: tuple | None = None         # fallback with several outputs: positions of the tensor outputs
    calls: int = 0
    sq: dict = field(default_factory=dict)


def _trainable_modules(model: nn.Module):
    for name, module in model.named_modules():
        want = tuple(n for n, p in module.named_parameters(recurse=False) if p.requires_grad)
        if want:
            yield name, module, want


def check(model: nn.Module) -> dict[str, str]:
    """{module name: class name} for every module with trainable parameters and no rule (empty: all covered)."""
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"check: model must be an nn.Module, got {type(model).__name__}")
    return {name or "<model>": type(m).__name__ for name, m, _ in _trainable_modules(model) if find_rule(m) is None}


def _plan(model: nn.Module, on_missing: str) -> list[_Layer]:
    """The layers to capture; raises once listing every problem of a kind."""
    coupled = [name or "<model>" for name, m in model.named_modules()
               if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)]
    if coupled:
        raise InvalidArgumentError(
            f"per_example_grad_norms: BatchNorm normalises with batch statistics at {', '.join(coupled)} (train "
            "mode or track_running_stats=False), which couples the examples of a batch, so per-example "
            "gradients are not defined; call model.eval() to use the running statistics")
    missing = check(model) if on_missing == "error" else {}
    if missing:
        listed = ", ".join(f"`{n}` ({c})" for n, c in missing.items())
        raise UnsupportedModuleError(
            f"per_example_grad_norms: no rule for {len(missing)} module(s) with trainable parameters: {listed}; "
            "register one with kdfast.grad_norms.register_rule or pass on_missing='fallback'")
    owners: dict[int, list[str]] = {}
    layers = []
    for name, module, want in _trainable_modules(model):
        for pn in want:
            owners.setdefault(id(getattr(module, pn)), []).append(f"{name}.{pn}" if name else pn)
        layers.append(_Layer(name, module, find_rule(module), want))
    for outer in layers:
        if outer.rule is None:
            prefix = f"{outer.name}." if outer.name else ""
            outer.inner = [layer for layer in layers if layer is not outer and layer.name.startswith(prefix)]
    shared = [" = ".join(names) for names in owners.values() if len(names) > 1]
    if shared:
        raise UnsupportedModuleError(
            f"per_example_grad_norms: parameters shared between modules ({'; '.join(shared)}): the per-example "
            "gradient of a tied weight sums its uses, whose cross terms no rule computes; untie them or "
            "freeze one use")
    return layers


def _is_float_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


class _TapOutputs(torch.autograd.Function):
    """Identity on the tensor outputs of a fallback module with several outputs, whose backward hands all
    their gradients to the layer at once (zeros for unused ones). Returns copies: outputs of a custom
    Function that alias its inputs may not be modified in place afterwards."""

    @staticmethod
    def forward(ctx, on_grads, *tensors):
        ctx.on_grads = on_grads
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.on_grads(grads)
        return (None, *grads)


class _Capture:
    """Hooks, frozen parameters and saved inputs for one call; everything undone on exit."""

    def __init__(self, model, layers, backend, batch_size):
        self.model, self.layers, self.backend, self.B = model, layers, backend, batch_size
        self.handles, self.anchors, self.replaying = [], {}, False

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            for layer in self.layers:
                hook = functools.partial(self._on_forward, layer)
                self.handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
            for p, _ in self.flags:
                p.requires_grad_(False)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for handle in self.handles:
            handle.remove()
        for layer in self.layers:
            layer.args = layer.kwargs = None
        self.handles, self.anchors = [], {}
        return False

    def _anchor(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.device)
        if key not in self.anchors:
            self.anchors[key] = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
        return self.anchors[key]

    def _on_forward(self, layer, module, args, kwargs, output):
        if self.replaying:  # the fallback re-running a module: not part of the captured forward
            return None
        layer.calls += 1
        if layer.calls > 1:
            raise UnsupportedModuleError(
                f"per_example_grad_norms: `{layer.name}` ({type(module).__name__}) ran more than once in one "
                "forward; the per-example gradient of a reused module sums its calls, whose cross terms no rule "
                "computes; give each use its own module")
        if layer.rule is not None and not (args and isinstance(args[0], torch.Tensor)):
            raise UnsupportedModuleError(
                f"per_example_grad_norms: `{layer.name}` ({type(module).__name__}) was called without a positional "
                "input tensor; its rule reads the first positional argument")
        several = layer.rule is None and type(output) in (tuple, list)
        tensors = [o for o in output if _is_float_tensor(o)] if several else [output]
        if not tensors or any(not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != self.B
                              for t in tensors):
            got = (tuple(output.shape) if isinstance(output, torch.Tensor)
                   else [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in output]
                   if type(output) in (tuple, list) else type(output).__name__)
            raise UnsupportedModuleError(
                f"per_example_grad_norms: `{layer.name}` ({type(module).__name__}) must return batch-first "
                f"tensors with {self.B} rows (one tensor for modules with a rule), got {got}; a layer applied to "
                "an input shared by the whole batch (e.g. positional embeddings of arange(T)) sums the examples' "
                "gradients before any rule sees them: feed it a batch-first input such as arange(T).expand(B, T)")
        layer.args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        layer.kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        layer.versions = tuple(a._version if isinstance(a, torch.Tensor) else None for a in args)
        tensors = [t if t.requires_grad else t + self._anchor(t) for t in tensors]
        if several:
            layer.slots = tuple(i for i, o in enumerate(output) if _is_float_tensor(o))
            tapped = iter(_TapOutputs.apply(functools.partial(self._on_grad, layer), *tensors))
            return type(output)(next(tapped) if _is_float_tensor(o) else o for o in output)
        self.handles.append(tensors[0].register_hook(functools.partial(self._on_grad, layer)))
        return None if tensors[0] is output else tensors[0]

    def _on_grad(self, layer, grad_output):
        if any(isinstance(a, torch.Tensor) and a._version != v for a, v in zip(layer.args, layer.versions)):
            raise UnsupportedModuleError(
                f"per_example_grad_norms: the input of `{layer.name}` ({type(layer.module).__name__}) was modified "
                "in place after the layer ran, so its saved value is gone; make the later operation out of place")
        device = (grad_output if isinstance(grad_output, torch.Tensor) else grad_output[0]).device
        with torch.autocast(device.type, enabled=False):  # rules choose their own accumulation dtype
            self._apply_rule(layer, grad_output)
        layer.args = layer.kwargs = None
        return None

    def _apply_rule(self, layer, grad_output):
        if layer.rule is None:
            self._fallback(layer, grad_output)
        else:
            sq = layer.rule(layer.module, layer.args[0], grad_output, want=frozenset(layer.want),
                            backend=self.backend)
            missing = [n for n in layer.want if n not in sq]
            if missing:
                raise UnsupportedModuleError(f"per_example_grad_norms: the rule for `{layer.name}` "
                                             f"({type(layer.module).__name__}) returned no norms for {missing}")
            layer.sq = {n: sq[n] for n in layer.want}

    def _fallback(self, layer, grad_output):
        """torch.func on the module, covering also nested layers that never ran their own forward: their
        weights were used by this module's code directly (e.g. MultiheadAttention's out_proj)."""
        targets = {pn: (layer, pn) for pn in layer.want}
        start = len(layer.name) + 1 if layer.name else 0
        for inner in layer.inner:
            if inner.calls == 0:
                targets.update({f"{inner.name[start:]}.{pn}": (inner, pn) for pn in inner.want})
        self.replaying = True
        try:
            sq = fallback_sqnorms(layer.module, layer.args, layer.kwargs, grad_output, layer.slots, tuple(targets))
        finally:
            self.replaying = False
        for name, (owner, pn) in targets.items():
            owner.sq[pn] = sq[name]

    def backward(self, total: torch.Tensor) -> None:
        if total.requires_grad and self.anchors:
            torch.autograd.grad(total, list(self.anchors.values()), allow_unused=True)


def _check_args(model, inputs, targets, loss, teacher_logits, per_layer, on_missing):
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"per_example_grad_norms: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
        got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise InvalidArgumentError(f"per_example_grad_norms: inputs must be a batch-first tensor (B, ...), got {got}")
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0 or targets.shape[0] != inputs.shape[0]:
        raise InvalidArgumentError(
            f"per_example_grad_norms: targets must be a tensor with one entry per example ({inputs.shape[0]}), got "
            f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if not (callable(loss) or loss in LOSSES):
        raise InvalidArgumentError(f"per_example_grad_norms: loss must be 'ce', 'kd' or a callable returning "
                                   f"per-example losses (B,), got {loss!r}")
    if loss == "kd" and teacher_logits is None:
        raise InvalidArgumentError("per_example_grad_norms: loss='kd' needs teacher_logits (B, C), got None")
    if on_missing not in ON_MISSING:
        raise InvalidArgumentError(f"per_example_grad_norms: on_missing must be one of {ON_MISSING}, got "
                                   f"{on_missing!r}")
    if not isinstance(per_layer, bool):
        raise InvalidArgumentError(f"per_example_grad_norms: per_layer must be a bool, got {per_layer!r}")


def _summed_loss(output, targets, loss, alpha, temperature, teacher_logits):
    """Sum over examples of their own losses (so d/d activation holds each example's own gradient)."""
    B = targets.shape[0]
    if callable(loss):
        per_example = loss(output, targets)
        if not isinstance(per_example, torch.Tensor) or tuple(per_example.shape) != (B,):
            got = tuple(per_example.shape) if isinstance(per_example, torch.Tensor) else type(per_example).__name__
            raise InvalidArgumentError(f"per_example_grad_norms: the loss callable must return per-example "
                                       f"losses of shape ({B},), got {got}")
        return per_example.sum()
    from ..ops.kd_loss import kd_loss
    if not isinstance(output, torch.Tensor):
        raise InvalidArgumentError(f"per_example_grad_norms: loss={loss!r} needs the model to return logits "
                                   f"(B, ..., C), got {type(output).__name__}")
    if loss == "ce":
        return kd_loss(output, None, targets, alpha=0.0, reduction="sum")
    return kd_loss(output, teacher_logits.detach(), targets, alpha=alpha, temperature=temperature,
                   reduction="sum")


def _choose_backend(backend, device, float64):
    chosen = resolve_backend(backend, device, op="per_example_grad_norms")
    if chosen == "cpp":  # no C++ kernels here: on the CPU the rules are BLAS-bound batched torch already
        return "torch"
    if float64 and chosen == "triton":
        if backend is None:
            return "torch"  # float64 is the testing dtype: keep its precision
        raise BackendUnavailableError("per_example_grad_norms: backend='triton' computes in float32; a float64 "
                                      "model needs backend='torch'")
    return chosen


def per_example_grad_norms(model, inputs, targets, *, loss="ce", alpha=0.5, temperature=4.0, teacher_logits=None,
                           per_layer=False, on_missing="error", backend=None):
    """Exact L2 norm of each example's gradient w.r.t. every parameter with requires_grad.

    Args:
        model: the network; BatchNorm must be in eval mode (running statistics).
        inputs: (B, ...) batch-first input tensor.
        targets: (B,) class indices (or (B, ...) matching the logits' leading dims, summed per example).
        loss: "ce", "kd" (kdfast.kd_loss with alpha, temperature and teacher_logits) or a callable
            (output, targets) -> (B,) per-example losses.
        per_layer: also return {parameter name: (B,) squared norms}; they sum to norms ** 2.
        on_missing: "error" (list every module without a rule) or "fallback" (torch.func for those modules).
        backend: "triton", "torch" or None (Triton for CUDA tensors; "cpp" runs the torch path).

    Returns:
        (B,) float32 norms (float64 when the model is float64), and the dict with per_layer=True.
    """
    _check_args(model, inputs, targets, loss, teacher_logits, per_layer, on_missing)
    layers = _plan(model, on_missing)
    for layer in layers:
        if layer.rule is None:
            log_fallback_once(layer.module)
    float64 = any(p.dtype == torch.float64 for p in model.parameters())
    out_dtype = torch.float64 if float64 else torch.float32
    chosen = _choose_backend(backend, inputs.device, float64)
    B = inputs.shape[0]
    if B:
        with _Capture(model, layers, chosen, B) as capture, torch.enable_grad():
            output = model(inputs.detach())
            capture.backward(_summed_loss(output, targets, loss, alpha, temperature, teacher_logits))
    sq = {}
    for layer in layers:
        for pn in layer.want:
            value = layer.sq.get(pn)
            sq[f"{layer.name}.{pn}" if layer.name else pn] = (
                torch.zeros(B, dtype=out_dtype, device=inputs.device) if value is None else value.to(out_dtype))
    total = torch.zeros(B, dtype=out_dtype, device=inputs.device)
    for value in sq.values():
        total += value
    norms = total.sqrt()
    return (norms, sq) if per_layer else norms
