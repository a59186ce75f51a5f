"""Content digests end to end: a photo rewritten with its old size and mtime restored (which the up-front
(path, size, mtime) fingerprint cannot see) is caught the moment its bytes are read by kdfast-score --resume, by
kdfast-distill with a keep file, a teacher cache or scores, and by fit resuming a checkpoint; each names the file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from _fake_datasets import replace_keeping_size_and_mtime, write_image_folder
from _processes import kill_when

from kdfast.cli.main import distill_main, prune_main, score_main
from kdfast.data import load_dataset
from kdfast.data.digests import DigestMismatchError


def _crc32s(root, files):
    return np.array([zlib.crc32(open(os.path.join(root, f), "rb").read()) for f in files], dtype=np.int64)


def _error(capsys, prog):
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith(f"{prog}: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def _folder(root):
    return ["--dataset", "folder", "--data-root", str(root), "--image-size", "8", "--model", "mlp"]


@pytest.mark.slow
def test_score_resume_catches_a_file_replaced_while_stopped_and_a_normal_resume_passes(tmp_path, capsys):
    root = tmp_path / "photos"
    files = write_image_folder(root, per_class=6, size=(32, 24))
    argv = _folder(root) + ["--train-epochs", "1", "--seeds", "1", "--batch-size", "2", "--chunk-size", "2",
                            "--quiet"]
    killed = tmp_path / "killed"
    kill_when(subprocess.Popen([sys.executable, "-m", "kdfast.cli.score", *argv, "--out", str(killed)],
                               stderr=subprocess.PIPE, text=True), killed / "chunks")
    assert not (killed / "meta.json").exists()
    last = root / files[-1]  # scored last: not scored before the kill, read by the training before it
    original, st = last.read_bytes(), os.stat(last)
    replace_keeping_size_and_mtime(last)
    assert score_main(argv + ["--out", str(killed), "--resume"]) == 1
    line = _error(capsys, "kdfast-score")
    assert f"{last} changed since the interrupted run in {killed} read it" in line and "--overwrite" in line
    last.write_bytes(original)
    os.utime(last, ns=(st.st_atime_ns, st.st_mtime_ns))
    # the original bytes again: no false alarm, and the same scores as an uninterrupted run
    assert score_main(argv + ["--out", str(killed), "--resume"]) == 0, capsys.readouterr().err
    assert score_main(argv + ["--out", str(tmp_path / "whole")]) == 0, capsys.readouterr().err
    np.testing.assert_array_equal(np.load(killed / "scores.npy"), np.load(tmp_path / "whole" / "scores.npy"))
    digests = np.load(killed / "digests.npy")
    np.testing.assert_array_equal(digests, _crc32s(root, files))
    meta = json.loads((killed / "meta.json").read_text())
    assert meta["digests"]["file"] == "digests.npy" and "digests.npy" in meta["files"]


@pytest.mark.slow
def test_keep_file_teacher_cache_and_scores_catch_a_replaced_file_when_training_reads_it(tmp_path, capsys):
    root = tmp_path / "photos"
    files = write_image_folder(root, per_class=6, size=(32, 24))
    scores = tmp_path / "scores"
    assert score_main(_folder(root) + ["--train-epochs", "1", "--seeds", "1", "--save-logits", "--method", "el2n",
                                       "--quiet", "--out", str(scores)]) == 0, capsys.readouterr().err
    reference = _crc32s(root, files)
    np.testing.assert_array_equal(np.load(scores / "digests.npy"), reference)
    np.testing.assert_array_equal(np.load(scores / "teacher-logits" / "digests.npy"), reference)
    keep_path = tmp_path / "keep.npy"
    assert prune_main(["--scores", str(scores), "--fraction", "0.5", "--out", str(keep_path)]) == 0
    np.testing.assert_array_equal(np.load(f"{keep_path}.digests.npy"), reference)
    student = _folder(root) + ["--epochs", "1", "--quiet", "--no-augment", "--val-fraction", "0"]
    assert distill_main(student + ["--keep", str(keep_path), "--out", str(tmp_path / "ok"),
                                   "--teacher-cache", str(scores / "teacher-logits")]) == 0
    capsys.readouterr()
    changed = root / files[int(np.load(keep_path)[0])]  # a kept file: every consumer below reads it
    replace_keeping_size_and_mtime(changed)
    for flags, artifact in [(["--keep", str(keep_path), "--alpha", "0"], f"the scores behind --keep {keep_path}"),
                            (["--teacher-cache", str(scores / "teacher-logits")], f"the teacher cache {scores}")]:
        assert distill_main(student + flags + ["--out", str(tmp_path / "run")]) == 1
        line = _error(capsys, "kdfast-distill")
        assert f"{changed} changed since {artifact}" in line, line
    for f in files:  # stochastic pruning draws its examples: every file replaced, whichever it reads first fails
        if root / f != changed:
            replace_keeping_size_and_mtime(root / f)
    assert distill_main(student + ["--sampler", "lipschitz", "--scores", str(scores), "--fraction", "0.5",
                                   "--alpha", "0", "--out", str(tmp_path / "run")]) == 1
    line = _error(capsys, "kdfast-distill")
    assert f"changed since --scores {scores} read it" in line and str(root) in line, line


def test_fit_resume_checks_the_reads_of_the_run_before_the_stop(tmp_path):
    from kdfast.models import create_model
    from kdfast.training.fit import TrainRecipe, fit
    root = tmp_path / "photos"
    files = write_image_folder(root, per_class=4, size=(32, 24))
    recipe = TrainRecipe(epochs=2, batch_size=4, lr=0.05, seed=0)

    def run(stop_after_first=False):
        torch.manual_seed(0)
        model = create_model("mlp", num_classes=3, in_channels=3, image_size=8)

        def on_epoch(history):
            if stop_after_first:
                raise KeyboardInterrupt  # stopped after epoch 1's checkpoint
        data = load_dataset("folder", root=root, image_size=8)
        fit(model, data, recipe, checkpoint_path=tmp_path / "ck.pt", resume=True, progress=False, on_epoch=on_epoch)
        return model

    with pytest.raises(KeyboardInterrupt):
        run(stop_after_first=True)
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    np.testing.assert_array_equal(state["digests"].numpy(), _crc32s(root, files))
    original = (root / files[2]).read_bytes()
    st = os.stat(root / files[2])
    replace_keeping_size_and_mtime(root / files[2])
    with pytest.raises(DigestMismatchError, match=f"{files[2]} changed since the run that wrote checkpoint"):
        run()
    (root / files[2]).write_bytes(original)
    os.utime(root / files[2], ns=(st.st_atime_ns, st.st_mtime_ns))
    resumed = run()  # the same bytes: no false alarm, the weights of an uninterrupted run
    os.remove(tmp_path / "ck.pt")
    whole = run()
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_score_with_out_records_digests_that_its_consumers_check(tmp_path):
    import hashlib

    import kdfast
    from kdfast.models import create_model
    from kdfast.scoring.folder import expect_score_digests
    root = tmp_path / "photos"
    files = write_image_folder(root, per_class=3, size=(32, 24))
    data = load_dataset("folder", root=root, image_size=8)
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=3, in_channels=3, image_size=8)
    kdfast.score(model, data, "el2n", batch_size=4, out=tmp_path / "s", progress=False)
    digests = np.load(tmp_path / "s" / "digests.npy")
    np.testing.assert_array_equal(digests, _crc32s(root, files))
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["digests"]["sha256"] == hashlib.sha256(digests.astype("<i8").tobytes()).hexdigest()
    replace_keeping_size_and_mtime(root / files[7])
    fresh = load_dataset("folder", root=root, image_size=8)
    expect_score_digests(str(tmp_path / "s"), fresh)
    fresh[6]
    with pytest.raises(DigestMismatchError, match=f"{files[7]} changed since --scores {tmp_path / 's'} read it"):
        fresh[7]
