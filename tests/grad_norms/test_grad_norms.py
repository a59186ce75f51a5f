"""Per-example gradient norms: every rule and the engine against the torch.func vmap(grad) oracle."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contextlib import nullcontext

from torch.utils._python_dispatch import TorchDispatchMode

from kdfast.errors import BackendUnavailableError, InvalidArgumentError, UnsupportedModuleError
from kdfast.grad_norms import GradNormPlan, check, per_example_grad_norms, register_rule
from kdfast.grad_norms.forms import gram_sqnorm, outer_sqnorm, prefer_gram
from kdfast.grad_norms.registry import RULES, Sink, find_rule
from kdfast.grad_norms.reference import per_example_grad_norms_ref

RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def assert_close_rel(got, want, rtol, what):
    """Relative error per example (absolute where the oracle is exactly 0), with the worst index on failure."""
    got, want = got.double(), want.double()
    err = (got - want).abs() / want.abs().clamp_min(1e-30)
    err = torch.where(want == 0, (got - want).abs(), err)
    bad = err > rtol
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{err.numel()} mismatches, worst index {int(err.argmax())} "
                           f"rel err {err.max().item():.3e} (got {got.flatten()[err.argmax()].item():.6e}, "
                           f"want {want.flatten()[err.argmax()].item():.6e})")


def compare(model, x, y, dtype=torch.float64, **kw):
    model = model.to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    teacher = kw.get("teacher_logits")
    if teacher is not None:
        kw["teacher_logits"] = teacher.to(dtype)
    norms, sq = per_example_grad_norms(model, x, y, per_layer=True, **kw)
    ref_model = model.double()
    ref_x = x.double() if x.is_floating_point() else x
    if teacher is not None:
        kw["teacher_logits"] = teacher.double()
    kw.pop("on_missing", None)
    kw.pop("backend", None)
    ref, ref_sq = per_example_grad_norms_ref(ref_model, ref_x, y, **kw)
    assert norms.shape == (x.shape[0],)
    assert norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_rel(norms, ref, RTOL[dtype], "total norm")
    assert list(sq) == list(ref_sq), "per_layer names differ from the model's trainable parameters"
    for name in ref_sq:
        assert_close_rel(sq[name], ref_sq[name], RTOL[dtype] * 10, f"per_layer[{name!r}]")
    assert_close_rel(sum(sq.values()), norms.double() ** 2, RTOL[dtype], "per_layer sum vs total")
    return norms


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    return model.eval()


# ------------------------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    """ResNet block with in-place ReLU and an in-place residual add (the in-place hazards of torchvision)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.down(x)
        return self.relu(out)


def tiny_resnet(norm="bn"):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          BasicBlock(8, 8, 1), BasicBlock(8, 12, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(12, 5))
    if norm == "gn":
        for parent in model.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.BatchNorm2d):
                    setattr(parent, name, nn.GroupNorm(2, child.num_features))
    return _randomise_bn(model)


class TinyTransformer(nn.Module):
    """Embedding + pre-norm attention block + MLP on (B, T, d): Linear layers with a sequence dimension,
    shaped so that both the Gram and the materialised form are chosen."""

    def __init__(self, vocab=11, d=16, T=12, classes=4):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(T, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.RMSNorm(d)
        self.up = nn.Linear(d, 64)
        self.down = nn.Linear(64, d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        T = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(T, device=ids.device).expand(ids.shape[0], T))
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        h = h + self.proj(att @ v)
        h = h + self.down(F.gelu(self.up(self.ln2(h))))
        return self.head(h.mean(1))


def conv_net(n, bias):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]
    return nn.Sequential(
        conv(4, 6, 3, stride=2, padding=1, bias=bias), nn.PReLU(init=0.1),
        conv(6, 6, 3, dilation=2, padding="same", groups=3, padding_mode="reflect", bias=bias), nn.Tanh(),
        conv(6, 4, 2, stride=(1,) * (n - 1) + (2,), padding="valid", bias=bias), nn.Tanh(),
        conv(4, 8, 1, groups=4, bias=bias), nn.Tanh(),
        nn.Flatten(), nn.LazyLinear(3, bias=bias))


SPATIAL = {1: (11,), 2: (7, 9), 3: (5, 6, 7)}


# -------------------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("B", [1, 5])
def test_mlp(B):
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(inplace=True), nn.Linear(10, 10), nn.PReLU(10), nn.Linear(10, 4))
    compare(model, torch.randn(B, 6), torch.randint(0, 4, (B,)))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_conv_every_option(n, bias):
    model = conv_net(n, bias)
    x = torch.randn(3, 4, *SPATIAL[n])
    model(x)  # materialise the lazy head
    compare(model, x, torch.randint(0, 3, (3,)))


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_resnet(norm):
    model = tiny_resnet(norm)
    x, y = torch.randn(5, 3, 10, 10), torch.randint(0, 5, (5,))
    norms = compare(model, x, y)
    # a partial batch: every example's norm is its own, whatever the batch around it
    assert_close_rel(per_example_grad_norms(model, x[3:].double(), y[3:]), norms[3:], 1e-12, "partial batch")


