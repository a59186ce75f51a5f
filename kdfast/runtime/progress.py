"""Progress and log lines on stderr, shared by training, scoring and the command line.

`progress(iterable, ...)` reports counts, rate and ETA: a tqdm bar on a terminal, plain lines in logs and pipes
(one at the first batch of the process's first pass, so a log shows when work began, after the imports, the data
set's scan and the loader's start; then at most one every PLAIN_INTERVAL_S, and one at the end), nothing when
quiet.
"""
from __future__ import annotations

import sys
import time


PLAIN_INTERVAL_S = 10.0  # seconds between plain progress lines: a log stays readable, a long pass is never silent
_first_batch = {"reported": False}  # the process's first plain progress line comes at its first batch


class _PlainProgress:
    """Progress as plain lines on stderr (logs, pipes): at most one every PLAIN_INTERVAL_S seconds, and one at the
    end unless `end_line` is False (callers printing their own line per pass)."""

    def __init__(self, total, desc, unit, end_line=True):
        self.total, self.desc, self.unit, self.end_line = total, desc, unit, end_line
        self.interval = PLAIN_INTERVAL_S
        self.n, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n):
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval or not _first_batch["reported"]:
            _first_batch["reported"] = True
            self.last = now
            self._print(now)

    def _print(self, now):
        rate = self.n / max(now - self.start, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        eta = ""
        if self.total and rate > 0 and self.n < self.total:
            eta = f", ETA {(self.total - self.n) / rate:.0f} s"
        print(f"{self.desc}: {done} {self.unit} ({rate:,.0f} {self.unit}/s{eta})", file=sys.stderr, flush=True)

    def close(self):
        if self.end_line:
            self._print(time.perf_counter())


class _Silent:
    def update(self, n):
        pass

    def close(self):
        pass


class _Closing:
    """Makes a bar a context manager that closes it."""

    def __init__(self, bar):
        self.bar = bar

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        self.bar.close()
        return False


def progress_bar(total=None, *, desc="", quiet=False, unit="ex", plain=True):
    """A bar with update(n) and close(), also a context manager: tqdm on a terminal, plain lines elsewhere
    (without the closing one with plain=False, for callers that print their own line per pass), nothing when
    quiet."""
    bar = None
    if not quiet and sys.stderr.isatty():
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                       leave=False)
        except ImportError:
            pass
    if bar is None:
        bar = _PlainProgress(total, desc, unit, end_line=plain) if not quiet else _Silent()
    return _Closing(bar)


def progress(iterable, *, total=None, desc="", quiet=False, unit="ex", count=None, plain=True):
    """Yields from `iterable`, reporting progress on stderr as progress_bar does.

    `count(item)` gives how many `unit`s each item stands for (e.g. examples in a batch; 1 by default), so
    the rate reads in examples per second.
    """
    with progress_bar(total, desc=desc, quiet=quiet, unit=unit, plain=plain) as bar:
        for item in iterable:
            yield item
            bar.update(count(item) if count else 1)


def log(message: str, *, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)
