"""pytest-benchmark entry points for the KD loss (not collected by the default `testpaths = ["tests"]`):

    python -m pytest bench/test_bench_kd_loss.py --benchmark-only
CPU: the 1024 x 1000 fp32 shape; CUDA: every configured shape that fits.
"""
from __future__ import annotations

import pytest
import torch

from bench.perf.bench_kd_loss import CONFIGS, CPU_CONFIGS, make_inputs, providers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAMES = list(CONFIGS) if DEVICE.type == "cuda" else list(CPU_CONFIGS)


@pytest.mark.parametrize("provider", list(providers(DEVICE)))
@pytest.mark.parametrize("config", NAMES)
def test_kd_loss_forward_backward(benchmark, config, provider):
    N, C, dtype = CONFIGS[config]
    s, t, y = make_inputs(N, C, dtype, DEVICE)
    fn = providers(DEVICE)[provider]

    def full():
        s.grad = None
        fn(s, t, y).backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(config=config, provider=provider, device=str(DEVICE))
    benchmark(full)