def test_torchvision_resnet_in_place_ops():
    torchvision = pytest.importorskip("torchvision")
    model = _randomise_bn(torchvision.models.resnet18(num_classes=3))
    compare(model, torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2,)))


def test_layernorm_net():
    model = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 12),
                          nn.LayerNorm(12, bias=False), nn.Linear(12, 3))
    compare(model, torch.randn(4, 6), torch.randint(0, 3, (4,)))


def test_transformer_block_with_sequence_dim():
    model = TinyTransformer()
    ids = torch.randint(0, 11, (4, 12))
    ids[0, :3] = 0  # padding positions get no embedding gradient
    ids[1, :] = 5   # one id repeated at every position
    assert prefer_gram(12, 16, 64) and not prefer_gram(12, 16, 16)  # up is Gram, proj materialised
    compare(model, ids, torch.randint(0, 4, (4,)))


def test_kd_and_callable_losses():
    model = tiny_resnet("gn")
    x, y = torch.randn(3, 3, 8, 8), torch.randint(0, 5, (3,))
    teacher = torch.randn(3, 5) * 3
    teacher[0, 2] = float("-inf")
    compare(model, x, y, loss="kd", teacher_logits=teacher, alpha=0.3, temperature=2.5)
    compare(model, x, y, loss=lambda out, t: F.softplus(out).sum(1) - 2 * out.gather(1, t[:, None]).squeeze(1))


def test_zero_gradient_examples():
    model = nn.Sequential(nn.Linear(5, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    x = torch.randn(4, 5)
    x[1] = 0  # a bias-free net has exactly zero gradient at a zero input
    norms = compare(model, x, torch.randint(0, 3, (4,)))
    assert norms[1] == 0 and (norms[[0, 2, 3]] > 0).all()
    # a perfectly fit example: its squared error and every gradient of it are exactly zero
    fit = model(x.double()).detach()
    fit[2:] += torch.randn(2, 3, dtype=torch.float64)
    norms = compare(model, x, fit, loss=lambda out, t: (out - t).square().sum(1))
    assert (norms[:2] == 0).all() and (norms[2:] > 0).all()


def test_float32_and_frozen_parameters():
    model = tiny_resnet("bn")
    model[0].weight.requires_grad_(False)
    model[3].bn1.bias.requires_grad_(False)
    norms = compare(model, torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,)), dtype=torch.float32)
    assert norms.dtype == torch.float32


def test_modules_without_rule_go_through_the_use_capture(caplog):
    class Scale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.gain = nn.Parameter(torch.randn(n))
            self.shift = nn.Parameter(torch.randn(n))

        def forward(self, x):
            return x * self.gain + self.shift ** 2

    model = nn.Sequential(nn.Linear(4, 6), Scale(6), nn.ReLU(), nn.Linear(6, 3), Scale(3))
    x, y = torch.randn(3, 4), torch.randint(0, 3, (3,))
    assert check(model) == {} and check(model, x) == {}
    with caplog.at_level("WARNING", logger="kdfast.grad_norms"):
        compare(model, x, y)
        compare(model, x, y, on_missing="fallback")  # nothing the capture misses: no fallback, no warning
    assert not caplog.records


