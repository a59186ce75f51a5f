"""Image folders and pruning at ImageNet scale: the folder scan, the start of a scoring run and kdfast-prune.

    python -m bench.run --only data_scale              # 100k and 1.28M files (the 1.28M tree takes minutes)
    python -m bench.run --only data_scale --quick      # 100k files only
    python -m bench.perf.bench_data_scale --sizes 20000
    python -m bench.perf.bench_data_scale --sizes 1281167 --no-shards --runs 3 --out bench/results/results.jsonl

Each size writes an ImageNet-shaped tree (ROOT/train/<wnid>/<wnid>_<i>.JPEG, 1000 classes) of hard links to 40
small JPEGs under the system temp dir, measures, and removes it. Every measurement runs in a child process of its
own (a clean RSS, a cold interpreter, as a user's command starts); the tree is walked once before, so the page and
dentry caches are warm for every row. Rows (`ms`: wall time of the child, start to the event named):

    walk                 a bare os.scandir walk that stats every file (the floor of any scan: sizes and mtimes are
                         part of the data identity); `ms` is the walk alone, inside the child
    imports              `import torch, torchvision` alone: `rss_mib` is the RSS every kdfast command starts from
    score-first-batch    `kdfast-score --dataset imagenet --model mlp --image-size 8 --train-epochs 1` from the
                         child's start to its first progress line (the first training batch; runtime/progress.py
                         prints it at the first batch), then killed. `ratio_to_walk` = ms / walk's ms;
                         `rss_above_imports_mib` = its peak RSS less the imports row's
    prune-npy            `kdfast-prune --scores scores.npy --fraction 0.3` (N float scores)
    prune-class-balanced the same with `--class-balanced --labels labels.npy`
    prune-csv-cli        `kdfast-prune --scores scores.csv --dataset imagenet --data-root ROOT`: a keyed CSV (N rows
                         `file,score`, shuffled) matched to the folder, its listing (names only) included
    prune-csv            the same CSV matched to a score run's files.txt and pruned (`load_score_file` +
                         `keep_indices` in a child: the library calls without the folder's listing)
Then the same tree as a shard source, converted by make_shards (1000 examples a shard, .idx.npz sidecars):
    wds-convert          make_shards(train, OUT) in a child: the conversion's time (not a goal)
    wds-score-first-batch  score-first-batch's command on `--dataset wds:OUT/shard-{000000..}.tar`; ratio_to_walk
                         is to the walk of the tree of the same size
    wds-score-random     `kdfast-score --dataset wds:... --method random` to its end: a real keyed score folder
                         (scores.parquet: key, label, score; meta.json) of N rows
    wds-prune            `kdfast-prune --scores FOLDER --fraction 0.5 --out keep.parquet`
    wds-prune-class-balanced  the same with `--class-balanced` (labels from scores.parquet)
The prune rows' `work_ms` is the child's time after its imports (kdfast-prune imports no torch for these modes),
`rss_mib` the child's own peak RSS (the helpers it forks to walk and read, ~0.1 GB each, not counted).

Targets (1.28M files, and 1.28M examples in shards): score-first-batch <= 1.5x walk, peak RSS <= 250 MiB above
the imports, each kdfast-prune <= 5 s; each judged on the median of the runs of the newest commit measured
(`--runs 3` measures three in one go).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import make_row, report

OP = "data_scale"
IMAGENET_TRAIN = 1_281_167
SIZES = {"quick": (100_000,), "full": (100_000, IMAGENET_TRAIN), "smoke": (3_000,)}
CLASSES = 1000
SOURCES = 40  # distinct small JPEGs every file links to
ROOT = Path(__file__).resolve().parents[2]
PROGRESS_LINE = re.compile(r"^(epoch \d+/\d+|scoring \(\w[\w-]*\)): \d+")  # runtime/progress.py's plain lines

WALK = """
import os, sys, time
def walk(path):
    n = 0
    with os.scandir(path) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                n += walk(e.path)
            else:
                e.stat()
                n += 1
    return n
