"""Where the C++ kernels come from (kdfast.runtime.cpp_build): compiled on first use where kdfast._C is absent, once for
several processes starting together, loaded from the cache afterwards; turned off, one warning and the reference; a
wheel from an isolated `python -m build` reaching the C++ backend. (Without a compiler: tests/test_backends.py.)

The first-use compile really runs here: every test points TORCH_EXTENSIONS_DIR at a temporary folder, which one
module fixture fills (the concurrent first use) and the later tests reuse.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from kdfast.runtime import cpp_build
from kdfast.cli.env import report
from kdfast.runtime.dispatch import backends
from kdfast.errors import InvalidArgumentError

ROOT = Path(__file__).resolve().parents[2]  # tests/runtime/ -> the repository
COMPILING = "kdfast: compiling the C++ CPU kernels"
# Run in a fresh interpreter: which C++ kernels it got, when it asked and got them, and the C++ backend's kd_loss
# (forward and gradient, fp32, with an ignored row) against the float64 reference.
PROBE = textwrap.dedent("""
    import json, sys, time
    import torch, kdfast
    from kdfast.cli.env import report
    from kdfast.runtime.dispatch import cpp_state
    asked = time.time()
    state = cpp_state()
    got = time.time()
    s = (torch.randn(37, 101) * 3).requires_grad_()
    t, y = torch.randn(37, 101) * 3, torch.randint(0, 101, (37,))
    y[5] = -100
    loss = kdfast.kd_loss(s, t, y, backend="cpp")
    loss.backward()
    s64 = s.detach().double().requires_grad_()
    ref = kdfast.kd_loss(s64, t.double(), y, backend="torch")
    ref.backward()
    err = max(abs(loss.item() - ref.item()) / abs(ref.item()),
              ((s.grad.double() - s64.grad).abs().max() / s64.grad.abs().max()).item())
    rows = dict(report())
    print(json.dumps({"origin": state.origin, "detail": state.detail, "asked": asked, "got": got, "err": err,
                      "kdfast": kdfast.__file__, "sources": __import__("kdfast.runtime.cpp_build").runtime.cpp_build.source_dir(),
                      "env_row": rows["backend cpp"]}))