# ------------------------------------------------------------------------------------------ side effects
def _state(model):
    return ([(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
            [(m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for m in model.modules()])


def _same_state(a, b):
    (pa, ma), (pb, mb) = a, b
    assert ma == mb
    for (ra, ga), (rb, gb) in zip(pa, pb):
        assert ra == rb and (ga is None) == (gb is None) and (ga is None or torch.equal(ga, gb))


def _model_with_state(n):
    """A model whose state a run could disturb: a frozen weight and a gradient already there; and a batch of n."""
    model = tiny_resnet("gn").double()
    model[0].weight.requires_grad_(False)
    model[-1].weight.grad = torch.randn_like(model[-1].weight)
    return model, torch.randn(n, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (n,))


def test_no_side_effects_also_after_an_exception():
    model, x, y = _model_with_state(2)
    before = _state(model)
    per_example_grad_norms(model, x, y)
    _same_state(before, _state(model))

    def failing_loss(out, t):
        raise RuntimeError("midway")

    with pytest.raises(RuntimeError, match="midway"):
        per_example_grad_norms(model, x, y, loss=failing_loss)
    _same_state(before, _state(model))

    class Broken(nn.Linear):
        pass

    @register_rule(Broken)
    def broken_rule(module, x, grad_output, *, want, backend):
        raise RuntimeError("rule failed in the backward")

    broken = nn.Sequential(model, Broken(5, 2)).double()
    before = _state(broken)
    with pytest.raises(RuntimeError, match="rule failed"):
        per_example_grad_norms(broken, x, y.clamp(max=1))
    _same_state(before, _state(broken))


# ------------------------------------------------------------------------------------------ refusals
def test_batchnorm_in_train_mode_is_refused():
    model = tiny_resnet("bn").train()
    with pytest.raises(InvalidArgumentError, match=r"BatchNorm .* at 1, 3\.bn1.*model\.eval\(\)"):
        per_example_grad_norms(model, torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,)))
    no_stats = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(InvalidArgumentError, match="track_running_stats=False"):
        per_example_grad_norms(no_stats, torch.randn(2, 3), torch.randint(0, 4, (2,)))


class SharedPositions(nn.Module):
    """Adds positional embeddings computed once for the whole batch (the rows are not per example)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(3, 4)

    def forward(self, x):
        return x + self.emb(torch.arange(x.shape[1]))


def test_reused_module_and_shared_input_are_refused_tied_weights_are_exact():
    lin = nn.Linear(4, 4)
    with pytest.raises(UnsupportedModuleError, match="ran more than once"):
        per_example_grad_norms(nn.Sequential(lin, nn.Tanh(), lin), torch.randn(2, 4), torch.randint(0, 4, (2,)))
    with pytest.raises(UnsupportedModuleError, match=r"must return batch-first tensors with 2 rows.*expand"):
        per_example_grad_norms(SharedPositions(), torch.randn(2, 3, 4),
                               torch.randint(0, 4, (2, 3)))
    emb, head = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
    head.weight = emb.weight  # tied: the norm of the summed per-example gradient, no longer refused
    compare(nn.Sequential(emb, nn.Tanh(), head), torch.randint(0, 7, (2, 3)), torch.randint(0, 7, (2, 3)))


@pytest.mark.parametrize("kwargs, match", [
    ({"loss": "mse"}, "loss must be 'ce', 'kd' or a callable"),
    ({"loss": "kd"}, "needs teacher_logits"),
    ({"on_missing": "skip"}, "on_missing must be one of"),
    ({"per_layer": 1}, "per_layer must be a bool"),
    ({"loss": lambda out, t: out.sum()}, r"per-example losses of shape \(3,\), got \(\)"),
    ({"targets": torch.zeros(2, dtype=torch.long)}, r"one entry per example \(3\)"),
    ({"inputs": 3.0}, "inputs must be a batch-first tensor"),
])
def test_bad_arguments(kwargs, match):
    args = {"inputs": torch.randn(3, 4), "targets": torch.randint(0, 2, (3,))}
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=match):
        per_example_grad_norms(nn.Linear(4, 2), args.pop("inputs"), args.pop("targets"), **args)


def test_empty_batch_and_no_trainable_parameters():
    model = nn.Linear(4, 2)
    assert per_example_grad_norms(model, torch.randn(0, 4), torch.zeros(0, dtype=torch.long)).shape == (0,)
    model.requires_grad_(False)
    assert torch.equal(per_example_grad_norms(model, torch.randn(3, 4), torch.randint(0, 2, (3,))), torch.zeros(3))


# ------------------------------------------------------------------------------------------- registry
def test_registry_covers_the_built_in_layers():
    for cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.Embedding, nn.LazyLinear, nn.PReLU):
        assert find_rule(cls.__new__(cls)) is not None, cls.__name__
    assert find_rule(nn.ConvTranspose2d(2, 2, 3)) is None  # a sibling class, not a subclass: no rule


def test_register_rule_overwrite_and_mro():
    class MyLinear(nn.Linear):
        pass

    assert find_rule(MyLinear(2, 2)) is RULES[nn.Linear]  # the parent's rule through the MRO
    with pytest.raises(InvalidArgumentError, match="overwrite=True"):
        register_rule(nn.Linear)(lambda *a, **k: {})
    calls = []

    def my_rule(module, x, grad_output, *, want, backend):  # the dict-returning signature, still accepted
        calls.append(type(module).__name__)
        sink = Sink(per_param={n: torch.zeros(x.shape[0], dtype=x.dtype) for n in want})
        RULES[nn.Linear](module, x, grad_output, want=want, backend=backend, sink=sink, saved=None)
        return sink.per_param

    register_rule(MyLinear)(my_rule)
    try:
        assert find_rule(MyLinear(2, 2)) is my_rule  # the exact type wins over the parent
        register_rule(MyLinear, overwrite=True)(my_rule)
        compare(nn.Sequential(MyLinear(3, 4), nn.Tanh(), nn.Linear(4, 2)), torch.randn(3, 3),
                torch.randint(0, 2, (3,)))
        assert calls == ["MyLinear"]
    finally:
        del RULES[MyLinear]
    with pytest.raises(InvalidArgumentError, match="nn.Module subclasses"):
        register_rule(int)


# ------------------------------------------------------------------------------- forms and Triton kernels
def _explicit_conv_sqnorms(x, g, n, stride, padding, dilation, groups, kernel_size):
    """Each example's weight gradient by autograd, one example at a time (float64)."""
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    w = torch.zeros(g.shape[1], x.shape[1] // groups, *kernel_size, dtype=x.dtype, requires_grad=True)
    out = []
    for i in range(x.shape[0]):
        y = conv(x[i:i + 1], w, None, stride, padding, dilation, groups)
        (gw,) = torch.autograd.grad((y * g[i:i + 1]).sum(), w)
        out.append(gw.square().sum())
    return torch.stack(out)


# (n, Cin, Cout, kernel, stride, padding, dilation, groups, spatial): odd sizes, more than one tile of
# output channels (70 > 64) and of input-channel taps (8 * 9 = 72 > 64), 1x1, grouped, depthwise.
CONV_CASES = [
    (1, 3, 5, (3,), (2,), (1,), (1,), 1, (13,)),
    (2, 8, 70, (3, 3), (1, 1), (1, 1), (1, 1), 1, (5, 6)),
    (2, 6, 4, (3, 2), (2, 1), (0, 2), (2, 1), 2, (9, 7)),
    (2, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 4, (6, 6)),
    (2, 5, 7, (1, 1), (2, 2), (0, 0), (1, 1), 1, (5, 5)),
    (3, 4, 6, (2, 3, 2), (1, 2, 1), (1, 0, 1), (1, 1, 2), 2, (4, 5, 6)),
    (2, 3, 6, (3, 5), (2, 3), (1, 2), (2, 1), 3, (11, 12)),           # depthwise, channel multiplier 2
    (1, 4, 4, (4,), (3,), (0,), (2,), 4, (13,)),
    (3, 2, 2, (2, 3, 2), (1, 2, 2), (1, 0, 1), (1, 1, 2), 2, (5, 7, 6)),
]


def _added(form, *args, dtype=torch.float64):
    """A form's contribution, added into a zeroed (B,) buffer (how the engine calls it)."""
    out = torch.zeros(args[0].shape[0], dtype=dtype)
    form(*args, out) if not isinstance(form, str) else _triton_form(form, *args, out)
    return out


def _as_kernel_casts_to_bf16(x):
    """x rounded to bf16 the way a kernel's .to(bfloat16) does, in float64: to nearest even on a GPU,
    toward zero in the interpreter (so a kernel that upcast the bf16 operand instead would miss by ~4e-3)."""
    from kdfast.runtime.dispatch import triton_interpret
    if not triton_interpret():
        return x.bfloat16().double()
    return (x.float().view(torch.int32) & -65536).view(torch.float32).double()


def _triton_form(form, *args):
    from kdfast.grad_norms.rules.conv import _triton
    _triton(form, *args)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"conv{c[0]}d-{c[1]}x{c[2]}-g{c[7]}")
def test_conv_forms_and_triton_kernels(case):
    """Both forms in torch (float64) and in Triton, contiguous and channels-last, fp32 and under bf16
    autocast (an fp32 input beside a bf16 gradient: the input is cast down, the gradient never up)."""
    from kdfast.grad_norms.rules.conv import _depthwise_torch, _direct_torch, _gram_torch, _grouped_torch
    n, cin, cout, k, stride, padding, dilation, groups, spatial = case
    x = torch.randn(3, cin, *spatial, dtype=torch.float64)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    shape = conv(x, torch.zeros(cout, cin // groups, *k, dtype=x.dtype), None, stride, padding, dilation,
                 groups).shape
    g = torch.randn(shape, dtype=torch.float64)
    want = _explicit_conv_sqnorms(x, g, n, stride, padding, dilation, groups, k)
    args = (k, stride, padding, dilation, groups)
    assert_close_rel(_added(_direct_torch, x, g, *args), want, 1e-10, "direct (torch)")
    assert_close_rel(_added(_gram_torch, x, g, *args), want, 1e-10, "Gram (torch)")
    if groups > 1:
        assert_close_rel(_added(_grouped_torch, x, g, *args), want, 1e-10, "grouped (torch)")
    if groups == cin:
        for xs in [x] + ([x.contiguous(memory_format=torch.channels_last)] if n == 2 else []):
            assert_close_rel(_added(_depthwise_torch, xs, g, *args[:-1]), want, 1e-10, "depthwise (torch)")
        assert_close_rel(_added(_depthwise_torch, x.float(), g.float(), *args[:-1], dtype=torch.float32), want,
                         1e-4, "depthwise (torch, fp32)")
    g_bf = g.bfloat16()
    want_bf = _explicit_conv_sqnorms(_as_kernel_casts_to_bf16(x.float()), g_bf.double(), n, stride, padding,
                                     dilation, groups, k)
    layouts = [x.float()] + ([x.float().contiguous(memory_format=torch.channels_last)] if n == 2 else [])
    for form in ("direct", "gram"):
        for xs in layouts:
            what = f"{form} (Triton, {'channels-last' if not xs.is_contiguous() else 'contiguous'})"
            assert_close_rel(_added(form, xs, g.float(), *args, dtype=torch.float32), want, 1e-4, what)
        # bf16 products are exact in fp32: the result matches the float64 norm of the bf16-rounded operands
        assert_close_rel(_added(form, x.float(), g_bf, *args, dtype=torch.float32), want_bf, 1e-4,
                         f"{form} (Triton, fp32 input, bf16 gradient)")


@pytest.mark.parametrize("T, da, dg", [(1, 5, 3), (7, 20, 9), (70, 6, 17)])
def test_linear_forms_and_triton_kernels(T, da, dg):
    a = torch.randn(4, T, da, dtype=torch.float64)
    g = torch.randn(4, T, dg, dtype=torch.float64)
    want = torch.einsum("ntd,nte->nde", a, g).square().sum((1, 2))
    assert_close_rel(gram_sqnorm(a, g, "torch"), want, 1e-10, "Gram (torch)")
    assert_close_rel(outer_sqnorm(a, g, "torch"), want, 1e-10, "outer (torch)")
    at, gt = a.float().transpose(1, 2).contiguous().transpose(1, 2), g.float()  # a strided view
    assert_close_rel(gram_sqnorm(at, gt, "triton"), want, 1e-4, "Gram (Triton)")
    assert_close_rel(outer_sqnorm(at, gt, "triton"), want, 1e-4, "outer (Triton)")


def test_engine_on_the_triton_backend():
    model = _randomise_bn(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.PReLU(4), nn.Conv2d(4, 6, 3, stride=2),
        nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 3)))
    compare(model, torch.randn(2, 3, 6, 6), torch.randint(0, 3, (2,)), dtype=torch.float32, backend="triton")
    compare(TinyTransformer(T=5), torch.randint(0, 11, (2, 5)), torch.randint(0, 4, (2,)), dtype=torch.float32,
            backend="triton")


