"""Former home of the file primitives, kept as the public `kdfast.jobs` namespace: they live in kdfast.io.

    from kdfast.jobs import Job, ChunkStore, write_json, save_npy
"""
from kdfast.io import *  # noqa: F401,F403
from kdfast.io import __all__  # noqa: F401
