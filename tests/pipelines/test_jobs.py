"""The job layer (kdfast/jobs): job records and identity checks, atomic writes, the resumable chunk store,
kdfast.score(out=, resume=), and the data identity helpers it relies on."""
from __future__ import annotations

import dataclasses

import json
import os

import numpy as np
import pytest
import torch

import kdfast
from kdfast.data import (DataIdentityError, LabeledDataset, LabeledSubset, check_identity, data_identity,
                         describe_file_mismatch, load_dataset, stratified_split)
from kdfast.errors import KDFastError
from kdfast.io import (ChunkStore, IncompleteStoreError, Job, JobError, JobExistsError, JobLockedError,
                         JobMismatchError, atomic_write, save_npy, write_json)
from kdfast.models import create_model
from kdfast.training.recipe import TrainRecipe


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# ------------------------------------------------------------------------------------------------ jobs
def test_a_job_records_its_identity_before_work_and_resumes_only_the_same_job(tmp_path):
    out = tmp_path / "run"
    Job.start(out, "score", {"lr": 0.1, "epochs": 3, "device": "cpu", "quiet": True}, data={"n": 5})
    record = json.loads((out / "job.json").read_text())
    assert record["status"] == "running" and record["identity"]["lr"] == 0.1 and record["identity"]["data"] == {"n": 5}
    assert "device" not in record["identity"] and "quiet" not in record["identity"]  # where/how, not what
    assert record["identity"]["kdfast_version"] == kdfast.__version__
    (out / "work.npy").write_bytes(b"x")  # some work product
    # where it runs may change; what it computes may not
    again = Job.start(out, "score", {"lr": 0.1, "epochs": 3, "device": "cuda", "quiet": False}, data={"n": 5},
                      resume=True)
    assert not again.finished
    with pytest.raises(JobMismatchError) as info:
        Job.start(out, "score", {"lr": 0.2, "epochs": 3, "new_flag": 1}, data={"n": 6}, resume=True,
                  label=lambda f: "--" + f)
    message = str(info.value)
    assert "--lr: 0.1 in the run, 0.2 now" in message and "--new_flag: None in the run, 1 now" in message
    assert "data.n: 5 in the run, 6 now" in message
    assert {f for f, _, _ in info.value.differences} == {"lr", "new_flag", "data.n"}
    with pytest.raises(JobExistsError, match="already holds a score run"):
        Job.start(out, "score", {"lr": 0.1, "epochs": 3}, data={"n": 5})
    with pytest.raises(JobMismatchError, match="not a 'distill' run"):
        Job.start(out, "distill", {"lr": 0.1, "epochs": 3}, data={"n": 5}, resume=True)
    fresh = Job.start(out, "score", {"lr": 0.2}, overwrite=True)
    assert not (out / "work.npy").exists() and fresh.record["identity"]["lr"] == 0.2
    fresh.complete()
    assert Job.start(out, "score", {"lr": 0.2}, resume=True).finished is False  # no work product: a fresh start


def test_a_failed_start_leaves_nothing_behind(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), Job.start(out, "score", {"a": 1}):
        raise RuntimeError("bad checkpoint")
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError), Job.start(existing, "score", {"a": 1}, files=["x.png"]):
        raise RuntimeError("bad checkpoint")
    assert existing.exists() and not list(existing.iterdir())
    # a record without any work (a start killed early) never blocks another job
    Job.start(existing, "score", {"a": 1})
    assert Job.start(existing, "score", {"a": 2}).record["identity"]["a"] == 2
    # once work exists, a failure keeps everything for --resume
    with pytest.raises(RuntimeError), Job.start(existing, "score", {"a": 2}, overwrite=True) as job:
        save_npy(job.path("part.npy"), np.zeros(3))
        raise RuntimeError("killed")
    assert (existing / "part.npy").exists() and (existing / "job.json").exists()


def test_foreign_and_legacy_folders_are_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.txt").write_text("mine")
    with pytest.raises(JobError, match="holds no kdfast run"):
        Job.start(tmp_path / "photos", "score", {}, overwrite=True)
    assert (tmp_path / "photos" / "a.txt").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    with pytest.raises(JobExistsError, match="without a job record"):
        Job.start(tmp_path / "old", "score", {}, resume=True)
    Job.start(tmp_path / "old", "score", {}, overwrite=True)
    with pytest.raises(JobError, match="resume or overwrite, not both"):
        Job.start(tmp_path / "x", "score", {}, resume=True, overwrite=True)


