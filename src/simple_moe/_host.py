"""Host-side integer helpers for launchers.

`triton.cdiv` and `triton.next_power_of_2` are Triton constexpr functions: called from Python they unwrap every argument first,
about 1 us a call, and a layer call makes several. These are the plain-Python equivalents.
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
