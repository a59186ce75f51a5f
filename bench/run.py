"""Benchmark runner: every benchmark on one device, under one time budget, rows kept as they are measured.

    python -m bench.run --device cuda --budget-s 420   # all benchmarks within 420 s (a GPU machine, started blind)
    python -m bench.run --smoke                        # tiny CPU shapes (the test suite runs this)
    python -m bench.run --record --merge OTHER.jsonl   # add another machine's rows to bench/results/results.jsonl
    python -m bench.run --record --render-only         # regenerate bench/results/RESULTS.md from bench/results/results.jsonl

Where rows go: `runs/bench/results.jsonl` and `runs/bench/RESULTS.md` (untracked), unless `--out`/`--markdown`
name other files or `--record` names the tracked record, `bench/results/results.jsonl` and `bench/results/RESULTS.md`. Every row
is appended the moment it is measured (a killed run loses nothing it finished); RESULTS.md is regenerated from
all rows of the file at the end (the newest row of each measurement, labelled by commit).

Budget (--budget-s): the benchmarks run in the order of BENCHMARKS, each in a child process of its own when a
budget is set or the device is a GPU (a crash, a hung compile or a broken CUDA context then ends that benchmark
only; on the CPU without a budget, e.g. --smoke, they run in this process). Each gets the share of the time still
left that its weight is of the weights still to run (kd_loss 0.30, linear_kd_loss 0.15, grad_norms 0.20, score
0.15, e2e 0.15, hessian 0.20, digests 0.05, data_scale 0.15): time one leaves unused is carried forward to the rest
in proportion. A benchmark is told 85% of its share (`budget_s`, it stops starting new configurations when spent
and says so in a "skipped" row) and is killed at 100%; a share under MIN_START_S is not started. The runner keeps
5% of the budget (at most 15 s) for the summary. Without --budget-s nothing is bounded.

At the end it prints every open performance target (each benchmark's `targets(rows)`) with measured / target /
met, which RESULTS.md shows too. A benchmark that cannot be imported (a missing peer) or raises gets a
"skipped" row with the reason, and the runner goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path

import torch

from bench.common import PEERS, append_rows, read_rows, skipped_row

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECORD = HERE / "results" / "results.jsonl"  # the tracked record (RESULTS.md beside it)
SCRATCH = ROOT / "runs" / "bench" / "results.jsonl"  # where a run writes unless told otherwise
# name -> (module, weight in the budget split, the op its rows are filed under); also the order they run in
BENCHMARKS = {
    "kd_loss": ("bench.perf.bench_kd_loss", 0.30, "kd_loss"),
    "linear_kd_loss": ("bench.perf.bench_linear_kd_loss", 0.15, "linear_kd_loss"),
    "grad_norms": ("bench.perf.bench_grad_norms", 0.20, "per_example_grad_norms"),
    "score": ("bench.perf.bench_score", 0.15, "score"),
    "e2e": ("bench.perf.bench_e2e", 0.15, "e2e"),
    "hessian": ("bench.perf.bench_hessian", 0.20, "hessian_spectral_norms"),
    "digests": ("bench.perf.bench_digests", 0.05, "digests"),
    "data_scale": ("bench.perf.bench_data_scale", 0.15, "data_scale"),
}
SOFT_FRACTION = 0.85  # of its share, the time a benchmark is told it has; it is killed at the whole share
MIN_START_S = 3.0

# ratio fields some benchmarks record, and how the table names them
RATIOS = {"ratio_to_inference": "x inference throughput", "time_vs_plain": "x plain fwd+bwd time",
          "ratio_to_ceiling": "x its ceiling (decode, inference or fwd+bwd throughput)",
          "ratio_to_without_digests": "x the time without content digests"}
TIMED_MODES = ("forward", "backward", "full")
# KD-loss rows measured before each provider got its own inputs: the in-place provider overwrote the shared
# logits, so it and every provider timed after it ran on gradient values
INPLACE_CAVEAT_PROVIDERS = {"kdfast-inplace", "eager", "compile", "liger", "kdfast-kernel"}
INPLACE_CAVEAT = ("timed on gradient values: before the benchmark cloned inputs per provider, kdfast-inplace "
                  "overwrote the shared student logits and this provider ran after it (time is insensitive to "
                  "the values for these kernels; rerun to confirm)")


# ------------------------------------------------------------------------------------------- running
def run_module(name: str, *, device: torch.device, quick: bool, smoke: bool, budget_s: float | None, emit) -> None:
    """One benchmark in this process: its rows through `emit`; an import failure or an exception becomes a
    "skipped" row that says why. Modules without `emit`/`budget_s` parameters get their rows emitted at the end."""
    path, _, op = BENCHMARKS[name]
    try:
        module = importlib.import_module(path)
    except Exception as exc:  # a missing peer or a broken module must not end the run
        emit(skipped_row(op=op, device=device, note=f"import failed: {type(exc).__name__}: {str(exc)[:300]}"))
        return
    if not callable(getattr(module, "run", None)):
        emit(skipped_row(op=op, device=device, note=f"{path} defines no run() entry point"))
        return
    offered = dict(device=device, quick=quick, smoke=smoke, budget_s=budget_s, emit=emit)
    params = inspect.signature(module.run).parameters
    try:
        rows = module.run(**{k: v for k, v in offered.items() if k in params})
    except Exception as exc:
        traceback.print_exc()
        emit(skipped_row(op=op, device=device, note=f"raised {type(exc).__name__}: {str(exc)[:300]}"))
        return
    if "emit" not in params:
        for row in rows:
            emit(row)


def make_emit(out: Path, command: str, run_id: str):
    """The `emit` callback: stamp the runner's command and run id on the row and append it to `out` at once."""
    def emit(row: dict) -> None:
        row["command"], row["run_id"] = command, run_id
        append_rows([row], out)
    return emit


