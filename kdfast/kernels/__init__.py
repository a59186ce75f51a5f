"""Triton kernels and their launchers (GPU, or CPU under TRITON_INTERPRET=1). Imported lazily by the ops."""