def test_mismatched_files_are_listed_on_resume(tmp_path):
    out = tmp_path / "run"
    identity = {"files_fingerprint": "a"}
    Job.start(out, "score", {}, data=identity, files=["cat/a.png", "cat/b.png", "dog/c.png"])
    (out / "scores.npy").write_bytes(b"x")
    with pytest.raises(JobMismatchError, match="1 files gone: cat/b.png; 1 new: cat/bb.png"):
        Job.start(out, "score", {}, data={"files_fingerprint": "b"}, files=["cat/a.png", "cat/bb.png", "dog/c.png"],
                  resume=True)


# ---------------------------------------------------------------------------------------- atomic writes
def test_atomic_writes_leave_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "meta.json"
    write_json(path, {"a": 1})

    def half(fh):
        fh.write("{\"a\": ")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half, mode="w")
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["meta.json"]
    save_npy(tmp_path / "x.npy", np.arange(3))  # no .npy appended to the temporary name, no leftovers
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "x.npy"] and np.load(tmp_path / "x.npy").tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------- chunk store
def test_chunk_store_merges_ranks_by_index_and_resumes_with_typed_errors(tmp_path):
    job = {"method": "el2n"}
    ranks = [ChunkStore(tmp_path / "c", num_rows=10, width=2, job=job, rank=r, rows_per_chunk=2, resume=r > 0)
             for r in range(2)]
    values = np.random.default_rng(0).random((10, 2), dtype=np.float32)
    for r, store in enumerate(ranks):  # rank r owns rows r, r + 2, ... (a distributed sampler's split)
        rows = np.arange(r, 10, 2)
        for part in np.array_split(rows, 3):
            store.write(part, values[part])
    (tmp_path / "c" / "rank00001-00000009.npz.tmp123").write_bytes(b"half a chunk")  # a kill mid-write
    ranks[0].close()
    with pytest.raises(IncompleteStoreError, match="rows were never written"):
        ChunkStore(tmp_path / "c", num_rows=10, width=2, job=job, resume=True).gather()
    ranks[1].close()
    again = ChunkStore(tmp_path / "c", num_rows=10, width=2, job=job, resume=True, rank=1)
    assert again.done_mask().all() and not list((tmp_path / "c").glob("rank00001-*.tmp*"))
    np.testing.assert_array_equal(again.gather(), values)
    with pytest.raises(JobExistsError, match="resume"):
        ChunkStore(tmp_path / "c", num_rows=10, width=2, job=job)
    with pytest.raises(JobMismatchError, match="num_rows: 10 recorded, 11 now"):
        ChunkStore(tmp_path / "c", num_rows=11, width=2, job=job, resume=True)
    assert issubclass(JobMismatchError, KDFastError) and issubclass(IncompleteStoreError, KDFastError)


# ------------------------------------------------------------------------------- score(out=, resume=)
class _Interrupt(Exception):
    pass