def _die_with_parent() -> None:
    """In the child: start a new session (its group can be killed as one) and die when the runner dies."""
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_child(name: str, args, share_s: float | None, run_id: str, command: str, emit) -> None:
    """One benchmark in a child process, killed (with its process group) when its share is spent."""
    cmd = [sys.executable, "-m", "bench.run", "--child", name, "--device", args.device, "--out", str(args.out),
           "--run-id", run_id, "--command", command]
    cmd += ["--quick"] * args.quick + ["--smoke"] * args.smoke
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--budget-s", str(share_s * SOFT_FRACTION)] if share_s is not None else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}  # its log up to a kill
    child = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent if os.name == "posix" else None)
    try:
        rc = child.wait(timeout=share_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        emit(skipped_row(op=BENCHMARKS[name][2], device=torch.device(args.device),
                         note=f"killed at its hard limit of {share_s:.0f} s (its share of the budget); the rows it "
                              "finished before are kept"))
        return
    if rc != 0:
        emit(skipped_row(op=BENCHMARKS[name][2], device=torch.device(args.device),
                         note=f"its process exited with code {rc} (see the log); the rows it finished are kept"))


def run_all(args, names: list[str], command: str, run_id: str) -> None:
    """Every named benchmark, in order, each within its share of the budget (see the module doc)."""
    device = torch.device(args.device)
    emit = make_emit(args.out, command, run_id)
    start = time.monotonic()
    reserve = min(15.0, 0.05 * args.budget_s) if args.budget_s is not None else 0.0
    for i, name in enumerate(names):
        share = None
        if args.budget_s is not None:
            left = args.budget_s - reserve - (time.monotonic() - start)
            share = left * BENCHMARKS[name][1] / sum(BENCHMARKS[n][1] for n in names[i:])
            if share < MIN_START_S:
                emit(skipped_row(op=BENCHMARKS[name][2], device=device,
                                 note=f"budget spent: {max(share, 0.0):.1f} s of the {args.budget_s:.0f} s budget left "
                                      f"for it (under {MIN_START_S:.0f} s: not started)"))
                continue
        print(f"== {name}" + (f" (share {share:.0f} s)" if share is not None else ""), flush=True)
        if args.in_process or (share is None and device.type == "cpu"):
            run_module(name, device=device, quick=args.quick, smoke=args.smoke,
                       budget_s=None if share is None else share * SOFT_FRACTION, emit=emit)
        else:
            run_child(name, args, share, run_id, command, emit)


# ------------------------------------------------------------------------------------------- targets
def collect_targets(rows: list[dict], names=None) -> list[dict]:
    """Every benchmark's open targets from `rows` (each dict gets the benchmark's name); a benchmark that cannot
    be imported or has no `targets` gets one line saying so."""
    out = []
    for name in names or BENCHMARKS:
        try:
            module = importlib.import_module(BENCHMARKS[name][0])
        except Exception as exc:
            out.append({"bench": name, "issue": None, "what": f"targets unknown: import failed ({type(exc).__name__})",
                        "measured": None, "target": "", "met": None, "unit": ""})
            continue
        if not hasattr(module, "targets"):
            out.append({"bench": name, "issue": None, "what": "targets unknown: the module defines no targets()",
                        "measured": None, "target": "", "met": None, "unit": ""})
            continue
        try:
            found = module.targets(rows)
        except Exception as exc:
            found = [{"issue": None, "what": f"targets() raised {type(exc).__name__}: {exc}", "measured": None,
                      "target": "", "met": None, "unit": ""}]
        out += [{"bench": name, **t} for t in found]
    return out


def _met(t: dict) -> str:
    return {True: "yes", False: "**no**", None: ""}[t["met"]]


def _measured(t: dict) -> str:
    if t["measured"] is None:
        return "not measured"
    return f"{t['measured']:{'.3f' if abs(t['measured']) < 10 else '.1f'}} {t['unit']}"


def targets_table(rows: list[dict]) -> str:
    """Plain-text table of `collect_targets(rows)`, for the terminal."""
    ts = collect_targets(rows)
    width = max(len(t["what"]) for t in ts)
    lines = [f"{'issue':>5}  {'benchmark':10}  {'target':{width}}  {'measured':>22}  {'goal':>18}  met",
             "-" * (width + 70)]
    met = {True: "yes", False: "NO", None: "-"}
    lines += [f"{t['issue'] or '':>5}  {t['bench']:10}  {t['what']:{width}}  {_measured(t):>22}  {t['target']:>18}  "
              f"{met[t['met']]}" for t in ts]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- rendering
def _fmt(x, spec=".3f") -> str:
    return "" if x is None else format(x, spec)


def _run_key(row: dict):
    """Rows of one run share this (the run id; older rows without one: their commit and command)."""
    return row.get("run_id") or (row["commit"], row["command"])


def _key(row: dict):
    # the model too: the same input shape feeds several architectures (a ViT's and a ConvNeXt's 2x3x224x224)
    return (row["device"], row["op"], row["provider"], row["mode"], row["shape"], row["dtype"], row.get("variant"),
            row.get("model"))


def _latest(rows: list[dict]) -> list[dict]:
    """The newest row of each measurement (device, op, provider, mode, shape, dtype, variant, model): reruns replace older
    numbers. A "skipped" row is kept only from the newest run of its device and op (a later run may have
    measured what an earlier one skipped)."""
    latest = {}
    for row in sorted(rows, key=lambda r: r["date"]):
        latest[_key(row)] = row
    newest_run = {}
    for row in sorted(latest.values(), key=lambda r: r["date"]):
        newest_run[row["device"], row["op"]] = _run_key(row)
    return [r for r in latest.values() if r["mode"] != "skipped" or newest_run[r["device"], r["op"]] == _run_key(r)]


def caveat(row: dict) -> str | None:
    if (row["op"] == "kd_loss" and row["mode"] in TIMED_MODES and row["provider"] in INPLACE_CAVEAT_PROVIDERS
            and not row.get("fresh_inputs")):
        return INPLACE_CAVEAT
    return None


def _backward_work(row: dict) -> str | None:
    if row.get("backward_work"):
        return row["backward_work"]
    if row["op"] == "kd_loss":
        from bench.perf.bench_kd_loss import backward_work
        return backward_work(row["provider"])
    return None


def _speedups(row: dict, rows: list[dict]) -> dict:
    """x faster than each peer (a provider of the op itself, not kdfast's, not a training step) of the same run,
    shape and mode, for kdfast's op-level rows; backward rows only against peers whose backward does the same work."""
    if not row["provider"].startswith("kdfast") or row["provider"] == "kdfast-kernel" or "ms" not in row:
        return {}
    if row.get("speedup_vs") is not None and row.get("run_id") is None:  # older rows carry their own
        found = dict(row["speedup_vs"])
    else:
        same = ("op", "shape", "dtype", "mode")
        found = {r["provider"]: r["ms"] / row["ms"] for r in rows
                 if "ms" in r and not r["provider"].startswith(("kdfast", "step-")) and _run_key(r) == _run_key(row)
                 and all(r[k] == row[k] for k in same)}
    if row["mode"] == "backward":
        found = {p: v for p, v in found.items()
                 if _backward_work({**row, "provider": p, "backward_work": None}) == _backward_work(row)}
    return found


def _size(row: dict) -> int:
    dims = [int(d) for d in row["shape"].split("x") if d.isdigit()]
    return dims[0] * dims[-1] if dims else 0


def _head(*columns: str) -> list[str]:
    """A Markdown table's header and alignment rows; a column named with a trailing ':' is right-aligned (numbers)."""
    return ["| " + " | ".join(c.rstrip(":") for c in columns) + " |",
            "| " + " | ".join("---:" if c.endswith(":") else "---" for c in columns) + " |"]


def _timing_table(rows: list[dict], all_rows: list[dict], notes: list[str]) -> list[str]:
    lines = _head("shape", "dtype", "mode", "provider", "median ms:", "p20-p80 ms", "x floor:", "peak extra MiB:",
                  "compared", "commit")
    mode_order = {"forward": 0, "backward": 1, "full": 2}
    for r in sorted(rows, key=lambda r: (_size(r), r["dtype"], mode_order.get(r["mode"], 3), r["provider"])):
        provider = r["provider"] + (f" ({r['backend']})" if r.get("backend") else "")
        text = caveat(r)
        if text:
            if text not in notes:
                notes.append(text)
            provider += f" [{notes.index(text) + 1}]"
        if "ms" not in r:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | {provider} | | | | | "
                         f"{r.get('note') or r.get('error') or ''} | {r['commit']} |")
            continue
        compared = ", ".join([*(f"{v:.2f}x faster than {k}" for k, v in sorted(_speedups(r, all_rows).items())),
                              *(f"{r[key]:.2f} {what}" for key, what in RATIOS.items() if r.get(key) is not None)])
        if r["mode"] == "backward" and r.get("op") == "kd_loss" and not compared:
            compared = f"not compared (backward: {_backward_work(r)})"
        # one sample has no spread to show
        spread = f"{r['p20']:.4f}-{r['p80']:.4f}" if r.get("p20") is not None and r["p20"] < r["p80"] else ""
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | {provider} | {r['ms']:.4f} | {spread} | "
                     f"{_fmt(r.get('ratio_to_floor'), '.2f')} | {_fmt(r.get('peak_extra_mib'), '.1f')} | {compared} | "
                     f"{r['commit']} |")
    return lines


