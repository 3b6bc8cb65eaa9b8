"""Kernel launches with less host time than `kernel[grid](...)`.

Every `kernel[grid](*args)` call makes Triton bind and specialise each argument, build a cache key and look the compiled kernel
up. `launch()` does the first launch of each specialisation through Triton as usual, keeps the compiled kernel, and afterwards
calls its driver launcher directly, under a key built from exactly what Triton specialises a kernel on:
- a tensor: its dtype and whether its address is a multiple of 16 bytes;
- an int: whether it equals 1, whether it is a multiple of 16, and whether it fits 32 bits;
- the constexprs and the launch options (num_warps, num_stages, launch_pdl, maxnreg), and the current device.
Two calls with the same key run the same binary, which is what Triton's own cache would pick. The direct call skips Triton's launch
hooks, so it steps aside while a hook is installed (e.g. the Proton profiler), under the interpreter, and when
`SIMPLE_MOE_FAST_LAUNCH=0`. Host time of one eager Qwen3-30B decode call (four launches) on the H100 machine: 212 us through
`kernel[grid]`, 162 us direct (benchmarks/results/launch_overhead_h100_v4.txt).

The direct call hands the driver launcher each tensor's address as an int rather than the tensor: for a tensor argument Triton's
C launcher calls `data_ptr()` back in Python and asks the CUDA driver which memory the address lies in (cuPointerGetAttribute,
to reject host tensors); the callers here validated their tensors' device already. That measured ~1 us a launch of ten
pointers (10.9 vs 10.0 us, launch_overhead_h100_v6c.txt). And it calls the C launch function itself, what Triton's
`CudaLauncher.__call__` does once it finds no scratch memory to allocate.
"""
from __future__ import annotations

import itertools
import operator

import torch
from triton import knobs
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from ._host import env_flag

try:  # Gluon kernels take Gluon's own descriptor type (it carries the shared-memory layout)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
    _DESCRIPTORS: tuple = (TensorDescriptor, GluonTensorDescriptor)
except ImportError:  # pragma: no cover - a Triton without Gluon
    _DESCRIPTORS = (TensorDescriptor,)

_ENABLED = env_flag("SIMPLE_MOE_FAST_LAUNCH", True)
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1

# key -> (kernel, its launch function, its CUfunction, the launch function's arguments between the CUfunction and the kernel's)
_compiled: dict = {}
# id(kernel) -> how many of its runtime arguments (the leading ones) are tensors, and how many TMA descriptors follow them
_num_tensors: dict = {}


def arg_key(value):
    """What Triton specialises a runtime argument on (see the module docstring)."""
    if type(value) is int:  # the common case first (not bool: `type(True) is int` is False)
        return value == 1, value % 16 == 0, _INT32_MIN <= value <= _INT32_MAX
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    return type(value), value if isinstance(value, bool) else None


class _IntSpecs(dict):
    """int -> `arg_key` of it, filled on demand (a dict lookup instead of three comparisons and a tuple per int argument);
    any other value -> its `arg_key`, not kept."""

    def __missing__(self, value):
        if type(value) is not int:
            return arg_key(value)
        if len(self) >= 1 << 16:  # shapes and strides repeat; this only bounds a process that sees endless new ones
            self.clear()
        spec = self[value] = arg_key(value)
        return spec


_int_specs = _IntSpecs()
_dtype_of = operator.attrgetter("dtype")
_address_of = operator.methodcaller("data_ptr")
_SIXTEEN = itertools.repeat(16)


def key_and_launch_args(args: tuple, num_tensors: int, num_descriptors: int = 0) -> tuple[tuple, list]:
    """(what Triton specialises `args` on, `args` with each tensor replaced by its address) for `args` whose first
    `num_tensors` are tensors, then `num_descriptors` TMA descriptors (`TensorDescriptor`s, passed on as they are: the driver
    launcher encodes them). Every step is a `map` over C callables: a launch has 20-40 arguments and this runs on every
    eager call (a Python loop over them took 10 us of a 24 us launch on the H100 host, launch_overhead_h100_v6b.txt).
    Tensors are keyed by dtype and address modulo 16 (finer than Triton's aligned-or-not, so never coarser); descriptors by
    their tensor's dtype and their block shape, what their type in the kernel's signature is made of."""
    tensors, rest = args[:num_tensors], args[num_tensors + num_descriptors:]
    addresses = list(map(_address_of, tensors))
    key = (tuple(map(_dtype_of, tensors)), tuple(map(operator.mod, addresses, _SIXTEEN)),
           tuple(map(_int_specs.__getitem__, rest)))
    if num_descriptors:
        descriptors = args[num_tensors:num_tensors + num_descriptors]
        key += tuple((d.base.dtype, tuple(d.block_shape), d.padding) for d in descriptors)
        addresses.extend(descriptors)
    addresses.extend(rest)
    return key, addresses


def leading_tensors(args: tuple) -> tuple[int, int]:
    """How many of `args` are tensors before the first one that is not (the kernels here take their pointers first), and how
    many TMA descriptors follow them."""
    tensors = descriptors = 0
    for a in args:
        if isinstance(a, torch.Tensor) and not descriptors:
            tensors += 1
        elif isinstance(a, _DESCRIPTORS):
            descriptors += 1
        else:
            break
    return tensors, descriptors


def _launch_hooks_installed() -> bool:
    hooks = knobs.runtime.launch_enter_hook  # a HookChain in Triton 3.6 (empty unless a profiler registered a hook)
    return bool(hooks.calls) if hasattr(hooks, "calls") else hooks is not None


