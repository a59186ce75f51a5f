"""Exact Hessian- and Gauss-Newton-vector products of a model's mini-batch loss, many batches at once.

Vectors are flat, one row per batch: (K, P) with P the number of trainable parameters, so the Krylov
solvers never touch parameter structure. Two engines:

- "loop" (the default): per batch, the gradient is built once with create_graph and retained (PyHessian's
  trick), then every product is one double backward through it. On CUDA the build and the product are
  captured once per slot as CUDA graphs and replayed (a new batch: a copy into the slot's static inputs and
  a replay of the build), so a product costs its kernels, not the ~1,670 eager launches of ResNet-18's
  GroupNorm double backward (measured on a GPU, bench/results/NOTES.md). Capture failing falls back to eager, with one warning.
- "vmap": torch.func.vmap over the K stacked batches of jvp(grad(f)) (forward-over-reverse) through
  functional_call: forward and backward are recomputed per product, so eagerly it is the slower engine
  (bench/perf/bench_hessian.py rows); `compile=` compiles it, opt-in only.

With curvature="ggn" the product is J^T H_out J v: a jvp gives J v, the loss's output Hessian (for the
softmax cross-entropy (diag(p) - p pᵀ)/B per example, closed form) acts in output space, a vjp maps back.
"""
from __future__ import annotations

