"""Test-harness fixes for Triton's CPU interpreter (TRITON_INTERPRET=1): exact bfloat16 `tl.dot` and bfloat16 casts, fused fma.

The interpreter keeps bfloat16 tensors as numpy `uint16` arrays holding the bit patterns (numpy has no bfloat16). Triton 3.6's
`InterpreterBuilder` gets two things wrong with them:

- `create_dot` converts only 8-bit floats before `np.matmul`, so a bf16 dot multiplies the bit patterns as integers (garbage).
  A bf16 value is the top half of the float32 with the same sign, exponent and leading 7 mantissa bits, so `bits << 16` read as
  float32 is the exact value. We convert bf16 operands that way and then run the original `create_dot`, which accumulates in the
  accumulator's dtype. Every other operand dtype passes through untouched.
- `cast_impl` (behind `x.to(tl.bfloat16)`) truncates float32 to bf16 (round toward zero), where the compiled kernel rounds to
  nearest even; and it casts integers to bf16 by `astype(uint16)`, i.e. the integer becomes the bit pattern. Truncation biases every
  rounding the same way (about half an ulp, 2^-9 relative, toward zero), which roughly triples bf16 errors against a float64
  reference. We round to nearest even (NaN stays NaN) and go through float32 for other source types. Casts from bf16 to anything
  other than float32 go through the exact float32 value. Casts that involve no bf16 are untouched.

- `create_fma` (behind `tl.fma`) computes `x * y + z` with two roundings where the GPU's fma rounds once. The row quantiser's
  division (quant._divide_rn) depends on that single rounding: its residual must be exact. For float32 we compute the product
  exactly in float64, the sum's rounding error by TwoSum, round to odd and then to float32 (correct: 53 >= 24 + 2 bits).

Importing this module installs the patches when TRITON_INTERPRET=1 (tests/conftest.py imports it); on a GPU run it does nothing.
"""
from __future__ import annotations

import os

import numpy as np

# The interpreter's own methods, kept so tests can show the patches are needed.
ORIGINAL_CREATE_DOT = None
ORIGINAL_CAST_IMPL = None
ORIGINAL_CREATE_FMA = None


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> the exact float32 values."""
    return (np.ascontiguousarray(bits).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even; NaN -> quiet NaN of the same sign."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    # Adding 0x7FFF plus the lowest kept bit rounds the dropped 16 bits to nearest even; a carry out of the mantissa correctly
    # bumps the exponent (and rounds the largest finite values up to inf, as the hardware does).
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(values, dtype=np.float32))
    return np.where(nan, ((bits >> 16).astype(np.uint16) | np.uint16(0x0040)), rounded).astype(np.uint16)


def fma_float32(x, y, z) -> np.ndarray:
    """float32 `x * y + z` rounded once, to nearest even (what the GPU's FFMA gives)."""
    x64, y64, z64 = (np.asarray(v, dtype=np.float32).astype(np.float64) for v in (x, y, z))
    product = x64 * y64  # exact: 24 + 24 significant bits
    total = product + z64
    back = total - product  # TwoSum: `total + error` is the exact sum
    error = (product - (total - back)) + (z64 - back)
    # Round to odd: an inexact sum whose last bit is 0 moves one ulp toward the exact value, so the rounding to float32 below
    # cannot land on a tie that the exact value does not sit on.
    even = (np.ascontiguousarray(total).view(np.int64) & 1) == 0
    total = np.where((error != 0) & even, np.nextafter(total, np.where(error > 0, np.inf, -np.inf)), total)
    return total.astype(np.float32)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET read the way Triton reads it)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")


def install() -> bool:
    """Patches the interpreter once. Returns True when the patches are (already) in place."""
    global ORIGINAL_CREATE_DOT, ORIGINAL_CAST_IMPL, ORIGINAL_CREATE_FMA
    if not interpreting():
        return False
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_bf16_exact", False):
        return True
    original_dot = builder.create_dot
    original_cast = builder.cast_impl
    original_fma = builder.create_fma

    def as_float32_if_bf16(handle):
        if handle.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle(bf16_bits_to_float32(handle.data), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, as_float32_if_bf16(a), as_float32_if_bf16(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        src_type, dst_scalar = src.dtype.scalar, dst_type.scalar
        if dst_scalar == tl.bfloat16 and src_type != tl.bfloat16:
            values = np.asarray(src.data).astype(np.float32)
            return interpreter.TensorHandle(float32_to_bf16_bits(values).reshape(np.shape(src.data)), dst_scalar)
        if src_type == tl.bfloat16 and dst_scalar != tl.bfloat16:
            values = bf16_bits_to_float32(src.data).reshape(np.shape(src.data))
            return interpreter.TensorHandle(values.astype(interpreter._get_np_dtype(dst_scalar)), dst_scalar)
        return original_cast(self, src, dst_type)

    def create_fma(self, x, y, z):
        if z.dtype.scalar == tl.float32:
            return interpreter.TensorHandle(fma_float32(x.data, y.data, z.data), tl.float32)
        return original_fma(self, x, y, z)

    create_dot._bf16_exact = True
    ORIGINAL_CREATE_DOT, ORIGINAL_CAST_IMPL, ORIGINAL_CREATE_FMA = original_dot, original_cast, original_fma
    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder.create_fma = create_fma
    return True


INSTALLED = install()