def test_input_modified_in_place_after_the_layer_is_refused():
    class Clobber(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = torch.tanh(x)
            out = self.a(h)
            h.mul_(2)  # the saved input of `a` changes after `a` ran
            return self.b(out + h)

    with pytest.raises(UnsupportedModuleError, match="`a` .* modified in place"):
        per_example_grad_norms(Clobber(), torch.randn(2, 4), torch.randint(0, 3, (2,)))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "features_last"])
@pytest.mark.parametrize("stats", ["rstd", "var", None, "neg_part"])
def test_norm_affine_sqnorms_torch_and_triton(layout, stats):
    from kdfast.grad_norms.forms import affine_sqnorms
    B, C, L, G = 3, 21, 150, 7  # more than one channel block (16) and position block (128); 3 channels a group
    x = torch.randn(B, C, L, dtype=torch.float64) * 2 + 1
    g = torch.randn(B, C, L, dtype=torch.float64)
    mean, stat = torch.randn(G, dtype=torch.float64).expand(B, G), torch.rand(B, G, dtype=torch.float64) + 0.5
    eps = 1e-3
    rstd = stat if stats == "rstd" else (stat + eps).rsqrt() if stats == "var" else None
    x_hat = (x.clamp(max=0) if stats == "neg_part" else x) if rstd is None else (
        (x - mean.repeat_interleave(C // G, 1)[..., None]) * rstd.repeat_interleave(C // G, 1)[..., None])
    want_w, want_b = (g * x_hat).sum(2).square().sum(1), g.sum(2).square().sum(1)
    if layout == "features_last":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "channels_last":
        x = x.reshape(B, C, 10, 15).contiguous(memory_format=torch.channels_last).reshape(B, C, L)
    assert x.is_contiguous() == (layout == "contiguous") and x.float().stride() == x.stride()
    kw = dict(stats=None if stats == "neg_part" else stats, eps=eps, neg_part=stats == "neg_part")
    for backend, tol, dt in (("torch", 1e-10, torch.float64), ("triton", 1e-4, torch.float32)):
        out_w, out_b = torch.zeros(B, dtype=dt), torch.ones(B, dtype=dt)  # adds into what is there
        affine_sqnorms(x.to(dt), g.to(dt), mean, stat, out_w=out_w, out_b=out_b, backend=backend, **kw)
        assert_close_rel(out_w, want_w, tol, f"sum_c (sum_l g x_hat)^2 ({backend})")
        assert_close_rel(out_b - 1, want_b, tol, f"sum_c (sum_l g)^2 ({backend})")


def test_multi_output_modules_and_weights_used_by_the_parent():
    """nn.MultiheadAttention returns a tuple and uses out_proj's weight without its forward: its rule covers
    out_proj, in either on_missing mode."""

    class Block(nn.Module):
        def __init__(self, d=8, T=5):
            super().__init__()
            self.emb = nn.Embedding(13, d)
            self.att = nn.MultiheadAttention(d, 2, batch_first=True)
            self.head = nn.Linear(d, 3)

        def forward(self, ids):
            h = self.emb(ids)
            out, weights = self.att(h, h, h, key_padding_mask=ids == 0)
            return self.head(out.mean(1) + weights.mean((1, 2))[:, None])

    model = Block().eval()
    ids = torch.randint(1, 13, (3, 5))
    ids[0, -2:] = 0
    assert check(model) == {} and check(model, ids) == {}
    compare(model, ids, torch.randint(0, 3, (3,)))
    compare(model, ids, torch.randint(0, 3, (3,)), on_missing="fallback")


def test_fallback_module_using_its_parameter_before_a_nested_layer():
    """The nested layers' inputs depend on the parent's own parameter, not on an earlier layer's output: the
    backward must still reach them."""

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.shift = nn.Parameter(torch.randn(3, 1, 1))
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4 * 4 * 4, 3)

        def forward(self, x):
            return self.head(self.conv(x + self.shift).flatten(1))

    compare(Shifted(), torch.randn(2, 3, 6, 6), torch.randint(0, 3, (2,)), on_missing="fallback")


def test_triton_engine_on_a_channels_last_net_under_bf16_autocast():
    model = _randomise_bn(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2),
        nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 2 * 2, 3)))
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (2,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = per_example_grad_norms(model, x, y, backend="triton")
        torch_path = per_example_grad_norms(model, x, y, backend="torch")
    ref, _ = per_example_grad_norms_ref(model.double(), x.double(), y)
    assert got.dtype == torch.float32
    assert_close_rel(got, ref, 5e-2, "Triton, bf16 autocast vs float64")  # bf16 activations: ~1e-2 budget
    assert_close_rel(got, torch_path, 1e-2, "Triton vs torch rules on the same bf16 activations")


def test_groupnorm_reads_the_statistics_of_its_forward(monkeypatch):
    model = tiny_resnet("gn").double()
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (2,))
    want, _ = per_example_grad_norms_ref(model, x, y)

    def no_recompute(*a, **k):
        raise AssertionError("GroupNorm statistics recomputed")

    monkeypatch.setattr(torch, "var_mean", no_recompute)
    assert_close_rel(per_example_grad_norms(model, x, y), want, 1e-10, "GroupNorm with its saved statistics")


