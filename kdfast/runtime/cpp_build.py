"""Where the C++ CPU kernels come from: the extension built at install (kdfast._C), else csrc/ compiled on first
use into the torch extensions cache, else none, with the reason.

An isolated `pip install` (the usual one: `pip install kdfast`, `pip install .`, a wheel from `python -m build`)
builds without torch, so the package arrives without kdfast._C but with its C++ sources (kdfast/csrc/). The first
process that wants the C++ backend then compiles them with torch.utils.cpp_extension.load into
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions)/kdfast/<kdfast, torch and Python versions>-<hash of the
sources, flags and compiler>/, once per machine; later processes load the library from there in milliseconds.
Processes starting together (DataLoader workers, torchrun ranks) serialise on a lock file beside that folder: one
compiles, the others wait and load its result. The lock is an OS advisory lock (filelock), which the kernel
releases when its holder dies: a compile killed half-way leaves no stale lock, and the next process rebuilds.

KDFAST_CPP selects: "auto" (default) the installed extension, else compile on first use; "jit" compile on first use
even where kdfast._C is installed; "off" no C++ kernels (the reference backend runs, with one warning).

This module imports only the standard library at its top: setup.py loads it by path (without torch) for the compile
flags, so the install-time build and the first-use compile use the same ones.
"""
from __future__ import annotations

import glob
import hashlib
import os
import platform
import re
import sys
import time

ENV_VAR = "KDFAST_CPP"
MODES = ("auto", "jit", "off")
MODULE_NAME = "kdfast_C"  # the first-use build's module; the install-time build is kdfast._C
_OPENMP = [] if sys.platform == "darwin" else ["-fopenmp"]
# No -std: torch adds the standard its headers need (C++17 in older releases, C++20 in 2.14). -fno-trapping-math
# lets the compiler evaluate both arms of a branch-free select (as in `q > 0 ? q * (u - v) : 0`), which loops need
# to vectorise; the kernels never read FP exception flags. -DNDEBUG: setuptools takes it from Python's own build
# flags, torch's load() does not, and without it torch's headers compile in their debug-only checks.
EXTRA_COMPILE_ARGS = ["-O3", "-DNDEBUG", "-fno-trapping-math", *_OPENMP]
EXTRA_LINK_ARGS = [*_OPENMP]
_DONE = "built.ok"       # written (atomically) once the library in a build folder is complete
_FAILED = "failed.log"   # the last failed compile's output: processes that waited on it take its result
_LIB = MODULE_NAME + (".pyd" if os.name == "nt" else ".so")  # the name torch's load links


class CppState:
    """What the C++ backend is here: `module` (None when unavailable), `origin` ("install", "compiled" in this
    process, "cache" compiled by an earlier one, or "unavailable") and `detail` (where from, or why not)."""

    __slots__ = ("module", "origin", "detail", "fix")

    def __init__(self, module, origin: str, detail: str, fix: str = ""):
        self.module, self.origin, self.detail, self.fix = module, origin, detail, fix

    def __repr__(self) -> str:
        return f"CppState(origin={self.origin!r}, detail={self.detail!r})"


def source_files(directory: str) -> list[str]:
    """The translation units of the extension, in a fixed order."""
    return sorted(glob.glob(os.path.join(directory, "*.cpp")))


