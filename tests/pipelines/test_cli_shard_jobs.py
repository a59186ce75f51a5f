"""The shard jobs end to end at the command line, on real shards made here from an image folder: kdfast-score
SIGKILLed at random moments and resumed, and under torchrun (2 gloo ranks, also killed and resumed), gives bitwise
the scores of one uninterrupted process; score -> prune -> distill trains the student on exactly the kept keys;
--limit keeps the per-shard path; the summary names the hardest examples by key."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from _fake_datasets import write_image_folder
from _processes import rank_pid
from kdfast.data.make_shards import make_shards
from kdfast.models import create_model

pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("webdataset")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# one OpenMP thread everywhere (torchrun sets it per rank): every reduction runs in the same order
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
CLASSES = ("cat", "dog", "emu")


@pytest.fixture
def sources(tmp_path):
    """{"wds": name, "parquet": name} of 60 images in 20 shards of 3, and two checkpoints to score with."""
    root = tmp_path / "photos"
    write_image_folder(root, classes=CLASSES, per_class=20, size=(17, 12))
    names = {"wds": make_shards(str(root), str(tmp_path / "wds"), shard_size=3),
             "parquet": make_shards(str(root), str(tmp_path / "pq"), shard_size=3, format="parquet",
                                    row_group_size=2)}
    checkpoints = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        model = create_model("mlp", num_classes=len(CLASSES), in_channels=3, image_size=8)
        checkpoints += ["--checkpoint", str(tmp_path / f"m{seed}.pt")]
        torch.save({"model": model.state_dict()}, checkpoints[-1])
    return names, checkpoints


def _score_args(name, checkpoints, out, *more):
    return ["--dataset", name, "--model", "mlp", "--image-size", "8", "--method", "el2n", "--batch-size", "1",
            "--num-workers", "0", *checkpoints, "--out", str(out), *more]


def _command(argv, nproc=1):
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [*launcher, "-m", "kdfast.cli.score", *argv]


def _run(argv, nproc=1):
    done = subprocess.run(_command(argv, nproc), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _committed(out, folders=("accuracy-shards", "shards")):
    return [f for d in folders if os.path.isdir(out / d) for f in os.listdir(out / d) if f.endswith(".npz")]


def _assert_same_scores(out, whole):
    assert pq.read_table(out / "scores.parquet").equals(pq.read_table(whole / "scores.parquet"))
    for name in ("scores.npy", "scores_per_model.npy"):
        np.testing.assert_array_equal(np.load(out / name), np.load(whole / name))
    assert not (out / "shards").exists() and not (out / "accuracy-shards").exists()


@pytest.mark.slow  # several processes, each killed
@pytest.mark.parametrize("source", ["wds", "parquet"])
def test_killed_at_random_moments_then_resumed_gives_the_uninterrupted_scores(sources, tmp_path, source):
    names, checkpoints = sources
    whole = tmp_path / "whole"
    _run(_score_args(names[source], checkpoints, whole, "--quiet"))
    assert np.load(whole / "scores.npy").std() > 0
    killed = tmp_path / "killed"
    rng = random.Random(source)
    kills = 0
    for attempt in range(3):  # up to three runs, each SIGKILLed at a random moment of its passes over the shards
        args = _score_args(names[source], checkpoints, killed, "--quiet", *(["--resume"] if attempt else []))
        proc = subprocess.Popen(_command(args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        before, deadline = len(_committed(killed)), time.time() + 120
        while len(_committed(killed)) <= before and proc.poll() is None:
            assert time.time() < deadline, "no shard was committed in time"
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        assert proc.wait() in (0, -signal.SIGKILL), proc.stderr.read()[-2000:]
        proc.stderr.close()
        if (killed / "meta.json").exists():
            break
    assert kills >= 1
    _run(_score_args(names[source], checkpoints, killed, "--resume"))
    _assert_same_scores(killed, whole)


def _kill_rank1_after_its_first_shard(argv, out):
    """Runs argv under torchrun with 2 ranks and SIGKILLs rank 1 once it committed a scoring shard of its block
    (the second half of the 20 shards); torchrun then stops the job."""
    launcher = subprocess.Popen(_command(argv, 2), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    try:
        rank1 = rank_pid(launcher.pid, 1)
        deadline = time.time() + 120
        while not any(int(f.split(".")[0]) >= 10 for f in _committed(out, ("shards",))):
            assert launcher.poll() is None, f"the job ended before rank 1 could be killed: {launcher.stderr.read()}"
            assert time.time() < deadline, "rank 1 committed no shard in time"
            time.sleep(0.001)
        os.kill(rank1, signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        launcher.stderr.close()


@pytest.mark.slow  # torchrun with 2 ranks, three times
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the rank to kill through /proc")
def test_two_ranks_also_killed_and_resumed_give_the_single_process_scores(sources, tmp_path):
    names, checkpoints = sources
    whole = tmp_path / "whole"
    _run(_score_args(names["wds"], checkpoints, whole, "--quiet"))
    two = tmp_path / "two"
    assert _run(_score_args(names["wds"], checkpoints, two, "--quiet"), nproc=2).stdout.count("scored 60") == 1
    _assert_same_scores(two, whole)
    killed = tmp_path / "killed"
    _kill_rank1_after_its_first_shard(_score_args(names["wds"], checkpoints, killed, "--quiet"), killed)
    assert not (killed / "meta.json").exists()
    left = {int(f.split(".")[0]) for f in _committed(killed, ("shards",))}
    assert left and not left >= set(range(20))  # rank 1 died with shards of its block still to score
    _run(_score_args(names["wds"], checkpoints, killed, "--resume"), nproc=2)
    _assert_same_scores(killed, whole)


def _keys(name):
    from kdfast.data import load_dataset
    from kdfast.data.keys import example_keys
    return example_keys(load_dataset(name, image_size=8)).to_pylist()


@pytest.mark.slow  # score, prune and distill on two sources
@pytest.mark.parametrize("source", ["wds", "parquet"])
def test_score_prune_distill_trains_the_student_on_exactly_the_kept_keys(sources, tmp_path, monkeypatch, source):
    from kdfast.cli.main import main
    from kdfast.data.keys import example_keys
    from kdfast.distill.teacher_cache import TeacherCache
    import kdfast.training.fit as training
    names, checkpoints = sources
    run = tmp_path / "scores"
    _run(_score_args(names[source], checkpoints[:2], run, "--save-logits", "--quiet"))
    keep = str(tmp_path / "keep.parquet")
    assert main(["prune", "--scores", str(run), "--fraction", "0.5", "--class-balanced", "--out", keep]) == 0
    table = pq.read_table(run / "scores.parquet")
    kept = pq.read_table(keep).column("key").to_pylist()
    # the reference: per class, the half with the highest scores (hard mode keeps the hardest)
    labels, scores = table.column("label").to_numpy(), table.column("score").to_numpy()
    keys = np.array(table.column("key").to_pylist())
    expected = {k for c in range(len(CLASSES)) for k in keys[labels == c][np.argsort(-scores[labels == c],
                                                                                    kind="stable")[:10]]}
    assert set(kept) == expected and len(kept) == 30
    assert [CLASSES[c] for c in labels] == [k.split("%2F")[0] for k in keys]  # the folder's classes, by key

    seen = {}
    real_fit = training.fit

    def recording_fit(model, data, recipe, kd=None, *, subset=None, **kw):
        seen["keys"] = example_keys(data).take(subset.numpy()).to_pylist()
        seen["logits"] = kd.teacher_cache[subset]
        return real_fit(model, data, recipe, kd, subset=subset, **kw)
    monkeypatch.setattr(training, "fit", recording_fit)  # imported by the job when it runs
    student = tmp_path / "student"
    code = main(["distill", "--dataset", names[source], "--model", "mlp", "--image-size", "8", "--epochs", "1",
                 "--keep", keep, "--teacher-cache", str(run / "teacher-logits"), "--no-augment", "--val-fraction", "0",
                 "--quiet", "--num-workers", "0", "--out", str(student)])
    assert code == 0 and (student / "student.pt").is_file()
    assert sorted(seen["keys"]) == sorted(kept)
    # the teacher's logits of each kept example are those the scoring run cached under its key
    cache = TeacherCache.open(str(run / "teacher-logits"))
    rows = torch.tensor([_keys(names[source]).index(k) for k in seen["keys"]])
    torch.testing.assert_close(seen["logits"], cache[rows], rtol=0, atol=0)
    assert json.loads((student / "summary.json").read_text())["num_kept"] == 30


def test_limit_keeps_the_per_shard_path_with_the_last_shard_cut(sources, tmp_path, capsys):
    from kdfast.cli.main import main
    names, checkpoints = sources
    out = tmp_path / "limited"
    argv = _score_args(names["wds"], checkpoints, out, "--limit", "7", "--quiet")
    assert main(["score", *argv]) == 0
    whole = tmp_path / "whole"
    assert main(["score", *_score_args(names["wds"], checkpoints, whole, "--quiet")]) == 0
    # the first 7 examples' scores are those of the whole run (batches of 1), found by key
    limited, full = pq.read_table(out / "scores.parquet"), pq.read_table(whole / "scores.parquet")
    assert limited.column("key").to_pylist() == _keys(names["wds"])[:7]
    assert limited.equals(full.slice(0, 7))
    # the shards recorded: 0 and 1 whole, 2 cut after its first example and marked as cut
    shards = json.loads((out / "meta.json").read_text())["data"]["shards"]
    assert [r[1:2] + r[4:] for r in shards] == [[3], [3], [1, 3]]


@pytest.mark.slow  # score, prune, distill
def test_a_keep_list_of_a_limited_run_serves_the_whole_source(sources, tmp_path, capsys):
    from kdfast.cli.main import main
    names, checkpoints = sources
    run, keep = tmp_path / "limited", str(tmp_path / "keep.parquet")
    assert main(["score", *_score_args(names["wds"], checkpoints, run, "--limit", "8", "--quiet")]) == 0
    # --dataset: --class-balanced reloads the limited source (its cut shards), checked against the run's record
    assert main(["prune", "--scores", str(run), "--fraction", "0.5", "--class-balanced", "--dataset", names["wds"],
                 "--out", keep]) == 0
    kept = pq.read_table(keep).column("key").to_pylist()
    assert len(kept) == 4 and set(kept) < set(_keys(names["wds"])[:8])
    # the keep list records shard 2 cut after 2 of its 3 examples: the whole shard is the same file
    code = main(["distill", "--dataset", names["wds"], "--model", "mlp", "--image-size", "8", "--epochs", "1",
                 "--keep", keep, "--alpha", "0", "--val-fraction", "0", "--quiet", "--num-workers", "0",
                 "--out", str(tmp_path / "student")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "student" / "summary.json").read_text())["num_kept"] == 4


def test_class_balanced_prune_takes_the_labels_from_scores_parquet(sources, tmp_path, capsys):
    """Shards scored with a source option (--label-column) and moved since: no reload, the folder's labels."""
    import pyarrow.parquet
    from kdfast.cli.main import main
    names, checkpoints = sources
    os.makedirs(tmp_path / "pqy")
    for path in sorted((tmp_path / "pq").glob("shard-*.parquet")):
        table = pq.read_table(path)
        pq.write_table(table.rename_columns(["y" if c == "label" else c for c in table.column_names]),
                       tmp_path / "pqy" / path.name)
    run, keep = tmp_path / "run", str(tmp_path / "keep.parquet")
    argv = _score_args(f"parquet:{tmp_path}/pqy/shard-*.parquet", checkpoints, run, "--label-column", "y", "--quiet")
    assert main(["score", *argv]) == 0
    os.rename(tmp_path / "pqy", tmp_path / "moved")
    assert main(["prune", "--scores", str(run), "--fraction", "0.5", "--class-balanced", "--out", keep]) == 0, \
        capsys.readouterr().err
    table = pq.read_table(run / "scores.parquet")
    assert [CLASSES[c] for c in table.column("label").to_numpy()] == \
        [k.split("%2F")[0] for k in table.column("key").to_pylist()]
    kept = set(pq.read_table(keep).column("key").to_pylist())
    assert [sum(k.startswith(c) for k in kept) for c in CLASSES] == [10, 10, 10]
    # labels that are not those the scores were computed on are refused, naming where they came from
    pyarrow.parquet.write_table(table.set_column(1, "label", pyarrow.array(np.zeros(60, np.int64))),
                                run / "scores.parquet")
    capsys.readouterr()
    assert main(["prune", "--scores", str(run), "--fraction", "0.5", "--class-balanced", "--out", keep]) == 1
    err = capsys.readouterr().err
    assert f"check {run / 'scores.parquet'}" in err and len(err.strip().splitlines()) == 1, err