t = time.perf_counter(); n = walk(sys.argv[1]); print(n, time.perf_counter() - t)
"""
# the prune children print last the seconds of their work after the imports (`work_ms`) and their own peak RSS
# (VmHWM: the exit status's ru_maxrss would count this process's RSS at the spawn, see _peak_rss)
OWN_PEAK = 'next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))'
CSV_PRUNE = """
import sys, time
from kdfast.io.atomic import read_file_list
from kdfast.pruning.score_files import load_score_file
from kdfast.pruning.selection import keep_indices
t = time.perf_counter()
files = read_file_list(sys.argv[1])
keep = keep_indices(load_score_file(sys.argv[2], files=files), 0.3, "hard")
print(len(files), len(keep), time.perf_counter() - t, %s)
""" % OWN_PEAK
MAKE_SHARDS = """
import sys
from kdfast.data.make_shards import make_shards
print(make_shards(sys.argv[1], sys.argv[2], shard_size=1000))
"""
CLI = """
import sys, time
from kdfast.cli.main import main
t = time.perf_counter(); rc = main(sys.argv[1:]); print(time.perf_counter() - t, %s); sys.exit(rc)
""" % OWN_PEAK


def write_tree(root: Path, n: int) -> None:
    """ROOT/train/<wnid>/<wnid>_<i>.JPEG: n hard links to SOURCES small JPEGs, spread over CLASSES folders."""
    from PIL import Image
    rng = np.random.default_rng(0)
    sources = root / "sources"
    sources.mkdir(parents=True)
    for k in range(SOURCES):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(sources / f"{k}.JPEG", quality=80)
    source_paths = [str(sources / f"{k}.JPEG") for k in range(SOURCES)]
    per_class = np.diff(np.linspace(0, n, CLASSES + 1).round().astype(int))
    for c, count in enumerate(per_class.tolist()):
        wnid = f"n{c:08d}"
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        prefix = f"{folder}/{wnid}_"
        for i in range(count):
            os.link(source_paths[(c + i) % SOURCES], f"{prefix}{i}.JPEG")


def _peak_rss(pid: int) -> int | None:
    """VmHWM of a live process in bytes: its own peak (ru_maxrss also counts the spawning process's RSS, which
    Linux carries into a vfork'd child's maximum through its exec)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def _child(argv: list[str], *, until=None, env=None) -> tuple[float, int, str]:
    """(wall s from start to exit or to the first stderr line matching `until`, peak RSS in bytes, stdout) of a
    child; a child stopped at `until` is killed there and its peak RSS is its own VmHWM then; else ru_maxrss,
    which is at least this process's peak RSS (see _peak_rss)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    wall, err, peak = None, [], None  # wall stays None until `until` matches
    for line in proc.stderr if until is not None else ():
        err.append(line)
        if until.match(line):
            wall = time.perf_counter() - start
            peak = _peak_rss(proc.pid)
            proc.kill()
            break
    out = proc.stdout.read()
    err += proc.stderr.readlines()
    _, status, usage = os.wait4(proc.pid, 0)
    ended = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if until is not None and wall is None:
        raise RuntimeError(f"{' '.join(argv[:5])}: no progress line; stderr ends {''.join(err)[-800:]}")
    if until is None and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:5])} exited {proc.returncode}: {''.join(err)[-800:]}")
    return ended if until is None else wall, peak or usage.ru_maxrss * 1024, out


def _work_and_peak(out: str) -> dict:
    """A prune child's `work_ms` and `rss_mib` (its own peak; the helpers it forks are not counted) from its last
    printed line."""
    work_s, peak = out.split()[-2:]
    return {"work_ms": float(work_s) * 1e3, "rss_mib": int(peak) / 2**20}


def _kdfast(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdfast.cli.main", *args]


def bench_size(n: int, emit, device: torch.device, shards: bool = True) -> list[dict]:
    rows = []
    base = Path(tempfile.mkdtemp(prefix="kdfast-bench-data-scale-"))
    try:
        t = time.perf_counter()
        write_tree(base, n)
        print(f"data_scale: {n} files written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        data_root, train = base, base / "train"
        _child([sys.executable, "-c", WALK, str(train)])  # warms the dentry and inode caches for every row

        def row(provider, ms, **fields):
            rows.append(make_row(op=OP, provider=provider, mode="wall", shape=(n,), dtype="-", device=device,
                                 ms=ms, files=n, **fields))
            emit(rows[-1])
            return rows[-1]

        _, _, out = _child([sys.executable, "-c", WALK, str(train)])
        walk_s = float(out.split()[1])
        row("walk", walk_s * 1e3)
        wall, imports_rss, _ = _child([sys.executable, "-c", "import torch, torchvision"])
        row("imports", wall * 1e3, rss_mib=imports_rss / 2**20)
        out_dir = base / "score-run"
        wall, rss, _ = _child(_kdfast("score", "--dataset", "imagenet", "--data-root", str(data_root), "--model", "mlp",
                                      "--image-size", "8", "--train-epochs", "1", "--seeds", "1", "--out",
                                      str(out_dir)), until=PROGRESS_LINE)
        row("score-first-batch", wall * 1e3, ratio_to_walk=wall / walk_s, rss_mib=rss / 2**20,
            rss_above_imports_mib=(rss - imports_rss) / 2**20)
        files_txt = out_dir / "files.txt"
        rng = np.random.default_rng(1)
        scores = rng.random(n)
        np.save(base / "scores.npy", scores)
        labels = np.repeat(np.arange(CLASSES), np.diff(np.linspace(0, n, CLASSES + 1).round().astype(int)))
        np.save(base / "labels.npy", labels)
        names = files_txt.read_bytes().decode().splitlines()
        order = rng.permutation(n)
        with open(base / "scores.csv", "w") as fh:  # keyed by the data set's relative paths, in another order
            fh.write("file,score\n")
            values = scores.tolist()
            fh.writelines(f"{names[i]},{values[i]!r}\n" for i in order.tolist())
        del names
        keep = str(base / "keep.npy")
        for provider, extra in (("prune-npy", ["--scores", str(base / "scores.npy")]),
                                ("prune-class-balanced", ["--scores", str(base / "scores.npy"), "--class-balanced",
                                                          "--labels", str(base / "labels.npy")]),
                                ("prune-csv-cli", ["--scores", str(base / "scores.csv"), "--dataset", "imagenet",
                                                   "--data-root", str(data_root)])):
            wall, _, out = _child([sys.executable, "-c", CLI, "prune", *extra, "--fraction", "0.3", "--out", keep,
                                   "--quiet"])
            row(provider, wall * 1e3, **_work_and_peak(out))
        wall, _, out = _child([sys.executable, "-c", CSV_PRUNE, str(files_txt), str(base / "scores.csv")])
        row("prune-csv", wall * 1e3, **_work_and_peak(out),
            csv_mib=os.path.getsize(base / "scores.csv") / 2**20)
        if shards:  # the shard rows take most of the time at 1.28M (the conversion: ~20 min on 2 cores)
            shard_rows(base, train, walk_s, imports_rss, row)
    finally:
        t = time.perf_counter()
        shutil.rmtree(base, ignore_errors=True)
        print(f"data_scale: tree removed in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return rows


def shard_rows(base: Path, train: Path, walk_s: float, imports_rss: int, row) -> None:
    """The shard-source rows: the tree converted to wds shards (make_shards), kdfast-score's start on them, a
    `--method random` score folder (keyed scores.parquet) and kdfast-prune from it, plain and class-balanced."""
    # in a child: a child's peak RSS counts its parent's at the spawn (vfork), so this process stays small
    wall, rss, out = _child([sys.executable, "-c", MAKE_SHARDS, str(train), str(base / "shards")])
    name = out.split()[-1]
    shards = [e for e in os.scandir(base / "shards") if e.name.endswith(".tar")]
    row("wds-convert", wall * 1e3, shards=len(shards), shards_mib=sum(e.stat().st_size for e in shards) / 2**20,
        rss_mib=rss / 2**20)
    wall, rss, _ = _child(_kdfast("score", "--dataset", name, "--model", "mlp", "--image-size", "8", "--train-epochs",
                                  "1", "--seeds", "1", "--out", str(base / "wds-score-run")), until=PROGRESS_LINE)
    row("wds-score-first-batch", wall * 1e3, ratio_to_walk=wall / walk_s, rss_mib=rss / 2**20,
        rss_above_imports_mib=(rss - imports_rss) / 2**20)
    scores = base / "wds-random"
    wall, rss, _ = _child(_kdfast("score", "--dataset", name, "--method", "random", "--out", str(scores), "--quiet"))
    row("wds-score-random", wall * 1e3, rss_mib=rss / 2**20)
    for provider, extra in (("wds-prune", []), ("wds-prune-class-balanced", ["--class-balanced"])):
        wall, _, out = _child([sys.executable, "-c", CLI, "prune", "--scores", str(scores), *extra, "--fraction",
                               "0.5", "--out", str(base / "keep.parquet"), "--quiet"])
        row(provider, wall * 1e3, **_work_and_peak(out))


def run(*, device, quick: bool = False, smoke: bool = False, emit=None, sizes=None, shards: bool = True) -> list[dict]:
    """The `bench.run` entry point (CPU work whatever the device): rows of each size, emitted as measured;
    `shards=False` leaves out the shard-source rows."""
    device = torch.device("cpu")
    emit = emit or (lambda row: None)
    sizes = sizes or SIZES["smoke" if smoke else "quick" if quick else "full"]
    return [r for n in sizes for r in bench_size(n, emit, device, shards)]


def targets(rows: list[dict]) -> list[dict]:
    """The ImageNet-scale targets: the median of the runs at 1.28M of the newest commit measured (wall times on a
    shared 2-core machine vary by +-15% from run to run; a single run's outlier does not decide a goal)."""
    def newest_runs(provider):
        mine = [r for r in rows if r.get("op") == OP and r.get("provider") == provider and r.get("files") ==
                IMAGENET_TRAIN and "ms" in r]
        commit = max(mine, key=lambda r: r["date"])["commit"] if mine else None
        return [r for r in mine if r["commit"] == commit], commit
    out = []
    for what, provider, field, goal, unit in (
            ("start to first batch of kdfast-score vs a bare scandir+stat walk (1.28M files)", "score-first-batch",
             "ratio_to_walk", 1.5, "x walk"),
            ("kdfast-score peak RSS above `import torch, torchvision` (1.28M files)", "score-first-batch",
             "rss_above_imports_mib", 250.0, "MiB"),
            ("kdfast-prune from .npy (1.28M scores)", "prune-npy", "ms", 5000.0, "ms"),
            ("kdfast-prune class-balanced (1.28M scores)", "prune-class-balanced", "ms", 5000.0, "ms"),
            ("kdfast-prune from a keyed CSV matched to the folder, its listing included (1.28M rows)",
             "prune-csv-cli", "ms", 5000.0, "ms"),
            ("start to first batch of kdfast-score on wds shards vs the walk of the same-size tree (1.28M examples)",
             "wds-score-first-batch", "ratio_to_walk", 1.5, "x walk"),
            ("kdfast-score on wds shards: peak RSS above `import torch, torchvision` (1.28M examples)",
             "wds-score-first-batch", "rss_above_imports_mib", 250.0, "MiB"),
            ("kdfast-prune from a keyed score folder of wds shards (1.28M rows)", "wds-prune", "ms", 5000.0, "ms"),
            ("kdfast-prune class-balanced from a keyed score folder of wds shards (1.28M rows)",
             "wds-prune-class-balanced", "ms", 5000.0, "ms")):
        runs, commit = newest_runs(provider)
        values = [r[field] for r in runs if r.get(field) is not None]
        measured = float(np.median(values)) if values else None
        runs_note = f" (median of {len(values)} runs: {', '.join(f'{v:.4g}' for v in values)})" \
            if len(values) > 1 else ""
        out.append({"issue": None, "what": what, "measured": measured, "target": f"<= {goal:g}", "commit": commit,
                    "met": None if measured is None else measured <= goal, "unit": unit + runs_note})
    return out


def format_table(rows) -> str:
    lines = [f"{'files':>9} {'provider':22} {'wall ms':>10} {'x walk':>7} {'RSS MiB':>8} {'above imports':>13}"]
    for r in rows:
        lines.append(f"{r['files']:9d} {r['provider']:22} {r['ms']:10.0f} {r.get('ratio_to_walk') or '':>7.4} "
                     f"{r.get('rss_mib') or '':>8.6} {r.get('rss_above_imports_mib') or '':>13.6}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES["quick"]))
    parser.add_argument("--out", type=Path, help="append the rows to this results.jsonl")
    parser.add_argument("--no-shards", action="store_true", help="image-folder rows only (no wds conversion)")
    parser.add_argument("--runs", type=int, default=1, help="measure each size this many times (a tree each)")
    args = parser.parse_args(argv)
    rows = [r for _ in range(args.runs) for r in run(device="cpu", sizes=args.sizes, shards=not args.no_shards)]
    return report(rows, format_table(rows), args.out)


if __name__ == "__main__":
    sys.exit(main())
