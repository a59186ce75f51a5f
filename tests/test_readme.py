"""Every code block of README.md runs as written (CPU, digits), in document order, in a scratch folder.

How each block runs:
- python blocks are executed as written, each in a fresh namespace; like a reader following the README, they
  may read files that earlier bash blocks made (runs/digits-el2n, ...).
- bash blocks run one command per logical line (backslash continuations joined, comments dropped):
  * `kdfast-<cmd> ARGS` and `kdfast <cmd> ARGS` run in this process through the console-script entry point
    and must exit 0. To keep the suite within its budget, training is shortened by appending
    `--train-epochs 1` to kdfast-score commands that train, and `--epochs 1 --teacher-epochs 1` to
    kdfast-distill commands (argparse keeps the last value); nothing else is changed.
  * a command whose `--data-root` does not exist here (CIFAR, ImageNet, a photo folder) is parsed by the
    command's real parser, so every flag and value in it must be valid, but it is not run;
  * `torchrun ... -m kdfast.cli.<cmd> ARGS`: ARGS are parsed the same way (multi-process runs are tested in
    test_distributed.py);
  * `python -m kdfast.data.make_shards ARGS` runs in this process and must exit 0;
  * `make ...` and `pip ...` set up the environment this test runs in; they are not run.
  Any other command fails the test, so a new kind of example gets a rule here.
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from kdfast.cli.main import COMMANDS, _command_parser, main

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks():
    return [(lang, body) for lang, body in BLOCK.findall(README.read_text()) if lang in ("bash", "python")]


def commands(body):
    joined = re.sub(r"\\\n\s*", " ", body)
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            yield words


def _shortened(cmd, args):
    if cmd == "score" and "--checkpoint" not in args and "random" not in args:
        return args + ["--train-epochs", "1"]
    if cmd == "distill":
        return args + ["--epochs", "1", "--teacher-epochs", "1"]
    return args


def _missing_data(args):
    if "--data-root" not in args:
        return False
    return not os.path.exists(os.path.expanduser(args[args.index("--data-root") + 1]))


def _parse_only(cmd, args):
    _command_parser(cmd, f"kdfast-{cmd}")().parse_args(args)  # raises UsageError on any bad flag or value


def run_bash(body, capsys):
    for words in commands(body):
        head = words[0]
        if head in ("make", "pip"):
            continue
        if words[:3] == ["python", "-m", "kdfast.data.make_shards"]:
            from kdfast.data.make_shards import main as make_shards
            assert make_shards(words[3:]) == 0, words
            capsys.readouterr()
            continue
        if head == "torchrun":
            module = words[words.index("-m") + 1]
            assert module.startswith("kdfast.cli."), words
            _parse_only(module.rsplit(".", 1)[1], words[words.index("-m") + 2:])
            continue
        if head.startswith("kdfast-"):
            cmd, args = head[len("kdfast-"):], words[1:]
        elif head == "kdfast":
            cmd, args = words[1], words[2:]
        else:
            raise AssertionError(f"README command without a rule in tests/test_readme.py: {' '.join(words)}")
        assert cmd in COMMANDS, words
        if _missing_data(args):
            _parse_only(cmd, args)
            continue
        code = main([cmd, *_shortened(cmd, args)])
        captured = capsys.readouterr()
        assert code == 0, f"{' '.join(words)} exited {code}:\n{captured.err[-2000:]}"


def test_the_readme_has_runnable_blocks():
    kinds = [lang for lang, _ in blocks()]
    assert kinds.count("python") >= 4 and kinds.count("bash") >= 4


def test_every_readme_block_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for i, (lang, body) in enumerate(blocks()):
        if lang == "bash":
            run_bash(body, capsys)
        else:
            try:
                exec(compile(body, f"README.md python block {i}", "exec"), {"__name__": "__readme__"})
            except Exception as exc:
                pytest.fail(f"README python block {i} failed: {type(exc).__name__}: {exc}\n{body}")