def _eager_call_table(rows: list[dict]) -> list[str]:
    lines = ["Wall-clock ms per forward+backward call, back to back and synchronised, as a training loop runs them "
             "(the best of the rounds; do_bench's cache flush hides this host time):", "",
             *_head("shape", "dtype", "provider", "ms per call:", "median of rounds:", "rounds x calls",
                    "x F.cross_entropy:", "commit")]
    for r in sorted(rows, key=lambda r: (_size(r), r["provider"])):
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['provider']} | {r['ms']:.4f} | "
                     f"{_fmt(r.get('median_ms'), '.4f')} | {r.get('samples', '')} x {r.get('calls_per_sample', '')} | "
                     f"{_fmt(r.get('ratio_to_cross_entropy'), '.2f')} | {r['commit']} |")
    return lines


def _sweep_table(rows: list[dict]) -> list[str]:
    lines = ["Best forward-launcher config per shape (BLOCK x num_warps x num_stages x SPLIT through `config=`), "
             "against the launcher's own default in the same run:", "",
             *_head("shape", "dtype", "best config", "ms:", "default ms:", "x faster than default:", "x floor:",
                    "configs", "commit")]
    for r in sorted(rows, key=_size):
        config = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        lines.append(f"| {r['shape']} | {r['dtype']} | {config} | {r['ms']:.4f} | {r['default_ms']:.4f} | "
                     f"{r['speedup_vs_default']:.2f} | {_fmt(r.get('ratio_to_floor'), '.2f')} | {r.get('note', '')} | "
                     f"{r['commit']} |")
    return lines


