"""bench.cpu_memory measures the call, not the process: the chapter's layer, which holds the (B, H, N, N) weights
for its backward, peaks well above ours. Measured from a parent that holds much more memory than the call needs,
as the main job does: Linux carries a process's peak resident set (``ru_maxrss``) across fork and exec, so before
the peak was reset at the call every layer read the parent's peak (518 / 519 / 519 MiB in two CPU reports)."""

from __future__ import annotations

import sys

import pytest

from bench import cpu_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_the_chapters_weights_show_in_its_peak():
    parent = bytearray(400 * 2**20)  # resident: the main job holds models and tensors when it measures
    parent[::4096] = b"x" * len(parent[::4096])
    chapter = cpu_memory.peak_bytes("chapter", 512, 0.0, batch=2, width=256, heads=4)
    ours = cpu_memory.peak_bytes("ours", 512, 0.0, batch=2, width=256, heads=4)
    del parent
    weights = 2 * 4 * 512 * 512 * 4  # (B, H, N, N) float32: 8 MiB, held at least twice (scores, softmax)
    assert chapter - ours >= weights, f"chapter {chapter / 2**20:.1f} MiB, ours {ours / 2**20:.1f} MiB"
    assert 0 < ours < chapter < 200 * 2**20
