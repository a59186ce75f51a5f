"""spectral_norms: the largest |eigenvalue| of each mini-batch's loss Hessian (or Gauss-Newton matrix).

A slot scheduler runs up to `chunk` batches' Krylov solvers side by side, each product call serving all
live slots at once; a slot whose batch converges (or runs out of steps) is refilled with the next batch at
once, so converged batches drop out of the batched work and the batch dimension stays full.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from kdfast.errors import InvalidArgumentError
from kdfast.runtime.checks import int_at_least, require
from kdfast.hessian.hvp import BatchedHVP, chunk_for_memory
from kdfast.hessian.lanczos import LanczosSlots
from kdfast.hessian.power import PowerSlots

METHODS = {"lanczos": LanczosSlots, "power": PowerSlots}
# Fraction of free accelerator memory the Krylov bases may take (the rest: activations of the products).
_BASIS_MEMORY_FRACTION = 0.25
_CPU_CHUNK = 8
_CPU_BASIS_BYTES = 2 * 1024**3  # host memory is shared with everything else: ResNet-18 gets 2 slots


@dataclass
class SpectralInfo:
    """Per batch: products used, final Ritz residual, whether it met tol; the product variant that ran."""
    products: list[int] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)
    engine: str = ""
    chunk: int = 0


def _validate(iters, tol, method, chunk):
    require("spectral_norms", int_at_least("iters", iters, 1, expected="an int >= 1"))
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise InvalidArgumentError(f"spectral_norms: tol must be in (0, 1), got {tol!r}")
    if method not in METHODS:
        raise InvalidArgumentError(f"spectral_norms: method must be one of {tuple(METHODS)}, got {method!r}")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise InvalidArgumentError(f"spectral_norms: chunk must be an int >= 1 or None, got {chunk!r}")


def _default_chunk(num_params: int, steps: int, dtype: torch.dtype, device: torch.device) -> int:
    itemsize = torch.finfo(dtype).bits // 8
    if device.type != "cuda":
        return min(_CPU_CHUNK, chunk_for_memory(num_params, steps, itemsize, _CPU_BASIS_BYTES))
    free, _ = torch.cuda.mem_get_info(device)
    return min(16, chunk_for_memory(num_params, steps, itemsize, free * _BASIS_MEMORY_FRACTION))


def spectral_norms(model: nn.Module, batches, *, loss="ce", curvature: str = "hessian", iters: int = 20,
                   tol: float = 1e-3, method: str = "lanczos", engine: str = "loop", compile: bool | str = False,
                   chunk: int | None = None, seed: int = 0, return_info: bool = False, on_batch_done=None,
                   products: BatchedHVP | None = None):
    """L_j = max |eigenvalue| of the curvature of each batch's mean loss at the model's current weights.

    batches: iterable of (inputs, targets) pairs, consumed lazily (moved to the model's device as slots free
    up, so a data set larger than memory streams through). Returns (num_batches,)
    float32 on the CPU, in batch order; with return_info=True also a SpectralInfo. engine: "loop" (double
    backward through each batch's retained gradient, replayed from CUDA graphs on CUDA) or "vmap"
    (torch.func; `compile=True` or a variant name compiles it, opt-in, see BatchedHVP). Start vectors are
    drawn on the device from a generator seeded by (seed, batch index), so results are reproducible on one
    device type. on_batch_done(j) is called as batch j finishes.
    products: a BatchedHVP built once and reused across calls (its loss, curvature, engine and compiled
    function win over the arguments here), so a compiled product is compiled once (keep `chunk` fixed too).
    """
    _validate(iters, tol, method, chunk)
    trainable = [p for p in model.parameters() if p.requires_grad] if isinstance(model, nn.Module) else []
    if not trainable:
        raise InvalidArgumentError(f"spectral_norms: model must be an nn.Module with trainable parameters, got "
                                   f"{type(model).__name__}")
    device, dtype = trainable[0].device, trainable[0].dtype
    if products is None:
        products = BatchedHVP(model, loss=loss, curvature=curvature, engine=engine, compile=compile)
    elif products.model is not model:
        raise InvalidArgumentError("spectral_norms: products was built for another model")
    use_compile = products.compiled
    products.clear_cache()  # graphs from an earlier call may belong to other batches or weights
    size = products.flat.size
    chunk = chunk or _default_chunk(size, iters, dtype, device)

    # Batches stream in (only `chunk` of them sit on the device at a time) and stack with batches of the same
    # shape; a batch of another shape (the ragged last one) is set aside and run after, in its own stack.
    stream = _numbered_pairs(batches)
    first = next(stream, None)
    if first is None:
        raise InvalidArgumentError("spectral_norms: batches is empty; expected (inputs, targets) pairs")
    results: dict[int, tuple[float, int, float]] = {}
    set_aside: dict[tuple, list] = {}
    run = functools.partial(_run_group, products, solver_cls=METHODS[method], iters=iters, tol=tol, seed=seed,
                            device=device, dtype=dtype, pad=use_compile, results=results, on_batch_done=on_batch_done)
    # Slots beyond the number of batches would only hold idle bases.
    run(first, _same_shape(stream, _shape_key(first), set_aside),
        chunk=min(chunk, len(batches)) if hasattr(batches, "__len__") else chunk)
    for items in set_aside.values():
        run(items[0], iter(items[1:]), chunk=min(chunk, len(items)))
    count = len(results)
    norms = torch.tensor([results[j][0] for j in range(count)], dtype=torch.float32)
    info = SpectralInfo(products=[results[j][1] for j in range(count)],
                        residuals=[results[j][2] for j in range(count)],
                        converged=[results[j][2] <= tol * results[j][0] for j in range(count)],
                        engine=products.variant, chunk=chunk)
    return (norms, info) if return_info else norms


def _numbered_pairs(batches):
    for j, pair in enumerate(batches):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise InvalidArgumentError(
                f"spectral_norms: batches[{j}] must be an (inputs, targets) pair, got {type(pair).__name__}")
        yield j, torch.as_tensor(pair[0]), torch.as_tensor(pair[1])


def _shape_key(item) -> tuple:
    _, x, y = item
    return tuple(x.shape), x.dtype, tuple(y.shape), y.dtype


def _same_shape(stream, key, set_aside):
    for item in stream:
        if _shape_key(item) == key:
            yield item
        else:
            set_aside.setdefault(_shape_key(item), []).append(item)


def _start_vector(size: int, seed: int, index: int, dtype, device) -> torch.Tensor:
    """Drawn where it is used, in the working dtype: no host draw of P values per batch."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
    return torch.randn(size, generator=gen, dtype=dtype, device=device)


def _run_group(products, first, rest, *, solver_cls, iters, tol, chunk, seed, device, dtype, pad, results,
               on_batch_done):
    _, x0, y0 = first
    inputs = torch.zeros((chunk, *x0.shape), dtype=x0.dtype, device=device)
    targets = torch.zeros((chunk, *y0.shape), dtype=y0.dtype, device=device)  # idle slots: valid class 0
    solver = solver_cls(chunk, products.flat.size, iters, tol, dtype=dtype, device=device)
    owner: list[int | None] = [None] * chunk
    used = [0] * chunk
    queue = itertools.chain([first], rest)

    def load(slot: int) -> None:
        item = next(queue, None)
        owner[slot], used[slot] = (None if item is None else item[0]), 0
        if item is not None:
            j, x, y = item
            inputs[slot].copy_(x)
            targets[slot].copy_(y)
            solver.start(slot, _start_vector(products.flat.size, seed, j, dtype, device))

    for s in range(chunk):
        load(s)
    while True:
        live = [s for s in range(chunk) if owner[s] is not None]
        if not live:
            break
        # A compiled product keeps its batch dimension fixed (no recompiles): idle slots ride along.
        run = list(range(chunk)) if pad else live
        result = products(inputs[run], targets[run], solver.vectors(run), keys=[owner[s] for s in run])
        result = result[live] if pad else result
        estimates, residuals, done = solver.update(live, result)
        for s, estimate, residual, finished in zip(live, estimates, residuals, done):
            used[s] += 1
            if finished:
                results[owner[s]] = (estimate, used[s], residual)
                if on_batch_done is not None:
                    on_batch_done(owner[s])
                load(s)
