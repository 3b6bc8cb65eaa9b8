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


_TRUE = ("1", "true", "on", "yes", "y")
_FALSE = ("0", "false", "off", "no", "n", "")


def triton_interpreting() -> bool:
    """TRITON_INTERPRET as Triton reads it (1, true, on, yes or y, in any case)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def env_flag(name: str, default: bool) -> bool:
    """A simple_moe switch from the environment: 1/true/on/yes/y or 0/false/off/no/n (any case), `default` when unset; a
    ValueError naming the variable otherwise (a misspelt "flase" must not silently mean one or the other)."""
    value = os.environ.get(name)
    if value is None:
        return default
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ValueError(f"{name}={value!r}: expected 1, true, on, yes or 0, false, off, no")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a count of tokens or rounds), or argparse's usage error."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def triton_runs_on(device) -> bool:
    """Triton kernels run on CUDA devices, and on the CPU only under the interpreter (TRITON_INTERPRET=1 before import)."""
    return device.type == "cuda" or triton_interpreting()
