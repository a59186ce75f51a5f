"""The folder walk's variants give one answer: names alone (stat=False) and split over a forked helper (split=True,
in a process without torch, as kdfast-score's prefetch child and kdfast-prune's listing run it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# every variant of one tree's walk, in a process that never imports torch (where split=True forks)
WALKS = """
import json, os, sys, warnings
import kdfast.runtime.folder_walk as fw
folder, how = sys.argv[1], sys.argv[2]
forks, real_fork = [], os.fork
def counted_fork():
    forks.append(1)
    return real_fork()
os.fork = counted_fork
if how == "helper-dies":  # the helper dies at its first class folder: the parent walks its classes too
    parent, real = os.getpid(), fw._class_files
    def flaky(*args):
        if os.getpid() != parent:
            os._exit(3)
        return real(*args)
    fw._class_files = flaky
def walk(**kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = fw.walk_image_folder(folder, "folder", fw.FOLDER_LAYOUT, **kw)
    return {"classes": w.classes, "buffer": w.buffer.decode(), "offsets": w.offsets.tolist(), "counts": w.counts,
            "skipped": w.skipped, "stats": None if w.stats is None else w.stats.tolist(),
            "warnings": [str(m.message) for m in caught]}
out = {f"{stat}-{split}": walk(stat=stat, split=split) for stat in (True, False) for split in (False, True)}
print(json.dumps({"torch": "torch" in sys.modules, "forks": len(forks), "walks": out}))
"""


def _walks(folder, how="plain", forks=2):
    """The four walks of `folder`; `forks`: how many of them split (each split walk forks one helper)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(WALKS), str(folder), how], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert not out["torch"] and out["forks"] == forks
    return out["walks"]


def _tree(root, classes=7):
    for c in range(classes):  # uneven classes, nested folders, other files, an empty class
        for k in range(c % 4):
            path = root / f"c{c}" / ("sub" if k == 2 else "") / f"img{k}.{'png' if k % 2 else 'JPG'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(bytes([c, k]) * (c + k + 1))
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        (root / f"c{c}" / "notes.txt").write_text("not an image")
    return root


def _assert_one_answer(walks):
    base = walks["True-False"]
    assert base["counts"] == [0, 1, 2, 3, 0, 1, 2] and len(base["skipped"]) == 7 and base["stats"] is not None
    assert walks["True-True"] == base  # split: the same walk, stats and warnings included
    for split in ("False", "True"):
        assert walks[f"False-{split}"] == {**base, "stats": None}  # names alone: the same but the stats


def test_split_and_names_only_walks_give_the_walk(tmp_path):
    _assert_one_answer(_walks(_tree(tmp_path / "f")))


def test_a_helper_that_dies_leaves_its_classes_to_the_parent(tmp_path):
    _assert_one_answer(_walks(_tree(tmp_path / "f"), "helper-dies"))


def test_a_linked_class_folder_keeps_the_walk_in_one_process(tmp_path):
    # c7 links to c2: the one `seen` set leaves the second of them empty (real paths counted once), which a helper
    # walking half the classes could not know: the walk is not split
    root = _tree(tmp_path / "f")
    (root / "c7").symlink_to(root / "c2", target_is_directory=True)
    walks = _walks(root, forks=0)
    base = walks["True-False"]
    assert base["classes"][-1] == "c7" and base["counts"][-1] == 0
    assert walks["True-True"] == base and walks["False-True"] == {**base, "stats": None}
