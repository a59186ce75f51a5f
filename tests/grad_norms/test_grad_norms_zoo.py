"""Per-example gradient norms of today's ImageNet architectures: the MultiheadAttention rule, parameters used by
module code directly (use capture), tied parameters, LayerNorm2d, grouped convolutions, and the torchvision zoo
against a float64 per-example loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdfast.errors import UnsupportedModuleError
from kdfast.grad_norms import check, per_example_grad_norms

from test_grad_norms import assert_close_rel, compare

torchvision = pytest.importorskip("torchvision")


def loop_norms(model, x, y):
    """Float64 oracle: one autograd backward per example, its gradient summed over every parameter use."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        out.append(sum(g.double().square().sum() for g in torch.autograd.grad(loss, params)).sqrt())
    return torch.stack(out)


def independent(model, x, y, **kw):
    """Perturbing example 0 changes its own norm only: a reduction that mixes examples cannot pass."""
    before = per_example_grad_norms(model, x, y, **kw)
    x2 = x.clone()
    x2[0] = x2[0] + torch.randn_like(x2[0])
    after = per_example_grad_norms(model, x2, y, **kw)
    assert_close_rel(after[1:], before[1:], 1e-12, "norms of the unperturbed examples")
    assert (after[0] - before[0]).abs() > 1e-6 * before[0], "example 0's norm ignored its own input"


# --------------------------------------------------------------------------------- MultiheadAttention
class Attention(nn.Module):
    """One nn.MultiheadAttention in either layout, self- or cross-attention, masks and the weights output."""

    def __init__(self, batch_first, kdim=None, bias_kv=False, zero_attn=False, weights=False, cross=False,
                 bias=True, float_mask=False, T=5, d=8):
        super().__init__()
        self.att = nn.MultiheadAttention(d, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias,
                                         add_bias_kv=bias_kv, add_zero_attn=zero_attn)
        self.kv = nn.Linear(d, kdim or d)
        self.head = nn.Linear(d, 3)
        self.batch_first, self.weights, self.cross, self.float_mask = batch_first, weights, cross, float_mask
        mask = torch.randn(T, T) if float_mask else torch.rand(T, T) > 0.7
        self.register_buffer("mask", mask.fill_diagonal_(0 if float_mask else False))

    def forward(self, x):
        q = x if self.batch_first else x.transpose(0, 1)
        kv = self.kv(q) if self.cross else q
        padding = x[..., 0] > 1.0  # per example, from its own input
        padding[:, 0] = False
        if self.float_mask:
            padding = padding.to(x.dtype) * -3.0
        out, w = self.att(q, kv, kv, key_padding_mask=padding, attn_mask=self.mask, need_weights=self.weights)
        out = out if self.batch_first else out.transpose(0, 1)
        pooled = out.mean(1)
        return self.head(pooled + w.mean((1, 2))[:, None] if self.weights else pooled)


