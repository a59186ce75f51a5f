"""Exact Hessian- and Gauss-Newton-vector products of a model's mini-batch loss, many batches at once.

Vectors are flat, one row per batch: (K, P) with P the number of trainable parameters, so the Krylov
solvers never touch parameter structure. Two engines, chosen by measurement (bench/bench_hessian.py):

- "vmap": torch.func.vmap over the K stacked batches of jvp(grad(f)) (forward-over-reverse) through
  functional_call; one call serves K batches, and torch.compile fuses it (on the H100 for ResNet-18
  GroupNorm 32x32 batch 128: about 6 ms per batch-HVP compiled and vmapped over 8, after a one-off
  compile of about two minutes, against 58 to 72 ms for eager double backward);
- "loop": eager double backward per batch (autograd.grad with create_graph), each batch's gradient graph
  retained while its products continue (as PyHessian does): the faster engine on CPU (bench/bench_hessian.py
  --smoke: 10.8 batches/s against 2.0 for eager vmap on a small GroupNorm CNN, one thread).

With curvature="ggn" the product is J^T H_out J v: a jvp gives J v, the loss's output Hessian (for the
softmax cross-entropy (diag(p) - p pᵀ)/B per example, closed form) acts in output space, a vjp maps back.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from kdfast.errors import InvalidArgumentError, UnsupportedModuleError

LOSSES = ("ce", "mse")
CURVATURES = ("hessian", "ggn")
ENGINES = ("vmap", "loop")
# compile(vmap): the K-batch product compiled as one graph; vmap(compile): the one-batch product compiled,
# batched by an eager vmap; loop(compile): the compiled one-batch product called K times.
COMPILED_VARIANTS = ("compile(vmap)", "vmap(compile)", "loop(compile)")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_loss(loss) -> LossFn:
    """`"ce"` (mean cross-entropy), `"mse"` (mean squared error) or a callable (outputs, targets) -> scalar."""
    if callable(loss):
        return loss
    if loss == "ce":
        return F.cross_entropy
    if loss == "mse":
        return F.mse_loss
    raise InvalidArgumentError(f"hessian: loss must be one of {LOSSES} or a callable, got {loss!r}")


def check_model(model: nn.Module) -> None:
    """Curvature is defined for a fixed function: BatchNorm must use running statistics (eval mode) and
    Dropout must be off, else every product would see a different loss."""
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"hessian: model must be an nn.Module, got {type(model).__name__}")
    stochastic = [name or type(model).__name__ for name, m in model.named_modules()
                  if m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))]
    if stochastic:
        raise UnsupportedModuleError(
            f"hessian: {', '.join(stochastic[:5])} in train mode (BatchNorm batch statistics or Dropout "
            "make the loss change between products): call model.eval() first")
    if not any(p.requires_grad for p in model.parameters()):
        raise InvalidArgumentError("hessian: model has no trainable parameters")


class FlatParams:
    """The model's trainable parameters as one flat vector, and back (views, no copies of the model)."""

    def __init__(self, model: nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.size = sum(self.numels)
        self.params = {n: p.detach() for n, p in named}
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        self.buffers = dict(model.named_buffers())

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels, dim=-1), self.shapes)}

    @staticmethod
    def flatten(tensors) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])


