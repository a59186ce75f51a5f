"""The package surface: lazy public API, backend discovery and dispatch."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kdfast
from kdfast.runtime.dispatch import BACKEND_NAMES, ENV_VAR, backends, resolve_backend
from kdfast.errors import BackendUnavailableError, InvalidArgumentError


def test_backends_reports_every_backend_with_a_reason():
    report = backends()
    assert set(report) == set(BACKEND_NAMES)
    assert report["torch"] == "available"
    for name, status in report.items():
        assert isinstance(status, str) and status, name
        if status != "available":
            assert len(status) > 20, f"{name}: reason too terse to act on: {status!r}"


def test_resolve_backend_default_is_live_and_preferred():
    chosen = resolve_backend(None, torch.device("cpu"), op="kd_loss")
    expected = "cpp" if backends()["cpp"] == "available" else "torch"
    assert chosen == expected


def test_resolve_backend_rejects_unknown_name_naming_the_argument():
    with pytest.raises(InvalidArgumentError, match=r"backend must be one of .*'nope'"):
        resolve_backend("nope", torch.device("cpu"), op="kd_loss")


def test_env_override_is_used_and_validated(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend(None, torch.device("cpu"), op="kd_loss") == "torch"
    monkeypatch.setenv(ENV_VAR, "fortran")
    with pytest.raises(InvalidArgumentError, match=ENV_VAR):
        resolve_backend(None, torch.device("cpu"), op="kd_loss")
    # an explicit argument wins over the environment
    assert resolve_backend("torch", torch.device("cpu"), op="kd_loss") == "torch"


def test_cpp_backend_refuses_cuda_tensors():
    with pytest.raises(BackendUnavailableError, match="cpp"):
        resolve_backend("cpp", torch.device("cuda"), op="kd_loss")


def test_triton_without_cuda_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: Triton runs natively")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.device("cpu"), op="kd_loss")


def test_public_api_names_all_resolve():
    for name in kdfast.__all__:
        assert getattr(kdfast, name) is not None, name


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        kdfast.no_such_thing  # noqa: B018


def test_import_is_cheap_and_touches_no_device():
    code = ("import sys, kdfast; heavy = [m for m in ('kdfast.losses.kd_loss', 'triton') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
