"""Kernel launches with less host time than `kernel[grid](...)`.

Every `kernel[grid](*args)` call makes Triton bind and specialise each argument, build a cache key and look the compiled kernel
up. `launch()` does the first launch of each specialisation through Triton as usual, keeps the compiled kernel, and afterwards
calls its driver launcher directly, under a key built from exactly what Triton specialises a kernel on:
- a tensor: its dtype and whether its address is a multiple of 16 bytes;
- an int: whether it equals 1, whether it is a multiple of 16, and whether it fits 32 bits;
- the constexprs and the launch options (num_warps, num_stages), and the current device.
Two calls with the same key run the same binary, which is what Triton's own cache would pick. The direct call skips Triton's launch
hooks, so it steps aside while a hook is installed (e.g. the Proton profiler), under the interpreter, and when
`SIMPLE_MOE_FAST_LAUNCH=0`. Host time of one eager Qwen3-30B decode call (four launches) on the H100 machine: 212 us through
`kernel[grid]`, 162 us direct (benchmarks/results/launch_overhead_h100_v4.txt).
"""
from __future__ import annotations

import os

import torch
from triton import knobs
from triton.runtime.jit import JITFunction

_ENABLED = os.environ.get("SIMPLE_MOE_FAST_LAUNCH", "1") != "0"
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1

# (kernel, key) -> (compiled kernel's launcher, its CUfunction, its packed metadata)
_compiled: dict = {}


def arg_key(value):
    """What Triton specialises a runtime argument on (see the module docstring)."""
    if type(value) is int:  # the common case first (not bool: `type(True) is int` is False)
        return value == 1, value % 16 == 0, _INT32_MIN <= value <= _INT32_MAX
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    return type(value), value if isinstance(value, bool) else None


def args_key(args: tuple) -> tuple:
    """`arg_key` of every argument, with the int and tensor cases inline: a launch has 20-40 arguments and this runs on every
    eager call (a function call per argument was 11 us of a 30 us launch on the H100 host, launch_overhead_h100_v6.txt)."""
    return tuple([(a == 1, a % 16 == 0, _INT32_MIN <= a <= _INT32_MAX) if type(a) is int
                  else (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else arg_key(a) for a in args])


def _launch_hooks_installed() -> bool:
    hooks = knobs.runtime.launch_enter_hook  # a HookChain in Triton 3.6 (empty unless a profiler registered a hook)
    return bool(hooks.calls) if hasattr(hooks, "calls") else hooks is not None


def launch(kernel, grid: tuple, args: tuple, num_warps: int, num_stages: int | None = None, launch_pdl: bool = False,
           **constexprs) -> None:
    """`kernel[grid](*args, **constexprs, num_warps=..., num_stages=..., launch_pdl=...)`, with the runtime `args` in signature
    order first and every constexpr by name (the kernels here declare their constexprs last). `launch_pdl`: a programmatic
    dependent launch (SM90+; the kernel must wait for the previous grid before touching memory)."""
    if not (_ENABLED and isinstance(kernel, JITFunction)) or _launch_hooks_installed():
        kernel[grid](*args, **constexprs, **_options(num_warps, num_stages, launch_pdl))
        return
    device = torch.cuda.current_device()
    constexpr_values = tuple(constexprs.values())
    # id(kernel): a JITFunction hashes its source digest through a Python property (~1 us a lookup).
    key = (id(kernel), device, num_warps, num_stages, launch_pdl, constexpr_values, args_key(args))
    entry = _compiled.get(key)
    if entry is None:
        if list(constexprs) != kernel.arg_names[len(args):]:
            raise TypeError(f"launch: {kernel.__name__} takes its runtime arguments first, then the constexprs "
                            f"{kernel.arg_names[len(args):]} in that order")
        compiled = kernel[grid](*args, **constexprs, **_options(num_warps, num_stages, launch_pdl))
        _compiled[key] = (kernel, compiled.run, compiled.function, compiled.packed_metadata)  # the kernel keeps its id unique
        return
    _, run, function, packed_metadata = entry
    stream = torch._C._cuda_getCurrentRawStream(device)  # what Triton's own launch path asks torch for
    grid = tuple(grid) + (1,) * (3 - len(grid))
    run(grid[0], grid[1], grid[2], stream, function, packed_metadata, None, None, None, *args, *constexpr_values)


def _options(num_warps: int, num_stages: int | None, launch_pdl: bool) -> dict:
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    if launch_pdl:
        options["launch_pdl"] = True
    return options


def cached_launches() -> int:
    """How many specialisations the direct path holds (tests use it to see that the second call took the direct path)."""
    return len(_compiled)