ATTENTION_CASES = [
    dict(batch_first=True),
    dict(batch_first=False),
    dict(batch_first=True, kdim=6, cross=True),
    dict(batch_first=False, bias_kv=True, zero_attn=True, weights=True),
    dict(batch_first=True, cross=True, bias=False, weights=True, float_mask=True),
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_multihead_attention_rule(case):
    torch.manual_seed(0)
    model = Attention(**case).eval()
    assert check(model, torch.randn(2, 5, 8)) == {}
    x = torch.randn(3, 5, 8)
    compare(model, x, torch.randint(0, 3, (3,)))
    independent(model.double(), x.double(), torch.randint(0, 3, (3,)))


def test_multihead_attention_rule_in_float32_and_refused_with_dropout_in_train_mode():
    torch.manual_seed(1)
    compare(Attention(batch_first=True).eval(), torch.randn(3, 5, 8), torch.randint(0, 3, (3,)),
            dtype=torch.float32)
    model = Attention(batch_first=True)
    model.att.dropout = 0.1
    with pytest.raises(UnsupportedModuleError, match="dropout=0.1 in train mode.*model.eval"):
        per_example_grad_norms(model.train(), torch.randn(2, 5, 8), torch.randint(0, 3, (2,)))


# --------------------------------------------------------------------------------- direct parameter uses
class DirectUses(nn.Module):
    """A class token (expanded, concatenated), positional embeddings (added), a layer scale (multiplied), a
    relative position bias table (gathered, permuted, added to attention logits of window-major rows) and a
    child Linear whose weight the parent passes to F.linear itself."""

    def __init__(self, d=6, T=4, heads=2, windows=3):
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.class_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, T + 1, d))
        self.scale = nn.Parameter(torch.randn(d) * 0.5 + 1)
        self.table = nn.Parameter(torch.randn(2 * T + 1, heads))
        self.register_buffer("index", (torch.arange(T + 1)[:, None] - torch.arange(T + 1)[None] + T).clamp(0, 2 * T))
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, 3)
        self.heads, self.windows = heads, windows

    def forward(self, x):                                       # x (B, windows, T, 5)
        B, W, T, _ = x.shape
        h = self.embed(x).reshape(B * W, T, -1)                 # window-major rows, as Swin's partition
        h = torch.cat([self.class_token.expand(B * W, -1, -1), h], 1) + self.pos
        q, k, v = F.linear(h, self.qkv.weight, self.qkv.bias).chunk(3, -1)
        bias = self.table[self.index.reshape(-1)].view(T + 1, T + 1, -1).permute(2, 0, 1).unsqueeze(0)
        qh, kh, vh = (t.reshape(B * W, T + 1, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(qh @ kh.transpose(-1, -2) + bias, -1) @ vh
        h = h + self.scale * att.transpose(1, 2).reshape(B * W, T + 1, -1)
        return self.head(h.reshape(B, -1, h.shape[-1]).mean(1))


def test_direct_parameter_uses_are_captured():
    torch.manual_seed(2)
    model = DirectUses()
    x = torch.randn(3, 3, 4, 5)
    assert check(model, x) == {}
    compare(model, x, torch.randint(0, 3, (3,)))
    compare(model, x[:1], torch.randint(0, 3, (1,)))  # B = 1: every tensor is batch-led
    compare(model, x, torch.randint(0, 3, (3,)), dtype=torch.float32)
    independent(model.double(), x.double(), torch.randint(0, 3, (3,)))


def test_tied_parameters_norm_of_the_summed_gradient():
    """lm_head tied to the embedding, and a parameter used both by its module and by module code."""

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.mix = nn.Linear(6, 6)
            self.lm_head = nn.Linear(6, 11, bias=False)
            self.lm_head.weight = self.emb.weight

        def forward(self, ids):
            h = torch.tanh(self.mix(self.emb(ids)))
            return self.lm_head(h) + F.linear(h, self.mix.weight).sum(-1, keepdim=True)

    torch.manual_seed(3)
    model = TiedLM()
    ids = torch.randint(0, 11, (3, 5))
    norms = compare(model, ids, torch.randint(0, 11, (3, 5)))
    # the norm of the sum is not the sum of the uses' norms: the cross terms matter
    untied = TiedLM().double()
    untied.load_state_dict(model.state_dict())
    untied.lm_head.weight = nn.Parameter(model.emb.weight.detach().clone())
    assert ((per_example_grad_norms(untied, ids, torch.randint(0, 11, (3, 5))) - norms).abs() > 1e-6).any()


def test_an_unsupported_custom_module_is_listed_in_one_error_and_falls_back_alone(caplog):
    class BatchCoupled(nn.Module):  # its parameter meets a statistic over the whole batch
        def __init__(self, d):
            super().__init__()
            self.w = nn.Parameter(torch.randn(d))

        def forward(self, x):
            return x * (self.w * x.mean(0, keepdim=True))

    model = nn.Sequential(nn.Linear(4, 5), BatchCoupled(5), nn.Tanh(), nn.Linear(5, 3), BatchCoupled(3)).double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    assert check(model, x) == {"1": "BatchCoupled", "4": "BatchCoupled"}
    with pytest.raises(UnsupportedModuleError, match=r"2 module\(s\).*`1` \(BatchCoupled\).*`4` \(BatchCoupled\)"
                                                     r".*on_missing='fallback'"):
        per_example_grad_norms(model, x, y)
    # the fallback takes over the two small modules only (torch.func on one example sees a batch of one),
    # logged once for the class; the Linear layers keep their rules
    import kdfast.grad_norms.fallback as fallback_module
    fallback_module._LOGGED.discard(BatchCoupled)
    with caplog.at_level("WARNING", logger="kdfast.grad_norms"):
        norms, sq = per_example_grad_norms(model, x, y, on_missing="fallback", per_layer=True)
    assert [r.getMessage().count("no rule for BatchCoupled") for r in caplog.records] == [1]
    assert list(sq) == [n for n, _ in model.named_parameters()] and torch.isfinite(norms).all()


# --------------------------------------------------------------------------------- norms and convolutions
def _norms_and_grouped_convolutions(batch):
    """LayerNorm2d, depthwise convolutions (plain and strided) and a grouped one at stride 3, materialised on `batch`."""
    from torchvision.models.convnext import LayerNorm2d

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), LayerNorm2d(8),
        nn.Conv2d(8, 8, 5, stride=1, padding=2, groups=8), nn.GELU(),   # depthwise
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),              # depthwise, strided
        nn.Conv2d(8, 12, 3, stride=3, groups=4), LayerNorm2d(12),       # grouped, stride 3
        nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(batch, 3, 14, 14)
    model(x)
    return model, x, torch.randint(0, 4, (batch,))


