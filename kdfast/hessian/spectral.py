"""spectral_norms: the largest |eigenvalue| of each mini-batch's loss Hessian (or Gauss-Newton matrix).

A slot scheduler runs up to `chunk` batches' Krylov solvers side by side, each product call serving all
live slots at once; a slot whose batch converges (or runs out of steps) is refilled with the next batch at
once, so converged batches drop out of the batched work and the batch dimension stays full.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from kdfast.errors import InvalidArgumentError
from kdfast.hessian.hvp import BatchedHVP, chunk_for_memory
from kdfast.hessian.lanczos import LanczosSlots
from kdfast.hessian.power import PowerSlots

METHODS = {"lanczos": LanczosSlots, "power": PowerSlots}
# Fraction of free accelerator memory the Krylov bases may take (the rest: activations of the products).
_BASIS_MEMORY_FRACTION = 0.25
_CPU_CHUNK = 8


@dataclass
class SpectralInfo:
    """Per batch: products used, final Ritz residual, whether it met tol; the product variant that ran."""
    products: list[int] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)
    engine: str = ""
    chunk: int = 0


def _validate(iters, tol, method, chunk):
    if not isinstance(iters, int) or iters < 1:
        raise InvalidArgumentError(f"spectral_norms: iters must be an int >= 1, got {iters!r}")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise InvalidArgumentError(f"spectral_norms: tol must be in (0, 1), got {tol!r}")
    if method not in METHODS:
        raise InvalidArgumentError(f"spectral_norms: method must be one of {tuple(METHODS)}, got {method!r}")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise InvalidArgumentError(f"spectral_norms: chunk must be an int >= 1 or None, got {chunk!r}")


def _default_chunk(num_params: int, steps: int, dtype: torch.dtype, device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_CHUNK
    free, _ = torch.cuda.mem_get_info(device)
    return min(16, chunk_for_memory(num_params, steps, torch.finfo(dtype).bits // 8, free * _BASIS_MEMORY_FRACTION))


def spectral_norms(model: nn.Module, batches, *, loss="ce", curvature: str = "hessian", iters: int = 20,
                   tol: float = 1e-3, method: str = "lanczos", engine: str = "auto", compile: bool | str = "auto",
                   chunk: int | None = None, seed: int = 0, return_info: bool = False, on_batch_done=None,
                   products: BatchedHVP | None = None):
    """L_j = max |eigenvalue| of the curvature of each batch's mean loss at the model's current weights.

    batches: iterable of (inputs, targets) pairs (moved to the model's device). Returns (num_batches,)
    float32 on the CPU, in batch order; with return_info=True also a SpectralInfo. engine: "vmap"
    (torch.func, compiled on CUDA when compile="auto"), "loop" (eager double backward per batch) or
    "auto" (vmap on CUDA, loop on CPU: what measured fastest on each, bench/RESULTS.md). Start vectors are
    seeded per batch index, so results are reproducible. on_batch_done(j) is called as batch j finishes.
    products: a BatchedHVP built once and reused across calls (its loss, curvature, engine and compiled
    function win over the arguments here), so a compiled product is compiled once (keep `chunk` fixed too).
    """
    _validate(iters, tol, method, chunk)
    batches = list(batches)
    if not batches:
        raise InvalidArgumentError("spectral_norms: batches is empty; expected (inputs, targets) pairs")
    for j, pair in enumerate(batches):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise InvalidArgumentError(f"spectral_norms: batches[{j}] must be an (inputs, targets) pair, got {type(pair).__name__}")
    trainable = [p for p in model.parameters() if p.requires_grad] if isinstance(model, nn.Module) else []
    if not trainable:
        raise InvalidArgumentError(f"spectral_norms: model must be an nn.Module with trainable parameters, got "
                                   f"{type(model).__name__}")
    device, dtype = trainable[0].device, trainable[0].dtype
    if products is None:
        if engine == "auto":
            engine = "vmap" if device.type == "cuda" else "loop"
        use_compile = (device.type == "cuda" and engine == "vmap") if compile == "auto" else bool(compile)
        products = BatchedHVP(model, loss=loss, curvature=curvature, engine=engine, compile=use_compile)
    elif products.model is not model:
        raise InvalidArgumentError("spectral_norms: products was built for another model")
    use_compile = products.compiled
    products.clear_cache()  # graphs from an earlier call may belong to other batches or weights
    size = products.flat.size
    chunk = chunk or _default_chunk(size, iters, dtype, device)

    norms = torch.full((len(batches),), math.nan, dtype=torch.float32)
    info = SpectralInfo(products=[0] * len(batches), residuals=[math.nan] * len(batches),
                        converged=[False] * len(batches), chunk=chunk)
    # Batches of one shape stack together; a ragged last batch gets its own group.
    groups: dict[tuple, list[int]] = {}
    for j, (x, y) in enumerate(batches):
        groups.setdefault((tuple(x.shape), tuple(torch.as_tensor(y).shape)), []).append(j)
    for members in groups.values():
        _run_group(products, batches, members, METHODS[method], iters, tol, chunk, seed, device, dtype,
                   pad=use_compile, norms=norms, info=info, on_batch_done=on_batch_done)
    info.engine = products.variant
    return (norms, info) if return_info else norms


def _start_vector(size: int, seed: int, index: int, dtype, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(size, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def _run_group(products, batches, members, solver_cls, iters, tol, chunk, seed, device, dtype, *, pad, norms, info,
               on_batch_done):
    slots = min(chunk, len(members))
    x0, y0 = batches[members[0]]
    inputs = torch.empty((slots, *x0.shape), dtype=x0.dtype, device=device)
    targets = torch.empty((slots, *torch.as_tensor(y0).shape), dtype=torch.as_tensor(y0).dtype, device=device)
    solver = solver_cls(slots, products.flat.size, iters, tol, dtype=dtype, device=device)
    owner: list[int | None] = [None] * slots
    queue = iter(members)

    def load(slot: int) -> None:
        j = next(queue, None)
        owner[slot] = j
        if j is not None:
            x, y = batches[j]
            inputs[slot].copy_(torch.as_tensor(x))
            targets[slot].copy_(torch.as_tensor(y))
            solver.start(slot, _start_vector(products.flat.size, seed, j, dtype, device))

    for s in range(slots):
        load(s)
    while True:
        live = [s for s in range(slots) if owner[s] is not None]
        if not live:
            break
        # A compiled product keeps its batch dimension fixed (no recompiles): idle slots ride along.
        run = list(range(slots)) if pad else live
        result = products(inputs[run], targets[run], solver.vectors(run), keys=[owner[s] for s in run])
        result = result[[run.index(s) for s in live]] if pad else result
        estimates, residuals, done = solver.update(live, result)
        for s, estimate, residual, finished in zip(live, estimates, residuals, done):
            j = owner[s]
            info.products[j] += 1
            if finished:
                norms[j] = estimate
                info.residuals[j] = residual
                info.converged[j] = residual <= tol * estimate
                if on_batch_done is not None:
                    on_batch_done(j)
                load(s)
