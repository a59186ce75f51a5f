"""Helpers of tests that run and kill jobs (plain processes and torchrun ranks)."""
from __future__ import annotations

import os
import signal
import time


def rank_pid(launcher_pid, rank, timeout=60):
    """The process id of torchrun's worker `rank` (a child of the launcher, told apart by its RANK variable)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if parent == launcher_pid and f"RANK={rank}".encode() in environ:
                return int(entry)
        time.sleep(0.01)
    raise AssertionError(f"torchrun started no worker with RANK={rank}")


def kill_when(proc, folder, suffix=".npz", timeout=120):
    """SIGKILLs `proc` as soon as a file ending in `suffix` appears in `folder`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(folder) and any(f.endswith(suffix) for f in os.listdir(folder)):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed: {proc.stderr.read()}")
        time.sleep(0.001)
    proc.kill()
    raise AssertionError("no chunk appeared in time")


def checkpoint(path, name="cnn", seed=0, num_classes=10, in_channels=1):
    """A fresh model `name` (seeded) saved as a kdfast checkpoint at `path`; returns the model."""
    import torch

    from kdfast.models import create_model
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes, in_channels=in_channels)
    torch.save({"model": model.state_dict()}, path)
    return model
