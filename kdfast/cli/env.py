"""`kdfast env`: a paste-ready report of versions, kernel backends and devices, for bug reports."""
from __future__ import annotations

import importlib
import os
import platform
import sys


_PACKAGES = ("torch", "triton", "numpy", "torchvision", "sklearn", "scipy", "tqdm", "matplotlib", "PIL")


def add_parser(subparsers):
    return subparsers.add_parser("env", help="print versions, backends and devices",
                                 description="Print a paste-ready report of versions, backends and devices.")


def report() -> list[tuple[str, str]]:
    import torch

    from kdfast._version import __version__
    from kdfast.runtime.dispatch import backends
    rows = [("kdfast", __version__), ("python", sys.version.split()[0]),
            ("platform", platform.platform())]
    for name in _PACKAGES:
        try:
            mod = importlib.import_module(name)
            rows.append((name, str(getattr(mod, "__version__", "installed"))))
        except Exception as exc:
            rows.append((name, f"not available ({type(exc).__name__})"))
    rows.append(("torch CUDA build", str(torch.version.cuda)))
    rows.append(("CPU threads", f"{torch.get_num_threads()} (os.cpu_count {os.cpu_count()})"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}"))
    else:
        rows.append(("cuda", "no CUDA device"))
    for name, state in backends(details=True).items():  # details: where the C++ kernels came from
        rows.append((f"backend {name}", state))
    for var in ("KDFAST_BACKEND", "KDFAST_CPP", "TORCH_EXTENSIONS_DIR", "CXX", "TRITON_INTERPRET",
                "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"):
        if os.environ.get(var):
            rows.append((f"${var}", os.environ[var]))
    return rows


def run(args) -> int:
    rows = report()
    width = max(len(k) for k, _ in rows)
    print("```")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("```")
    return 0


if __name__ == "__main__":
    from kdfast.cli.main import env_main
    sys.exit(env_main())
