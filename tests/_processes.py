"""Helpers of tests that run and kill torchrun jobs."""
from __future__ import annotations

import os
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