def test_library_score_resumes_a_killed_job_and_refuses_another(tmp_path, digits, monkeypatch):
    torch.manual_seed(0)
    model = create_model("cnn", num_classes=10, in_channels=1)
    data = LabeledSubset(digits, range(300))
    whole = kdfast.score(model, data, "el2n", batch_size=32, progress=False)
    import kdfast.scoring.api as scoring  # the module whose score() looks it up
    real, calls = scoring.score_batches, []

    def dying(*args, **kw):  # dies after 4 batches, as a killed process would
        for item in real(*args, **kw):
            calls.append(1)
            if len(calls) > 4:
                raise _Interrupt
            yield item
    monkeypatch.setattr(scoring, "score_batches", dying)
    with pytest.raises(_Interrupt):
        kdfast.score(model, data, "el2n", batch_size=32, progress=False, out=tmp_path / "s", chunk_size=32)
    monkeypatch.setattr(scoring, "score_batches", real)
    assert len(os.listdir(tmp_path / "s" / "chunks")) >= 4 and not (tmp_path / "s" / "scores.npy").exists()
    with pytest.raises(JobExistsError):
        kdfast.score(model, data, "el2n", batch_size=32, progress=False, out=tmp_path / "s")
    with pytest.raises(JobMismatchError, match="batch_size: 32 in the run, 64 now"):
        kdfast.score(model, data, "el2n", batch_size=64, progress=False, out=tmp_path / "s", resume=True)
    other = create_model("cnn", num_classes=10, in_channels=1)
    with pytest.raises(JobMismatchError, match="models"):
        kdfast.score(other, data, "el2n", batch_size=32, progress=False, out=tmp_path / "s", resume=True)
    with pytest.raises(JobMismatchError, match="data.labels_fingerprint"):
        kdfast.score(model, LabeledSubset(digits, range(1, 301)), "el2n", batch_size=32, progress=False,
                     out=tmp_path / "s", resume=True)
    resumed, per_model = kdfast.score(model, data, "el2n", batch_size=32, progress=False, out=tmp_path / "s",
                                      resume=True, return_per_model=True)
    torch.testing.assert_close(resumed, whole, rtol=0, atol=0)
    assert per_model.shape == (1, 300) and not (tmp_path / "s" / "chunks").exists()
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "scores.npy"), whole.numpy())
    again = kdfast.score(model, data, "el2n", batch_size=32, progress=False, out=tmp_path / "s", resume=True)
    torch.testing.assert_close(again, whole, rtol=0, atol=0)  # a finished job returns its result


# -------------------------------------------------------------------------------------- data identity
def test_stratified_split_holds_out_each_class_in_proportion_and_is_seeded(digits):
    train, held = stratified_split(digits.targets, 0.2, seed=3)
    assert sorted(torch.cat([train, held]).tolist()) == list(range(len(digits)))
    counts, held_counts = np.bincount(digits.targets.numpy()), np.bincount(digits.targets[held].numpy())
    np.testing.assert_array_equal(held_counts, np.round(0.2 * counts).astype(int))
    assert torch.equal(held, stratified_split(digits.targets, 0.2, seed=3)[1])
    assert not torch.equal(held, stratified_split(digits.targets, 0.2, seed=4)[1])
    assert stratified_split(torch.tensor([0, 0, 1, 1, 1, 2]), 0.01)[1].tolist().__len__() == 2  # >= 1 per class
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        stratified_split(digits.targets, 1.0)


def test_file_fingerprint_sees_renames_and_replaced_files(tmp_path):
    from _fake_datasets import write_image_folder
    write_image_folder(tmp_path / "f")
    data = load_dataset("folder", root=tmp_path / "f", image_size=8)
    identity = data_identity(data)
    assert identity["files_fingerprint"] and identity["num_examples"] == 9
    check_identity(identity, load_dataset("folder", root=tmp_path / "f", image_size=8), what="scores")
    (tmp_path / "f" / "dog" / "img1.png").write_bytes((tmp_path / "f" / "dog" / "img1.png").read_bytes() + b"\0")
    with pytest.raises(DataIdentityError, match="1 files replaced or modified .*: dog/img1.png"):
        check_identity(identity, load_dataset("folder", root=tmp_path / "f", image_size=8), what="scores",
                       recorded_files=data.files)
    assert describe_file_mismatch(["a", "b"], ["b", "a"]) == "2 files at other positions: index 0: a then, b now, " \
                                                             "index 1: b then, a now"
    sub = LabeledSubset(data, [1, 4])
    assert sub.files == [data.files[1], data.files[4]] and sub.targets.tolist() == [0, 1] and sub.folder == data.folder
    torch.testing.assert_close(sub.load(1), data.load(4))


def test_image_folders_count_the_files_they_skip(tmp_path):
    from _fake_datasets import write_image_folder
    write_image_folder(tmp_path / "f")
    (tmp_path / "f" / "cat" / "notes.txt").write_text("x")
    (tmp_path / "f" / "dog" / ".DS_Store").write_text("x")
    data = load_dataset("folder", root=tmp_path / "f", image_size=8)
    assert data.skipped_files == [os.path.join("cat", "notes.txt")]