def source_dir() -> str | None:
    """The C++ sources: shipped inside the package (kdfast/csrc/), or the checkout's csrc/ beside it."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # kdfast/, above runtime/
    for directory in (os.path.join(package, "csrc"), os.path.join(os.path.dirname(package), "csrc")):
        if source_files(directory):
            return directory
    return None


def mode() -> str:
    value = (os.environ.get(ENV_VAR) or "auto").strip().lower()
    if value not in MODES:
        from kdfast.errors import InvalidArgumentError
        raise InvalidArgumentError(f"{ENV_VAR} must be one of {', '.join(map(repr, MODES))}, got "
                                   f"{os.environ.get(ENV_VAR)!r}")
    return value


def build_dir(sources: str) -> str:
    """The cache folder for these sources under this torch, Python, flags and compiler."""
    import torch

    from kdfast._version import __version__
    digest = hashlib.sha256()
    for part in (torch.__version__, sys.version, platform.machine(), os.environ.get("CXX", "c++"),
                 *EXTRA_COMPILE_ARGS, "|", *EXTRA_LINK_ARGS):
        digest.update(part.encode() + b"\0")
    for path in sorted(glob.glob(os.path.join(sources, "*.cpp")) + glob.glob(os.path.join(sources, "*.h"))):
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
    from torch._appdirs import user_cache_dir  # what torch's load() uses, without importing cpp_extension (slow)
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.realpath(user_cache_dir(appname="torch_extensions"))
    tag = f"{__version__}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    return os.path.join(root, "kdfast", f"{tag}-{digest.hexdigest()[:16]}")


def load() -> CppState:
    """The C++ kernels as KDFAST_CPP asks: installed, compiled now, loaded from the cache, or why none."""
    chosen = mode()
    if chosen == "off":
        return CppState(None, "unavailable", f"turned off by {ENV_VAR}=off",
                        fix=f"unset {ENV_VAR} (or set it to auto) to use them")
    why_not_installed = "kdfast._C is not installed"
    if chosen == "auto":
        import importlib
        try:
            installed = importlib.import_module("kdfast._C")
        except Exception as exc:  # absent (isolated install), or built against another torch
            if not isinstance(exc, ModuleNotFoundError) or exc.name != "kdfast._C":
                why_not_installed = f"kdfast._C failed to import ({type(exc).__name__}: {exc})"
        else:
            return CppState(installed, "install", f"built at install ({installed.__file__})")
    else:
        why_not_installed = f"{ENV_VAR}=jit"
    sources = source_dir()
    if sources is None:
        return CppState(None, "unavailable", f"{why_not_installed}, and its C++ sources (csrc/) are not in the "
                        "package to compile them on first use", fix="reinstall kdfast from its sdist or wheel")
    return _load_or_compile(sources, why_not_installed)


def _import(directory: str):
    import importlib.util

    import torch  # noqa: F401  (the library links against libtorch, which must be loaded first)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, os.path.join(directory, _LIB))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cached(directory: str):
    """The library of a completed build in `directory`, or None."""
    marker = os.path.join(directory, _DONE)
    if not os.path.exists(marker):
        return None
    try:
        return _import(directory)
    except Exception:  # damaged or foreign: rebuilt under the lock
        return None


def _load_or_compile(sources: str, why_not_installed: str) -> CppState:
    directory = build_dir(sources)
    loaded = f"compiled on first use ({why_not_installed}), loaded from {directory}"
    module = _cached(directory)
    if module is not None:
        return CppState(module, "cache", loaded)
    from filelock import FileLock

    os.makedirs(os.path.dirname(directory), exist_ok=True)
    asked = time.time()
    with FileLock(directory + ".lock"):
        module = _cached(directory)  # another process finished it while this one waited
        if module is not None:
            return CppState(module, "cache", loaded)
        failed = os.path.join(directory, _FAILED)
        if os.path.exists(failed) and os.path.getmtime(failed) >= asked:  # failed while this one waited
            with open(failed) as f:
                error = f.read()
        else:
            try:
                module, seconds = _compile(sources, directory)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                os.makedirs(directory, exist_ok=True)
                with open(failed, "w") as f:
                    f.write(error)
            else:
                return CppState(module, "compiled", f"compiled on first use ({why_not_installed}) in "
                                f"{seconds:.1f} s into {directory}")
    return CppState(None, "unavailable", f"{why_not_installed}, and compiling the C++ sources on first use failed "
                    f"({_summary(error)}; full output in {failed})",
                    fix="install a C++ compiler (g++ or clang++; CXX names another) and start again, or install "
                        "with `pip install --no-build-isolation kdfast` where torch and a compiler are present")


def _summary(error: str) -> str:
    """The line of a failed build that says what went wrong (not the compiler command lines around it)."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    telling = [line for line in lines if " -c " not in line and not line.startswith("ninja: build stopped")
               and re.search(r"error|not found|no such file|required|cannot", line, re.IGNORECASE)]
    return ((telling or lines or ["no message"])[0])[:300]


def _compile(sources: str, directory: str):
    """torch's load into `directory` (emptied first: what is there is incomplete); (module, seconds)."""
    import logging
    import shutil

    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    path = os.environ.get("PATH")
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    print(f"kdfast: compiling the C++ CPU kernels into {directory} (once per machine and torch version)...",
          end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        try:  # the ninja that pip installed with kdfast, where its scripts folder is not on PATH
            import ninja
            os.environ["PATH"] = os.pathsep.join(filter(None, (ninja.BIN_DIR, path)))
        except ImportError:
            pass
        logger.setLevel(logging.ERROR)  # its import warns about a missing CUDA runtime, which a CPU build never uses
        from torch.utils.cpp_extension import load
        module = load(MODULE_NAME, source_files(sources), extra_cflags=EXTRA_COMPILE_ARGS,
                      extra_ldflags=EXTRA_LINK_ARGS, build_directory=directory, verbose=False)
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path
        logger.setLevel(level)
    seconds = time.perf_counter() - start
    print(f" done in {seconds:.1f} s", file=sys.stderr, flush=True)
    tmp = os.path.join(directory, _DONE + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{seconds:.1f}\n")
    os.replace(tmp, os.path.join(directory, _DONE))
    return module, seconds
