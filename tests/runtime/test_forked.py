"""Forked: a call in a forked child gives what the call gives here (its value, its exception), falls back to
running here when the child dies or a fork is unsafe, and close() stops an unwanted child."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# in a process without torch (where Forked forks): each case prints what it saw
CASES = """
import json, os, signal, sys, time
import numpy as np
from kdfast.runtime.forked import Forked
from kdfast.errors import DataError
parent = os.getpid()
def work(n, fail=False, die=False):
    if die and os.getpid() != parent:
        os._exit(3)
    if fail:
        raise DataError(f"dataset 'x': bad {n} (in pid {'child' if os.getpid() != parent else 'parent'})")
    return {"pid": os.getpid() != parent, "values": np.arange(n, dtype=np.int64) * 3, "text": "é" * n}
out = {}
call = Forked(work, 100_000)
out["forked"] = call.forked
value = call.result()
out["value_ok"] = bool((value["values"] == np.arange(100_000) * 3).all()) and value["text"] == "é" * 100_000
out["ran_in_child"] = value["pid"]
try:
    Forked(work, 5, fail=True).result()
except DataError as exc:
    out["error"] = str(exc)
dying = Forked(work, 7, die=True)
out["after_death"] = (dying.result()["values"].tolist(), dying.forked, dying.fell_back)
out["niceness"] = Forked(os.nice, 0, nice=5).result() - os.nice(0)
slow = Forked(time.sleep, 60)
pid = slow.pid
slow.close()
try:
    os.kill(pid, 0)
    out["closed"] = False
except ProcessLookupError:
    out["closed"] = True
import torch  # noqa: F401 (a fork is unsafe now: the call runs here)
late = Forked(work, 3)
out["late"] = (late.forked, late.result()["pid"])
print(json.dumps(out))
"""


def test_forked_calls_give_their_value_their_exception_or_run_here():
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CASES)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["forked"] and out["ran_in_child"] and out["value_ok"]
    assert out["error"] == "dataset 'x': bad 5 (in pid child)"  # the child's exception, raised here
    assert out["after_death"] == [[0, 3, 6, 9, 12, 15, 18], False, True]  # the child died: the call ran here
    assert out["niceness"] == 5  # the child ran at a lower priority
    assert out["closed"]
    assert out["late"] == [False, False]  # torch imported: no fork, the call runs here