# ------------------------------------------------------------------------------------------ fit resume
def test_fit_refuses_to_resume_a_checkpoint_of_another_run(tmp_path, digits):
    from kdfast.distill.setup import KDSetup
    from kdfast.training.fit import TrainRecipe, fit
    data = LabeledSubset(digits, range(64))
    recipe = TrainRecipe(epochs=2, batch_size=32, lr=0.05)
    args = dict(progress=False, checkpoint_path=tmp_path / "c.pt")
    torch.manual_seed(0)
    fit(create_model("mlp", num_classes=10, in_channels=1), data, recipe, **args)
    with pytest.raises(JobMismatchError, match=r"lr: 0.05 then, 0.2 now; temperature") as info:
        fit(create_model("mlp", num_classes=10, in_channels=1), data, dataclasses.replace(recipe, lr=0.2),
            KDSetup(alpha=0.0, temperature=2.0), resume=True, **args)
    assert {f for f, _, _ in info.value.differences} == {"lr", "temperature"}
    with pytest.raises(JobMismatchError, match="data.labels_fingerprint"):
        fit(create_model("mlp", num_classes=10, in_channels=1), LabeledSubset(digits, range(1, 65)), recipe, **args,
            resume=True)
    with pytest.raises(JobMismatchError, match="epochs: 2 then, 3 now"):  # cosine: epochs set every epoch's LR
        fit(create_model("mlp", num_classes=10, in_channels=1), data, dataclasses.replace(recipe, epochs=3), **args,
            resume=True)
    # loader workers do not change the result: not part of the run
    history = fit(create_model("mlp", num_classes=10, in_channels=1), data, dataclasses.replace(recipe, num_workers=1),
                  **args, resume=True)
    assert [h["epoch"] for h in history] == [1, 2]  # the same run: restored, nothing left to train


# ---------------------------------------------------------------------------------------- the folder lock
_HOLD = """
import sys, time
from kdfast.io import Job
job = Job.start(sys.argv[1], "score", {"lr": float(sys.argv[2])})
print("started", flush=True)
time.sleep(60)
"""


def test_a_live_run_locks_its_folder_and_a_killed_one_does_not(tmp_path):
    import signal
    import subprocess
    import sys
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out), "0.01"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "started"
        assert sorted(os.listdir(out)) == ["job.json", "job.lock"]  # only job.json: a failed start if nobody held it
        for kwargs in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(JobLockedError, match=f"in use by a running kdfast job \\(pid {holder.pid}\\)"):
                Job.start(out, "score", {"lr": 0.02}, **kwargs)
        assert json.loads((out / "job.json").read_text())["identity"]["lr"] == 0.01  # the live run's record kept
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the killed run's lock: its job.json alone is a failed start, and a new run takes the folder
    job = Job.start(out, "score", {"lr": 0.02})
    assert job.record["identity"]["lr"] == 0.02 and (out / "job.lock").read_text().strip() == str(os.getpid())
    job.release()


_HOLD_WITH_CHILD = """
import os, sys, time
from kdfast.io import Job
job = Job.start(sys.argv[1], "score", {"lr": 0.01})
if os.fork() == 0:  # a forked DataLoader worker: it outlives a killed run by seconds, holding its open files
    time.sleep(30)
    os._exit(0)
print("started", flush=True)
time.sleep(60)
"""


def test_a_killed_runs_forked_workers_do_not_keep_its_folder_locked(tmp_path):
    import signal
    import subprocess
    import sys
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_WITH_CHILD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "started"
        with pytest.raises(JobLockedError, match=f"pid {holder.pid}"):
            Job.start(out, "score", {"lr": 0.01}, resume=True)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the child still lives with the lock file open: the folder is free at once all the same
    Job.start(out, "score", {"lr": 0.01}, resume=True).release()


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_killed_while_writing_its_file_list_does_not_block_the_next(tmp_path, resume):
    # SIGKILL between the file list and job.json used to leave a folder "that holds no kdfast run"
    out = tmp_path / "run"
    out.mkdir()
    (out / "job.lock").write_text("4242\n")
    (out / "files.txt").write_text("a.png\n")
    (out / "files.txt.stat.npy.tmp4242").write_bytes(b"half")
    job = Job.start(out, "score", {"a": 1}, files=["b.png"], resume=resume)
    job.release()
    assert sorted(os.listdir(out)) == ["files.txt", "job.json", "job.lock"]
    assert (out / "files.txt").read_text() == "b.png\n"