import math
import warnings
import weakref
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
# compile=True: torch 2.14 fails to trace compile(vmap(jvp(grad))) ("Tensor device mismatch ... meta" inside
# autograd.grad), so True names the variant that traces there.
DEFAULT_COMPILED = "vmap(compile)"
# Compiled products, per model, per (loss, curvature, variant): a second BatchedHVP on the same model reuses
# the compiled function instead of tracing again (weights are arguments, so it stays valid).
_COMPILED_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()

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
                 compile: bool | str = False, cuda_graphs: bool | None = None):
        """compile (vmap engine only, opt-in): True or one of COMPILED_VARIANTS. It is traced once, for the
        first batch shape it sees (other shapes run eager: no recompiles), cached per model, and a variant
        that fails to trace falls back to eager vmap with one warning, never to a second trace.
        cuda_graphs (loop engine): capture and replay the products as CUDA graphs; None = on CUDA."""
        check_model(model)
        if curvature not in CURVATURES:
            raise InvalidArgumentError(f"hessian: curvature must be one of {CURVATURES}, got {curvature!r}")
        if engine not in ENGINES:
            raise InvalidArgumentError(f"hessian: engine must be one of {ENGINES}, got {engine!r}")
        if curvature == "ggn" and not (loss in LOSSES):
            raise InvalidArgumentError(f"hessian: curvature='ggn' needs loss in {LOSSES} (a known output Hessian), got {loss!r}")
        if compile not in (False, True, *COMPILED_VARIANTS):
            raise InvalidArgumentError(f"hessian: compile must be a bool or one of {COMPILED_VARIANTS}, got {compile!r}")
        if compile and engine != "vmap":
            raise InvalidArgumentError(f"hessian: compile needs engine='vmap' (double backward is not compiled), got engine={engine!r}")
        self.model, self.flat = model, FlatParams(model)
        self.loss_name, self.loss_fn = loss, resolve_loss(loss)
        self.curvature, self.engine = curvature, engine
        self.compiled = bool(compile)
        device = next(iter(self.flat.params.values())).device
        self.cuda_graphs = (device.type == "cuda" and engine == "loop") if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and (engine != "loop" or device.type != "cuda"):
            raise InvalidArgumentError(f"hessian: cuda_graphs=True needs engine='loop' on a CUDA model, got "
                                       f"engine={engine!r} on {device}")
        if engine == "vmap":
            single = self._hvp_one if curvature == "hessian" else self._ggn_one
            self._eager = vmap(single, in_dims=(None, 0, 0, 0))
            self._compiled = None
            if compile:
                name = DEFAULT_COMPILED if compile is True else compile
                cache = _COMPILED_CACHE.setdefault(model, {})
                key = (loss, curvature, name)
                if key not in cache:
                    cache[key] = _Compiled(name, _compiled_variant(name, single, self._eager), self._eager)
                self._compiled = cache[key]
        self.products = 0  # batch-HVPs computed, for the benchmark's bookkeeping
        # loop engine: leaves sharing the weights' storage, the retained batches in flight (by key), and
        # captured slots waiting for a batch
        self._leaves = [self.flat.params[n].detach().requires_grad_(True) for n in self.flat.names]
        self._retained: dict = {}
        self._spare: list = []
        self._capture_failed = False
        self._warm: set = set()  # batch shapes run eagerly once before their first capture

    @property
    def variant(self) -> str:
        """What actually runs: "loop", "loop+cudagraph", "vmap" or one of COMPILED_VARIANTS."""
        if self.engine == "vmap":
            return self._compiled.variant if self._compiled is not None else "vmap"
        return "loop+cudagraph" if self.cuda_graphs and not self._capture_failed else "loop"

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
        """Forget the retained batches (captured slots are kept, to be loaded with the next batches)."""
        self._spare += [r for r in self._retained.values() if isinstance(r, _Captured)]
        self._retained = {}

    def _retain(self, x: torch.Tensor, y: torch.Tensor, free: list):
        """A retained batch for (x, y): a released slot of the same shapes reloaded, else a new one."""
        for pool in (free, self._spare):
            for r in pool:
                if r.fits(x, y):
                    pool.remove(r)
                    r.load(x, y)
                    return r
        if self.cuda_graphs and not self._capture_failed:
            try:
                return _Captured(self, x, y)
            except RuntimeError as exc:
                self._capture_failed = True
                warnings.warn(f"hessian: capturing the products as CUDA graphs failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]}); running them eagerly", RuntimeWarning, stacklevel=3)
        return _Retained(self, x, y)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, vectors: torch.Tensor, keys=None) -> torch.Tensor:
        """keys (loop engine): one hashable per batch; a batch's graph is kept while its key keeps coming
        back in consecutive calls, so repeated products on it skip the forward and first backward. Keys must
        name the same (inputs, targets) at the same weights: clear_cache() when either changes."""
        if vectors.ndim != 2 or vectors.shape[1] != self.flat.size:
            raise InvalidArgumentError(
                f"hvp: vectors must have shape (K, {self.flat.size}), got {tuple(vectors.shape)}")
        self.products += vectors.shape[0]
        if self.engine == "vmap":
            run = self._compiled if self._compiled is not None else self._eager
            return run(self.flat.params, inputs, targets, vectors)
        if keys is None:
            return torch.stack([self._loop_one(self._loop_graph(x, y), v) for x, y, v in zip(inputs, targets, vectors)])
        wanted = set(keys)
        free = [r for k, r in self._retained.items() if k not in wanted]  # released by this call
        live = {k: self._retained.get(k) or self._retain(x, y, free) for k, x, y in zip(keys, inputs, targets)}
        self._spare += [r for r in free if isinstance(r, _Captured)]
        self._retained = live
        return torch.stack([live[k].product(v) for k, v in zip(keys, vectors)])


class _Retained:
    """One batch's differentiable gradient, built once; each product is one double backward through it."""

    def __init__(self, hvp: BatchedHVP, x: torch.Tensor, y: torch.Tensor):
        self.hvp, self.shapes = hvp, (x.shape, x.dtype, y.shape, y.dtype)
        self.load(x, y)

    def fits(self, x, y) -> bool:
        return self.shapes == (x.shape, x.dtype, y.shape, y.dtype)

    def load(self, x, y) -> None:
        self.graph = None  # release the old batch's graph before building the new one
        self.graph = self.hvp._loop_graph(x, y)

    def product(self, v: torch.Tensor) -> torch.Tensor:
        return self.hvp._loop_one(self.graph, v)


