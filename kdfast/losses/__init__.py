"""Functional ops, one per file: argument checks, backend dispatch, autograd and torch.library registration."""
from kdfast.losses.kd_loss import KDLoss, KDLossFunction, kd_loss

__all__ = ["KDLoss", "KDLossFunction", "kd_loss"]
