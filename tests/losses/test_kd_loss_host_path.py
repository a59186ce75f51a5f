"""The host path of one kd_loss forward + backward, counted so that regressions fail: aten ops (a
TorchDispatchMode census on CPU tensors), host synchronisations, Triton launches (counted at the launcher,
kernels running under TRITON_INTERPRET=1), and the launcher's cache of compiled kernels."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kdfast import kd_loss
from kdfast.runtime.dispatch import backends
from kdfast.losses.reference import kd_loss_fwd_torch

from _assertions import assert_close

kd_ops = importlib.import_module("kdfast.losses.kd_loss")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
SYNCS = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero"}  # ops that read device memory on the host


class _Census(TorchDispatchMode):
    """Names of the aten ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _census(fn) -> list[str]:
    with _Census() as census:
        fn()
    return census.ops


def _triton_runs_here() -> bool:
    try:
        kd_ops.resolve_backend("triton", torch.device("cpu"), op="test")
    except Exception:
        return False
    return True


@pytest.mark.parametrize("shape", [(8, 10), (128, 100)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cpp_forward_backward_costs_no_more_aten_ops_than_cross_entropy(shape, reduction):
    """Default kd_loss on CPU (the C++ backend, labels validated inside the kernel, the mean reduced there, the
    backward a no-op for an upstream 1 read without an op): fewer aten ops than F.cross_entropy alone, and
    no host synchronisation."""
    if backends()["cpp"] != "available":
        pytest.skip(backends()["cpp"])
    s = torch.randn(*shape, requires_grad=True)
    t, y = torch.randn(*shape), torch.randint(0, shape[1], shape[:1])
    kd = _census(lambda: kd_loss(s, t, y, reduction=reduction).backward())
    ce = _census(lambda: F.cross_entropy(s, y, reduction=reduction).backward())
    assert not SYNCS & set(kd), f"host synchronisation in {kd}"
    # the forward allocates its outputs (loss, gradient, stats shell) inside the kernel call; the engine adds
    # ones_like for the seed gradient and the accumulation into .grad
    assert len(kd) <= len(ce), f"kd_loss {kd} vs F.cross_entropy {ce}"
    assert len(kd) <= 6, kd


def test_cpp_backward_with_a_non_unit_upstream_gradient_is_one_scale():
    if backends()["cpp"] != "available":
        pytest.skip(backends()["cpp"])
    s = torch.randn(8, 10, requires_grad=True)
    t, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    loss, half = kd_loss(s, t, y), torch.tensor(0.5)
    ops = _census(lambda: loss.backward(half))
    assert [op for op in ops if op != "detach"] == ["mul_"], ops  # (detach: .grad takes the buffer, no copy)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_forward_backward_is_at_most_two_launches(monkeypatch, reduction):
    """One forward launch (labels counted and the loss reduced in the kernel) and one backward launch (which
    returns on the device for an upstream 1); validate=False: no host synchronisation."""
    if not _triton_runs_here():
        pytest.skip("Triton cannot run here")
    kernels = importlib.import_module("kdfast.losses.triton")
    launches = []
    real = kernels._launch
    monkeypatch.setattr(kernels, "_launch", lambda kernel, *a, **kw: (launches.append(kernel), real(kernel, *a, **kw)))
    s = torch.randn(6, 10, requires_grad=True)
    t, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    y[1] = -100
    kd_loss(s, t, y, backend="triton", reduction=reduction, validate=False).sum().backward()  # warm: compiles
    launches.clear()
    ops = _census(lambda: kd_loss(s, t, y, backend="triton", reduction=reduction, validate=False).sum().backward())
    assert len(launches) <= 2, launches
    assert "_local_scalar_dense" not in ops and "nonzero" not in ops, ops


def test_triton_mean_is_reduced_in_the_kernel_deterministically():
    """The last program sums the rows in row order: the same bits on every call, and the float64 value."""
    if not _triton_runs_here():
        pytest.skip("Triton cannot run here")
    kernels = importlib.import_module("kdfast.losses.triton")
    s, t, y = torch.randn(7, 9) * 3, torch.randn(7, 9), torch.randint(0, 9, (7,))
    y[3] = -100
    first = kernels.kd_loss_fwd(s, t, y, None, 0.3, 2.0, -100, 2, True, False)
    again = kernels.kd_loss_fwd(s, t, y, None, 0.3, 2.0, -100, 2, True, False)
    ref = kd_loss_fwd_torch(s.double(), t.double(), y, None, 0.3, 2.0, -100, 2, True, False)
    assert torch.equal(first[0], again[0]) and first[0].shape == ()
    assert_close("mean", first[0], ref[0], atol=1e-6, rtol=1e-6)
    assert_close("grad / n", first[1], ref[1], atol=1e-7, rtol=1e-5)
    assert int(kernels._counter(s.device)) == 0, "the last program resets the ticket counter"


def test_triton_config_overrides_tiles_warps_and_stages():
    """config= (the benchmark's sweep): a 16-wide tiled variant with 3 stages computes the same function."""
    if not _triton_runs_here():
        pytest.skip("Triton cannot run here")
    kernels = importlib.import_module("kdfast.losses.triton")
    assert kernels.forward_config(37) == {"SINGLE_TILE": True, "BLOCK_C": 64, "num_warps": 4, "num_stages": 1,
                                          "SPLIT": 1}
    cfg = kernels.forward_config(37, {"BLOCK": 16, "num_warps": 2, "num_stages": 3, "SPLIT": 4})
    assert cfg == {"SINGLE_TILE": False, "BLOCK_C": 16, "num_warps": 2, "num_stages": 3, "SPLIT": 4}
    for bad in ({"TILE": 16}, {"BLOCK": 24}, {"SPLIT": 3}):
        with pytest.raises(ValueError, match="config"):
            kernels.forward_config(37, bad)
    s, t, y = torch.randn(5, 37) * 3, torch.randn(5, 37), torch.randint(0, 37, (5,))
    ref = kd_loss_fwd_torch(s.double(), t.double(), y, None, 0.3, 2.0, -100, 0, True, True)
    # SPLIT 8 over 3 tiles: five programs of each row fold no tile at all
    for config in ({"BLOCK": 16, "num_stages": 3}, {"BLOCK": 16, "SPLIT": 2}, {"BLOCK": 16, "SPLIT": 8}):
        out = kernels.kd_loss_fwd(s, t, y, None, 0.3, 2.0, -100, 0, True, True, config=config)
        for name, a, b in zip(("rows", "grad", "stats"), out, ref):
            assert_close(f"{name} with {config}", a, b, atol=1e-5, rtol=1e-5)
    assert int(kernels._row_counters[s.device].abs().sum()) == 0, "the last part of each row resets its counter"


# ------------------------------------------------------------------------- the launcher's compiled cache
class _FakeCompiled:
    function, packed_metadata = "function", "packed"

    def __init__(self, fail=False):
        self.runs, self.fail = [], fail

    def run(self, *args):
        if self.fail:
            raise TypeError("another launcher API")
        self.runs.append(args)


class _FakeKernel:
    """kernel[grid](*args, **kw): records the ordinary launch and returns the compiled kernel."""

    def __init__(self, compiled):
        self.compiled, self.launches = compiled, []

    def __getitem__(self, grid):
        return lambda *args, **kw: (self.launches.append((grid, args, kw)), self.compiled)[1]


class _FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234


def test_launcher_caches_compiled_kernels_by_specialisation(monkeypatch):
    kernels = pytest.importorskip("kdfast.losses.triton")
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_driver", _FakeDriver())
    monkeypatch.setattr(kernels, "_hooks", lambda: (None, None))
    compiled = _FakeCompiled()
    kernel = _FakeKernel(compiled)
    x = torch.zeros(64)
    args, constexprs = (x, 48, 3), {"BLOCK": 16, "FLAG": True}
    kernels._launch(kernel, (4, 1, 1), args, constexprs, 4, 1)
    assert len(kernel.launches) == 1 and not compiled.runs  # first call: Triton's own launch, then cached
    kernels._launch(kernel, (4, 1, 1), args, constexprs, 4, 1)
    assert len(kernel.launches) == 1
    assert compiled.runs == [(4, 1, 1, 1234, "function", "packed", None, None, None, x, 48, 3, 16, True)]
    # anything Triton specialises on differs: a misaligned pointer, an int that is 1 or not a multiple of 16
    for other in ((x[1:], 48, 3), (x, 47, 3), (x, 48, 1), (x, 2 ** 40, 3)):
        kernels._launch(kernel, (4, 1, 1), other, constexprs, 4, 1)
    assert len(kernel.launches) == 5 and len(compiled.runs) == 1
    kernels._launch(kernel, (4, 1, 1), args, {"BLOCK": 32, "FLAG": True}, 4, 1)  # another constexpr
    kernels._launch(kernel, (4, 1, 1), args, constexprs, 8, 1)  # other warps
    assert len(kernel.launches) == 7


def test_launcher_falls_back_to_the_ordinary_launch(monkeypatch):
    kernels = pytest.importorskip("kdfast.losses.triton")
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_driver", _FakeDriver())
    monkeypatch.setattr(kernels, "_hooks", lambda: (None, None))
    kernel = _FakeKernel(_FakeCompiled(fail=True))
    args = (torch.zeros(16), 32)
    for _ in range(3):
        kernels._launch(kernel, (2, 1, 1), args, {}, 4, 1)
    assert kernels._compiled is None and len(kernel.launches) == 3  # an incompatible API: ordinary launches
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_hooks", lambda: ("profiler hook", None))
    kernel = _FakeKernel(_FakeCompiled())
    for _ in range(2):
        kernels._launch(kernel, (2, 1, 1), args, {}, 4, 1)
    assert len(kernel.launches) == 2 and not kernel.compiled.runs  # a launch hook set: Triton's path keeps it
