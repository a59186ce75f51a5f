"""What every kdfast command shares: exit codes and errors, the run wrapper, progress, saved configuration.

Exit codes: 0 success, 2 usage error (bad arguments), 1 failure (missing data, bad checkpoint, ...).
Expected errors print one line `kdfast <cmd>: error: ...` to stderr; `--debug` prints the traceback too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from ..errors import KDFastError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line arguments (exit 2)."""


class CliError(Exception):
    """The command could not do its job for a reason the user can fix (exit 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so every command reports errors the same way."""

    def error(self, message):
        raise UsageError(message)


def make_parser(prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, epilog=epilog,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(parser)
    return parser


def add_common_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("General")
    group.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    group.add_argument("--debug", action="store_true", help="print tracebacks of expected errors")


def one_line(exc: BaseException) -> str:
    """The message as one line; errors re-raised from DataLoader workers carry the original on the last line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and "Original Traceback" in lines[1]:
        head, _, message = lines[-1].partition(": ")  # "package.module.ErrorClass: message"
        return message if message and all(part.isidentifier() for part in head.split(".")) else lines[-1]
    return " ".join(lines)


def run_cli(parser_fn, run_fn, argv=None) -> int:
    """Parses argv with parser_fn() and runs run_fn(args) -> int; expected errors become one line and an exit code.

    UsageError (and argparse errors) exit 2; CliError and kdfast's own typed errors exit 1; KeyboardInterrupt
    exits 130. Anything else is a bug: the traceback is printed and the exit code is 1.
    """
    parser = parser_fn()
    prog = parser.prog
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        return int(run_fn(args) or 0)
    except UsageError as exc:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(exc)} (see {prog} --help)", file=sys.stderr)
        return EXIT_USAGE
    except (CliError, KDFastError, OSError) as exc:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (finished work is kept; --resume continues where supported)", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if "out of memory" not in str(exc).lower():
            raise
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: out of memory ({one_line(exc)[:200]}); lower --batch-size", file=sys.stderr)
        return EXIT_FAILURE


class _PlainProgress:
    """Progress as plain lines on stderr (logs, pipes): at most one every `interval` seconds, and one at the end."""

    def __init__(self, total, desc, unit, interval=10.0):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n):
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
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
        self._print(time.perf_counter())


def progress(iterable, *, total=None, desc="", quiet=False, unit="ex", count=None):
    """Yields from `iterable`, reporting progress on stderr: a tqdm bar on a TTY, plain lines otherwise.

    `count(item)` gives how many `unit`s each item stands for (e.g. examples in a batch; 1 by default), so
    the rate reads in examples per second.
    """
    if quiet:
        yield from iterable
        return
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            bar = _PlainProgress(total, desc, unit)
    else:
        bar = _PlainProgress(total, desc, unit)
    try:
        for item in iterable:
            yield item
            bar.update(count(item) if count else 1)
    finally:
        bar.close()


def log(message: str, *, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def save_config(out_dir: str, args: argparse.Namespace, name: str = "config.json") -> str:
    """Writes the resolved arguments beside the outputs (so a run can be repeated); returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    config = {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_") and not callable(v)}
    config["argv"] = sys.argv
    write_json_atomic(path, config)
    return path
