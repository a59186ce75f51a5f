"""The model's linear head and a forward hook that records ||h||^2 of its input for each example."""
from __future__ import annotations

import torch
from torch import nn

from kdfast.errors import InvalidArgumentError


def find_head(model: nn.Module, head=None) -> nn.Linear:
    """`head` (a module of `model`, or its qualified name), else the last nn.Linear registered in `model`."""
    if isinstance(head, str):
        modules = dict(model.named_modules())
        if head not in modules:
            raise InvalidArgumentError(f"score: head={head!r} is not a submodule name of the model")
        head = modules[head]
    if head is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise InvalidArgumentError(f"score: the model ({type(model).__name__}) has no nn.Linear layer to use "
                                       "as the head; pass head= (a linear module producing the logits)")
        head = linears[-1]
    if not isinstance(head, nn.Linear):
        raise InvalidArgumentError(f"score: head must be an nn.Linear producing the logits, got {type(head).__name__}")
    return head


class HeadCapture:
    """Forward hook on the head: keeps (B,) ||h||^2 of its input and its output, to check it made the logits."""

    def __init__(self, head: nn.Linear):
        self.head = head
        self.has_bias = head.bias is not None
        self.sqnorm = None
        self.output = None
        self._handle = head.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        h = inputs[0]
        if h.dim() != 2:
            raise InvalidArgumentError(f"score: the head's input must be (batch, features), got shape "
                                       f"{tuple(h.shape)}; pass head= a linear layer applied to pooled features")
        self.sqnorm = h.detach().float().pow(2).sum(1)
        self.output = output

    def take(self, logits: torch.Tensor) -> torch.Tensor:
        """The squared feature norms of the forward that produced `logits`."""
        if self.output is not logits:
            raise InvalidArgumentError("score: the head (the last nn.Linear, or head=) did not produce the model's "
                                       "output; pass head= the linear layer that computes the logits")
        sq, self.sqnorm, self.output = self.sqnorm, None, None
        return sq

    def remove(self) -> None:
        self._handle.remove()
