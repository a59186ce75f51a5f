"""What every kdfast command shares: exit codes and errors, the run wrapper, the shared options and their
checks (one validation, one help style), progress and atomic writes (from the library).

Exit codes: 0 success, 2 usage error (bad arguments), 1 failure (missing data, bad checkpoint, ...).
Expected errors print one line `kdfast <cmd>: error: ...` to stderr; `--debug` prints the traceback too.
"""
from __future__ import annotations

import argparse
import sys
import traceback
import warnings

from kdfast.errors import InvalidArgumentError, KDFastError
from kdfast.runtime.checks import Problem, finite, fraction, positive_int
from kdfast.io.atomic import write_json
from kdfast.runtime.progress import log, progress
from kdfast.runtime.devices import PRECISIONS

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "UsageError", "CliError", "make_parser", "add_common_options",
           "run_cli", "flag", "lower", "model_name", "add_output_options", "add_performance_options",
           "check_common", "made", "add_kd_term_options", "check_kd_term", "default_device", "log", "progress", "write_json",
           "PRECISIONS", "dataset_name", "add_dataset_options", "check_dataset_options"]

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
        with warnings.catch_warnings():  # library warnings as one line each, like the errors, every time
            warnings.simplefilter("always", UserWarning)
            warnings.showwarning = lambda message, *_, **__: print(f"{prog}: warning: {message}", file=sys.stderr)
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


def flag(field: str) -> str:
    """The command-line flag of a resolved argument: train_epochs -> --train-epochs."""
    return "--" + field.replace("_", "-")


def lower(text: str) -> str:
    """argparse `type=` for case-insensitive choices."""
    return text.lower()


def model_name(text: str) -> str:
    """argparse `type=` for architectures: built-in names case-insensitive, '-' or '_' (resnet-18 = resnet18,
    wrn40-2 = wrn40_2); torchvision:NAME and timm:NAME as given. An unknown name is a usage error."""
    from kdfast.models import PREFIXES, check_model_name
    name = text if text.startswith(PREFIXES) else text.lower().replace("-", "_")
    problem = check_model_name(name)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return name


def dataset_name(text: str) -> str:
    """argparse `type=` for --dataset: a DATASETS name (case-insensitive), or wds:PATTERN / parquet:GLOB (the
    pattern as given)."""
    from kdfast.data import DATASETS, shard_source
    kind = shard_source(text)
    if kind:
        pattern = text.partition(":")[2]
        if not pattern:
            raise argparse.ArgumentTypeError(f"{text!r} needs a pattern: {kind}:PATTERN")
        return f"{kind}:{pattern}"
    if text.lower() not in DATASETS:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(DATASETS)}, "
                                         "wds:PATTERN, parquet:GLOB)")
    return text.lower()


def add_dataset_options(group, *, default: str = "digits") -> None:
    """--dataset (dataset_name) and the options of shard data sets."""
    from kdfast.data import DATASETS
    group.add_argument("--dataset", default=default, type=dataset_name, metavar="NAME",
                       help=f"{', '.join(DATASETS)}, wds:PATTERN (WebDataset tar shards, e.g. "
                            "wds:/data/train-{000000..000127}.tar) or parquet:GLOB (Parquet files with image bytes "
                            "and labels); shards need no --data-root (default: %(default)s)")
    group.add_argument("--image-ext", help="wds: extension of the image member (default: the first of jpg, jpeg, png, "
                                           "webp a sample has)")
    group.add_argument("--label-field", help="wds: read the label from this field of the json member (default: the "
                                             "cls member, else the json member's field label)")
    group.add_argument("--index-dir", metavar="DIR", help="wds: cache the index of shards that have no .idx.npz "
                                                          "sidecar in DIR (a folder outside --out), so later runs do "
                                                          "not scan the tars again")
    group.add_argument("--image-column", help="parquet: column of image bytes (default: image)")
    group.add_argument("--label-column", help="parquet: column of int labels (default: label)")
    group.add_argument("--id-column", help="parquet: column of example keys (default: id when present, else "
                                           "FILE:ROW)")


def check_dataset_options(args, problems: list[str]) -> None:
    """Each shard option goes with its source; other data sets need --data-root (digits excepted)."""
    from kdfast.data import SHARD_OPTIONS, shard_source
    kind = shard_source(args.dataset)
    for source, names in SHARD_OPTIONS.items():
        for name in names:
            if getattr(args, name, None) is not None and kind != source:
                problems.append(f"{flag(name)} goes with --dataset {source}:..., not {args.dataset}")
    if not kind and args.dataset != "digits" and not args.data_root:
        problems.append(f"--dataset {args.dataset} needs --data-root (kdfast never downloads data)")


def add_output_options(group, *, out_help: str, resume_help: str) -> None:
    group.add_argument("--out", help=out_help)
    group.add_argument("--resume", action="store_true", help=resume_help + "; refused when the arguments resolve to "
                       "another job (each differing field is named)")
    group.add_argument("--overwrite", action="store_true", help="delete an earlier run in --out and start afresh")


