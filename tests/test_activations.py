"""The activation table: the Triton epilogue `apply_activation` against the float64 torch reference, and `get_activation` lookup.

Also proves the interpreter harness fix (tests/_triton_interpreter.py): a bf16 `tl.dot` and a float32 -> bf16 cast are right with
it and wrong with the interpreter's own code.
"""
from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import _triton_interpreter
from simple_moe.activations import ACTIVATIONS, ActivationType, activation_params, activation_torch, apply_activation, get_activation

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


@triton.jit
def _activation_kernel(gate_ptr, up_ptr, out_ptr, n, p0, p1, p2, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, apply_activation(gate, up, p0, p1, p2, ACTIVATION), mask=mask)


def triton_activation(gate, up, kind, params):
    out = torch.empty_like(gate)
    _activation_kernel[(1,)](gate, up, out, gate.numel(), *params, ACTIVATION=int(kind),
                             BLOCK=triton.next_power_of_2(gate.numel()))
    return out


def spanning_inputs():
    """gate, up in fp32: a dense sweep of [-30, 30], tiny values, zero, and large values of both signs (exp overflow paths)."""
    special = torch.tensor([-1000.0, -100.0, -50.0, -20.5, -1e-3, -1e-6, 0.0, 1e-6, 1e-3, 20.5, 50.0, 100.0, 1000.0])
    gate = torch.cat([torch.linspace(-30, 30, 243), special])
    generator = torch.Generator().manual_seed(0)
    up = gate[torch.randperm(gate.numel(), generator=generator)] * 0.7 + torch.randn(gate.numel(), generator=generator)
    return gate.float().contiguous().to(DEVICE), up.float().contiguous().to(DEVICE)


def relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


PARAMS = {  # per activation: parameter sets besides the defaults, chosen so the clamps and betas actually bite
    ActivationType.SwigluBias: [(1.702, 1.0, 7.0), (0.5, -0.25, 2.0)],
    ActivationType.SwigluStep: [(0.0, 0.0, 3.0)],
    ActivationType.Situ: [(2.0, 10.0, 0.0), (7.5, 40.0, 0.0)],
}


@pytest.mark.parametrize("kind", list(ACTIVATIONS), ids=lambda k: k.name)
def test_triton_activation_matches_torch_table(kind):
    activation = ACTIVATIONS[kind]
    gate, up = spanning_inputs()
    for params in [activation.default_params] + PARAMS.get(kind, []):
        out = triton_activation(gate, up, kind, params)
        ref = activation.reference(gate.double(), up.double() if activation.gated else None, params)
        assert torch.isfinite(out).all(), (kind.name, params)
        err = relative_error(out, ref)
        assert err < 1e-6, (kind.name, params, err)
        # And element by element: nothing may hide in a norm dominated by the large inputs.
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("kind", list(ACTIVATIONS), ids=lambda k: k.name)
def test_triton_activation_small_inputs_element_by_element(kind):
    """Relative accuracy for small gates and ups (1e-8 .. 0.5, both signs), element by element: no formula may lose it to a
    cancellation (situ's tanh of gate/4 and up/25 did, as 2*sigmoid(2x) - 1)."""
    activation = ACTIVATIONS[kind]
    magnitudes = torch.logspace(-8, math.log10(0.5), 64, dtype=torch.float64)
    gate = torch.cat([magnitudes, -magnitudes]).float().to(DEVICE)
    up = gate.flip(0) * 0.7
    for params in [activation.default_params] + PARAMS.get(kind, []):
        out = triton_activation(gate, up, kind, params)
        ref = activation.reference(gate.double(), up.double() if activation.gated else None, params)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=0.0, msg=lambda m: f"{kind.name} {params}: {m}")


def _spec(kind, g, u, p):
    """The activations as ../shared/docs/flashinfer_api.md states them, with torch.nn.functional where one exists: written
    apart from activations.py, whose torch table is both the reference's and (through the test above) the kernels' yardstick."""
    F = torch.nn.functional
    if kind == ActivationType.SwigluBias:
        gate, up = torch.clamp(g, max=p[2]), torch.clamp(u, -p[2], p[2])
        return gate * torch.sigmoid(p[0] * gate) * (up + p[1])
    if kind == ActivationType.SwigluStep:
        return torch.clamp(F.silu(g), max=p[2]) * torch.clamp(u, -p[2], p[2])
    if kind == ActivationType.Situ:
        return p[0] * torch.tanh(g / p[0]) * torch.sigmoid(g) * (p[1] * torch.tanh(u / p[1]))
    return {ActivationType.Gelu: lambda: F.gelu(g), ActivationType.Relu: lambda: F.relu(g), ActivationType.Silu: lambda: F.silu(g),
            ActivationType.Swiglu: lambda: F.silu(g) * u, ActivationType.Geglu: lambda: F.gelu(g) * u,
            ActivationType.Relu2: lambda: F.relu(g) ** 2, ActivationType.GegluTanh: lambda: F.gelu(g, approximate="tanh") * u,
            ActivationType.Identity: lambda: g}[kind]()


