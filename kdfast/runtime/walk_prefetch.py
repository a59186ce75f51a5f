"""An image folder's walk (runtime/folder_walk.py) in a process forked before torch is imported, so that the
walk and kdfast-score's imports and model set-up overlap (a thread would not: the walk holds the GIL).

`prefetch_walk` starts the walk in a forked child (runtime/forked.py, at a lower priority: it takes the CPU the
imports leave), which sends back its FolderWalk with the walk's warnings or its DataError. `take_prefetched_walk`
(called by the scan with the same arguments) takes it once; the warnings are issued then, in this process, and a
DataError is raised here as the walk would have. A child that failed gives None, with a note: the caller walks
in-process; a child that died leaves the walk to this process at once (a note says so too).
"""
from __future__ import annotations

import sys
import warnings

from kdfast.errors import DataError
from kdfast.runtime.folder_walk import walk_image_folder
from kdfast.runtime.forked import Forked

_pending: dict = {}  # (folder, name, layout, drop_empty_classes) -> its Forked walk


def prefetch_walk(folder: str, name: str, layout: str, *, drop_empty_classes: bool = False) -> bool:
    """Starts the walk of `folder` in a forked child (where a fork is safe: POSIX, torch not imported, one
    thread); True when started."""
    key = (folder, name, layout, drop_empty_classes)
    walking = Forked(_walk_report, *key, nice=5)
    if walking.forked:
        _pending[key] = walking
    return walking.forked


def take_prefetched_walk(folder: str, name: str, layout: str, *, drop_empty_classes: bool = False):
    """The FolderWalk prefetched for these arguments (taken once; its warnings issued now, its DataError raised
    now), or None when there is none or its child failed (a note says so)."""
    walking = _pending.pop((folder, name, layout, drop_empty_classes), None)
    if walking is None:
        return None
    report = walking.result()
    if walking.fell_back or "failed" in report:
        why = report.get("failed") or "its process ended without an answer"
        print(f"note: the prefetched walk of {folder} failed ({why}); walking it here", file=sys.stderr, flush=True)
        if "failed" in report:
            return None
    for category, message in report["warnings"]:  # issued once: the caller does not walk again
        warnings.warn(message, category, stacklevel=4)  # where the in-process walk points: the scan's caller
    if "error" in report:
        raise DataError(report["error"])
    return report["walk"]


def _walk_report(folder: str, name: str, layout: str, drop_empty_classes: bool) -> dict:
    """{"walk": the FolderWalk (split over a helper), or "error": its DataError's text, or "failed": any other
    exception's; "warnings": the walk's (category, message)s}."""
    report = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report["walk"] = walk_image_folder(folder, name, layout, drop_empty_classes=drop_empty_classes,
                                               split=True)
        except DataError as exc:
            report["error"] = str(exc)
        except Exception as exc:  # the parent walks again, in-process, and reports what that gives
            report["failed"] = f"{type(exc).__name__}: {exc}"
    report["warnings"] = [(w.category, str(w.message)) for w in caught]
    return report
