"""Plain-PyTorch oracles: slow, float64-capable, written for clarity. Tests compare every kernel to them."""
from .kd_loss import KD_STAT_NAMES, kd_loss_fwd_torch, kd_loss_ref, kd_stats_ref

__all__ = ["KD_STAT_NAMES", "kd_loss_fwd_torch", "kd_loss_ref", "kd_stats_ref"]
