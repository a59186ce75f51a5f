"""kdfast-score's folder walk in a process forked before torch is imported (runtime/walk_prefetch.py): the data set
it gives equals the in-process scan's (files, labels, classes, stats, skipped files, data identity); the walk's
warnings and errors reach the user once; a killed or failed child falls back to walking in-process, with a note.
Each case runs in a fresh interpreter: the prefetch forks only a process that has not imported torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# builds both data sets: `a` from the prefetched walk (taken once), `b` by walking in-process
COMPARE = """
import json, os, signal, sys, warnings
import kdfast.runtime.walk_prefetch as prefetch
from kdfast.runtime.folder_walk import FOLDER_LAYOUT
folder, how = sys.argv[1], sys.argv[2]
if how == "failed":  # the walk raises in the child only: the parent's own walk works
    import kdfast.runtime.folder_walk as walk
    parent, real = os.getpid(), walk.walk_image_folder
    def flaky(*args, **kwargs):
        if os.getpid() != parent:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)
    prefetch.walk_image_folder = flaky
started = prefetch.prefetch_walk(folder, "folder", FOLDER_LAYOUT)
if how == "killed":
    os.kill(next(iter(prefetch._pending.values())).pid, signal.SIGKILL)
import torch  # noqa: F401 (after the fork, as in kdfast-score)
from kdfast.data import DataError, data_identity, load_dataset
def load():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            data = load_dataset("folder", root=folder)
        except DataError as exc:
            return None, [str(w.message) for w in caught] + [str(exc)]
    return data, [str(w.message) for w in caught]
a, a_said = load()
left = len(prefetch._pending)
b, b_said = load()
same = None if a is None else (a.classes == b.classes and list(a.files) == list(b.files)
    and a.targets.tolist() == b.targets.tolist() and a.files.stats.tolist() == b.files.stats.tolist()
    and a.skipped_files == b.skipped_files and data_identity(a) == data_identity(b))
print(json.dumps({"started": started, "left": left, "same": same, "n": 0 if a is None else len(a),
                  "a_said": a_said, "b_said": b_said}))
"""


def _run(code, *args):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    return proc


def _compare(folder, how="plain"):
    proc = _run(COMPARE, folder, how)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


def _tree(root):
    for rel in ("b/z.jpg", "b/a/y.png", "b/a/c/x.jpg", "b/0.JPG", "a/q.png", "a/notes.txt", "a/._q.png",
                "c/d/e/f.jpg", "ü ñ/p.jpeg"):
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        (root / rel).write_bytes(rel.encode() * 3)
    (root / "empty").mkdir()  # a class folder without images: warned about
    (root / "b" / "gone.jpg").symlink_to(root / "nowhere.jpg")  # a dangling link: stats -1, -1
    return root


def test_prefetched_walk_gives_the_in_process_data_set_and_its_warnings_once(tmp_path):
    out, stderr = _compare(_tree(tmp_path / "f"))
    assert out["started"] and out["left"] == 0 and out["same"] and out["n"] == 8
    assert len(out["a_said"]) == 1 and "hold no images (empty)" in out["a_said"][0]
    assert out["a_said"] == out["b_said"] and "note:" not in stderr


def test_prefetched_walk_raises_the_scans_error(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "loose.jpg").write_bytes(b"x")
    (tmp_path / "f" / "loop").symlink_to(tmp_path / "f")  # its only class folder: a loop, warned about, left out
    out, _ = _compare(tmp_path / "f")
    assert out["started"] and out["n"] == 0 and out["a_said"] == out["b_said"] and len(out["a_said"]) == 2
    assert "link back" in out["a_said"][0]  # the warning first, then the error, as the in-process walk says them
    assert "has no class subfolders" in out["a_said"][1] and str(tmp_path / "f") in out["a_said"][1]


@pytest.mark.parametrize("how", ["killed", "failed"])
def test_a_killed_or_failed_walk_child_falls_back_to_walking_here(tmp_path, how):
    out, stderr = _compare(_tree(tmp_path / "f"), how)
    assert out["started"] and out["left"] == 0 and out["same"] and out["n"] == 8
    assert len(out["a_said"]) == 1 and out["a_said"] == out["b_said"]
    notes = [line for line in stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "walking it here" in notes[0] and str(tmp_path / "f") in notes[0]
    assert ("disk on fire" in notes[0]) == (how == "failed")


# kdfast-score itself: the walk is prefetched (taken once), its warning printed once, its error one line
CLI = """
import sys
import kdfast.runtime.walk_prefetch as prefetch
real, taken = prefetch.take_prefetched_walk, []
def take(*args, **kwargs):
    try:
        walk = real(*args, **kwargs)
    except Exception as exc:
        taken.append(type(exc).__name__)
        raise
    taken.append(walk is not None)
    return walk
prefetch.take_prefetched_walk = take
from kdfast.cli.main import main
try:
    rc = main(sys.argv[1:])
finally:
    print("taken", taken)
sys.exit(rc)
"""


def test_kdfast_score_prefetches_the_walk_and_reports_once(tmp_path):
    from PIL import Image
    root = tmp_path / "f"
    for k, rel in enumerate(("a/q.png", "b/z.jpg", "b/a/y.png", "ü ñ/p.jpeg")):
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        Image.new("RGB", (9, 7), (40 * k, 9, 200)).save(root / rel)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    argv = ["score", "--dataset", "folder", "--data-root", root, "--method", "random", "--out", tmp_path / "run",
            "--image-size", "8", "--num-workers", "0"]
    proc = _run(CLI, *argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "taken [True]" in proc.stdout
    assert proc.stderr.count("hold no images") == 1 and "note:" not in proc.stderr
    scored = (tmp_path / "run" / "files.txt").read_text(encoding="utf-8").splitlines()
    assert scored == ["a/q.png", "b/z.jpg", "b/a/y.png", "ü ñ/p.jpeg"]
    bad = tmp_path / "bad"
    bad.mkdir()
    proc = _run(CLI, *argv[:4], bad, *argv[5:-4], "--out", tmp_path / "run2")
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 1 and "taken ['DataError']" in proc.stdout, proc.stderr[-3000:]
    assert len(errors) == 1 and "has no class subfolders" in errors[0] and str(bad) in errors[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run2").exists()