""")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("KDFAST_BACKEND", "KDFAST_CPP", "PYTHONPATH")}
    env.update(extra)
    return env


def _probe_result(stdout: str, stderr: str, code: int) -> dict:
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["err"] < 1e-5, result  # fp32 kernels against float64
    return result


@pytest.fixture(scope="module")
def first_use(tmp_path_factory):
    """Three processes that want the C++ kernels at once on a machine that has none compiled (KDFAST_CPP=jit: as if
    kdfast._C were not installed): (the cache folder, each one's probe result, their stderr together)."""
    cache = tmp_path_factory.mktemp("torch_extensions")
    env = _env(KDFAST_CPP="jit", TORCH_EXTENSIONS_DIR=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [(*p.communicate(timeout=900), p.returncode) for p in procs]
    return cache, [_probe_result(*out) for out in outs], "".join(out[1] for out in outs)


@pytest.mark.slow
def test_concurrent_first_uses_compile_once(first_use):
    cache, results, stderr = first_use
    origins = sorted(r["origin"] for r in results)
    assert origins == ["cache", "cache", "compiled"], results
    assert stderr.count(COMPILING) == 1, stderr[-3000:]
    compiled = next(r for r in results if r["origin"] == "compiled")
    build = Path(compiled["detail"].rsplit(" into ", 1)[1])
    finished = (build / cpp_build._DONE).stat().st_mtime
    for r in results:
        assert r["asked"] < finished, results  # all three asked while it compiled: the others waited for it
        assert r["detail"].startswith("compiled on first use (KDFAST_CPP=jit)") and str(cache) in r["detail"], r
        assert r["env_row"] == f"available: {r['detail']}", r
    assert " s into " in compiled["detail"], compiled  # how long it took
    assert (build / cpp_build._LIB).is_file()
    # the first-use compile got the flags setup.py builds kdfast._C with
    ninja = (build / "build.ninja").read_text()
    cflags = next(line for line in ninja.splitlines() if line.startswith("cflags ="))
    assert all(flag in cflags.split() for flag in cpp_build.EXTRA_COMPILE_ARGS), cflags


@pytest.mark.slow
def test_later_processes_load_the_cache_without_compiling(first_use):
    cache, results, _ = first_use
    build = Path(next(r for r in results if r["origin"] == "compiled")["detail"].rsplit(" into ", 1)[1])
    library = build / cpp_build._LIB
    before = library.stat().st_mtime_ns
    out = subprocess.run([sys.executable, "-c", PROBE], env=_env(KDFAST_CPP="jit", TORCH_EXTENSIONS_DIR=str(cache)),
                         capture_output=True, text=True)
    result = _probe_result(out.stdout, out.stderr, out.returncode)
    assert result["origin"] == "cache" and COMPILING not in out.stderr, (result, out.stderr[-2000:])
    assert result["detail"] == f"compiled on first use (KDFAST_CPP=jit), loaded from {build}"
    assert library.stat().st_mtime_ns == before


def test_installed_extension_is_reported_as_built_at_install():
    if backends()["cpp"] != "available":
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the C++ backend must be built in CI: {backends()['cpp']}")
        pytest.skip(backends()["cpp"])
    detail = backends(details=True)["cpp"]
    assert detail.startswith("available: built at install (") and "_C" in detail, detail
    assert dict(report())["backend cpp"] == detail
    assert backends()["cpp"] == "available"  # the plain report keeps its one word


def test_kdfast_cpp_must_name_a_mode(monkeypatch):
    monkeypatch.setenv("KDFAST_CPP", "fast")
    with pytest.raises(InvalidArgumentError, match=r"KDFAST_CPP must be one of 'auto', 'jit', 'off', got 'fast'"):
        cpp_build.load()
    monkeypatch.setenv("KDFAST_CPP", " OFF ")
    assert cpp_build.load().origin == "unavailable"


def test_kdfast_cpp_off_runs_the_reference_with_one_warning(tmp_path):
    """Even where kdfast._C is installed: nothing loads, nothing compiles, one warning naming the cost and the fix
    however many CPU calls fall back."""
    code = textwrap.dedent("""
        import warnings
        import torch, kdfast
        from kdfast.errors import BackendUnavailableError, SlowFallbackWarning
        s, t, y = torch.randn(6, 9), torch.randn(6, 9), torch.randint(0, 9, (6,))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = [kdfast.kd_loss(s, t, y) for _ in range(3)]
            kdfast.KDLoss()(s, t, y)
        slow = [str(w.message) for w in caught if issubclass(w.category, SlowFallbackWarning)]
        assert len(slow) == 1, slow
        assert "KDFAST_CPP=off" in slow[0] and "8-27x slower" in slow[0] and "unset KDFAST_CPP" in slow[0], slow
        assert all(torch.equal(x, kdfast.kd_loss(s, t, y, backend="torch")) for x in losses)
        assert kdfast.backends()["cpp"] == "turned off by KDFAST_CPP=off", kdfast.backends()
        try:
            kdfast.kd_loss(s, t, y, backend="cpp")
        except BackendUnavailableError as exc:
            assert "KDFAST_CPP=off" in str(exc), exc
        else:
            raise AssertionError("backend='cpp' ran with KDFAST_CPP=off")
        print("off ok")
    """)
    cache = tmp_path / "torch_extensions"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(KDFAST_CPP="off", TORCH_EXTENSIONS_DIR=str(cache)))
    assert out.returncode == 0 and out.stdout.strip() == "off ok", out.stderr[-3000:]
    assert not cache.exists() and COMPILING not in out.stderr


def test_explicit_reference_backend_does_not_warn():
    code = ("import warnings; warnings.simplefilter('error'); import torch, kdfast; "
            "kdfast.kd_loss(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 2]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(KDFAST_CPP="off", KDFAST_BACKEND="torch"))
    assert out.returncode == 0, out.stderr[-2000:]


def _copy_project(dest: Path) -> Path:
    """The files an sdist is made of, without build outputs (the in-place kdfast._C of a development install)."""
    dest.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "*.egg-info")
    for name in ("kdfast", "csrc"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


@pytest.mark.slow
def test_wheel_from_an_isolated_build_reaches_the_cpp_backend(tmp_path, first_use):
    """`python -m build` (sdist, then the wheel from it, each in an isolated environment without torch); the wheel
    installed with plain pip into a fresh environment runs kd_loss on the CPU through the C++ backend."""
    cache = first_use[0]  # the same sources, torch and flags: the compile above is reused
    src = _copy_project(tmp_path / "src")
    dist = tmp_path / "dist"
    out = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(src)], capture_output=True,
                         text=True, env=_env())
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "torch not importable at build time" in out.stdout + out.stderr  # the build really was without torch
    (wheel,), (sdist,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in tar.getnames() if len(Path(n).parts) > 1}
    assert {"csrc/kd_loss.cpp", "csrc/kd_loss.h", "csrc/bindings.cpp", "MANIFEST.in"} <= names, sorted(names)
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    shipped = {f"kdfast/csrc/{p.name}" for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".h")}
    assert shipped <= names and "kdfast/runtime/cpp_build.py" in names, sorted(names)
    assert not [n for n in names if n.startswith("kdfast/_C")], sorted(names)
    # A fresh environment: the test's packages (torch, ...) reach it through a .pth line, which does not run their
    # own .pth files, so a development install's editable finder cannot serve this checkout's kdfast._C there.
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = str(env_dir / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "test_packages.pth").write_text("".join(p + "\n" for p in sys.path if p.endswith("site-packages")))
    out = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", str(wheel)],
                         capture_output=True, text=True, env=_env())
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    run = tmp_path / "run"
    run.mkdir()
    out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, cwd=run,
                         env=_env(TORCH_EXTENSIONS_DIR=str(cache)))
    result = _probe_result(out.stdout, out.stderr, out.returncode)
    assert Path(result["kdfast"]).parent == Path(purelib, "kdfast"), result
    assert Path(result["sources"]) == Path(purelib, "kdfast", "csrc"), result
    assert result["origin"] in ("compiled", "cache"), result
    assert result["detail"].startswith("compiled on first use (kdfast._C is not installed)"), result
