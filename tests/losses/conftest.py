"""The `backend` fixture of the loss tests: each test runs on every backend (see tests/_backends.py)."""
import pytest
from _backends import BACKENDS, require_backend


@pytest.fixture(params=BACKENDS)
def backend(request):
    require_backend(request.param)
    return request.param