def test_triton_cost_model_picks_gram_where_few_positions_meet_many_weights():
    # ResNet-50 at 224 px: layer1's 3x3 (56x56 positions, 64 -> 64) direct, layer4's 3x3 (7x7, 512 -> 512) Gram
    assert not prefer_gram(56 * 56, 64 * 9, 64, taps=9, backend="triton")
    assert prefer_gram(7 * 7, 512 * 9, 512, taps=9, backend="triton")
    # narrow input channels pay a whole 16-wide tile per tap in the direct kernel: conv1 (3 -> 64, 7x7, 112x112)
    assert not prefer_gram(112 * 112, 3 * 49, 64, taps=49, backend="triton")
    assert prefer_gram(16, 256, 256, backend="triton") and not prefer_gram(64, 8, 8, backend="triton")
    assert not prefer_gram(4, 100, 100, backend="triton")  # 4 positions still fill a 16-row Gram tile


def test_under_autocast_the_rules_keep_fp32_accumulation():
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norms = per_example_grad_norms(model, x, y)
    assert norms.dtype == torch.float32
    ref, _ = per_example_grad_norms_ref(model.double(), x.double(), y)
    assert_close_rel(norms, ref, 5e-2, "autocast bf16 vs float64")  # bf16 activations: ~1e-2 budget