def add_performance_options(group, *, num_workers_default=None, num_workers_help="data loading processes"):
    group.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    group.add_argument("--precision", default="fp32", type=lower, choices=PRECISIONS, help="(default: %(default)s)")
    group.add_argument("--num-workers", type=int, default=num_workers_default, help=num_workers_help)


def check_common(args, problems: list[str], *, positive=(), fractions=()) -> None:
    """The checks every command shares, appended to `problems`: --resume/--overwrite, --device, --num-workers,
    positive integers (`positive` names) and open-interval fractions (`fractions`: name -> (low, high))."""
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        problems.append("give --resume or --overwrite, not both")
    for name in positive:
        value = getattr(args, name)
        if value is not None and positive_int(name, value):
            problems.append(positive_int(name, value).text(flag(name)))
    for name in fractions:
        value = getattr(args, name)
        if value is not None and fraction(name, value, closed_high=False):
            problems.append(fraction(name, value, closed_high=False).text(flag(name)))
    if getattr(args, "num_workers", None) is not None and args.num_workers < 0:
        problems.append(f"--num-workers must be >= 0, got {args.num_workers}")
    device = getattr(args, "device", None)
    if device:
        import torch
        try:
            dev = torch.device(device)
        except RuntimeError:
            problems.append(f"--device must be like cpu, cuda or cuda:1, got {device!r}")
        else:
            if dev.type == "cuda" and not torch.cuda.is_available():
                problems.append(f"--device {device}: no CUDA device here")


def made(make, problems: list[str], labels: dict[str, str] | None = None):
    """make() (a library config object, which checks its own fields), or None with its problems appended in the
    command line's terms: each field by its flag (`labels` maps fields whose flag is not --field-name)."""
    try:
        return make()
    except InvalidArgumentError as exc:
        labels = labels or {}
        problems.extend(p.text(labels.get(p.name) or flag(p.name)) if isinstance(p, Problem) else p
                        for p in getattr(exc, "problems", [str(exc)]))
        return None


def add_kd_term_options(group) -> None:
    """--kd-term (the kdfast.distill.terms registry, or logit alone), --kd-beta, --kd-layers."""
    from kdfast.distill.terms import KD_TERMS
    group.add_argument("--kd-term", default="logit", type=lower, choices=("logit", *sorted(KD_TERMS)),
                       help="logit: the KD loss alone; hint (FitNets), vid (variational information distillation) "
                            "or at (attention transfer): that feature term added, beta * term (default: %(default)s)")
    group.add_argument("--kd-beta", type=float, help="weight beta of the feature term (default: the term's: " +
                       ", ".join(f"{name} {KD_TERMS[name].default_beta:g}" for name in sorted(KD_TERMS)) + ")")
    group.add_argument("--kd-layers", help="STUDENT_LAYER:TEACHER_LAYER module names (a trailing '.in' takes a "
                                           "module's input); default: the classifier heads' inputs (hint, vid), the "
                                           "last spatial stage (at)")


def check_kd_term(args, sources: list[str], problems: list[str]) -> None:
    """Checks the --kd-term options against the teacher `sources` given (flags), appending to `problems`, and
    resolves them: --kd-beta to the term's default when not given, --kd-layers to a (student, teacher) pair of
    kd_terms layer names ('12.in' -> '12:in'), None for the default layers."""
    if args.kd_term == "logit":
        for name in ("kd_beta", "kd_layers"):
            if getattr(args, name) is not None:
                problems.append(f"{flag(name)} goes with --kd-term hint|vid|at")
        return
    from kdfast.distill.terms import KD_TERMS
    from kdfast.distill.terms.capture import INPUT_SUFFIX
    if not {"--teacher", "--train-teacher"} & set(sources):
        problems.append(f"--kd-term {args.kd_term} distills from a teacher's features: pass --teacher PATH or "
                        "--train-teacher (a --teacher-cache holds only logits)")
    elif "--teacher-cache" in sources:
        problems.append(f"--kd-term {args.kd_term} runs the teacher online for its features; it cannot go with "
                        "--teacher-cache (which holds only logits)")
    if args.kd_beta is None:
        args.kd_beta = KD_TERMS[args.kd_term].default_beta
    elif finite("kd_beta", args.kd_beta, low=0.0, low_open=False):
        problems.append(finite("kd_beta", args.kd_beta, low=0.0, low_open=False).text("--kd-beta"))
    if isinstance(args.kd_layers, str):
        if args.kd_layers.count(":") != 1 or "" in args.kd_layers.split(":"):
            problems.append(f"--kd-layers must be STUDENT_LAYER:TEACHER_LAYER, e.g. 9:9 or 12.in:12.in, got "
                            f"{args.kd_layers!r}")
        else:
            args.kd_layers = tuple(name[:-3] + INPUT_SUFFIX if name.endswith(".in") else name
                                   for name in args.kd_layers.split(":"))


def default_device(name):
    import torch
    return name or ("cuda" if torch.cuda.is_available() else "cpu")
