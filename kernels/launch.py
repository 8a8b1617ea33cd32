"""Launching a compiled kernel without Triton's per-call dispatch (GPU only).

``kernel[grid](*args, **kwargs)`` does, on every call: bind the arguments, specialize each one (a tensor on
its dtype and 16-byte alignment; an integer on being 1, divisible by 16, and its width), build a cache key
from those and the options, find the compiled kernel, check the globals it read, build launch metadata for
the profiler hooks, and only then call the compiled kernel's launcher. On the 2-core CPU that is ~20 us a
launch (bench/NOTES.md), and at the GPT-2 shape a forward+backward is three launches against ~280 us of GPU
time, so the JIT's dispatch is a fifth of the call.

``Launcher`` sends the first call of each argument signature through the JIT (which compiles, or finds, and
launches), keeps the compiled kernel under a key that separates at least what Triton's specialization
separates, and sends later calls straight to that kernel's launcher. The key (``signature``):

- a tensor: its dtype and whether its address is a multiple of 16 bytes;
- an ``int``: 1 or not (Triton makes a 1 a constant), divisible by 16 or not, and its width (i32, i64, u64),
  or the width alone for a ``do_not_specialize`` parameter;
- a ``float`` or ``bool``: its type (Triton does not specialize on their values);
- the keyword arguments (constexprs, run-time integers passed by name, num_warps, num_stages) by value;
- the current device.

A finer key than Triton's costs an extra JIT call, never a wrong kernel; a coarser one would launch a kernel
specialized for another alignment or divisibility (a wrong address, not an error), so the key errs finer:
``tests/kernels/test_launch.py`` checks it against Triton's own specialization, and ``bench/launch_check.py``
replays our launchers through both paths with Hopper-compiled kernels and compares every launch. Where
anything could differ from the JIT's path the JIT runs:

- unless ``settings.current.direct_launch`` is on (off by default until a GPU run has checked it bit for bit:
  ``kernels/settings.py``, ``KERNELS_DIRECT_LAUNCH``);
- off NVIDIA's backend (AMD's specializes on more, e.g. a tensor's storage under 2 GB, which this key ignores);
- on another Triton than 3.6-3.9 (``CONVENTION_KNOWN``), and under the interpreter;
- while any of Triton's per-launch hooks is set (launch enter or exit hooks, a profiler; a stages-inspection
  hook), or a global a kernel read has changed (the JIT raises for that), or ``run`` was patched on the jit
  function (``bench/sm90.py``), or the kernel has pre-run hooks;
- for an argument of another type.

Triton's per-call settings that change the compiled kernel (``knobs.runtime.debug``, the instrumentation mode)
are part of the key.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.runtime.jit import JITFunction

from . import settings

# The Tritons whose launch convention (every parameter passed, constexprs included, after the grid, stream,
# function, metadata and hooks) bench/launch_check.py verified: 3.6 and 3.9, and those between. Others launch
# through the JIT until checked.
_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
CONVENTION_KNOWN = (3, 6) <= _VERSION <= (3, 9) and hasattr(triton, "knobs")
MAX_SIGNATURES = 1024  # per kernel; past it the table starts over (shapes that never repeat)
_I32_MIN, _I32_MAX, _I64_MAX = -(2**31), 2**31 - 1, 2**63 - 1


def _int_class(x: int, specialize: bool, align: bool):
    """What Triton's specialization sees of an integer argument: its width, and unless the parameter is
    ``do_not_specialize``, whether it is 1 (compiled in as a constant) or divisible by 16."""
    width = "i32" if _I32_MIN <= x <= _I32_MAX else "i64" if x <= _I64_MAX else "u64"
    if not specialize:
        return width
    if x == 1:
        return 1
    return width, align and x % 16 == 0


def signature(args, flags) -> tuple | None:
    """The key of one call's positional arguments (``flags``: per parameter, specialize and align, or None for
    a constexpr), or None for an argument this module does not classify (the call then goes through the JIT)."""
    key = []
    for x, flag in zip(args, flags):
        if flag is None:
            key.append(x)
            continue
        specialize, align = flag
        cls = x.__class__
        if cls is int:
            key.append(_int_class(x, specialize, align))
        elif cls is float or cls is bool or x is None:
            key.append(cls)
        elif isinstance(x, torch.Tensor):
            key.append((x.dtype, specialize and align and x.data_ptr() % 16 == 0))
        else:
            return None
    return tuple(key)


def _hook_set(hook) -> bool:
    return hook is not None and bool(getattr(hook, "calls", True))


def _jit_must_launch(jit) -> bool:
    """Whether something per launch (a hook, a changed global) needs the JIT's own path this time."""
    runtime = triton.knobs.runtime
    if _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook):
        return True
    if getattr(runtime, "add_stages_inspection_hook", None) is not None or jit.pre_run_hooks:
        return True
    if "run" in jit.__dict__:
        return True
    missing = object()
    return any(
        scope.get(name, missing) != value for (name, _), (value, scope) in getattr(jit, "used_global_vals", {}).items()
    )


