"""NumPy views of what callers pass as arrays (tensors on any device, arrays, sequences) without importing torch:
the modules that read scores, labels and identities serve kdfast-prune, which runs without it."""
from __future__ import annotations

import numpy as np


def to_numpy(values) -> np.ndarray:
    """`values` as a NumPy array: a tensor detached and copied to the CPU (bf16 as float32, which NumPy lacks),
    anything else through np.asarray."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
        return (values.float() if str(values.dtype) == "torch.bfloat16" else values).numpy()
    return np.asarray(values)
