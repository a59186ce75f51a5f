"""The CPU proxy of the KD loss's host-path target (no slower than F.cross_entropy), printed: bench_kd_loss's eager-call rows (kd_loss fwd+bwd vs
F.cross_entropy fwd+bwd, one thread, interleaved, best of the rounds) at the CPU shapes, plus the C++ row kernel
alone (`kdfast._C.kd_loss_fwd` with the gradient, mean reduction) in microseconds per call.

    python -m bench.perf.host_path_ratio [--rounds 15]
"""
from __future__ import annotations

import argparse
import time

import torch

from kdfast import _C

from bench.perf.bench_kd_loss import ALPHA, EAGER_SHAPES, TEMPERATURE, _threads, bench_eager_calls, make_inputs
from bench.common import Budget


def kernel_us(N: int, C: int, rounds: int, calls: int = 200) -> float:
    """Best-of-rounds microseconds per `_C.kd_loss_fwd` call (fp32, teacher, gradient, mean)."""
    s, t, y = make_inputs(N, C, torch.float32, torch.device("cpu"))
    s = s.detach()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            _C.kd_loss_fwd(s, t, y, None, ALPHA, TEMPERATURE, -100, 2, True, False, None, True)
        best = min(best, (time.perf_counter() - t0) * 1e6 / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    rows: list[dict] = []
    bench_eager_calls(torch.device("cpu"), EAGER_SHAPES["cpu"], args.rounds, Budget(None), rows.append)
    by_shape: dict[str, dict] = {}
    for r in rows:
        by_shape.setdefault(r["shape"], {})[r["provider"]] = r
    with _threads(1):
        for (N, C), (shape, row) in zip(EAGER_SHAPES["cpu"], by_shape.items()):
            k = kernel_us(N, C, args.rounds)
            print(f"{shape:>8}  kd_loss/cross_entropy {row['kdfast']['ratio_to_cross_entropy']:.2f}  "
                  f"kd_loss {row['kdfast']['ms'] * 1e3:6.1f} us  cross_entropy {row['cross_entropy']['ms'] * 1e3:6.1f} us"
                  f"  kernel alone {k:6.1f} us")


if __name__ == "__main__":
    main()