class BatchedHVP:
    """hvp(inputs (K, B, ...), targets (K, B, ...), vectors (K, P)) -> (K, P): each batch's curvature
    (Hessian or GGN of its mean loss at the model's current weights) times its own vector."""

    def __init__(self, model: nn.Module, *, loss="ce", curvature: str = "hessian", engine: str = "loop",
                 compile: bool | str = False):
        check_model(model)
        if curvature not in CURVATURES:
            raise InvalidArgumentError(f"hessian: curvature must be one of {CURVATURES}, got {curvature!r}")
        if engine not in ENGINES:
            raise InvalidArgumentError(f"hessian: engine must be one of {ENGINES}, got {engine!r}")
        if curvature == "ggn" and not (loss in LOSSES):
            raise InvalidArgumentError(f"hessian: curvature='ggn' needs loss in {LOSSES} (a known output Hessian), got {loss!r}")
        self.model, self.flat = model, FlatParams(model)
        self.loss_name, self.loss_fn = loss, resolve_loss(loss)
        self.curvature, self.engine = curvature, engine
        single = self._hvp_one if curvature == "hessian" else self._ggn_one
        if compile and engine != "vmap":
            raise InvalidArgumentError(f"hessian: compile needs engine='vmap' (double backward is not compiled), got engine={engine!r}")
        if compile not in (False, True, *COMPILED_VARIANTS):
            raise InvalidArgumentError(f"hessian: compile must be a bool or one of {COMPILED_VARIANTS}, got {compile!r}")
        self.compiled = bool(compile)
        if engine == "vmap":
            batched = vmap(single, in_dims=(None, 0, 0, 0))
            if compile is True:  # the fallback chain, best first
                self._batched = _first_that_runs([(name, _compiled_variant(name, single, batched))
                                                  for name in ("compile(vmap)", "vmap(compile)")] + [("vmap", batched)])
            elif compile:  # one named variant, no fallback: what the benchmark measures
                self._batched = _first_that_runs([(compile, _compiled_variant(compile, single, batched))])
            else:
                self._batched = _first_that_runs([("vmap", batched)])
        self.products = 0  # batch-HVPs computed, for the benchmark's bookkeeping
        # loop engine: leaves sharing the weights' storage, and the retained graphs of the batches in flight
        self._leaves = [self.flat.params[n].detach().requires_grad_(True) for n in self.flat.names]
        self._graphs = {}

    @property
    def variant(self) -> str:
        """What actually runs: "loop", "vmap" or one of COMPILED_VARIANTS (known after the first call)."""
        return self._batched.variant if self.engine == "vmap" else "loop"

    # -- one batch, pure functions of (inputs, targets, flat vector) ------------------------------------
    def _outputs(self, params: dict, inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (params, self.flat.frozen, self.flat.buffers), (inputs,))

    # Parameters come in as an argument (not a closure) so a compiled product guards on their metadata only.
    def _hvp_one(self, weights, inputs, targets, vector):
        def loss_of(params):
            return self.loss_fn(self._outputs(params, inputs), targets)
        _, tangent = jvp(grad(loss_of), (weights,), (self.flat.unflatten(vector),))
        return FlatParams.flatten(tangent[n] for n in self.flat.names)

    def _ggn_one(self, weights, inputs, targets, vector):
        def outputs_of(params):
            return self._outputs(params, inputs)
        outputs, jv = jvp(outputs_of, (weights,), (self.flat.unflatten(vector),))
        _, pullback = vjp(outputs_of, weights)
        (jtu,) = pullback(self._output_hessian_times(outputs, jv))
        return FlatParams.flatten(jtu[n] for n in self.flat.names)

    def _output_hessian_times(self, outputs: torch.Tensor, jv: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "ce":  # mean over rows of (diag(p) - p pᵀ) per row
            p = outputs.detach().softmax(dim=-1)
            rows = outputs.numel() // outputs.shape[-1]
            return (p * jv - p * (p * jv).sum(dim=-1, keepdim=True)) / rows
        return 2.0 * jv / outputs.numel()  # mse: mean of squares

    def _loop_graph(self, inputs, targets):
        """The differentiable pieces one batch's products reuse (PyHessian's trick: build once, retain)."""
        with torch.enable_grad():
            outputs = self._outputs(dict(zip(self.flat.names, self._leaves)), inputs)
            if self.curvature == "hessian":
                return torch.autograd.grad(self.loss_fn(outputs, targets), self._leaves, create_graph=True), None, None
            # J v by the double-vjp trick (vjp of the vjp), then J^T (H_out J v)
            dummy = torch.zeros_like(outputs, requires_grad=True)
            return torch.autograd.grad(outputs, self._leaves, dummy, create_graph=True), dummy, outputs

    def _loop_one(self, graph, vector):
        first, dummy, outputs = graph
        tangent = tuple(self.flat.unflatten(vector).values())
        if dummy is None:
            return FlatParams.flatten(torch.autograd.grad(first, self._leaves, tangent, retain_graph=True))
        jv = torch.autograd.grad(first, dummy, tangent, retain_graph=True)[0]
        return FlatParams.flatten(torch.autograd.grad(outputs, self._leaves, self._output_hessian_times(outputs, jv),
                                                      retain_graph=True))

    def clear_cache(self) -> None:
        self._graphs = {}

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, vectors: torch.Tensor, keys=None) -> torch.Tensor:
        """keys (loop engine): one hashable per batch; a batch's graph is kept while its key keeps coming
        back in consecutive calls, so repeated products on it skip the forward and first backward. Keys must
        name the same (inputs, targets) at the same weights: clear_cache() when either changes."""
        if vectors.ndim != 2 or vectors.shape[1] != self.flat.size:
            raise InvalidArgumentError(
                f"hvp: vectors must have shape (K, {self.flat.size}), got {tuple(vectors.shape)}")
        self.products += vectors.shape[0]
        if self.engine == "vmap":
            return self._batched(self.flat.params, inputs, targets, vectors)
        if keys is None:
            return torch.stack([self._loop_one(self._loop_graph(x, y), v) for x, y, v in zip(inputs, targets, vectors)])
        graphs = {k: self._graphs.get(k) or self._loop_graph(x, y) for k, x, y in zip(keys, inputs, targets)}
        self._graphs = graphs  # keys absent from this call are released
        return torch.stack([self._loop_one(graphs[k], v) for k, v in zip(keys, vectors)])


