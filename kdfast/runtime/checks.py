"""The argument checks every layer shares: one home, so each rule and its wording is written once.

Each check returns None when the value is fine, else a `Problem` naming the argument, what was expected and
the value received; `require(where, *problems)` raises one InvalidArgumentError listing every problem given (also kept as
its `.problems`).

    require("score", positive_int("batch_size", batch_size), one_of("precision", precision, PRECISIONS))

Callers that gather problems (config objects, the command lines) keep the `Problem`s, so a command line can
name its own flag for the same rule (`Problem.text(label)`).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

from kdfast.errors import InvalidArgumentError


class Problem(NamedTuple):
    name: str       # the argument
    expected: str   # what it must be: "a positive integer"
    value: object   # what it was

    def text(self, label: str | None = None) -> str:
        """'{label or name} must be {expected}, got {value!r}'."""
        return f"{label or self.name} must be {self.expected}, got {self.value!r}"


def require(where: str, *problems: Problem | str | None) -> None:
    """Raises InvalidArgumentError('{where}: problem; problem') when any problem is not None."""
    found = [p for p in problems if p is not None]
    if found:
        error = InvalidArgumentError(f"{where}: " + "; ".join(p.text() if isinstance(p, Problem) else p
                                                             for p in found))
        error.problems = found  # a command line restates them in its own flags
        raise error


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def int_at_least(name: str, value, minimum: int, expected: str | None = None) -> Problem | None:
    """An integer (not a bool) >= minimum."""
    if _is_int(value) and value >= minimum:
        return None
    return Problem(name, expected or (f"an integer >= {minimum}" if minimum != 1 else "a positive integer"), value)


def int_in_range(name: str, value, low: int, high: int, expected: str | None = None) -> Problem | None:
    """An integer (not a bool) in [low, high]."""
    if _is_int(value) and low <= value <= high:
        return None
    return Problem(name, expected or f"an integer in [{low}, {high}]", value)


def positive_int(name: str, value, expected: str | None = None) -> Problem | None:
    return int_at_least(name, value, 1, expected)


def integer(name: str, value) -> Problem | None:
    """Any integer (not a bool): seeds."""
    return None if _is_int(value) else Problem(name, "an integer", value)


def finite(name: str, value, *, low: float = -math.inf, low_open: bool = True, expected: str | None = None) \
        -> Problem | None:
    """A finite real number (not a bool) above `low` (> low when low_open, else >= low)."""
    if _is_real(value) and math.isfinite(value) and (value > low if low_open else value >= low):
        return None
    if expected is None:
        bound = "" if low == -math.inf else f" {'>' if low_open else '>='} {low:g}"
        expected = f"a finite number{bound}"
    return Problem(name, expected, value)


def in_range(name: str, value, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
             expected: str | None = None) -> Problem | None:
    """A real number (not a bool) in the interval between low and high, each end open or closed."""
    if _is_real(value) and (value > low if low_open else value >= low) and (value < high if high_open else
                                                                           value <= high):
        return None
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Problem(name, expected or f"a number in {interval}", value)


def fraction(name: str, value, *, closed_high: bool = True, expected: str | None = None) -> Problem | None:
    """A share of the data: a number in (0, 1] (or (0, 1) with closed_high=False)."""
    return in_range(name, value, 0.0, 1.0, low_open=True, high_open=not closed_high, expected=expected)


def one_of(name: str, value, choices) -> Problem | None:
    return None if value in choices else Problem(name, f"one of {tuple(choices)}", value)
