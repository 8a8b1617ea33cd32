"""Shared test setup: the Triton interpreter when there is no GPU, and one seed per test."""

import os

import torch

# Must happen before anything imports kernels: @triton.jit picks interpreter or compiler when it runs.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (compiled Triton kernels, GPU-sized shapes)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> str:
    return DEVICE
