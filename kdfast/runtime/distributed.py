"""Multi-process runs under torchrun: the process group from the environment, data shards, rank-0 duties.

    python -m torch.distributed.run --nproc-per-node G --nnodes M ... -m kdfast.cli.score ...

`init_from_env(device)` joins the group that torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (NCCL for
CUDA, gloo for the CPU) and returns the device this rank works on; without those variables (or with a world
of one) nothing is initialised and every helper here behaves as for a single process, so a 1-process torchrun
run is the plain run.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from kdfast.errors import InvalidArgumentError
from kdfast.runtime.checks import int_at_least, integer, require

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidArgumentError(f"distributed: environment variable {name} must be an integer, got {value!r}; "
                                   "launch with torchrun, which sets it") from None


def init_from_env(device: str | torch.device | None = None) -> torch.device:
    """Joins torchrun's process group (if any) and returns this rank's device.

    device: "cuda", "cuda:N" or "cpu" (default: cuda when available). Under torchrun, a CUDA device without an
    index becomes cuda:LOCAL_RANK (made current), so G processes on a node use its G GPUs.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1 or dist.is_initialized():
        return device
    rank, local_rank = _env_int("RANK", -1), _env_int("LOCAL_RANK", -1)
    if not 0 <= rank < world or local_rank < 0:
        raise InvalidArgumentError(f"distributed: RANK={rank} and LOCAL_RANK={local_rank} must lie in [0, "
                                   f"WORLD_SIZE={world}); launch with torchrun, which sets {', '.join(_ENV)}")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def spans_nodes() -> bool:
    """True when torchrun's job runs on more than one node (WORLD_SIZE > LOCAL_WORLD_SIZE); read before init."""
    return _env_int("WORLD_SIZE", 1) > _env_int("LOCAL_WORLD_SIZE", _env_int("WORLD_SIZE", 1))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on the rank that writes shared outputs (rank 0; the only process of a plain run)."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def process_group_for(device):
    """`init_from_env(device)` for a with-block that tears the process group down at its end. On success the
    ranks leave together: a rank that tears down its gloo group while another still works (rank 0 writing the
    summary and plots) can abort in gloo's teardown ("terminate called without an active exception") after all
    its work is done. After an exception, at once: the others may never reach a barrier."""
    device = init_from_env(device)
    try:
        yield device
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums `tensor` over ranks in place (a no-op for one process) and returns it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copies rank 0's buffers (e.g. BatchNorm running statistics) to every rank; a no-op for one process."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def shard_indices(n: int, rank: int, world: int) -> range:
    """The contiguous block of range(n) that `rank` of `world` owns.

    Blocks tile range(n) in rank order with sizes differing by at most one (the first n % world ranks get the
    extra item), so the union over ranks is range(n) with nothing duplicated or dropped, and concatenating the
    ranks' results in rank order restores the single-process order. Ranks past n get an empty range.
    """
    require("shard_indices", integer("n", n), integer("rank", rank), integer("world", world))
    require("shard_indices", int_at_least("n", n, 0, expected=">= 0"), int_at_least("world", world, 1, expected=">= 1"))
    if not 0 <= rank < world:
        raise InvalidArgumentError(f"shard_indices: rank must lie in [0, world={world}), got {rank}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))