_COMPILE_FOR_SM90 = """
import inspect, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kdfast.grad_norms.triton as kernels

def compile_for_sm90(kernel, pointers, constexprs):
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    if compiled.metadata.shared > 227 * 1024:
        sys.exit(f"{kernel.fn.__name__} needs {compiled.metadata.shared} bytes of shared memory, sm_90 has 227 KiB")

conv = {"KD": 1, "KH": 3, "KW": 3, "NUM_STAGES": kernels.NUM_STAGES}
for dtype, precision, dot in (("fp32", "tf32x3", "fp32"), ("bf16", "tf32", "bf16"), ("fp32", "tf32", "bf16")):
    pointers = {"x_ptr": f"*{dtype}", "g_ptr": "*bf16" if dot == "bf16" else f"*{dtype}", "out_ptr": "*fp32"}
    dt = {"fp32": tl.float32, "bf16": tl.bfloat16}[dot]
    compile_for_sm90(kernels._conv_wgrad_sqnorm_kernel, pointers,
                     {**conv, "BLOCK_M": kernels.MAX_TILE, "BLOCK_N": kernels.MAX_TILE, "BLOCK_H": 8, "BLOCK_W": 8,
                      "DOT_DTYPE": dt, "MMA_DTYPE": dt, "PRECISION": precision})
    compile_for_sm90(kernels._conv_gram_sqnorm_kernel, pointers,
                     {**conv, "BLOCK_T": kernels.MAX_TILE, "BLOCK_C": kernels.MAX_TILE, "DOT_DTYPE": dt,
                      "MMA_DTYPE": dt, "PRECISION": precision})
compile_for_sm90(kernels._affine_sqnorm_kernel,
                 {"x_ptr": "*bf16", "g_ptr": "*bf16", "mean_ptr": "*fp32", "stat_ptr": "*fp32", "outw_ptr": "*fp32",
                  "outb_ptr": "*fp32", "eps": "fp32"},
                 {"STATS": kernels.STATS_RSTD, "NEG_PART": False, "HAS_W": True, "HAS_B": True,
                  "BLOCK_C": kernels.NORM_BLOCK_C, "BLOCK_L": kernels.NORM_MAX_BLOCK_L})
compile_for_sm90(kernels._rank_one_sqnorm_kernel,
                 {"a_ptr": "*bf16", "g_ptr": "*bf16", "outw_ptr": "*fp32", "outb_ptr": "*fp32"},
                 {"HAS_W": True, "HAS_B": True, "BLOCK": kernels.RANK_ONE_BLOCK})
"""