def test_limit_stores_cut_shards_apart_from_whole_ones(sources, tmp_path):
    from kdfast.data import LabeledSubset, load_dataset
    from kdfast.data.keys import example_keys
    from kdfast.io.errors import JobMismatchError
    from kdfast.io.shards import ShardStore
    names, _ = sources
    data = load_dataset(names["parquet"], image_size=8)
    head = LabeledSubset(data, range(7))
    assert [(s.start, s.stop, s.whole) for s in head.shards] == [(0, 3, None), (3, 6, None), (6, 7, 3)]
    assert [s.name for s in head.shards] == [s.name for s in data.shards[:3]]
    ShardStore(str(tmp_path / "s"), shards=head.shards, width=1, keys=example_keys(head), labels=head.targets)
    whole = LabeledSubset(data, range(9))  # the same three shards, the third whole
    assert whole.shards == data.shards[:3]
    with pytest.raises(JobMismatchError, match="changed: shard 2"):
        ShardStore(str(tmp_path / "s"), shards=whole.shards, width=1, keys=example_keys(whole),
                   labels=whole.targets)
    shuffled = LabeledSubset(data, [5, 0, 1])  # not a prefix: it records the parent's shards
    assert shuffled.shards == data.shards


def test_summary_names_the_hardest_examples_by_key(sources, tmp_path, capsys):
    from kdfast.cli.main import main
    names, checkpoints = sources
    out = tmp_path / "run"
    assert main(["score", *_score_args(names["parquet"], checkpoints, out, "--quiet", "--top", "3")]) == 0
    printed = capsys.readouterr().out.splitlines()
    table = pq.read_table(out / "scores.parquet")
    scores, keys = table.column("score").to_numpy(), table.column("key").to_pylist()
    hardest = np.argsort(-scores, kind="stable")[:3]
    at = printed.index("hardest 3 examples:")
    assert printed[at + 1].split() == ["rank", "index", "label", "score", "key"]
    for rank, i in enumerate(hardest, 1):
        row = printed[at + 1 + rank].split()
        assert row[0] == str(rank) and row[1] == str(i) and row[-1] == keys[i]