def _census_table(rows: list[dict]) -> list[str]:
    lines = ["Op and launch census (aten ops and kernel launches per call, counted through a dispatch mode on the "
             "CPU, Triton launches at their launcher):", "",
             *_head("shape", "dtype", "provider", "aten ops:", "kernel launches:", "x plain:", "commit")]
    for r in sorted(rows, key=lambda r: (r["shape"], r["dtype"], r["provider"] != "plain", r["provider"])):
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['provider']} | {r['aten_ops']} | {r['kernel_launches']} | "
                     f"{_fmt(r.get('ratio_to_plain'), '.2f')} | {r['commit']} |")
    return lines


_PROVENANCE = {"op", "provider", "mode", "shape", "dtype", "device", "device_type", "versions", "commit", "date",
               "command", "load_avg_1min", "run_id", "merged_from"}


def _other_table(rows: list[dict]) -> list[str]:
    """Rows of a shape the tables above do not know, their fields as they are."""
    lines = _head("mode", "provider", "shape", "dtype", "fields", "commit")
    for r in sorted(rows, key=lambda r: (r["mode"], r["provider"], r["shape"])):
        fields = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in sorted(r.items()) if k not in _PROVENANCE and v is not None)
        lines.append(f"| {r['mode']} | {r['provider']} | {r['shape']} | {r['dtype']} | {fields} | {r['commit']} |")
    return lines


