"""Multi-process runs under torchrun (2 gloo ranks on the CPU): shards; kdfast-score (chunked and liprune)
equal to one process, also after one rank is SIGKILLed and the job resumed; kdfast-distill with
DistributedDataParallel against a float64 oracle, writing once, resuming."""
from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from _processes import rank_pid
from kdfast.runtime import distributed
from kdfast.cli.main import score_main
from kdfast.errors import InvalidArgumentError
from kdfast.models import create_model, file_sha256
from kdfast.distill.teacher_cache import TeacherCache

# torchrun itself sets one OpenMP thread per rank; the single-process references use one too, so every
# reduction runs in the same order and the comparisons can be exact
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(module, argv, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", f"kdfast.cli.{module}", *argv]


def _run_torchrun(module, argv, nproc=2):
    done = subprocess.run(_torchrun(module, argv, nproc), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _single_process(main, argv, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(argv)
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


# ------------------------------------------------------------------------------------------------- shards
@pytest.mark.parametrize("world", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("n", [0, 1, 5, 7, 100, 1397])
def test_shards_tile_the_range_in_rank_order(n, world):
    shards = [distributed.shard_indices(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))  # nothing duplicated, dropped or reordered
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert shards == [distributed.shard_indices(n, r, world) for r in range(world)]  # deterministic


@pytest.mark.parametrize("n, rank, world, message", [
    (-1, 0, 1, "n must be >= 0, got -1"), (4, 0, 0, "world must be >= 1, got 0"),
    (4, 2, 2, r"rank must lie in \[0, world=2\), got 2"), (4, -1, 2, "got -1"),
    (4.0, 0, 1, "n must be an integer, got 4.0"), (4, True, 2, "rank must be an integer, got True")])
def test_bad_shard_arguments_are_named(n, rank, world, message):
    with pytest.raises(InvalidArgumentError, match=message):
        distributed.shard_indices(n, rank, world)


def test_without_torchrun_nothing_is_initialised(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_from_env("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")  # a 1-process torchrun job runs the plain code path
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.init_from_env("cpu") == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    distributed.barrier()
    with distributed.process_group_for("cpu") as device:
        assert device == torch.device("cpu") and not torch.distributed.is_initialized()


@pytest.mark.parametrize("env, message", [({"WORLD_SIZE": "two"}, "WORLD_SIZE must be an integer, got 'two'"),
                                          ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK=2")])
def test_a_broken_torchrun_environment_is_named(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InvalidArgumentError, match=message):
        distributed.init_from_env("cpu")


# ------------------------------------------------------------------------------------------ kdfast-score
def test_two_ranks_write_the_teacher_logits_of_one_process(tmp_path, capsys):
    # rank 0 trains the model, rank 1 loads it after the barrier; 7 batches of 32: rank 0 scores 4, rank 1 3
    common = ["--model", "mlp", "--limit", "200", "--train-epochs", "1", "--seeds", "1", "--batch-size", "32",
              "--chunk-size", "32", "--method", "grand", "--save-logits", "--quiet"]
    done = _run_torchrun("score", [*common, "--out", str(tmp_path / "two")])
    assert done.stdout.count("scored 200 examples") == 1  # one rank reports
    _single_process(score_main, [*common, "--out", str(tmp_path / "one")], capsys)
    np.testing.assert_array_equal(np.load(tmp_path / "two" / "scores.npy"), np.load(tmp_path / "one" / "scores.npy"))
    for name in ("logits.npy", "written.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "two" / "teacher-logits" / name),
                                      np.load(tmp_path / "one" / "teacher-logits" / name))
    assert len(TeacherCache.open(str(tmp_path / "two" / "teacher-logits"))) == 200  # closed, every row written
    assert not (tmp_path / "two" / "chunks").exists()


def test_liprune_models_split_across_ranks_equal_one_process(tmp_path, capsys):
    for seed in (3, 4):  # model k is scored by rank k % 2, whole fixed batches as in one process
        torch.manual_seed(seed)
        torch.save({"model": create_model("mlp", num_classes=10, in_channels=1).state_dict()}, tmp_path / f"{seed}.pt")
    common = ["--model", "mlp", "--checkpoint", str(tmp_path / "3.pt"), "--checkpoint", str(tmp_path / "4.pt"),
              "--method", "liprune", "--limit", "64", "--batch-size", "32", "--quiet"]
    _run_torchrun("score", [*common, "--out", str(tmp_path / "two")])
    _single_process(score_main, [*common, "--out", str(tmp_path / "one")], capsys)
    for name in ("scores.npy", "scores_per_model.npy", "batch_ids.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "two" / name), np.load(tmp_path / "one" / name))


def test_save_logits_across_nodes_is_refused(tmp_path, capsys, monkeypatch):
    for name, value in (("WORLD_SIZE", "4"), ("LOCAL_WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    code = score_main(["--save-logits", "--seeds", "1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--save-logits writes one memory-mapped file" in err and "--nnodes 1" in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # torchrun with 2 ranks, several epochs
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker to kill through /proc")
def test_a_rank_killed_mid_run_resumes_to_the_single_process_output(tmp_path, capsys):
    # seed 0 is trained by rank 0, seed 1 by rank 1; 60 scoring batches of 8, a chunk after each: rank 1 owns
    # batches 30..59 and is killed after its first chunk
    common = ["--model", "mlp", "--limit", "480", "--train-epochs", "1", "--seeds", "2", "--batch-size", "8",
              "--chunk-size", "8", "--method", "el2n", "--quiet"]
    killed = tmp_path / "killed"
    launcher = subprocess.Popen(_torchrun("score", [*common, "--out", str(killed)]), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        rank1 = rank_pid(launcher.pid, 1)
        deadline = time.time() + 120
        while not (os.path.isdir(killed / "chunks") and any(f.startswith("rank00001-") and f.endswith(".npz")
                                                            for f in os.listdir(killed / "chunks"))):
            assert launcher.poll() is None, f"the job ended before rank 1 could be killed: {launcher.stderr.read()}"
            assert time.time() < deadline, "rank 1 wrote no chunk in time"
            time.sleep(0.001)
        os.kill(rank1, signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0  # torchrun stops the job when a rank dies
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert not (killed / "meta.json").exists()
    rank1_rows = sum(len(np.load(killed / "chunks" / f)["indices"]) for f in os.listdir(killed / "chunks")
                     if f.startswith("rank00001-") and f.endswith(".npz"))
    assert 8 <= rank1_rows < 240  # rank 1 died mid-shard
    done = _run_torchrun("score", [*common, "--out", str(killed), "--resume"])
    assert done.stdout.count("scored 480 examples") == 1  # one rank reports
    _single_process(score_main, [*common, "--out", str(tmp_path / "whole")], capsys)
    for name in ("scores.npy", "scores_per_model.npy"):
        np.testing.assert_array_equal(np.load(killed / name), np.load(tmp_path / "whole" / name))
    for seed in (0, 1):
        name = f"models/seed{seed}.pt"
        assert file_sha256(killed / name) == file_sha256(tmp_path / "whole" / name)
    assert not (killed / "chunks").exists()


# ---------------------------------------------------------------------------------------- kdfast-distill
def _metrics(folder):
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # torchrun with 2 ranks, several epochs
def test_two_rank_distillation_writes_once_and_resumes(tmp_path):
    np.save(tmp_path / "keep.npy", np.arange(0, 1397, 2))
    common = ["--train-teacher", "--teacher-epochs", "1", "--model", "mlp", "--keep", str(tmp_path / "keep.npy"),
              "--batch-size", "16", "--quiet"]
    out = tmp_path / "ddp"
    done = _run_torchrun("distill", [*common, "--epochs", "1", "--out", str(out)])
    assert done.stdout.count("mlp student") == 1  # rank 0 alone reports and writes
    assert sorted(os.listdir(out)) == ["accuracy.png", "checkpoint.pt", "job.json", "job.lock", "metrics.csv",
                                       "student.pt", "summary.json", "teacher"]
    assert sorted(os.listdir(out / "teacher")) == ["accuracy.png", "checkpoint.pt", "history.json", "metrics.csv",
                                                   "teacher.pt"]
    _check_teacher_against_a_float64_oracle(out / "teacher" / "teacher.pt")
    first = _metrics(out)
    assert [row["epoch"] for row in first] == ["1"] and float(first[0]["eval_acc"]) > 0.1
    # resuming with another schedule is another job: refused on rank 0, naming the field; nothing changes
    refused = subprocess.run(_torchrun("distill", [*common, "--epochs", "2", "--out", str(out), "--resume"]),
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--epochs: 1 in the run, 2 now" in refused.stderr
    assert _metrics(out) == first


def _kill_job(launcher) -> None:
    """SIGKILL a torchrun job as a node failure would: the launcher and every process below it. (torchrun starts
    each rank in a session of its own, so killing the launcher's process group leaves the ranks running on,
    writing into the run folder while the resumed job starts.)"""
    os.kill(launcher.pid, signal.SIGSTOP)  # no rank (re)started while the tree is listed
    victims = [launcher.pid] + _descendants(launcher.pid)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    launcher.wait(timeout=60)
    deadline = time.time() + 60
    while any(_alive(pid) for pid in victims[1:]):
        assert time.time() < deadline, "the killed job's ranks did not exit"
        time.sleep(0.01)


def _descendants(pid: int) -> list[int]:
    """pid's child processes, recursively (Linux /proc)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/children") as f:
            for child in map(int, f.read().split()):
                found += [child, *_descendants(child)]
    return found


def _alive(pid: int) -> bool:
    """Running or not yet reaped by its new parent, but not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow  # torchrun with 2 ranks, several epochs
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the job's processes in /proc")
def test_two_rank_distillation_killed_mid_run_resumes_after_its_last_epoch(tmp_path):
    np.save(tmp_path / "keep.npy", np.arange(0, 1397, 2))
    argv = ["--alpha", "0", "--model", "mlp", "--keep", str(tmp_path / "keep.npy"), "--batch-size", "16",
            "--epochs", "20", "--quiet", "--out", str(tmp_path / "ddp")]
    launcher = subprocess.Popen(_torchrun("distill", argv), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "ddp" / "metrics.csv").exists():  # written after epoch 1's checkpoint
            assert launcher.poll() is None, f"the job ended before it could be killed: {launcher.stderr.read()}"
            assert time.time() < deadline, "no epoch finished in time"
            time.sleep(0.005)
        assert len(_descendants(launcher.pid)) == 2, "expected the launcher's two rank processes"
        _kill_job(launcher)
    finally:
        if launcher.poll() is None:
            _kill_job(launcher)
    before = _metrics(tmp_path / "ddp")
    assert 1 <= len(before) < 20 and not (tmp_path / "ddp" / "summary.json").exists()
    _run_torchrun("distill", [*argv, "--resume"])
    rows = _metrics(tmp_path / "ddp")
    assert [int(r["epoch"]) for r in rows] == list(range(1, 21)) and rows[:len(before)] == before
    assert torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["epoch"] == 20


def _check_teacher_against_a_float64_oracle(path, world=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4):
    """The DDP teacher (1 epoch, seed 1, digits recipe) against float64 SGD on the average of the ranks' mean
    cross-entropy gradients, each rank's batches drawn from its DistributedSampler share."""
    from torch.utils.data.distributed import DistributedSampler

    from kdfast.pipelines.distill import build_model as _build
    from kdfast.data import load_dataset
    data = load_dataset("digits", split="train", augment=False)
    torch.manual_seed(1)
    oracle = _build("mlp", "digits", data.num_classes, None).double()
    optimizer = torch.optim.SGD(oracle.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    shares = [list(DistributedSampler(range(len(data)), num_replicas=world, rank=r, shuffle=True, seed=1))
              for r in range(world)]
    for step in range(0, len(shares[0]), batch_size):
        optimizer.zero_grad()
        for share in shares:
            x, y = zip(*(data[i] for i in share[step:step + batch_size]))
            loss = torch.nn.functional.cross_entropy(oracle(torch.stack(x).double()), torch.as_tensor(y))
            (loss / world).backward()
        optimizer.step()
    trained = torch.load(path, weights_only=True)
    for name, expected in oracle.state_dict().items():
        err = (trained[name].double() - expected).abs().max().item()
        rel = err / expected.abs().max().item()
        assert rel < 1e-5, f"{name}: max abs error {err:.3g}, relative {rel:.3g} against the float64 oracle"