def _compiled_variant(name: str, single, batched):
    if name == "compile(vmap)":
        return torch.compile(batched)
    compiled = torch.compile(single)
    if name == "vmap(compile)":
        return vmap(compiled, in_dims=(None, 0, 0, 0))

    def looped(weights, inputs, targets, vectors):
        return torch.stack([compiled(weights, x, y, v) for x, y, v in zip(inputs, targets, vectors)])
    return looped


def _first_that_runs(candidates):
    """The first candidate whose first call succeeds, tried in order (later calls go straight to it).

    torch.compile of vmap(jvp(grad)) traces on some torch versions and fails in others (torch 2.14:
    "Tensor device mismatch ... meta" inside autograd.grad); compiling the per-batch product under an eager
    vmap is the next best, then plain vmap. The choice is logged once, and exposed as `.variant`.
    """
    state = {"index": 0, "settled": False}

    def call(*args):
        while True:
            name, fn = candidates[state["index"]]
            if state["settled"]:
                return fn(*args)
            try:
                out = fn(*args)
            except Exception as exc:  # a compiler failure: fall through to the next variant
                if state["index"] + 1 >= len(candidates):
                    raise
                warnings.warn(f"hessian: {name} product failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                              f"falling back to {candidates[state['index'] + 1][0]}", RuntimeWarning, stacklevel=3)
                state["index"] += 1
                continue
            state["settled"] = True
            call.variant = name
            return out

    call.variant = candidates[0][0]
    return call


def hvp(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, vector: torch.Tensor, *, loss="ce",
        curvature: str = "hessian", engine: str = "loop") -> torch.Tensor:
    """One batch's exact curvature-vector product: (P,) flat vector in, (P,) out."""
    return BatchedHVP(model, loss=loss, curvature=curvature, engine=engine)(inputs[None], targets[None], vector[None])[0]


def chunk_for_memory(num_params: int, steps: int, itemsize: int, budget_bytes: float) -> int:
    """How many batches' Krylov bases (steps + 2 vectors of num_params each) fit in budget_bytes."""
    per_batch = (steps + 2) * num_params * itemsize
    return max(1, int(budget_bytes // per_batch)) if math.isfinite(budget_bytes) else 1 << 30