def _targets_section(rows: list[dict]) -> list[str]:
    """Every open target with its measurement on each device that measured it (else: not measured): each
    benchmark's targets() over all of that device's rows picks the newest (data_scale: the median of the newest
    commit's runs)."""
    found: dict[tuple, list[dict]] = {}
    for device in [None, *sorted({r["device"] for r in rows})]:  # None: the targets themselves, from no rows
        for t in collect_targets([r for r in rows if r["device"] == device] if device else []):
            entries = found.setdefault((t["bench"], t["issue"], t["what"]), [t])
            if t["measured"] is not None:
                entries.append({**t, "device": device})
    lines = ["## Open performance targets", "",
             "Each benchmark's `targets()` over the rows of each device: the newest measurement, or for data_scale "
             "the median of the newest commit's runs (the runner prints the same table for the rows of its own run).",
             "",
             *_head("issue", "benchmark", "target", "measured:", "goal", "met", "device", "commit")]
    for (bench, issue, what), (proto, *measured) in found.items():
        for t in measured:
            lines.append(f"| {issue or ''} | {bench} | {what} | {_measured(t)} | {t['target']} | {_met(t)} | "
                         f"{t['device']} | {t.get('commit') or ''} |")
        if not measured:
            lines.append(f"| {issue or ''} | {bench} | {what} | not measured | {proto['target']} | | | |")
    return lines + [""]


