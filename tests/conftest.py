"""Test configuration: without a GPU, Triton kernels run under TRITON_INTERPRET=1 (set before any import
of triton, which reads it when kernels are decorated)."""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test, yet reproducible from the test's id when one fails.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def pytest_collection_modifyitems(config, items):
    # `gpu` tests need a CUDA device: skipped, with the reason shown, where there is none
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_threads():
    # a benchmark or reproduction called in-process may set torch's thread count (e.g. to 1 for timing); later
    # tests compare in-process runs bitwise with subprocesses started at the default, which other counts break
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
