"""Backend discovery and dispatch.

Three backends compute every op with the same semantics:
  "triton"  fused Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (how CI tests them)
  "cpp"     the C++/OpenMP extension (CPU tensors): kdfast._C built at install, else csrc/ compiled on first use
            (kdfast.runtime.cpp_build)
  "torch"   plain PyTorch, always available, float64-capable (the fallback)
The default picks triton for CUDA tensors and cpp for CPU tensors, falling back to torch when the
preferred one is unavailable (with one warning when CPU work loses the C++ kernels). `backend=` or the
KDFAST_BACKEND environment variable forces a choice.
Nothing here touches a device at import time.
"""
from __future__ import annotations

import functools
import os
import threading
import warnings

import torch

from kdfast.errors import BackendUnavailableError, InvalidArgumentError, SlowFallbackWarning

BACKEND_NAMES = ("triton", "cpp", "torch")
ENV_VAR = "KDFAST_BACKEND"


def _getenv(name: str) -> str | None:
    """os.environ.get(name) without the KeyError that Mapping.get raises and catches for an unset name: on the
    hot path of a small op that exception cost several microseconds (more than the rest of the dispatch)."""
    key = _ENV_KEYS.get(name)
    if key is None:
        encode = getattr(os.environ, "encodekey", None)
        if encode is None or not isinstance(getattr(os.environ, "_data", None), dict):  # not CPython's _Environ
            return os.environ.get(name)
        key = _ENV_KEYS[name] = encode(name)
    value = os.environ._data.get(key)
    return None if value is None else os.environ.decodevalue(value)


_ENV_KEYS: dict = {}  # name -> its key in os.environ's underlying dict


def triton_interpret() -> bool:
    return (_getenv("TRITON_INTERPRET") or "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return f"triton not importable ({type(exc).__name__}: {exc})"
    return None


_cpp_state = None
_cpp_state_lock = threading.Lock()  # threads asking at once: one loads (or compiles), the others wait for it


def cpp_state():
    """Where this process's C++ kernels come from (kdfast.runtime.cpp_build): built at install, compiled on first use (the
    first call may compile them, once per machine), or unavailable and why. Decided once per process."""
    global _cpp_state
    if _cpp_state is None:
        with _cpp_state_lock:
            if _cpp_state is None:
                from kdfast.runtime.cpp_build import load
                _cpp_state = load()
    return _cpp_state


def cpp_module():
    """The compiled extension; raises BackendUnavailableError with the reason when absent."""
    state = cpp_state()
    if state.module is None:
        raise BackendUnavailableError(f"backend 'cpp' unavailable: {state.detail}")
    return state.module


def _unavailable_reason(name: str, device: torch.device | None) -> str | None:
    """None when `name` can run on `device` (None: anywhere it could run at all)."""
    if name == "torch":
        return None
    if name == "cpp":
        state = cpp_state()
        if state.module is None:
            return state.detail
        if device is not None and device.type != "cpu":
            return f"the C++ backend runs on CPU tensors, got a {device.type} tensor"
        return None
    err = _triton_import_error()
    if err:
        return err
    on_cpu = device.type == "cpu" if device is not None else not torch.cuda.is_available()
    if on_cpu and not triton_interpret():
        return "Triton needs CUDA tensors (or TRITON_INTERPRET=1 to run its kernels on the CPU, slowly)"
    if device is not None and device.type not in ("cpu", "cuda"):
        return f"Triton kernels run on CUDA tensors, got a {device.type} tensor"
    return None


def backends(details: bool = False) -> dict[str, str]:
    """Which backends are live here, and why not the others: {name: "available" | reason}. With details=True a
    live "cpp" says where its kernels came from: "available: built at install (...)", "available: compiled on
    first use (...)". The first call may compile the C++ kernels (once per machine)."""
    report = {name: _unavailable_reason(name, None) or "available" for name in BACKEND_NAMES}
    if details and report["cpp"] == "available":
        report["cpp"] = f"available: {cpp_state().detail}"
    return report


_warned: set = set()  # causes of a slow fallback already reported in this process


def _warn_cpu_fallback() -> None:
    """One warning per cause when CPU work that wants the C++ kernels runs the reference instead."""
    state = cpp_state()
    if state.detail in _warned:
        return
    _warned.add(state.detail)
    warnings.warn(f"kdfast: the C++ CPU kernels are unavailable ({state.detail}); CPU kd_loss runs the plain "
                  f"PyTorch reference instead, 8-27x slower forward+backward. To fix: {state.fix}",
                  SlowFallbackWarning, stacklevel=4)


_resolved: dict = {}  # (backend, KDFAST_BACKEND, TRITON_INTERPRET, device type) -> backend; errors are not kept


def resolve_backend(backend: str | None, device: torch.device | str | None, *, op: str) -> str:
    """The backend that runs `op` on `device` (a device, its type as a string, or None: anywhere): explicit
    argument, then KDFAST_BACKEND, then default. Memoised on what the answer depends on, so the per-call cost
    is one or two environment reads."""
    env = _getenv(ENV_VAR)
    if backend is not None and type(backend) is not str:
        return _resolve(backend, env, device, op)  # raises, naming the value
    # TRITON_INTERPRET decides only whether Triton runs without a GPU: read it only where that is asked
    interpret = _getenv("TRITON_INTERPRET") if (backend or env) == "triton" or device is None else None
    key = (backend, env, interpret, device if device is None or type(device) is str else device.type)
    chosen = _resolved.get(key)
    if chosen is None:
        chosen = _resolved[key] = _resolve(backend, env, torch.device(device) if type(device) is str else device, op)
    return chosen


def _resolve(backend: str | None, env: str | None, device: torch.device | None, op: str) -> str:
    source = "backend"
    if backend is None and env:
        backend, source = env, ENV_VAR
    if backend is not None:
        if backend not in BACKEND_NAMES:
            raise InvalidArgumentError(
                f"{op}: {source} must be one of {', '.join(map(repr, BACKEND_NAMES))} or None, got {backend!r}")
        reason = _unavailable_reason(backend, device)
        if reason:
            raise BackendUnavailableError(f"{op}: {source}={backend!r} cannot run here: {reason}")
        return backend
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    preferred = "triton" if cuda else "cpp"
    if _unavailable_reason(preferred, device) is None:
        return preferred
    if preferred == "cpp" and (device is None or device.type == "cpu"):
        _warn_cpu_fallback()
    return "torch"