def render_markdown(rows: list[dict], reports: Path = HERE / "repro" / "reports") -> str:
    out = ["# Benchmark results", "",
           "Generated by `python -m bench.run` from `bench/results/results.jsonl` (the newest row of each measurement, "
           "labelled by the commit it was measured at); do not edit by hand. Predictions and their outcomes: "
           "`bench/results/NOTES.md`.",
           ""]
    if not any(r["device_type"] == "cuda" for r in rows):
        out += ["**GPU: not yet measured on a GPU.** No row below comes from a GPU: the GPU targets (for the KD "
                "loss: 8192x128256 and 4096x32000 bf16, the 256x1000 fp32 kernel and eager call, the captured "
                "training step) have no numbers yet.", ""]
    latest = _latest(rows)
    out += _targets_section(rows)
    for device in sorted({r["device"] for r in latest}):
        here = [r for r in latest if r["device"] == device]
        newest = max(here, key=lambda r: r["date"])
        versions = ", ".join(f"{k} {v}" for k, v in sorted(newest["versions"].items()))
        out += [f"## {device}", "", f"- versions: {versions} (newest run {newest['date']})"]
        if newest.get("load_avg_1min") is not None:
            out.append(f"- 1-minute load average when the newest run finished: {newest['load_avg_1min']:.1f} "
                       f"(CPU timings are only as steady as the machine is idle)")
        out += [f"- copy bandwidth: {r['gbs']:.1f} GB/s at commit {r['commit']} (read + write; the floor is 3 passes "
                f"of N x C at this rate)" for r in here if r["mode"] == "bandwidth"]
        with_peers = [r for r in here if r.get("peers")]
        if with_peers:
            peers = max(with_peers, key=lambda r: r["date"])["peers"]
            missing = [f"{name} (`pip install {name}`; {PEERS.get(name, '')})"
                       for name, version in sorted(peers.items()) if version is None]
            if missing:
                out.append("- peers not installed in the newest run, so their rows are missing: " + ", ".join(missing))
        merged = sorted({r["merged_from"] for r in here if r.get("merged_from")})
        out += [f"- rows merged from `{m}`" for m in merged]
        for op in sorted({r["op"] for r in here} - {"copy"}):
            mine = [r for r in here if r["op"] == op]
            out += ["", f"### {op}", ""]
            runs = sorted({(r["date"][:10], r["commit"], r["command"]) for r in mine})
            out += [f"- measured {date} at commit {commit} by `{command}`" for date, commit, command in runs]
            skipped = [r for r in mine if r["mode"] == "skipped"]
            out += [f"- not measured: {r['provider']}{' ' + r['shape'] if r['shape'] else ''}: {r['note']}"
                    for r in skipped]
            checks = [r for r in mine if r["mode"] == "check" and "rel_err" in r]
            if checks:
                out += ["", "Correctness on this device (relative error against the float64 reference):", "",
                        *_head("shape", "dtype", "provider", "backend", "ok", "worst rel err:", "commit")]
                out += [f"| {r['shape']} | {r['dtype']} | {r['provider']} | {r.get('backend', '')} | {r['ok']} | "
                        f"{max(r['rel_err'].values()):.2e} | {r['commit']} |"
                        for r in sorted(checks, key=lambda r: (r["shape"], r["dtype"], r["provider"]))]
            timed = [r for r in mine if r["mode"] in TIMED_MODES]
            notes: list[str] = []
            if timed:
                out += ["", *_timing_table(timed, here, notes)]
                if op == "kd_loss":
                    out += ["", "Backward rows are compared only between providers whose backward does the same work: "
                                "kdfast's forward writes the gradient, so its backward (a scale by the upstream "
                                "gradient, a no-op for loss.backward()) is not compared with the softmax gradients of "
                                "eager and torch.compile, nor with Liger's KL gradient; compare the full (forward + "
                                "backward) rows."]
                out += [""] + [f"[{i + 1}] {text}" for i, text in enumerate(notes)]
            sections = (("eager-call", _eager_call_table), ("sweep-best", _sweep_table), ("census", _census_table))
            for mode, table in sections:
                picked = [r for r in mine if r["mode"] == mode and ("ms" in r or mode == "census")]
                if picked:
                    out += ["", *table(picked)]
            known = {"check", "skipped", "sweep", *TIMED_MODES, *(m for m, _ in sections)}
            other = [r for r in mine if r["mode"] not in known]
            if other:
                out += ["", *_other_table(other)]
        out.append("")
    return "\n".join(out + _reproductions(reports))


