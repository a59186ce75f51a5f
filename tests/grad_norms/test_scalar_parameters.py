"""A 0-d parameter a module uses directly (a learned scale): its per-example gradients are (B,), one number each."""
import torch
from torch import nn

import kdfast


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))

    def forward(self, x):
        return x * self.s


def test_a_scalar_parameter_used_directly_is_exact():
    model = nn.Sequential(nn.Linear(4, 3), Scale()).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    got = kdfast.per_example_grad_norms(model, x, y)
    want = []
    for i in range(5):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum"),
                                    list(model.parameters()))
        want.append(torch.sqrt(sum(g.square().sum() for g in grads)))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-10, atol=0)
