"""The layer tests' shared fixture: each test taking ``backend`` runs on the Triton kernel (the interpreter on a
CPU) and on PyTorch's fused kernels with our semantics; a module may widen it (test_swap, test_fused_layers)."""

import pytest

from chapter3_flash import attention


@pytest.fixture(params=["triton", "sdpa"])
def backend(request):
    with attention.use_backend(request.param):
        yield request.param
