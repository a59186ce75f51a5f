"""The `kdfast` umbrella command and the console-script entry points.

    kdfast score ...      same as kdfast-score ...
    kdfast prune ...      same as kdfast-prune ...
    kdfast distill ...    same as kdfast-distill ...
    kdfast env            a paste-ready report of versions, backends and devices

Each command module kdfast/cli/<cmd>.py exposes `add_parser(subparsers)` (registering one subparser named
<cmd>, built from the `subparsers` it is given so parse errors exit 2) and `run(args) -> int`. --quiet and
--debug are added here unless the command declares them. Command modules are imported only when their
command runs, so `kdfast env` works even when another command cannot load.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "score": "score every example of a data set (el2n, grand, forgetting, ...)",
    "prune": "keep a fraction of a data set from its scores",
    "distill": "train a student on the kept subset with a teacher",
    "env": "print versions, backends and devices for bug reports",
}


def _module(cmd: str):
    return importlib.import_module(f"kdfast.cli.{cmd}")


def _command_parser(cmd: str, prog: str):
    """The parser of one command: the module's own subparser, renamed `prog`, with --quiet and --debug."""
    def build():
        from kdfast.cli.common import add_common_options, make_parser
        sub = make_parser(prog, COMMANDS[cmd]).add_subparsers(dest="_command")
        _module(cmd).add_parser(sub)
        parser = sub.choices[cmd]
        parser.prog = prog
        if "--debug" not in parser._option_string_actions:  # commands may declare these themselves
            add_common_options(parser)
        return parser
    return build


def command_main(cmd: str, argv=None, prog: str | None = None) -> int:
    if cmd == "score":  # before torch is imported: the folder's walk overlaps the imports and the set-up
        from kdfast.cli.prefetch import prefetch_folder_walk
        prefetch_folder_walk(sys.argv[1:] if argv is None else list(argv))
    from kdfast.cli.common import run_cli
    return run_cli(_command_parser(cmd, prog or f"kdfast-{cmd}"), lambda args: _module(cmd).run(args), argv)


def _umbrella_parser():
    from kdfast.cli.common import make_parser
    parser = make_parser("kdfast", "kdfast: score, prune and distill training data.",
                         epilog="commands:\n" + "\n".join(f"  {c:<9} {h}" for c, h in COMMANDS.items()))
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), help="the command to run")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return command_main(argv[0], argv[1:], prog=f"kdfast {argv[0]}")

    from kdfast.cli.common import UsageError, run_cli

    def no_command(args):
        raise UsageError(f"a command is required: one of {', '.join(COMMANDS)}")
    return run_cli(_umbrella_parser, no_command, argv)


def score_main(argv=None) -> int:
    return command_main("score", argv)


def prune_main(argv=None) -> int:
    return command_main("prune", argv)


def distill_main(argv=None) -> int:
    return command_main("distill", argv)


def env_main(argv=None) -> int:
    return command_main("env", argv)


if __name__ == "__main__":
    sys.exit(main())