def test_resume_removes_the_temporary_files_a_killed_run_left(tmp_path):
    out = tmp_path / "run"
    Job.start(out, "score", {"a": 1}).release()
    save_npy(out / "scores.npy", np.arange(3.0))
    (out / "models").mkdir()
    for leftover in ("scores.npy.tmp4242", "models/seed0.partial.pt.tmp17"):
        (out / leftover).write_bytes(b"half")
    (out / "notes.tmp").write_text("not ours: no pid")
    Job.start(out, "score", {"a": 1}, resume=True).release()
    assert not (out / "scores.npy.tmp4242").exists() and not (out / "models" / "seed0.partial.pt.tmp17").exists()
    assert (out / "notes.tmp").exists() and (out / "scores.npy").exists()


def test_a_run_inside_another_runs_folder_is_refused(tmp_path):
    Job.start(tmp_path / "ref", "score", {}).release()
    with pytest.raises(JobError, match="lies inside the kdfast run folder .*ref"):
        Job.start(tmp_path / "ref" / "models" / "again", "score", {})
    assert not (tmp_path / "ref" / "models").exists()


def test_spellings_of_one_path_are_one_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    out = tmp_path / "run"
    Job.start(out, "score", {"data_root": "photos", "checkpoint": ["./a.pt"], "lr": 0.1}).release()
    (out / "scores.npy").write_bytes(b"x")
    for root in ("photos/", str(tmp_path / "photos"), "./photos//"):
        Job.start(out, "score", {"data_root": root, "checkpoint": [str(tmp_path / "a.pt")], "lr": 0.1},
                  resume=True).release()
    with pytest.raises(JobMismatchError, match="data_root"):
        Job.start(out, "score", {"data_root": "other", "checkpoint": ["a.pt"], "lr": 0.1}, resume=True)


def test_overwrite_never_deletes_an_input_inside_the_folder(tmp_path):
    out = tmp_path / "run"
    Job.start(out, "distill", {"keep": None}).release()
    save_npy(out / "keep.npy", np.arange(4))
    with pytest.raises(JobError, match=r"would delete the input --keep .*keep.npy, which lies inside"):
        Job.start(out, "distill", {"keep": str(out / "keep.npy")}, overwrite=True, label=lambda f: "--" + f)
    assert (out / "keep.npy").exists()


def test_another_commands_run_gets_no_resume_hint(tmp_path):
    out = tmp_path / "run"
    Job.start(out, "distill", {"a": 1})
    (out / "student.pt").write_bytes(b"x")
    with pytest.raises(JobExistsError) as info:
        Job.start(out, "score", {"a": 1})
    assert "holds a distill run, not a score run" in str(info.value) and "resume" not in str(info.value)


# ------------------------------------------------------------------------------- same-size replacement
def test_a_file_replaced_by_one_of_the_same_size_is_refused_everywhere_and_named(tmp_path):
    from _fake_datasets import write_image_folder

    from kdfast.pruning.keep import read_keep, write_keep
    from kdfast.scoring.folder import read_scores
    from kdfast.distill.teacher_cache import TeacherCache, TeacherCacheMismatchError
    write_image_folder(tmp_path / "f")
    data = load_dataset("folder", root=tmp_path / "f", image_size=8)
    identity = data_identity(data)
    # the three kinds of artifact, each recording the data identity and the file list
    run = tmp_path / "run"
    Job.start(run, "score", {"lr": 0.1}, data=identity, files=data.files).release()
    save_npy(run / "scores.npy", np.random.rand(len(data)).astype(np.float32))
    write_json(run / "meta.json", {"data": identity})
    write_keep(str(tmp_path / "keep.npy"), [0, 2], {"data": identity}, files=data.files)
    writer = TeacherCache.create(tmp_path / "cache", num_examples=len(data), num_classes=3,
                                 dataset_fingerprint=identity["labels_fingerprint"], teacher_fingerprint="t" * 64,
                                 files=data.files, files_fingerprint=identity["files_fingerprint"])
    writer.write(torch.arange(len(data)), torch.randn(len(data), 3))
    writer.close()
    # another image of the same size under the same name
    victim = tmp_path / "f" / "emu" / "img1.png"
    other = (tmp_path / "f" / "cat" / "img1.png").read_bytes()
    size = victim.stat().st_size
    victim.write_bytes(other[:size] + b"\0" * max(0, size - len(other)))
    assert victim.stat().st_size == size
    now = load_dataset("folder", root=tmp_path / "f", image_size=8)
    named = r"1 files replaced or modified \(size or modification time differs\): emu/img1.png"
    with pytest.raises(JobMismatchError, match=named):
        Job.start(run, "score", {"lr": 0.1}, data=data_identity(now), files=now.files, resume=True)
    with pytest.raises(DataIdentityError, match=named):
        read_keep(str(tmp_path / "keep.npy"), now)
    with pytest.raises(DataIdentityError, match=named):
        read_scores(str(run), now)
    with pytest.raises(TeacherCacheMismatchError, match=named):
        TeacherCache.open(tmp_path / "cache").check_dataset(now)


