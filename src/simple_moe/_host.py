"""Host-side helpers for launchers.

`triton.cdiv` and `triton.next_power_of_2` are Triton constexpr functions: called from Python they unwrap every argument first,
about 1 us a call, and a layer call makes several. These are the plain-Python equivalents.
"""
import os


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def is_int(value) -> bool:
    """An int, not a bool (bool subclasses int; `True` as a size or an id is a mistake, not a 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def triton_runs_on(device) -> bool:
    """Triton kernels run on CUDA devices, and on the CPU only under the interpreter (TRITON_INTERPRET=1 before import)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
