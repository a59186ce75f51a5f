"""kdfast.runtime.checks: the shared argument checks behind every config object and function signature."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kdfast.errors import InvalidArgumentError
from kdfast.runtime.checks import (Problem, finite, fraction, in_range, int_at_least, integer, one_of, positive_int,
                                   require)


@pytest.mark.parametrize("check, good, bad", [
    (lambda v: positive_int("n", v), [1, 7, np.int64(3)], [0, -1, True, 2.0, "3", None]),
    (lambda v: int_at_least("n", v, 0), [0, 5], [-1, False, 0.0]),
    (lambda v: integer("seed", v), [0, -4, np.int32(2)], [1.5, True, "1"]),
    (lambda v: finite("lr", v, low=0.0), [1e-300, 0.1, 3], [0.0, -1.0, math.inf, math.nan, True, "0.1"]),
    (lambda v: finite("wd", v, low=0.0, low_open=False), [0.0, 5e-4], [-1e-9, math.nan]),
    (lambda v: fraction("f", v), [1.0, 0.5, 1e-9], [0.0, 1.0000001, False, math.nan]),
    (lambda v: fraction("f", v, closed_high=False), [0.5], [1.0, 0.0]),
    (lambda v: in_range("a", v, 0.0, 1.0), [0.0, 1.0, 0.25], [-0.1, 1.1, True, math.inf]),
    (lambda v: one_of("mode", v, ("a", "b")), ["a", "b"], ["c", None]),
])
def test_checks_accept_their_domain_and_name_everything_else(check, good, bad):
    assert all(check(v) is None for v in good)
    for v in bad:
        problem = check(v)
        assert isinstance(problem, Problem) and problem.value is v, v
        assert problem.text().startswith(f"{problem.name} must be ") and problem.text().endswith(f", got {v!r}")


def test_require_raises_one_error_naming_every_problem_and_keeps_them():
    require("f", None, positive_int("n", 3))  # nothing wrong: no error
    with pytest.raises(InvalidArgumentError) as info:
        require("f", positive_int("n", 0), None, "x and y cannot go together", finite("lr", -1.0, low=0.0))
    assert str(info.value) == ("f: n must be a positive integer, got 0; x and y cannot go together; lr must be a "
                               "finite number > 0, got -1.0")
    assert [getattr(p, "name", p) for p in info.value.problems] == ["n", "x and y cannot go together", "lr"]
    assert positive_int("epochs", 0).text("--epochs") == "--epochs must be a positive integer, got 0"