def test_triton_kernels_compile_for_a_hopper_gpu():
    """Offline compilation to sm_90 with the bundled ptxas, in a process without TRITON_INTERPRET: checks
    the interpreter cannot make (dot operand types, shared-memory limits, layouts)."""
    import os
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"no bundled ptxas at {ptxas}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_benchmark_smoke_run():
    """The benchmark on a tiny CNN, so it cannot rot: every provider checked against vmap, rows complete."""
    bench = pytest.importorskip("bench.perf.bench_grad_norms", reason="bench/ ships with the repository only")
    emitted = []
    rows = bench.run(device=torch.device("cpu"), smoke=True, providers=("plain", "kdfast", "vmap"), reps=1,
                     emit=emitted.append)
    assert emitted == rows and {r["mode"] for r in rows} == {"census", "full"}
    by = {r["provider"]: r for r in rows if r["mode"] == "full"}
    assert set(by) == {"plain", "kdfast", "vmap"} and all("ms" in r and r["p20"] <= r["p80"] for r in by.values())
    assert by["kdfast"]["max_rel_err_vs_vmap"] < 1e-4 and set(by["kdfast"]["speedup_vs"]) == {"plain", "vmap"}
    assert "kdfast" in bench.format_table(rows)
    skipped = bench.run(device=torch.device("cpu"), smoke=True, budget_s=0.0, census=False)
    assert [r["mode"] for r in skipped] == ["skipped"] and "budget" in skipped[0]["note"]
    goals = bench.targets(rows)
    assert {t["issue"] for t in goals} == {11, 22} and all(t["measured"] is None for t in goals)  # no such rows


def test_op_and_launch_census_within_1_5x_of_plain():
    """The GPU path's host-side work (aten ops + Triton launches, counted without running them) for
    ResNet-18 GroupNorm, ResNet-50 (BatchNorm eval) and ViT-B/16 (the attention rule's recompute) against the
    plain forward + backward."""
    bench = pytest.importorskip("bench.perf.bench_grad_norms", reason="bench/ ships with the repository only")
    pytest.importorskip("torchvision")
    rows = bench.census_rows(configs=["resnet18-gn-32px-b4", "resnet50-64px-b2", "vit_b_16-32px-b2"])
    kdfast_rows = [r for r in rows if r["provider"] == "kdfast"]
    assert len(kdfast_rows) == 3
    for r in kdfast_rows:
        assert r["kernel_launches"] > 0 and r["ratio_to_plain"] <= 1.5, r
    met = {t["what"]: t["met"] for t in bench.targets(rows) if "census" in t["what"] and t["met"] is not None}
    assert list(met.values()) == [True, True, True]


# ------------------------------------------------------------------------------------------ plan, syncs
SYNCING_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static", "equal", "masked_select",
               "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave"}


