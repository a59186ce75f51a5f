"""The kernel backends every op test runs on: a backend that cannot run here is skipped with its reason, except in
CI (CI=true), where every one must be available."""
from __future__ import annotations

import os

import pytest
import torch

from kdfast.errors import BackendUnavailableError
from kdfast.runtime.dispatch import resolve_backend

BACKENDS = ("torch", "cpp", "triton")


def cpu_unavailable_reason(backend) -> str | None:
    """Why `backend` cannot run the tests' CPU tensors, or None. (Triton runs CPU tensors only under
    TRITON_INTERPRET=1, which conftest sets without a GPU; bench/perf/bench_kd_loss.py checks it on a GPU.)"""
    try:
        resolve_backend(backend, torch.device("cpu"), op="kd_loss")
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def require_backend(backend) -> None:
    """Skip an unavailable backend with its reason; in CI a missing backend is a failure."""
    reason = cpu_unavailable_reason(backend)
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"backend {backend!r} must be available in CI: {reason}")
        pytest.skip(f"backend {backend!r} unavailable: {reason}")
