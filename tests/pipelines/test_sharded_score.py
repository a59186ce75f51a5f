"""kdfast-score on a sharded, keyed source (the job's Python entry points on an in-memory fake source): the shard
is the unit of work and of commit; a run SIGKILLed at random moments and resumed, and a 2-rank torchrun run,
give bitwise the scores.parquet of one uninterrupted process."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

from _fake_datasets import keyed_digits
from kdfast.data import LabeledSubset
from kdfast.models import create_model

pq = pytest.importorskip("pyarrow.parquet")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# one OpenMP thread everywhere (torchrun sets it per rank): every reduction runs in the same order
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])}

# the job as kdfast.cli.score runs it, on the fake keyed source: argv = OUT DELAY [kdfast-score options]
SCRIPT = '''
import sys
from _fake_datasets import keyed_digits
from kdfast.cli.main import _command_parser
from kdfast.cli.score import _resolve
from kdfast.pipelines.score import finish_score_job, run_score_job, start_score_job
from kdfast.runtime import distributed

out, delay, *options = sys.argv[1:]
args = _command_parser("score", "kdfast-score")().parse_args(["--out", out, *options])
_resolve(args)
data = keyed_digits(delay=float(delay))
with distributed.process_group_for(args.device) as device:
    args.device = str(device)
    args.quiet = args.quiet or not distributed.is_main()
    job = start_score_job(args, data)
    with job:
        result = run_score_job(args, job, data, data)
        if result is not None:
            finish_score_job(job, result)
'''


def _checkpoints(tmp_path):
    paths = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        model = create_model("mlp", num_classes=10, in_channels=1, image_size=8)
        paths.append(str(tmp_path / f"m{seed}.pt"))
        torch.save({"model": model.state_dict()}, paths[-1])
    return paths


def _options(tmp_path, *more):
    options = ["--model", "mlp", "--batch-size", "4", "--method", "el2n", *more]
    for path in _checkpoints(tmp_path):
        options += ["--checkpoint", path]
    return options


def _script(tmp_path):
    path = tmp_path / "score_keyed.py"
    path.write_text(SCRIPT)
    return str(path)


def _run(tmp_path, out, options, delay=0.0, launcher=(sys.executable,)):
    done = subprocess.run([*launcher, _script(tmp_path), str(out), str(delay), *options], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _table(folder):
    return pq.read_table(folder / "scores.parquet")


def _reference(tmp_path, options):
    """An uninterrupted single-process run, checked against scores computed here batch by batch within shards."""
    out = tmp_path / "whole"
    _run(tmp_path, out, options)
    return out


def test_killed_at_random_moments_then_resumed_gives_the_uninterrupted_scores(tmp_path):
    options = _options(tmp_path)
    whole = _reference(tmp_path, [*options, "--quiet"])
    killed = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(3):  # three runs, each SIGKILLed at a random moment of its passes over the shards
        flags = [*options] + (["--resume"] if attempt else [])
        proc = subprocess.Popen([sys.executable, _script(tmp_path), str(killed), "0.004", *flags], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not any(os.path.isdir(killed / d) and any(f.endswith(".npz") for f in os.listdir(killed / d))
                      for d in ("accuracy-shards", "shards")):
            assert proc.poll() is None, f"the run ended before it wrote a shard: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "no shard was committed in time"
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if (killed / "meta.json").exists():
            break
    assert kills >= 1
    committed = len([f for f in os.listdir(killed / "shards") if f.endswith(".npz")]) \
        if os.path.isdir(killed / "shards") else 0
    done = _run(tmp_path, killed, [*options, "--resume"])
    if committed:  # the committed shards are skipped, the rest scored
        assert "resuming:" in done.stderr
    assert _table(killed).equals(_table(whole))
    np.testing.assert_array_equal(np.load(killed / "scores.npy"), np.load(whole / "scores.npy"))
    assert not (killed / "shards").exists() and not (killed / "accuracy-shards").exists()


def test_scores_parquet_of_a_keyed_source_matches_a_reference(tmp_path):
    options = _options(tmp_path)
    whole = _reference(tmp_path, [*options, "--quiet"])
    data = keyed_digits()
    table = _table(whole)
    assert table.column_names == ["key", "label", "score", "score_model0", "score_model1"]
    assert table.column("key").to_pylist() == list(data.keys)
    assert table.column("label").to_pylist() == data.targets.tolist()
    # the reference: EL2N (|softmax - onehot|_2) of each model, batch by batch within each shard
    for k, path in enumerate(_checkpoints(tmp_path)):
        model = create_model("mlp", num_classes=10, in_channels=1, image_size=8).double()
        model.load_state_dict({n: v.double() for n, v in torch.load(path)["model"].items()})
        with torch.no_grad():
            p = model(data.x.double()).softmax(-1)
        expected = (p - torch.nn.functional.one_hot(data.targets, 10)).norm(dim=-1).numpy()
        np.testing.assert_allclose(table.column(f"score_model{k}").to_numpy(), expected, rtol=1e-5, atol=1e-6)
    mean = np.mean([table.column(f"score_model{k}").to_numpy() for k in range(2)], axis=0, dtype=np.float32)
    np.testing.assert_array_equal(table.column("score").to_numpy(), np.load(whole / "scores.npy"))
    np.testing.assert_allclose(table.column("score").to_numpy(), mean, rtol=1e-6)
    meta = __import__("json").loads((whole / "meta.json").read_text())
    assert "scores.parquet" in meta["files"] and meta["keyed"] is True


@pytest.mark.slow  # torchrun with 2 ranks
def test_two_ranks_score_disjoint_shards_to_the_single_process_scores(tmp_path):
    options = [*_options(tmp_path), "--quiet"]
    whole = _reference(tmp_path, options)
    out = tmp_path / "ddp"
    _run(tmp_path, out, options, launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                                           "--nproc-per-node", "2"))
    assert _table(out).equals(_table(whole))
    np.testing.assert_array_equal(np.load(out / "scores_per_model.npy"), np.load(whole / "scores_per_model.npy"))


def _fake_job(tmp_path):
    return types.SimpleNamespace(path=lambda name: str(tmp_path / name))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_batches_stay_inside_shards_and_ranks_take_disjoint_shards(tmp_path, monkeypatch, world):
    from kdfast.pipelines import score as pipeline
    from kdfast.runtime import distributed
    data = keyed_digits()
    cfg = types.SimpleNamespace(batch_size=8, chunk_size=8192)
    bounds = [(s.start, s.stop) for s in data.shards]
    seen = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        _, mine, todo = pipeline._open_pass(cfg, _fake_job(tmp_path), data, 2, "")
        assert todo == mine
        for batch in mine:
            assert any(a <= batch[0] and batch[-1] < b for a, b in bounds)  # never across a shard boundary
            assert len(batch) <= 8
        seen += [i for b in mine for i in b]
    assert seen == list(range(len(data)))  # disjoint, complete, in shard order


def test_a_reordered_subset_is_scored_through_the_chunk_store(tmp_path):
    # it records its parent's shards, which do not describe its own indices
    from kdfast.io.chunks import ChunkStore
    from kdfast.pipelines import score as pipeline
    data = LabeledSubset(keyed_digits(), [5, 99, 0])
    store, mine, todo = pipeline._open_pass(types.SimpleNamespace(batch_size=2, chunk_size=8), _fake_job(tmp_path),
                                            data, 1, "")
    assert isinstance(store, ChunkStore) and [i for b in mine for i in b] == [0, 1, 2] and todo == mine


def test_saved_logits_of_a_keyed_source_carry_its_keys(tmp_path):
    from kdfast.distill.teacher_cache import TeacherCache
    path = _checkpoints(tmp_path)[0]
    _run(tmp_path, tmp_path / "run", ["--model", "mlp", "--batch-size", "8", "--checkpoint", path, "--save-logits",
                                      "--quiet"])
    data = keyed_digits()
    assert pq.read_table(tmp_path / "run" / "teacher-logits" / "keys.parquet").column("key").to_pylist() == list(data.keys)
    model = create_model("mlp", num_classes=10, in_channels=1, image_size=8)
    model.load_state_dict(torch.load(path)["model"])
    with torch.no_grad():
        expected = model(data.x)
    cache = TeacherCache.open(tmp_path / "run" / "teacher-logits")
    torch.testing.assert_close(cache[torch.arange(len(data))], expected, rtol=2e-3, atol=2e-3)  # stored as fp16
    shuffled = LabeledSubset(data, [5, 99, 0])
    torch.testing.assert_close(cache.for_dataset(shuffled)[torch.arange(3)], expected[[5, 99, 0]], rtol=2e-3,
                               atol=2e-3)