def _reproductions(reports: Path) -> list[str]:
    """The papers' findings reproduced on real data (bench/repro/reports/*.md, written by bench.repro.* with their
    device, date, versions and command), each under its own heading."""
    out = []
    for path in sorted(reports.rglob("*.md")):  # variants (e.g. with label noise) in their own folders
        lines = path.read_text().strip().splitlines()
        out += [f"## Reproduction: bench/repro/reports/{path.relative_to(reports)}", "",
                *("##" + line if line.startswith("#") else line for line in lines), ""]
    return out


def merge_rows(source: Path, out: Path) -> int:
    """Append the rows of `source` (another machine's results) to `out`, each once, with their provenance kept
    and the file they came from recorded. Returns how many were new."""
    have = {json.dumps(r, sort_keys=True) for r in read_rows(out)}
    new = []
    for row in read_rows(source):
        row.setdefault("merged_from", str(source))
        if json.dumps(row, sort_keys=True) not in have:
            new.append(row)
    append_rows(new, out)
    return len(new)


# ---------------------------------------------------------------------------------------------- main
def _print_rows(rows: list[dict]) -> None:
    for r in rows:
        if r["mode"] == "skipped":
            print(f"{r['op']:8} {r['shape']:>14} skipped  {r['provider']:22} {r.get('note', '')}")
        elif "ms" in r:
            print(f"{r['op']:8} {r['shape']:>14} {r['dtype']:9} {r['mode']:10} {r['provider']:22} {r['ms']:9.4f} ms "
                  f"{_fmt(r.get('ratio_to_floor'), '.2f'):>6}")
        elif r["mode"] == "check" and "rel_err" in r:
            print(f"{r['op']:8} {r['shape']:>14} {r['dtype']:9} check      {r['provider']:22} ok={r['ok']} "
                  f"worst rel err {max(r['rel_err'].values()):.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter timing loops, a smaller sweep")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes only (used by the test suite)")
    parser.add_argument("--only", choices=list(BENCHMARKS), action="append", help="benchmarks to run (default all)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device to benchmark (default: cuda when available)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="total wall-clock seconds for the run, split between the benchmarks (default: unbounded)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the benchmarks in this process even with a budget or on a GPU (no hard kill at "
                             "the end of a share)")
    parser.add_argument("--render-only", action="store_true",
                        help="only regenerate --markdown from the rows in --out (e.g. after adding a GPU run's rows)")
    parser.add_argument("--merge", type=Path, action="append", default=[],
                        help="append the rows of this results file to --out (once each), then regenerate --markdown")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and the C++ backend (default: torch's own choice)")
    parser.add_argument("--record", action="store_true",
                        help="--out bench/results/results.jsonl --markdown bench/results/RESULTS.md (the tracked record)")
    parser.add_argument("--out", type=Path, default=None,
                        help="rows are appended here (default runs/bench/results.jsonl, untracked)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="regenerated from --out (default: RESULTS.md beside it)")
    # the runner's own child processes: one benchmark each
    parser.add_argument("--child", choices=list(BENCHMARKS), help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    parser.add_argument("--command", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out or (RECORD if args.record else SCRATCH)
    args.markdown = args.markdown or args.out.with_name("RESULTS.md")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        run_module(args.child, device=torch.device(args.device), quick=args.quick, smoke=args.smoke,
                   budget_s=args.budget_s, emit=make_emit(args.out, args.command, args.run_id))
        return 0
    if args.render_only or args.merge:
        for source in args.merge:
            print(f"{merge_rows(source, args.out)} new rows from {source} -> {args.out}")
        args.markdown.write_text(render_markdown(read_rows(args.out)))
        return 0
    args.device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.device = "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    command = ("python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    run_id = uuid.uuid4().hex[:12]
    names = [n for n in BENCHMARKS if n in (args.only or BENCHMARKS)]
    run_all(args, names, command, run_id)
    rows = [r for r in read_rows(args.out) if r.get("run_id") == run_id]
    args.markdown.write_text(render_markdown(read_rows(args.out)))
    _print_rows(rows)
    print(f"\nrows: {args.out} ({len(rows)} from this run); report: {args.markdown}\n")
    print("Open performance targets, from this run's rows:")
    print(targets_table(rows))
    failed = [r for r in rows if r.get("ok") is False]
    if failed:
        print(f"{len(failed)} correctness check(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