class _ForbidSyncs(TorchDispatchMode):
    """Fails on every aten op that makes the host wait for the device (on CUDA; flagged here on the CPU)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        assert name not in SYNCING_OPS, f"host synchronisation: aten.{name}"
        if name in ("_to_copy", "copy_") and any(isinstance(a, torch.Tensor) and a.device.type == "cuda"
                                                  for a in args):
            assert kwargs.get("device", args[0].device).type == "cuda", f"device-to-host copy: aten.{name}"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_host_synchronisation_in_the_path(monkeypatch, backend):
    bench = pytest.importorskip("bench.perf.bench_grad_norms", reason="bench/ ships with the repository only")
    # kd_loss's CPU backends read labels and scalars on the host (no device synchronisation, but they would
    # trip the check; CUDA tensors take its Triton kernels): here the engine is checked with a plain loss,
    # and that its internal kd_loss call skips the label check's synchronisation
    import importlib
    kd_module = importlib.import_module("kdfast.losses.kd_loss")
    validates = []
    real = kd_module.kd_loss
    monkeypatch.setattr(kd_module, "kd_loss", lambda *a, **k: validates.append(k.get("validate")) or real(*a, **k))
    per_example_grad_norms(nn.Linear(4, 3), torch.randn(2, 4), torch.randint(0, 3, (2,)), backend=backend)
    assert validates == [False]

    def ce(out, t):
        return F.cross_entropy(out, t, reduction="none")

    for name in ("item", "tolist", "__bool__"):
        def refuse(*a, _name=name, **k):
            raise AssertionError(f"host synchronisation: Tensor.{_name}")
        monkeypatch.setattr(torch.Tensor, name, refuse)
    cases = [(tiny_resnet("gn"), torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,))),
             (tiny_resnet("bn"), torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,))),
             (TinyTransformer(T=5).eval(), torch.randint(0, 11, (2, 5)), torch.randint(0, 4, (2,)))]
    census = bench.OpCensus()
    launches = bench.counted_triton_launches(census) if backend == "triton" else nullcontext()
    with launches:
        for model, x, y in cases:
            with GradNormPlan(model, backend=backend) as plan, _ForbidSyncs():
                plan(x, y, loss=ce)
                plan(x, y, loss=ce, per_layer=True)
    assert (census.launches > 0) == (backend == "triton")


def test_a_plan_installs_its_hooks_once_flips_no_flag_and_leaves_the_model_as_it_was():
    model, x, y = _model_with_state(3)
    before = _state(model)
    flags = [p.requires_grad for p in model.parameters()]
    seen = []
    watch = model[3].register_forward_pre_hook(lambda m, a: seen.append([p.requires_grad for p in model.parameters()]))
    want, _ = per_example_grad_norms_ref(model, x, y)
    with GradNormPlan(model) as plan:
        hooks = [len(m._forward_hooks) for m in model.modules()]
        assert sum(hooks) == sum(len(m._forward_hooks) for m in model.modules()) > 0
        for _ in range(3):
            assert_close_rel(plan(x, y), want, 1e-10, "plan call")
            assert_close_rel(per_example_grad_norms(model, x, y), want, 1e-10, "call through the open plan")
            assert [len(m._forward_hooks) for m in model.modules()] == hooks  # installed once, not per call
        model(x)  # a plain forward while the plan is open: its hooks stay idle
    watch.remove()
    assert seen and all(s == flags for s in seen)  # requires_grad never flipped during a call
    _same_state(before, _state(model))
    with pytest.raises(InvalidArgumentError, match="not open"):
        plan(x, y)
    with GradNormPlan(model) as plan:
        model[-1].bias.requires_grad_(False)
        with pytest.raises(InvalidArgumentError, match="requires_grad .* changed"):
            plan(x, y)
        model[-1].bias.requires_grad_(True)
        assert_close_rel(plan(x, y), want, 1e-10, "after the refusal")
    from kdfast.grad_norms.engine import _OPEN
    with GradNormPlan(model) as plan:
        with GradNormPlan(model, backend="torch") as inner:  # another plan on the same model, closed first
            assert _OPEN[model] is inner
            assert_close_rel(per_example_grad_norms(model, x, y), want, 1e-10, "two plans open")
        assert _OPEN[model] is plan
    assert model not in _OPEN
    bn = tiny_resnet("bn")
    with GradNormPlan(bn) as plan:
        bn.train()
        with pytest.raises(InvalidArgumentError, match="batch statistics"):
            plan(x.float(), y)


def test_cuda_graph_is_refused_cleanly_off_cuda():
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    with GradNormPlan(model, cuda_graph=True) as plan:
        with pytest.raises(BackendUnavailableError, match="cuda_graph=True captures CUDA work.*cuda_graph=False"):
            plan(torch.randn(2, 4), torch.randint(0, 3, (2,)))
    with pytest.raises(InvalidArgumentError, match="cuda_graph must be a bool"):
        GradNormPlan(model, cuda_graph="yes")