def _knobs_key() -> tuple:
    """The global Triton settings the JIT folds into each compile's options."""
    compilation = triton.knobs.compilation
    return (
        bool(triton.knobs.runtime.debug),
        getattr(compilation, "instrumentation_mode", None),
        getattr(compilation, "fpsan_homomorphic_casts", None),
    )


@functools.cache
def _nvidia() -> bool:
    """Whether Triton's active driver targets NVIDIA GPUs (the backend whose specialization the key mirrors)."""
    try:
        return triton.runtime.driver.active.get_current_target().backend == "cuda"
    except RuntimeError:  # no GPU driver at all
        return False


class Launcher:
    """``Launcher(jit)(grid, *args, **kwargs)`` launches like ``jit[grid](*args, **kwargs)``."""

    def __init__(self, jit):
        self.jit = jit
        self.direct = CONVENTION_KNOWN and isinstance(jit, JITFunction)  # not the interpreter's function
        self.kernels: dict[tuple, tuple] = {}  # by signature
        # (argument types, where they have a tensor, where an int Triton does not specialize on, the table by
        # argument values for those types), replaced as a whole: a thread never mixes two calls' layouts
        self.layout: tuple = ((), (), (), {})
        if self.direct:
            # Per parameter: (specialize, align); None for a constexpr, keyed by its value.
            self.flags = tuple(
                None if p.is_constexpr else (not p.do_not_specialize, not p.do_not_specialize_on_alignment)
                for p in jit.params
            )
            self.names = [p.name for p in jit.params]
            self.defaults = {p.name: p.default for p in jit.params if p.has_default}

    def __call__(self, grid: tuple, *args, **kwargs):
        if not (settings.current.direct_launch and self.direct and _nvidia()) or _jit_must_launch(self.jit):
            return self.jit[grid](*args, **kwargs)
        active = triton.runtime.driver.active
        device = active.get_current_device()
        options = (tuple(kwargs.items()), _knobs_key())
        # The usual call repeats the last one's argument types, and mostly its values: then the key is the
        # values themselves (a tensor by its dtype and alignment), finer than the signature and faster to make.
        exact = None
        types, tensors, widths, by_values = self.layout
        if tuple(map(type, args)) == types:
            values = list(args)
            for i in tensors:
                t = values[i]
                values[i] = (t.dtype, t.data_ptr() % 16 == 0)
            for i in widths:  # a decode step's cache length: a new value every call, one kernel
                values[i] = _int_class(values[i], False, True)
            exact = (device, tuple(values), options)
            entry = by_values.get(exact)
            if entry is not None:
                return self._launch(entry, grid, args, active, device)
        args_key = signature(args, self.flags)
        if args_key is None:
            return self.jit[grid](*args, **kwargs)
        key = (device, args_key, options)
        entry = self.kernels.get(key)
        if entry is None:
            entry = self._first_call(grid, args, kwargs)
            if entry is None:
                return None
            self._remember(self.kernels, key, entry)
        else:
            self._launch(entry, grid, args, active, device)
        if exact is None:  # new argument types: the exact table follows them from now on
            loose = {i for i, flag in enumerate(self.flags) if flag is not None and not flag[0]}
            self.layout = (
                tuple(map(type, args)),
                tuple(i for i, x in enumerate(args) if isinstance(x, torch.Tensor)),
                tuple(i for i, x in enumerate(args) if x.__class__ is int and i in loose),
                {},
            )
        else:
            self._remember(by_values, exact, entry)
        return None

    @staticmethod
    def _launch(entry, grid, args, active, device) -> None:
        run, function, metadata, tail = entry
        stream = active.get_current_stream(device)
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        # The JIT's own call, less what it passes for the hooks (none are set: checked by the caller).
        run(grid[0], grid_y, grid_z, stream, function, metadata, None, None, None, *args, *tail)

    @staticmethod
    def _remember(table: dict, key, entry) -> None:
        if len(table) >= MAX_SIGNATURES:
            table.clear()
        table[key] = entry

    def _first_call(self, grid, args, kwargs) -> tuple | None:
        """Launch through the JIT; return what a direct launch of the same signature needs, or None where the
        JIT must keep launching (a compile still in flight, pre-run hooks)."""
        kernel = self.jit.run(*args, grid=grid, warmup=False, **kwargs)
        if kernel is None or hasattr(kernel, "result") or self.jit.pre_run_hooks:
            return None
        # The parameters after the positional ones, in the signature's order: the JIT passes all of them
        # (constexprs included; the launcher skips those).
        tail = tuple(kwargs[n] if n in kwargs else self.defaults[n] for n in self.names[len(args) :])
        return kernel.run, kernel.function, kernel.packed_metadata, tail
