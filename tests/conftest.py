"""Shared test setup: the Triton interpreter when there is no GPU, and one seed per test.

Shared builders and the tolerance rule live in tests/helpers.py; tests import that, never this file.
"""

import os

import torch

# Must happen before anything imports kernels: @triton.jit picks interpreter or compiler when it runs.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