class _Captured(_Retained):
    """A retained batch on CUDA whose build and product are captured once as CUDA graphs (on static input,
    target and vector buffers) and replayed: the autograd graph recorded while capturing the build keeps its
    saved tensors at fixed addresses, which every build replay refreshes and every product replay reads.
    Each capture has a private memory pool, so slots replay in any order."""

    def __init__(self, hvp: BatchedHVP, x: torch.Tensor, y: torch.Tensor):
        self.hvp, self.shapes = hvp, (x.shape, x.dtype, y.shape, y.dtype)
        self.x, self.y = x.detach().clone(), y.detach().clone()
        self.v = torch.zeros(hvp.flat.size, dtype=hvp._leaves[0].dtype, device=x.device)
        if self.shapes not in hvp._warm and x.device.type == "cuda":
            # one eager run per shape before capturing (cuDNN plans, lazy initialisation), on a side stream
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                self._build()
                self._product()
            torch.cuda.current_stream(x.device).wait_stream(side)
        hvp._warm.add(self.shapes)
        self.build = _capture(self._build)
        self.replay = _capture(self._product)
        self.build()  # capturing records the kernels without running them

    def _build(self) -> None:
        self.graph = None
        self.graph = self.hvp._loop_graph(self.x, self.y)

    def _product(self) -> None:
        self.out = self.hvp._loop_one(self.graph, self.v)

    def load(self, x, y) -> None:
        self.x.copy_(x)
        self.y.copy_(y)
        self.build()

    def product(self, v: torch.Tensor) -> torch.Tensor:
        self.v.copy_(v)
        self.replay()
        return self.out  # a static buffer: the caller's stack copies it before the next replay


def _capture(fn):
    """Records fn's kernels as a CUDA graph (in its own memory pool); returns the graph's replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class _Compiled:
    """A compiled product used for the first batch shape it sees only (no recompiles: other shapes run the
    eager vmap), falling back to the eager vmap for good, with one warning, when tracing fails."""

    def __init__(self, name: str, fn, eager):
        self.name, self.fn, self.eager, self.shape, self.failed = name, fn, eager, None, False

    @property
    def variant(self) -> str:
        return "vmap" if self.failed else self.name

    def __call__(self, weights, inputs, targets, vectors):
        key = (tuple(inputs.shape), inputs.dtype, tuple(targets.shape))
        if self.failed or (self.shape is not None and key != self.shape):
            return self.eager(weights, inputs, targets, vectors)
        try:
            out = self.fn(weights, inputs, targets, vectors)
        except Exception as exc:  # a compiler failure: eager for the rest of the run, never a second trace
            if self.shape is not None:
                raise
            self.failed = True
            warnings.warn(f"hessian: compiled product {self.name} failed to trace ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0]}); running the eager vmap instead", RuntimeWarning, stacklevel=3)
            return self.eager(weights, inputs, targets, vectors)
        self.shape = key
        return out


def _compiled_variant(name: str, single, batched):
    if name == "compile(vmap)":
        return torch.compile(batched)
    compiled = torch.compile(single)
    if name == "vmap(compile)":
        return vmap(compiled, in_dims=(None, 0, 0, 0))

    def looped(weights, inputs, targets, vectors):
        return torch.stack([compiled(weights, x, y, v) for x, y, v in zip(inputs, targets, vectors)])
    return looped


def hvp(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, vector: torch.Tensor, *, loss="ce",
        curvature: str = "hessian", engine: str = "loop") -> torch.Tensor:
    """One batch's exact curvature-vector product: (P,) flat vector in, (P,) out."""
    return BatchedHVP(model, loss=loss, curvature=curvature, engine=engine)(inputs[None], targets[None], vector[None])[0]


def chunk_for_memory(num_params: int, steps: int, itemsize: int, budget_bytes: float) -> int:
    """How many batches' Krylov bases (steps + 2 vectors of num_params each) fit in budget_bytes."""
    per_batch = (steps + 2) * num_params * itemsize
    return max(1, int(budget_bytes // per_batch)) if math.isfinite(budget_bytes) else 1 << 30