def test_layernorm2d_and_grouped_convolutions_at_every_stride():
    torch.manual_seed(4)
    compare(*_norms_and_grouped_convolutions(3))


# --------------------------------------------------------------------------------- the zoo
ZOO = {  # name: (constructor keyword arguments, image side): the smallest inputs each accepts
    "vit_b_16": ({"image_size": 32}, 32),
    "swin_t": ({}, 32),
    "convnext_tiny": ({}, 32),
    "maxvit_t": ({}, 224),
    "resnet50": ({}, 32),
    "efficientnet_b0": ({}, 32),
    "mobilenet_v3_small": ({}, 32),
    "regnet_y_400mf": ({}, 32),
    "densenet121": ({}, 32),
}


def _zoo_model(name, dtype):
    kwargs, side = ZOO[name]
    torch.manual_seed(5)
    model = getattr(torchvision.models, name)(num_classes=5, **kwargs).to(dtype).eval()
    x = torch.randn(2, 3, side, side, dtype=dtype)
    return model, x, torch.tensor([1, 4])


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_every_parameter_claimed_and_exact_in_float64(name):
    model, x, y = _zoo_model(name, torch.float64)
    assert check(model, x) == {}, "parameters no rule or use capture claims"
    norms = per_example_grad_norms(model, x, y, on_missing="error")
    assert_close_rel(norms, loop_norms(model, x, y), 1e-10, f"{name} float64")


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "convnext_tiny"])
def test_zoo_float32_within_1e_4(name):
    model, x, y = _zoo_model(name, torch.float32)
    norms = per_example_grad_norms(model, x, y, on_missing="error")
    assert_close_rel(norms, loop_norms(model.double(), x.double(), y), 1e-4, f"{name} float32")


def test_convnext_with_the_fallback_runs_and_matches():
    """The opt-in fallback never changes a model fully covered: ConvNeXt used to crash with it."""
    model, x, y = _zoo_model("convnext_tiny", torch.float64)
    assert_close_rel(per_example_grad_norms(model, x, y, on_missing="fallback"),
                     per_example_grad_norms(model, x, y), 1e-12, "fallback vs error mode")


# --------------------------------------------------------------------------------- the Triton path
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_multihead_attention_rule_on_the_triton_backend(case):
    torch.manual_seed(6)
    compare(Attention(**case).eval(), torch.randn(2, 5, 8), torch.randint(0, 3, (2,)), dtype=torch.float32,
            backend="triton")


def test_direct_uses_and_tied_parameters_on_the_triton_backend():
    """The use capture's F.linear uses (Gram / materialised forms in Triton), the vmapped uses and a tied
    weight, in float32 against the float64 oracle."""
    torch.manual_seed(7)
    compare(DirectUses(), torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2,)), dtype=torch.float32, backend="triton")

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.mix = nn.Linear(6, 6)
            self.out = nn.Linear(6, 6)
            self.lm_head = nn.Linear(6, 11, bias=False)
            self.lm_head.weight = self.emb.weight

        def forward(self, ids):
            h = torch.tanh(self.mix(self.emb(ids)))
            h = h + F.linear(h, self.out.weight, self.out.bias)  # used once, by the parent: nn.Linear's forms
            return self.lm_head(h) + F.linear(h, self.mix.weight).sum(-1, keepdim=True)

    compare(TiedLM(), torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 5)), dtype=torch.float32,
            backend="triton")


def test_layernorm2d_and_grouped_convolutions_on_the_triton_backend():
    torch.manual_seed(8)
    compare(*_norms_and_grouped_convolutions(2), dtype=torch.float32, backend="triton")