@pytest.mark.parametrize("kind", list(ACTIVATIONS), ids=lambda k: k.name)
def test_torch_table_matches_the_spec(kind):
    """The float64 torch table (the reference's formulas) against the API document's definitions, so a formula wrong in both
    the table and the kernel (tanh-GELU written as erf-GELU, say) cannot pass the kernel-vs-table test above."""
    activation = ACTIVATIONS[kind]
    gate, up = (t.double() for t in spanning_inputs())
    for params in [activation.default_params] + PARAMS.get(kind, []):
        table = activation.reference(gate, up if activation.gated else None, params)
        torch.testing.assert_close(table, _spec(kind, gate, up, params), rtol=1e-12, atol=1e-12)  # float64 rounding at zeros


def test_activation_torch_splits_gate_and_up_by_layout():
    torch.manual_seed(0)
    gate, up = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    swiglu = get_activation("swiglu")
    expected = gate * torch.sigmoid(gate) * up
    torch.testing.assert_close(activation_torch(torch.cat([gate, up], -1), swiglu), expected)
    torch.testing.assert_close(activation_torch(torch.cat([up, gate], -1), swiglu, gate_layout="up_first"), expected)
    interleaved = torch.stack([gate, up], -1).reshape(5, 8)
    torch.testing.assert_close(activation_torch(interleaved, swiglu, gate_layout="interleaved"), expected)
    with pytest.raises(ValueError, match="gate_layout"):
        activation_torch(torch.cat([gate, up], -1), swiglu, gate_layout="diagonal")


# ---------------------------------------------------------------------------------------------------------------------------------
# get_activation


@pytest.mark.parametrize("kind", list(ACTIVATIONS), ids=lambda k: k.name)
def test_get_activation_by_every_spelling(kind):
    activation = ACTIVATIONS[kind]
    assert activation.kind == kind
    assert get_activation(activation.name) is activation  # our name, e.g. "swiglu_bias"
    assert get_activation(kind.name) is activation  # FlashInfer's enum member name, e.g. "SwigluBias"
    assert get_activation(kind.name.upper()) is activation
    assert get_activation(f"  {activation.name} ") is activation
    assert get_activation(int(kind)) is activation  # FlashInfer's integer value
    assert get_activation(kind) is activation


def test_table_is_complete_and_consistent():
    assert set(ACTIVATIONS) == set(ActivationType) - {ActivationType.InvalidType}
    gated = {a.name for a in ACTIVATIONS.values() if a.gated}
    assert gated == {"swiglu", "geglu", "swiglu_bias", "swiglu_step", "geglu_tanh", "situ"}
    assert ACTIVATIONS[ActivationType.SwigluBias].default_params == (1.0, 0.0, math.inf)
    assert ACTIVATIONS[ActivationType.SwigluStep].default_params[2] == 7.0
    assert ACTIVATIONS[ActivationType.Situ].default_params[:2] == (4.0, 25.0)


@pytest.mark.parametrize("bad", ["swish", "", "gelu2", -1, 11, 99, ActivationType.InvalidType])
def test_get_activation_unknown_raises_value_error(bad):
    with pytest.raises(ValueError, match="activation"):
        get_activation(bad)


@pytest.mark.parametrize("bad", [None, 3.0, True, [3]])
def test_get_activation_wrong_type_raises(bad):
    with pytest.raises(TypeError, match="activation"):
        get_activation(bad)


def test_activation_params_tensor():
    assert activation_params(get_activation("swiglu"), 4, "cpu") is None
    params = activation_params(get_activation("swiglu_bias"), 3, "cpu", p0=torch.tensor([1.0, 2.0, 3.0]))
    assert params.dtype == torch.float32 and tuple(params.shape) == (3, 3)
    assert params[:, 0].tolist() == [1.0, 2.0, 3.0] and params[:, 1].tolist() == [0.0] * 3
    assert all(math.isinf(v) for v in params[:, 2].tolist())
    situ = activation_params(get_activation("situ"), 2, "cpu")
    assert situ[:, :2].tolist() == [[4.0, 25.0], [4.0, 25.0]]


# ---------------------------------------------------------------------------------------------------------------------------------
# The interpreter harness fix


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))  # fp32 accumulator


@triton.jit
def _cast_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))


def _bf16_dot(a, b):
    c = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    _dot_kernel[(1,)](a, b, c, M=a.shape[0], N=b.shape[1], K=a.shape[1])
    return c


needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="checks the CPU interpreter's patch")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dot_matches_float64(dtype):
    torch.manual_seed(0)
    a = torch.randn(16, 32, device=DEVICE).to(dtype)
    b = torch.randn(32, 16, device=DEVICE).to(dtype)
    ref = a.double() @ b.double()
    # 16-bit products are exact in the fp32 accumulator, so only its rounding remains; fp32 operands go through TF32 on a
    # GPU's tensor cores (tl.dot's default precision), ~1e-3, and are exact in the interpreter.
    tolerance = 2e-3 if dtype == torch.float32 and not INTERPRETED else 1e-5
    assert relative_error(_bf16_dot(a, b), ref) < tolerance


@needs_interpreter
def test_bf16_dot_patch_is_needed_and_exact(monkeypatch):
    from triton.runtime import interpreter

    assert _triton_interpreter.INSTALLED and _triton_interpreter.ORIGINAL_CREATE_DOT is not None
    torch.manual_seed(1)
    a = torch.randn(16, 32).to(torch.bfloat16)
    b = torch.randn(32, 16).to(torch.bfloat16)
    ref = a.double() @ b.double()
    patched = _bf16_dot(a, b)
    # bf16 products are exact in fp32, so only the fp32 accumulation rounds.
    assert relative_error(patched, ref) < 1e-6
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", _triton_interpreter.ORIGINAL_CREATE_DOT)
    unpatched = _bf16_dot(a, b)
    assert relative_error(unpatched, ref) > 1.0  # the bit patterns multiplied as integers


def test_float32_to_bf16_cast_rounds_to_nearest_even():
    # The bf16 ulp at 1 is 2^-7. 1 + 3*2^-9 lies 3/4 of the way from 1.0 to 1.0078125: nearest is up, truncation is down.
    # 1 + 2^-8 is a tie between 1.0 (even) and 1.0078125: ties go to even, i.e. down.
    # 1 + 3*2^-8 is a tie between 1.0078125 (odd) and 1.015625 (even): up.
    x = torch.tensor([1 + 3 * 2**-9, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 3 * 2**-9), 3.0e38, float("inf"), float("nan"), 1e-30,
                      0.0, -0.0, 65504.0, 1.0, 0.1, -2.5, 7.0, 1e-20], dtype=torch.float32, device=DEVICE)
    y = torch.empty(16, dtype=torch.bfloat16, device=DEVICE)
    _cast_kernel[(1,)](x, y, BLOCK=16)
    expected = x.to(torch.bfloat16)  # torch rounds to nearest even
    assert torch.equal(y.view(torch.int16)[:6], expected.view(torch.int16)[:6])
    assert torch.isnan(y[6])
    assert torch.equal(y.view(torch.int16)[7:], expected.view(torch.int16)[7:])


@needs_interpreter
def test_float32_to_bf16_cast_patch_is_needed(monkeypatch):
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", _triton_interpreter.ORIGINAL_CAST_IMPL)
    x = torch.tensor([1 + 3 * 2**-9] * 16, dtype=torch.float32)
    y = torch.empty(16, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, BLOCK=16)
    assert y[0].item() == 1.0  # truncated; round to nearest gives 1.0078125
    assert x.to(torch.bfloat16)[0].item() == 1.0078125


@needs_interpreter
def test_int8_to_bf16_cast_is_exact():
    x = torch.arange(-128, 128, dtype=torch.int8)
    y = torch.empty(256, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, BLOCK=256)
    assert torch.equal(y, x.to(torch.bfloat16))


def test_bit_helpers_round_trip():
    values = np.array([0.0, -0.0, 1.0, -2.5, 3.140625, 1e-38, 6e4], dtype=np.float32)
    bits = _triton_interpreter.float32_to_bf16_bits(values)
    assert np.array_equal(bits, torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    back = _triton_interpreter.bf16_bits_to_float32(bits)
    assert np.array_equal(back, torch.from_numpy(values).to(torch.bfloat16).float().numpy())


def _nearest_float32(exact: Fraction) -> np.float32:
    """The float32 nearest to a rational, ties to even (a reference with no intermediate rounding)."""
    guess = np.float32(float(exact))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(candidates, key=lambda c: (abs(Fraction(float(c)) - exact), int(np.array(c).view(np.int32)) & 1))


def test_fma_float32_rounds_once():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(3000) * 2.0 ** rng.integers(-30, 30, 3000)).astype(np.float32)
    y = rng.standard_normal(3000).astype(np.float32)
    # z near -x*y: the sums that cancel are the ones a double rounding gets wrong
    z = (-(x.astype(np.float64) * y) * (1 + rng.standard_normal(3000) * 2.0**-20)).astype(np.float32)
    got = _triton_interpreter.fma_float32(x, y, z)
    expected = [_nearest_float32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))) for a, b, c in zip(x, y, z)]
    assert np.array_equal(got, np.array(expected, dtype=np.float32))
    assert not np.array_equal(got, (x * y + z).astype(np.float32))  # what the interpreter computed before the patch