# --------------------------------------------------------------------------------- long runs: within-epoch state
class _Noisy(LabeledDataset):
    """Digits with random noise drawn at load time from the global RNG (as in-process augmentation draws), which
    raises KeyboardInterrupt (a kill) on its `stop`-th load."""

    def __init__(self, dataset, n, stop=None):
        super().__init__("noisy", dataset.targets[:n], dataset.num_classes)
        self.base, self.stop, self.loads = dataset, stop, 0

    def load(self, index):
        self.loads += 1
        if self.loads == self.stop:
            raise KeyboardInterrupt
        return self.base.load(index) + 0.1 * torch.randn(1, 8, 8)


def test_a_kill_within_an_epoch_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, digits, monkeypatch):
    from kdfast.runtime import progress as progress_module
    from kdfast.training.fit import fit
    recipe = TrainRecipe(epochs=2, batch_size=16, lr=0.05, seed=3, checkpoint_steps=3)

    def run(path, stop=None, **kw):
        torch.manual_seed(0)
        model = create_model("mlp", num_classes=10, in_channels=1)
        history = fit(model, _Noisy(digits, 96, stop), recipe, checkpoint_path=path, **kw)
        return model, history

    reference, ref_history = run(tmp_path / "a.pt", progress=False)
    with pytest.raises(KeyboardInterrupt):  # killed in epoch 2's fifth batch, after its checkpoint at step 3
        run(tmp_path / "b.pt", stop=96 + 4 * 16 + 5, progress=False)
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    assert state["epoch"] == 1 and state["within"]["step"] == 3
    torch.manual_seed(123)  # the global RNG of a new process: the checkpoint restores the one it had
    monkeypatch.setattr(progress_module, "PLAIN_INTERVAL_S", 0.0)
    resumed, history = run(tmp_path / "b.pt", resume=True)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["train_loss"] for h in history] == [h["train_loss"] for h in ref_history]
    assert "within" not in torch.load(tmp_path / "b.pt", weights_only=True)


def test_training_reports_rate_and_eta_within_an_epoch_off_a_terminal(digits, monkeypatch, capsys):
    from kdfast.runtime import progress as progress_module
    from kdfast.training.fit import fit
    monkeypatch.setattr(progress_module, "PLAIN_INTERVAL_S", 0.0)
    fit(create_model("mlp", num_classes=10, in_channels=1), LabeledSubset(digits, range(64)),
        TrainRecipe(epochs=1, batch_size=16, lr=0.05))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("epoch 1/1: 16/64 ex (") and ", ETA " in lines[0] and "ex/s" in lines[0]
    assert lines[-1].startswith("epoch 1/1: lr ")


def test_a_kill_during_evaluation_keeps_the_epoch(tmp_path, digits):
    from kdfast.training.fit import fit
    recipe = TrainRecipe(epochs=1, batch_size=32, lr=0.05)
    args = dict(progress=False, checkpoint_path=tmp_path / "c.pt")

    torch.manual_seed(0)
    model = create_model("mlp", num_classes=10, in_channels=1)
    with pytest.raises(KeyboardInterrupt):  # killed on the evaluation's first load
        fit(model, LabeledSubset(digits, range(64)), recipe, eval_dataset=_Noisy(digits, 32, stop=1), **args)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["epoch"] == 1 and "record" in state["within"]
    again = create_model("mlp", num_classes=10, in_channels=1)
    history = fit(again, LabeledSubset(digits, range(64)), recipe, eval_dataset=LabeledSubset(digits, range(64, 96)),
                  **args, resume=True)
    assert len(history) == 1 and "eval_acc" in history[0]  # evaluated, not trained again
    assert all(torch.equal(trained[k], v) for k, v in again.state_dict().items())