def _check_constexpr_order(kernel, num_args: int, constexprs: dict) -> None:
    """The direct launch hands the constexprs' values to the driver in the caller's order, so it must be the signature's."""
    expected = getattr(kernel, "arg_names", None)
    if expected is not None and list(constexprs) != expected[num_args:]:
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
        raise TypeError(f"launch: {name} takes its runtime arguments first, then the constexprs "
                        f"{expected[num_args:]} in that order, not {list(constexprs)}")


def launch(kernel, grid: tuple, args: tuple, num_warps: int, num_stages: int | None = None, launch_pdl: bool = False,
           maxnreg: int | None = None, **constexprs) -> tuple | None:
    """`kernel[grid](*args, **constexprs, num_warps=..., num_stages=..., launch_pdl=..., maxnreg=...)`, with the runtime `args`
    in signature order first and every constexpr by name (the kernels here declare their constexprs last). `launch_pdl`: a
    programmatic dependent launch (SM90+; the kernel must wait for the previous grid before touching memory). `maxnreg`:
    ptxas's cap on registers a thread (None: no cap).

    Returns the direct-launch entry `(launch function, CUfunction, head)` of this specialisation (what `PlannedLaunch`
    keeps), or None where the launch went through Triton's own path."""
    if not (_ENABLED and isinstance(kernel, JITFunction)) or _launch_hooks_installed():
        _check_constexpr_order(kernel, len(args), constexprs)  # here too, so that the interpreter's tests catch a misorder
        kernel[grid](*args, **constexprs, **_options(num_warps, num_stages, launch_pdl, maxnreg))
        return None
    device = torch.cuda.current_device()
    constexpr_values = tuple(constexprs.values())
    layout = _num_tensors.get(id(kernel))
    if layout is None:
        layout = _num_tensors[id(kernel)] = leading_tensors(args)
    try:
        spec, launch_args = key_and_launch_args(args, *layout)
    except (AttributeError, TypeError):  # not a tensor or descriptor where this kernel had one before: Triton's own path
        kernel[grid](*args, **constexprs, **_options(num_warps, num_stages, launch_pdl, maxnreg))
        return None
    # id(kernel): a JITFunction hashes its source digest through a Python property (~1 us a lookup).
    key = (id(kernel), device, num_warps, num_stages, launch_pdl, maxnreg, constexpr_values, spec)
    entry = _compiled.get(key)
    if entry is None:
        _check_constexpr_order(kernel, len(args), constexprs)
        compiled = kernel[grid](*args, **constexprs, **_options(num_warps, num_stages, launch_pdl, maxnreg))
        launcher = compiled.run
        if getattr(launcher, "global_scratch_size", 1) == 0 and getattr(launcher, "profile_scratch_size", 1) == 0:
            # Triton 3.6's CudaLauncher: without scratch memory its __call__ only forwards to this C function.
            run, head = launcher.launch, (launcher.launch_cooperative_grid, launcher.launch_pdl, None, None)
        else:
            run, head = launcher, ()
        # The entry holds the kernel so that its id stays unique while the entry lives.
        entry = _compiled[key] = (kernel, run, compiled.function, head + (compiled.packed_metadata, None, None, None))
        return entry[1:]
    _, run, function, head = entry
    stream = torch._C._cuda_getCurrentRawStream(device)  # what Triton's own launch path asks torch for
    grid = tuple(grid) + (1,) * (3 - len(grid))
    run(grid[0], grid[1], grid[2], stream, function, *head, *launch_args, *constexpr_values)
    return entry[1:]


class PlannedLaunch:
    """One launch of a call plan: grid, int arguments, options and constexprs fixed when the plan is made, tensors given per
    call (pointer arguments only, no TMA descriptors). The first call goes through `launch()`; later calls hand the tensors'
    addresses to the entry it returned, with no key to build (the plan's own key already fixed everything `launch()` keys on).

    The caller guarantees what the entry assumes: the tensors have the dtypes and 16-byte alignments of the first call's, and
    the current device is the first call's. The entry is dropped when `_compiled` is replaced (tests do), and the direct call
    steps aside as `launch()` does (launch hooks, the interpreter, SIMPLE_MOE_FAST_LAUNCH=0)."""

    def __init__(self, kernel, grid: tuple, ints: tuple, num_warps: int, num_stages: int | None = None,
                 launch_pdl: bool = False, maxnreg: int | None = None, **constexprs):
        self.kernel, self.ints, self.constexprs = kernel, tuple(ints), constexprs
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.options = (num_warps, num_stages, launch_pdl, maxnreg)
        self._tail = self.ints + tuple(constexprs.values())  # the launcher's arguments after the tensors' addresses
        self._entry = self._owner = None

    def __call__(self, *tensors: torch.Tensor) -> None:
        if self._entry is not None and self._owner is _compiled and _ENABLED and not _launch_hooks_installed():
            run, function, head = self._entry
            stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
            run(*self.grid, stream, function, *head, *map(_address_of, tensors), *self._tail)
            return
        self._entry = launch(self.kernel, self.grid, tensors + self.ints, *self.options, **self.constexprs)
        self._owner = _compiled

    @property
    def launch_pdl(self) -> bool:
        """Whether the launch is programmatic (may start while the previous kernel drains)."""
        return self.options[2]

    @property
    def direct(self) -> bool:
        """Whether the next call goes straight to the driver launcher (tests check that a plan took the direct path)."""
        return self._entry is not None and self._owner is _compiled and _ENABLED


def _options(num_warps: int, num_stages: int | None, launch_pdl: bool, maxnreg: int | None = None) -> dict:
    options = {"num_warps": num_warps}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    if num_stages is not None:
        options["num_stages"] = num_stages
    if launch_pdl:
        options["launch_pdl"] = True
    return options


def cached_launches() -> int:
    """How many specialisations the direct path holds (tests use it to see that the second call took the direct path)."""
    return len(_compiled)
