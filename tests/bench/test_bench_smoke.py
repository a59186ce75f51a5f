"""The benchmark runner on tiny CPU shapes, so it cannot rot: rows recorded as they are measured, the budget kept,
the targets table printed, RESULTS.md generated (GPU rows included). (The other benchmark modules it runs have
smoke tests of their own.)"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("bench.run", reason="the bench/ folder ships with the repository, not the package")
import bench.run as runner  # noqa: E402
from bench.perf import bench_kd_loss, bench_score  # noqa: E402
from bench.common import PEERS, read_rows  # noqa: E402
from bench.run import main, render_markdown  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ROW_FIELDS = {"op", "provider", "mode", "shape", "dtype", "device", "versions", "commit", "date", "command", "run_id"}
CPU = torch.device("cpu")


def test_runner_records_rows_and_renders_markdown(tmp_path, capsys):
    out, md = tmp_path / "results.jsonl", tmp_path / "RESULTS.md"
    assert main(["--smoke", "--only", "kd_loss", "--out", str(out), "--markdown", str(md)]) == 0
    rows = read_rows(out)
    assert all(ROW_FIELDS <= set(r) for r in rows)
    assert len({r["run_id"] for r in rows}) == 1 and all(set(r["peers"]) == set(PEERS) for r in rows)
    checks = [r for r in rows if r["mode"] == "check"]
    assert checks and all(r["ok"] for r in checks)
    timed = {(r["provider"], r["mode"]) for r in rows if "ms" in r}
    for provider in ("kdfast", "kdfast-stats", "kdfast-inplace", "eager"):
        for mode in ("forward", "backward", "full"):
            assert (provider, mode) in timed
    for provider in ("kdfast", "eager", "cross_entropy"):
        assert (provider, "eager-call") in timed
    for r in rows:
        if "p20" in r:
            assert 0 < r["p20"] <= r["ms"] <= r["p80"], r
    assert all(r["fresh_inputs"] for r in rows if r["mode"] in ("forward", "backward", "full"))
    full = next(r for r in rows if r["provider"] == "kdfast" and r["mode"] == "full")
    assert full["ratio_to_floor"] > 0
    call = next(r for r in rows if r["provider"] == "kdfast" and r["mode"] == "eager-call")
    assert call["ratio_to_cross_entropy"] > 0 and call["samples"] >= 3 and "p20" not in call
    text = md.read_text()
    assert "not yet measured on a GPU" in text and "| 16x50 | float32 | full | kdfast" in text
    assert "| 8x10 | float32 | kdfast |" in text  # the eager-call table
    printed = capsys.readouterr().out
    assert "Open performance targets" in printed and "CPU (1 thread) eager fwd+bwd call 8x10" in printed
    # a second run appends; the table keeps the newest row of each measurement
    assert main(["--smoke", "--only", "kd_loss", "--out", str(out), "--markdown", str(md)]) == 0
    text2 = md.read_text()
    assert len(read_rows(out)) == 2 * len(rows) and text2.count("| 16x50 | float32 | full | kdfast (") == 1
    assert "kd_loss" in capsys.readouterr().out
    md.unlink()
    assert main(["--render-only", "--out", str(out), "--markdown", str(md)]) == 0 and md.read_text() == text2


def test_tiny_budget_skips_what_it_cannot_start(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert main(["--smoke", "--budget-s", "2", "--out", str(out)]) == 0
    skipped = {r["op"]: r["note"] for r in read_rows(out) if r["mode"] == "skipped"}
    assert set(skipped) == {op for _, _, op in runner.BENCHMARKS.values()}
    assert all("budget spent" in n for n in skipped.values())
    assert "not measured" in capsys.readouterr().out  # the targets table, even with nothing measured
    assert "## Open performance targets" in (tmp_path / "RESULTS.md").read_text()


def test_budget_kills_a_benchmark_at_its_share_and_keeps_its_rows(tmp_path):
    out = tmp_path / "results.jsonl"
    budget = 3.5
    t0 = time.monotonic()
    args = argparse.Namespace(device="cpu", quick=False, smoke=True, threads=None, budget_s=budget, in_process=False,
                              out=out)
    runner.run_all(args, ["kd_loss"], "test", "run1")
    assert time.monotonic() - t0 < budget + 2  # the share is a hard limit (the kill and wait take a moment)
    rows = read_rows(out)
    done = [r for r in rows if r["op"] == "kd_loss" and r["mode"] == "full"]
    killed = [r for r in rows if r["mode"] == "skipped" and "hard limit" in r.get("note", "")]
    stopped = [r for r in rows if r["mode"] == "skipped" and "budget spent" in r.get("note", "")]
    assert killed or stopped or len(done) == 4  # killed at its share, stopped itself at 85% of it, or done
    assert all(r["run_id"] == "run1" for r in rows)


def test_modules_stop_at_their_budget():
    rows = bench_kd_loss.run(device=CPU, smoke=True, budget_s=0.0)
    assert not [r for r in rows if r["mode"] in ("forward", "backward", "full", "eager-call")]
    notes = [r["note"] for r in rows if r["mode"] == "skipped"]
    assert any("budget spent: config" in n for n in notes) and any("eager-call" in n for n in notes)
    emitted = []
    rows = bench_score.run(device=CPU, smoke=True, budget_s=0.0, emit=emitted.append)
    assert rows == emitted and rows and all(r["mode"] == "skipped" and "budget spent" in r["note"] for r in rows)


def test_rows_are_emitted_as_they_are_measured():
    seen = []

    def emit(row):
        seen.append((row["mode"], row["provider"], time.monotonic()))

    rows = bench_kd_loss.run(device=CPU, smoke=True, emit=emit)
    assert [(m, p) for m, p, _ in seen] == [(r["mode"], r["provider"]) for r in rows]
    stamps = [t for *_, t in seen]
    assert stamps[-1] - stamps[0] > 0.05  # spread over the run, not all handed over at the end


def test_a_killed_run_keeps_its_finished_rows(tmp_path):
    out = tmp_path / "results.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "bench.run", "--smoke", "--only", "kd_loss", "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(read_rows(out)) < 8 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = read_rows(out)
    assert len(rows) >= 8 and all(r["op"] in ("kd_loss", "copy") for r in rows)
    assert not (tmp_path / "RESULTS.md").exists()  # killed before the end
    time.sleep(1.0)  # the child dies with the runner: the file stops growing
    settled = len(read_rows(out))
    time.sleep(2.0)
    assert len(read_rows(out)) == settled


def test_default_output_is_untracked_and_make_bench_uses_it(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "SCRATCH", tmp_path / "runs" / "results.jsonl")
    before = runner.RECORD.read_bytes()
    assert main(["--smoke", "--budget-s", "1"]) == 0
    assert read_rows(tmp_path / "runs" / "results.jsonl") and (tmp_path / "runs" / "RESULTS.md").exists()
    assert runner.RECORD.read_bytes() == before
    assert subprocess.run(["git", "check-ignore", "-q", "runs/bench/results.jsonl"], cwd=ROOT).returncode == 0
    recipe = (ROOT / "Makefile").read_text().split("\nbench:")[1].split("\n\n")[0]
    assert "bench.run" in recipe and "--record" not in recipe and "--out runs/bench/" in recipe


def _row(**fields) -> dict:
    base = {"op": "kd_loss", "provider": "kdfast", "mode": "full", "shape": "8192x128256", "dtype": "bfloat16",
            "device": "NVIDIA H200", "device_type": "cuda", "versions": {"torch": "2.11"}, "commit": "6dbf7a1",
            "date": "2026-11-28T07:00:00+00:00", "command": "python -m bench.run --device cuda --quick"}
    return {**base, **fields}


def test_render_with_gpu_rows():
    rows = [
        _row(ms=5.30, p20=5.2, p80=5.4, ratio_to_floor=3.55, speedup_vs={"eager": 11.1, "compile": 3.3}),
        _row(provider="eager", ms=59.1, p20=59.1, p80=59.1),  # one sample, before inputs were cloned
        _row(provider="kdfast", mode="backward", ms=0.65, p20=0.6, p80=0.7, speedup_vs={"eager": 37.0}),
        _row(provider="kdfast-kernel", mode="sweep-best", shape="4096x32000", config={"BLOCK": 4096, "num_warps": 8,
             "num_stages": 3}, ms=0.5, default_ms=0.9, speedup_vs_default=1.8, ratio_to_floor=2.7, commit="abc1234",
             date="2026-11-29T07:00:00+00:00", note="24 configs timed"),
        _row(op="per_example_grad_norms", provider="kdfast", mode="census", shape="16x3x32x32", dtype="float32",
             aten_ops=190, kernel_launches=12, ratio_to_plain=1.34, device="x86_64 CPU, 1 thread", device_type="cpu",
             commit="abc1234"),
        _row(op="per_example_grad_norms", provider="plain", mode="census", shape="16x3x32x32", dtype="float32",
             aten_ops=142, kernel_launches=0, ratio_to_plain=1.0, device="x86_64 CPU, 1 thread", device_type="cpu",
             commit="abc1234"),
    ]
    text = render_markdown(rows)
    assert "not yet measured on a GPU" not in text
    assert "## NVIDIA H200" in text and "| 6dbf7a1 |" in text and "| abc1234 |" in text  # labelled by commit
    eager = next(line for line in text.splitlines() if "| full | eager [1]" in line)
    assert "| 59.1000 |  |" in eager  # no p20-p80 range for a single sample
    assert "[1] timed on gradient values" in text
    backward = next(line for line in text.splitlines() if "| backward | kdfast" in line)
    assert "faster" not in backward and "not compared" in backward
    assert "| 4096x32000 | bfloat16 | BLOCK=4096, num_warps=8, num_stages=3 | 0.5000 | 0.9000 | 1.80 |" in text
    assert "| 16x3x32x32 | float32 | kdfast | 190 | 12 | 1.34 | abc1234 |" in text
    target = next(line for line in text.splitlines() if "GPU 8192x128256 bf16 fwd+bwd" in line)
    assert "3.550 x floor" in target and "**no**" in target and "NVIDIA H200" in target
    assert json.dumps(rows)  # the rows themselves are left as they were


def test_sweep_records_the_best_config_and_skips_a_launcher_without_config():
    def launcher(s, t, y, weight, alpha, temperature, ignore_index, reduction, need_grad, stats, out, *, config=None):
        if config is not None and config["BLOCK"] == 64:
            raise RuntimeError("out of resources: shared memory")
        time.sleep(4e-3 if config is None else 1e-3 * config["BLOCK"] / 16)

    rows = []
    grid = {"BLOCK": (16, 32, 64), "num_warps": (4,), "num_stages": (2,)}
    bench_kd_loss.sweep("16x50-fp32", CPU, 10.0, grid, 5.0, bench_kd_loss.Budget(None), rows.append, launcher)
    assert [r["mode"] for r in rows] == ["sweep", "sweep", "sweep-best"]
    best = rows[-1]
    assert best["config"] == {"BLOCK": 16, "num_warps": 4, "num_stages": 2} and best["speedup_vs_default"] > 1.5
    assert "2 configs timed, 1 refused" in best["note"] and rows[0]["variant"] != rows[1]["variant"]

    def old_launcher(s, t, y, weight, alpha, temperature, ignore_index, reduction, need_grad, stats, out):
        raise AssertionError("not called")

    rows = []
    bench_kd_loss.sweep("16x50-fp32", CPU, 10.0, grid, 5.0, bench_kd_loss.Budget(None), rows.append, old_launcher)
    assert [r["mode"] for r in rows] == ["skipped"] and "takes no config=" in rows[0]["note"]


def test_a_row_cut_short_by_a_kill_is_closed_and_skipped(tmp_path):
    from bench.common import append_rows
    out = tmp_path / "results.jsonl"
    append_rows([{"a": 1}], out)
    with open(out, "a") as f:
        f.write('{"a": 2, "b"')  # a kill mid-write
    append_rows([{"a": 3}], out)
    assert read_rows(out) == [{"a": 1}, {"a": 3}]


def test_render_keeps_the_newest_row_of_each_model_sharing_a_shape():
    """ViT and ConvNeXt census rows share their input shape: each model's newest row is shown, not the newest."""
    census = dict(op="per_example_grad_norms", mode="census", shape="2x3x32x32", dtype="float32",
                  device="x86_64 CPU, 2 threads", device_type="cpu", provider="kdfast")
    rows = [_row(**census, model="vit_b_16", config="vit_b_16-32px-b2", aten_ops=1996, kernel_launches=814,
                 ratio_to_plain=1.22, date="2026-12-06T09:55:00+00:00"),
            _row(**census, model="convnext_tiny", config="convnext_tiny-32px-b2", aten_ops=1158, kernel_launches=563,
                 ratio_to_plain=1.41, date="2026-12-06T09:56:00+00:00")]
    text = render_markdown(rows)
    assert "| 2x3x32x32 | float32 | kdfast | 1996 | 814 | 1.22 |" in text
    assert "| 2x3x32x32 | float32 | kdfast | 1158 | 563 | 1.41 |" in text
    vit = next(line for line in text.splitlines() if "census of per_example_grad_norms, vit_b_16" in line)
    assert "1.220 x plain kernel launches" in vit and "| yes |" in vit
