"""Comparisons against float64 oracles that say where and by how much they fail."""
from __future__ import annotations

import torch


def assert_close(name, actual, expected, *, atol=0.0, rtol=0.0, budget=0.0):
    """|actual - expected| <= atol + rtol |expected| + budget elementwise; NaN and inf must match exactly.

    On failure reports the mismatch count, the worst index, and the max abs and rel errors.
    """
    a = actual.detach().double().cpu().reshape(-1)
    e = expected.detach().double().cpu().reshape(-1)
    assert a.shape == e.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    special = ~torch.isfinite(e)
    same_special = (a[special] == e[special]) | (a[special].isnan() & e[special].isnan())
    where = special.nonzero().reshape(-1)[~same_special][:5].tolist()
    assert bool(same_special.all()), (f"{name}: non-finite values differ at flat indices {where}: got "
                                      f"{a[where].tolist()}, expected {e[where].tolist()}")
    finite = (~special).nonzero().reshape(-1)
    a, e = a[finite], e[finite]
    if a.numel() == 0:
        return
    err = (a - e).abs().nan_to_num(nan=float("inf"))
    bad = err > atol + rtol * e.abs() + budget
    if bool(bad.any()):
        worst = int(err.argmax())
        rel = err / e.abs().clamp(min=1e-30)
        raise AssertionError(f"{name}: {int(bad.sum())}/{a.numel()} mismatches; worst at flat index "
                             f"{int(finite[worst])}: got {a[worst].item():.9g}, expected {e[worst].item():.9g}; "
                             f"max abs err {err.max().item():.3g}, max rel err {rel.max().item():.3g} (atol {atol:.3g}, "
                             f"rtol {rtol:.3g}, budget {budget:.3g})")


def max_abs_err(x, ref) -> float:
    """Largest |x - ref| over the entries where ref is finite (NaN in x counts as inf)."""
    d = (x.detach().double() - ref.detach().double()).abs()
    d = d[torch.isfinite(ref.detach().double())]
    return float(d.nan_to_num(nan=float("inf")).max()) if d.numel() else 0.0
