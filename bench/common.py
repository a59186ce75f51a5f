"""Timing, memory, budget and row-recording helpers shared by every benchmark module.

Times are medians with the 20th and 80th percentiles, in milliseconds: on a GPU through
`triton.testing.do_bench` (CUDA events, cache flushed between calls), on the CPU through a perf_counter
loop. Host-bound calls are timed by wall clock over back-to-back calls instead (`wall_per_call_ms`): that is
what a training loop sees, and do_bench's cache flush hides host time. A row is a flat dict that says what
ran, where, with which versions, and from which command.
"""
from __future__ import annotations

import datetime
import functools
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from kdfast.io.atomic import atomic_write, write_text

QUANTILES = (0.5, 0.2, 0.8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(samples_ms: list[float]) -> tuple[float, float, float]:
    q = torch.tensor(samples_ms, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(float(v) for v in q)


def time_ms(fn, device: torch.device, *, setup=None, warmup_ms: float = 25.0, rep_ms: float = 100.0,
            min_reps: int = 5) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of `fn()`, or of `fn(setup())` with the setup left out of the time.

    Without setup on a GPU this is triton's do_bench; with setup (a backward needs a fresh forward) each
    call is timed alone with CUDA events; on the CPU with perf_counter.
    """
    if device.type == "cuda" and setup is None:
        import triton.testing
        return tuple(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES)))

    def run_once() -> float:
        args = (setup(),) if setup is not None else ()
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn(*args)
        return (time.perf_counter() - t0) * 1e3

    spent = 0.0
    while spent < warmup_ms:  # at least one call: compilation and caches stay out of the numbers
        spent += max(run_once(), 1e-3)
    samples: list[float] = []
    while sum(samples) < rep_ms or len(samples) < min_reps:
        samples.append(run_once())
    return _quantiles(samples)


def wall_per_call_ms(fns: dict, device: torch.device, *, rounds: int = 5, calls: int = 100,
                     warmup: int = 20) -> dict[str, list[float]]:
    """Wall-clock ms per call of each `fns[name]()`, called `calls` times back to back and synchronised once at
    the end, per round; the providers interleaved in each round so that a drifting machine load hits all of
    them alike. Returns each name's per-round samples (report the best: the least disturbed round)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - t0) * 1e3 / calls)
    return samples


class Budget:
    """Wall-clock seconds a benchmark may still spend (None: unbounded). Check `spent()` before starting
    a new configuration; a configuration already started runs to its end."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic()

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (time.monotonic() - self.start)

    def spent(self, need_s: float = 0.0) -> bool:
        return self.left() <= need_s

    def note(self, what: str) -> str:
        return (f"budget spent: {what} not measured ({self.seconds:.0f} s budget, "
                f"{time.monotonic() - self.start:.0f} s used)")


def peak_extra_mib(fn, device: torch.device) -> float | None:
    """Peak device memory allocated by `fn()` above what was allocated before it (None off the GPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n = nbytes // 4
    if device.type == "cpu":
        n = min(n, 1 << 25)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(lambda: dst.copy_(src), device)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


@functools.lru_cache(maxsize=None)
def code_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kdfast", "csrc", "bench"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("KDFAST_COMMIT", "unknown")
    return head + ("+dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()} CPU, {threads} thread{'s' if threads > 1 else ''}"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "kdfast", "liger_kernel"):
        mod = sys.modules.get(name)
        if mod is None and name != "liger_kernel":
            try:
                mod = __import__(name)
            except ImportError:
                continue
        if mod is not None:
            out[name] = getattr(mod, "__version__", "unknown")
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


# optional peers the benchmarks compare against: distribution name -> where its rows appear
PEERS = {"liger-kernel": "kd_loss (GPU)", "backpack-for-pytorch": "grad_norms", "opacus": "grad_norms"}


@functools.lru_cache(maxsize=None)
def peer_versions() -> dict[str, str | None]:
    """The installed version of each optional peer, None where it is not installed (its rows are then missing)."""
    found = {}
    for name in PEERS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _main_module() -> str:
    """The module run with `python -m` (bench.run, or a benchmark run on its own); bench.run otherwise."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name.startswith("bench.") else "bench.run"


def make_row(*, op: str, provider: str, mode: str, shape, dtype, device: torch.device, **metrics) -> dict:
    """One result row: what ran (op, provider, mode, shape, dtype), where, with what, and the numbers."""
    return {
        "op": op, "provider": provider, "mode": mode,
        "shape": "x".join(str(d) for d in shape), "dtype": str(dtype).replace("torch.", ""),
        "device": device_name(device), "device_type": device.type,
        "versions": versions(), "peers": peer_versions(), "commit": code_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", _main_module(), *sys.argv[1:]]),
        # CPU timings on a shared machine are only as good as its idleness: keep the load beside them
        "load_avg_1min": os.getloadavg()[0] if device.type == "cpu" and hasattr(os, "getloadavg") else None,
        **metrics,
    }


def newest_row(rows: list[dict], **match) -> dict | None:
    """The newest timed row whose fields equal `match` (None when there is none): what `targets()` reads."""
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items()) and "ms" in r]
    return max(hits, key=lambda r: r["date"]) if hits else None


def skipped_row(*, op: str, device: torch.device, note: str, provider: str = "all", shape=(), dtype="-",
                **extra) -> dict:
    """A row that says what was not measured and why (budget spent, import failed, peer absent, ...)."""
    return make_row(op=op, provider=provider, mode="skipped", shape=shape, dtype=dtype, device=device, note=note,
                    **extra)


def append_rows(rows: list[dict], path: Path) -> None:
    """Append rows as JSON lines, each in one write and flushed before the next: a process killed between two
    rows leaves every finished row in the file (and a line cut short by a kill mid-write is closed first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:  # appends go to the end wherever the read position is
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                f.write(b"\n")
        for row in rows:
            f.write((json.dumps(row, sort_keys=True) + "\n").encode())
            f.flush()


def report(rows: list[dict], table: str, out: Path | None) -> int:
    """A standalone benchmark's ending: print its table, append its rows to `out` when given."""
    print(table)
    if out:
        append_rows(rows, out)
        print(f"rows appended to {out}", file=sys.stderr)
    return 0


def read_rows(path: Path) -> list[dict]:
    """Every row of a results file; a line cut short by a kill mid-write is left out (and said so)."""
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"{path}:{number}: ignoring a line cut short", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------- reproductions
# bench/repro/*.py run on the CPU and write `<name>.md`, `<name>.json` and `<name>.png` into bench/repro/reports/.

def repro_provenance(module: str, argv=None) -> dict:
    """Where a reproduction ran and with what (its md and json record it); `elapsed_s` is added when it ends."""
    return {"commit": code_commit(),  # the code that runs (the tree may move on while it does)
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(torch.device("cpu")), "versions": versions(),
            "command": " ".join([f"python -m {module}", shlex.join(sys.argv[1:] if argv is None else argv)]).strip()}


def stderr_log(start: float):
    """log(msg): msg on stderr after the seconds since `start` (a perf_counter reading)."""
    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)
    return log


def rendered(prov: dict) -> str:
    """Tables rebuilt with --from-json say which code rendered them (the numbers stay the recorded run's)."""
    return f"; rendered from the saved runs at commit {prov['rendered_by']}" if prov.get("rendered_by") else ""


def measured(prov: dict, *, seeds=None, figure: str | None = None) -> str:
    """A reproduction's closing line: when, where, how long, with what, from which commit and command."""
    return (f"Measured {prov['date']} on {prov['device']} in {prov['elapsed_s']:.0f} s; "
            f"{', '.join(f'{k} {v}' for k, v in sorted(prov['versions'].items()))}; "
            + (f"seeds {list(seeds)}; " if seeds is not None else "")
            + f"commit {prov['commit']}; command: `{prov['command']}`" + rendered(prov)
            + (f"; figure: {figure}" if figure else ""))


def load_saved(path: str) -> dict:
    """A previous run's json for --from-json, its provenance marked as rendered by the code that runs now."""
    with open(path) as fh:
        saved = json.load(fh)
    saved["provenance"]["rendered_by"] = code_commit()
    return saved


def pyplot(name: str):
    """matplotlib.pyplot on the Agg backend, or None (said on stderr) where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{name}: {name}.png skipped: matplotlib is not installed", file=sys.stderr)
        return None
    return plt


def save_figure(fig, path: str, *, dpi: int) -> None:
    """Writes `fig` as a png atomically and closes it."""
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=dpi))
    import matplotlib.pyplot as plt
    plt.close(fig)


def write_report(out: str, name: str, text: str, record: dict, *, indent: int | None = 1) -> None:
    """`<out>/<name>.md` (the text) and `<out>/<name>.json` (the record), each written whole or not at all."""
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, f"{name}.md"), text)
    atomic_write(os.path.join(out, f"{name}.json"), lambda fh: json.dump(record, fh, indent=indent), mode="w")


def cuda_peer_available(device, module: str) -> bool:
    """A peer that runs on CUDA only (Liger's Triton kernels): the device is a GPU and `module` imports."""
    if device.type != "cuda":
        return False
    try:
        importlib.import_module(module)
    except Exception:  # absent, or built for another torch
        return False
    return True
