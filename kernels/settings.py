"""The kernels' switches: one documented settings object, read from the environment once, changed by ``override``.

| setting | default | environment | what it does |
|---|---|---|---|
| ``direct_launch`` | off | ``KERNELS_DIRECT_LAUNCH`` | after a signature's first launch, call the compiled kernel without Triton's per-call dispatch (``kernels/launch.py``); NVIDIA GPUs only |
| ``fused_append`` | off | ``KERNELS_FUSED_APPEND`` | the decode kernel writes the step's keys and values into the cache itself, one launch fewer per step (``kernels/decode.py``) |
| ``check_cu_seqlens`` | off | ``KERNELS_CHECK_CU_SEQLENS`` | varlen's ``cu_seqlens`` values checked on CUDA too, at one device-to-host sync per call (on a CPU they always are; FlashAttention-2 trusts them) |
| ``backend`` | ``"auto"`` | | the path the fused layers of ``attention`` ask the kernels for (``attention.use_backend``) |

Both are off until a GPU run has passed their bit-for-bit tests (bench/gpu_check.sh's ``launch`` stage, then
bench/NOTES.md): a default path that has never run on the hardware it targets is not a default. The environment
variables are read as PyTorch reads its boolean ones (c10's ``check_env``): ``1``/``on``/``yes``/``true``/``y`` and
``0``/``off``/``no``/``false``/``n``, any case; another value warns and leaves the default.

    from chapter3_flash.kernels import settings
    settings.current.direct_launch          # read
    with settings.override(direct_launch=True):
        ...                                 # set for a block, restored after it
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings

from .checks import check_backend

_TRUE = ("1", "on", "yes", "true", "y")
_FALSE = ("0", "off", "no", "false", "n")


def env_flag(name: str, default: bool) -> bool:
    """A boolean environment variable, parsed as PyTorch parses its own."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    warnings.warn(
        f"{name}={raw!r} is not a boolean ({'/'.join(_TRUE)} or {'/'.join(_FALSE)}); using the default {default}",
        stacklevel=2,
    )
    return default


@dataclasses.dataclass
class Settings:
    direct_launch: bool = False
    fused_append: bool = False
    check_cu_seqlens: bool = False
    backend: str = "auto"

    @classmethod
    def from_environment(cls) -> Settings:
        return cls(
            direct_launch=env_flag("KERNELS_DIRECT_LAUNCH", cls.direct_launch),
            fused_append=env_flag("KERNELS_FUSED_APPEND", cls.fused_append),
            check_cu_seqlens=env_flag("KERNELS_CHECK_CU_SEQLENS", cls.check_cu_seqlens),
        )


current = Settings.from_environment()


@contextlib.contextmanager
def override(**changes):
    """The given settings inside the block, the previous ones restored after it."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(Settings)]}")
    for name, value in changes.items():
        if name == "backend":
            check_backend(value)
        elif not isinstance(value, bool):
            raise TypeError(f"setting {name} must be a bool, got {value!r}")
    saved = dataclasses.asdict(current)
    for name, value in changes.items():
        setattr(current, name, value)
    try:
        yield current
    finally:
        for name, value in saved.items():
            setattr(current, name, value)
