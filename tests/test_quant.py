"""INT8 (simple_moe.quant): the quantisation helpers, W8A16 (per channel and group-wise) and W8A8 through `fused_moe_simple`, the
GEMM callbacks, the CPU fallback, `cutlass_int8_woq_forward`, bad-input errors, and the error report.

Accuracy is checked against float64 references that use exactly the quantised numbers, so only the kernels' own rounding is measured
(relative L2 error: fp32 < 1e-5, fp16 < 2e-3, bf16 < 1e-2, the library's standard):

- W8A16: `reference_moe` on the dequantised weights `q * scale`, in float64. (Group-wise, the kernel rounds `q * scale` to the
  activation dtype before its dot, as any 16-bit weight is; per channel it applies the scale to the fp32 accumulator.)
- W8A8: `w8a8_reference` below, per (token, k) in float64:
  1. the input is quantised per token with the formula (`quantize_rows_ref`, float32 like the library: scale = max|x|/127, 1 where
     that is 0, q = round half away from zero of x/scale, clamped to +-127);
  2. GEMM1 = (q_x @ q_fc1[e].T) * s_x[t] * s_fc1[e] (+ b1) in float64, then the activation in float64;
  3. that row is rounded to the activation dtype (what the fast path stores between the GEMMs) and quantised with the same formula;
  4. GEMM2 = (q_h @ q_fc2[e].T) * s_h * s_fc2[e] (+ b2) in float64, times the router weight, summed over k.
  The kernels compute the dequantisation and activation in fp32, so a value within an ulp of a rounding boundary in step 3 can land
  one int8 step apart; that is far below the tolerances.

Outputs are passed in filled with NaN so an unwritten row fails. Shapes are small: the kernels run in Triton's interpreter on CPU.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import _triton_interpreter  # noqa: F401  (exact bf16 dot and casts in the interpreter)
import problems
from problems import DEVICE
from simple_moe import cublas_gemm, fused_moe_simple, pipeline, reference_moe, torch_loop_gemm
from simple_moe.activations import ACTIVATIONS, activation_torch, get_activation
from simple_moe.quant import (W8A8, W8A16, RowQuantizerPlan, cutlass_int8_woq_forward, dequantize_weights_int8,
                              quantization_error, quantize_activations_int8, quantize_activations_int8_torch,
                              quantize_moe_weights, quantize_weights_int8)
from simple_moe.pipeline import _torch_experts_forward
from simple_moe.routing import build_routing_maps_torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
pytestmark = pytest.mark.filterwarnings("ignore:simple_moe. tensors on cpu")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# name -> (scheme, group size)
SCHEMES = {"w8a16": ("w8a16", None), "w8a16-g32": ("w8a16", 32), "w8a16-g64": ("w8a16", 64), "w8a16-g128": ("w8a16", 128),
           "w8a8": ("w8a8", None)}
ACTIVATION_NAMES = [a.name for a in ACTIVATIONS.values()]


# ---------------------------------------------------------------------------------------------------------------------------------
# Problems and references


def make_problem(*args, **kwargs):
    """A float layer (float32 weights, to quantise with `quantize_moe_weights`); see tests/problems.py."""
    return problems.make_problem(*args, weight_dtype=torch.float32, **kwargs)


def quantized(problem, name):
    """(problem with int8 weights, quant) for a SCHEMES name."""
    scheme, group = SCHEMES[name]
    q1, q2, quant = quantize_moe_weights(problem["fc1_expert_weights"], problem["fc2_expert_weights"], scheme, group)
    return dict(problem, fc1_expert_weights=q1, fc2_expert_weights=q2), quant


def quantize_rows_ref(x: torch.Tensor):
    """The documented per-row formula, written out here independently: (q as float32, scales float32).

    Correctly rounded float32 divisions (by a tensor: torch's CUDA division by a Python number multiplies by the reciprocal)."""
    xf = x.float()
    amax = xf.abs().amax(dim=1)
    scale = amax / torch.full_like(amax, 127)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row, or one whose division underflows
    y = xf / scale[:, None]
    q = torch.where(y >= 0, torch.floor(y + 0.5), torch.ceil(y - 0.5)).clamp(-127, 127)
    return q.nan_to_num(0.0), scale  # rows with a NaN or Inf: scale NaN / Inf, q 0


def w8a16_reference(qproblem, quant, **kwargs):
    """float64 reference_moe on exactly the dequantised weights."""
    args = dict(qproblem, **kwargs)
    g = quant.group_size
    args["fc1_expert_weights"] = dequantize_weights_int8(qproblem["fc1_expert_weights"], quant.fc1_scales, g, torch.float64)
    args["fc2_expert_weights"] = dequantize_weights_int8(qproblem["fc2_expert_weights"], quant.fc2_scales, g, torch.float64)
    return reference_moe(**args)


def w8a8_reference(qproblem, quant, *, gate_layout="gate_first", activation_params=None, ep_size=1, ep_rank=0):
    """float64 W8A8 reference with the quantised input and intermediate (see the module docstring)."""
    x = qproblem["input"]
    dtype = x.dtype
    act = get_activation(qproblem["activation"])
    q1, q2 = qproblem["fc1_expert_weights"].double(), qproblem["fc2_expert_weights"].double()
    s1, s2 = quant.fc1_scales.double(), quant.fc2_scales.double()
    b1, b2 = qproblem["fc1_expert_biases"], qproblem["fc2_expert_biases"]
    router = qproblem["token_final_scales"]
    num_experts = q2.shape[0]
    xq, xs = quantize_rows_ref(x)
    out = torch.zeros(x.shape[0], q2.shape[1], dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for k in range(qproblem["token_selected_experts"].shape[1]):
            e = int(qproblem["token_selected_experts"][t, k]) - ep_rank * num_experts
            if not 0 <= e < num_experts:
                continue
            h = (xq[t].double() @ q1[e].T) * xs[t].double() * s1[e]
            if b1 is not None:
                h = h + b1[e].double()
            params = None if activation_params is None else tuple(activation_params[e].double().tolist())
            h = activation_torch(h[None], act, params, gate_layout).to(dtype)  # GEMM1 stores the activation dtype
            hq, hs = quantize_rows_ref(h)
            y = (hq[0].double() @ q2[e].T) * hs[0].double() * s2[e]
            if b2 is not None:
                y = y + b2[e].double()
            scale = 1.0 if router is None else router[t, k].double()
            out[t] += scale * y
    return out


def exact_reference(qproblem, quant, **kwargs):
    return w8a8_reference(qproblem, quant, **kwargs) if isinstance(quant, W8A8) else w8a16_reference(qproblem, quant, **kwargs)


def check_close(out, ref):
    dtype = out.dtype
    assert tuple(out.shape) == tuple(ref.shape)
    assert torch.isfinite(out).all(), "unwritten (NaN) or overflowed output"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < TOLERANCE[dtype], f"relative error {err:.3g} >= {TOLERANCE[dtype]:g} ({dtype})"
    return err


def run_and_check(qproblem, quant, *, reference_kwargs=None, **kwargs):
    output = torch.full(qproblem["input"].shape, float("nan"), dtype=qproblem["input"].dtype, device=DEVICE)
    out = fused_moe_simple(**qproblem, output=output, quant=quant, **kwargs)
    assert out.data_ptr() == output.data_ptr()
    return check_close(out, exact_reference(qproblem, quant, **(reference_kwargs or {})))


# ---------------------------------------------------------------------------------------------------------------------------------
# Helpers


@pytest.mark.parametrize("group_size", [None, 32, 64, 128])
def test_quantize_weights_int8_formula(group_size):
    w = torch.randn(3, 10, 256, dtype=torch.float64)
    w[1, 4] = 0.0  # an all-zero channel: scale 1, q 0
    q, scales = quantize_weights_int8(w, group_size)
    g = group_size or 256
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scales.dtype == torch.float32
    assert scales.shape == ((3, 10) if group_size is None else (3, 10, 256 // group_size))
    assert q.abs().max() <= 127 and q.abs().max() == 127
    blocks = w.float().reshape(3, 10, 256 // g, g)
    expected_q, expected_s = quantize_rows_ref(blocks.reshape(-1, g))
    assert torch.equal(q.reshape(-1, g).float(), expected_q)
    assert torch.equal(scales.reshape(-1), expected_s)
    assert (scales.reshape(3, 10, -1)[1, 4] == 1).all() and (q[1, 4] == 0).all()
    # Dequantisation error at most half a step.
    deq = dequantize_weights_int8(q, scales, group_size, torch.float64)
    step = scales.double().reshape(3, 10, -1).repeat_interleave(g, dim=-1)
    assert ((deq - w).abs() <= step / 2 + 1e-12).all()


def test_quantize_weights_int8_nan_and_inf_stay_visible():
    # A NaN weight makes its channel's (or group's) scale NaN, an Inf one Inf, so the dequantised weights carry them as the
    # float weights do; before, a NaN failed `scale > 0`, the scale fell back to 1 and the channel's other weights were
    # silently rounded to 0.
    w = torch.randn(2, 4, 64)
    w[0, 1, 5], w[1, 2, 7] = float("nan"), float("inf")
    for group_size in (None, 32):
        q, scales = quantize_weights_int8(w, group_size)
        s = scales.reshape(2, 4, -1)
        assert s[0, 1, 0].isnan() and s[1, 2, 0].isinf() and torch.isfinite(s).sum() == s.numel() - 2
        assert (q[0, 1, :32] == 0).all() and (q[1, 2, :32] == 0).all()
        deq = dequantize_weights_int8(q, scales, group_size)
        assert deq[0, 1, :32].isnan().all() and deq[1, 2, :32].isnan().all()
        assert torch.isfinite(deq).sum() == deq.numel() - (128 if group_size is None else 64)


@needs_kernels
@pytest.mark.parametrize("cols", [40, 5000])  # one block, the two-pass loop
def test_quantize_activations_int8_nan_and_inf_rows(cols):
    # tl.max skips NaN; the kernel's max must not, or a NaN row gets a finite scale and its NaN becomes a 0 (and the torch
    # twin, which keeps NaN, would disagree with it).
    x = torch.randn(5, cols)
    x[0, 3], x[1, cols - 1], x[3, 1] = float("nan"), float("inf"), -float("inf")
    x[2] = 0.0
    q, s = quantize_activations_int8(x.to(DEVICE))
    tq, ts = quantize_activations_int8_torch(x)
    eq, es = quantize_rows_ref(x)
    assert s[0].isnan() and s[1].isinf() and s[3].isinf() and s[2] == 1
    assert torch.equal(q.cpu(), tq) and torch.equal(q.float().cpu(), eq)
    torch.testing.assert_close(s.cpu(), ts, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(s.cpu(), es, rtol=0, atol=0, equal_nan=True)
    assert (q[:4] == 0).all().item() and (q[4] != 0).any().item()


@needs_kernels
@pytest.mark.parametrize("num_tokens", [1, 5])  # the decode path, the grouped path
@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
def test_nan_reaches_the_output_as_in_the_float_layer(scheme, num_tokens):
    problem = make_problem(num_tokens, 64, 32, 4, 2, torch.float32)
    if scheme == "w8a8":
        problem["input"][0, 3] = float("nan")  # token 0's activations
    else:
        problem["fc1_expert_weights"][problem["token_selected_experts"][0, 0], 0, 5] = float("nan")  # one of token 0's experts
    float_out = fused_moe_simple(**problem)
    qproblem, quant = quantized(problem, scheme)
    out = fused_moe_simple(**qproblem, quant=quant)
    assert float_out[0].isnan().any()
    assert torch.equal(out.isnan().any(dim=1), float_out.isnan().any(dim=1))


def test_quantize_weights_int8_bad_group_size():
    w = torch.randn(2, 4, 96)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weights_int8(w, 48)
    with pytest.raises(ValueError, match="group_size.*K=96"):
        quantize_weights_int8(w, 64)
    with pytest.raises(TypeError, match="w"):
        quantize_weights_int8(w.to(torch.int8))
    with pytest.raises(ValueError, match="^w: expected a reduction dimension K"):
        quantize_weights_int8(torch.randn(2, 4, 0))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("cols", [7, 64, 300, 5000])  # 5000 > one block: the two-pass loop
def test_quantize_activations_int8_matches_formula(dtype, cols):
    x = (torch.randn(6, cols) * torch.tensor([1.0, 10.0, 0.01, 0.0, 3.0, 1e-3])[:, None]).to(dtype).to(DEVICE)
    q, s = quantize_activations_int8(x)
    eq, es = quantize_rows_ref(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (6,)
    assert torch.equal(q.float(), eq) and torch.equal(s, es)  # bit-exact
    assert s[3] == 1 and (q[3] == 0).all()
    tq, ts = quantize_activations_int8_torch(x)
    assert torch.equal(tq, q) and torch.equal(ts, s)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_quantize_activations_int8_every_magnitude(dtype):
    # Rows from 2^-149 (the smallest float32 subnormal; bf16's is 2^-133) to 2^120, each a random row times a power of two, so
    # the row quantiser's one-reciprocal division (and its lift of tiny scales) meets every exponent; its bits must be the
    # correctly rounded division's. The hard cases are quotients within an ulp or two of a rounding boundary m + 1/2: the
    # last rows hold x = (m + 1/2) * scale rounded to float32 and nudged by -2..2 ulps, for a scale fixed by the row's max.
    exponents = torch.arange(-149, 121, 3, dtype=torch.float64)
    x = torch.randn(len(exponents), 512, dtype=torch.float64) * torch.exp2(exponents)[:, None]
    ties = []
    for row_max in (1.2345, 3.0e-20, 7.7e15):  # scales of ordinary, lifted (below 2^-60) and large rows
        scale = torch.tensor([row_max], dtype=torch.float32) / torch.tensor([127.0])
        near_tie = ((torch.randint(-127, 127, (511,)) + 0.5).float() * scale).view(torch.int32)
        near_tie = (near_tie + torch.randint(-2, 3, (511,), dtype=torch.int32)).view(torch.float32)  # same sign: bits +- ulps
        ties.append(torch.cat([torch.tensor([row_max], dtype=torch.float32), near_tie]))
    x = torch.cat([x, torch.stack(ties).double()]).to(dtype)
    q, s = quantize_activations_int8(x.to(DEVICE))
    eq, es = quantize_rows_ref(x)
    assert torch.equal(q.float().cpu(), eq) and torch.equal(s.cpu(), es)
    below = x.float().abs().amax(dim=1) < 127 * 2.0**-150  # zero rows, or max|x| / 127 underflows: scale 1, all zeros
    assert (s.cpu()[below] == 1).all() and (q.cpu()[below] == 0).all()
    assert ((q.cpu()[~below] != 0).sum(dim=1) > 0).all()


@needs_kernels
def test_quantize_activations_int8_strided_and_valid_rows():
    base = torch.randn(8, 80, dtype=torch.float16, device=DEVICE)
    x = base[:, ::2]  # non-unit column stride
    eq, es = quantize_rows_ref(x)
    q, s = quantize_activations_int8(x)
    assert torch.equal(q.float(), eq) and torch.equal(s, es)
    valid = torch.tensor([5], dtype=torch.int64, device=DEVICE)
    q, s = quantize_activations_int8(x, valid_rows=valid)
    assert torch.equal(q[:5].float(), eq[:5]) and torch.equal(s[:5], es[:5])


@needs_kernels
@pytest.mark.parametrize("valid", [None, 5])
def test_row_quantizer_plan_matches_the_formula(valid):
    # A call plan's quantiser (launch prepared once, later calls pass addresses) gives the formula's bits, call after call,
    # on strided rows and with a device-side valid-row count.
    base = torch.randn(8, 80, dtype=torch.float16, device=DEVICE)
    valid_rows = None if valid is None else torch.tensor([valid], dtype=torch.int64, device=DEVICE)
    plan = RowQuantizerPlan.like(base[:, ::2], valid_rows)
    for _ in range(3):
        base.normal_()
        x = base[:, ::2]
        q, s = plan(x, valid_rows)
        eq, es = quantize_rows_ref(x)
        rows = valid or x.shape[0]
        assert torch.equal(q[:rows].float(), eq[:rows]) and torch.equal(s[:rows], es[:rows])
        assert q.shape == x.shape and q.dtype == torch.int8 and s.dtype == torch.float32
    assert plan.launch is not None and (DEVICE == "cpu" or plan.launch.direct)
    empty = RowQuantizerPlan(0, 40, 40, 1, False, base.device)  # nothing to launch: the torch twin's answer
    assert empty(base[:0, :40])[0].shape == (0, 40)


@needs_kernels
def test_quantize_activations_int8_valid_rows_with_garbage_past_them():
    # The kernel reads every row (without waiting for the device-side count) but only the rows before the count matter.
    x = torch.randn(37, 1000, dtype=torch.bfloat16, device=DEVICE) * torch.rand(37, 1, device=DEVICE).to(torch.bfloat16)
    x[30:] = float("nan")  # unused rows may hold anything
    eq, es = quantize_rows_ref(x[:21])
    q, s = quantize_activations_int8(x, valid_rows=torch.tensor([21], dtype=torch.int64, device=DEVICE))
    assert torch.equal(q[:21].float(), eq) and torch.equal(s[:21], es)


# ---------------------------------------------------------------------------------------------------------------------------------
# fused_moe_simple with quant=


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("biases", [False, True], ids=["no_bias", "bias"])
def test_schemes(scheme, dtype, biases):
    size = 128 if scheme == "w8a16-g128" else 64  # the group must divide H and I
    problem = make_problem(13, size, size, 5, 2, dtype, bias1=biases, bias2=biases, seed=1)
    run_and_check(*quantized(problem, scheme))


@needs_kernels
@pytest.mark.parametrize("scheme", ["w8a16", "w8a16-g128", "w8a8"])
@pytest.mark.parametrize("num_tokens", [1, 5])  # the decode path's plan, the grouped path's
def test_planned_calls(num_tokens, scheme, monkeypatch):
    """The INT8 schemes take call plans (pipeline.py): later calls with new values stay right and match an unplanned call
    bit for bit; scales of another dtype or another scheme over the same weights get plans of their own."""
    plans = {}
    monkeypatch.setattr(pipeline, "_call_plans", plans)
    size = 128 if scheme == "w8a16-g128" else 64
    problem = make_problem(num_tokens, size, size, 5, 2, torch.bfloat16, bias1=True, bias2=True, seed=40)
    qproblem, quant = quantized(problem, scheme)
    run_and_check(qproblem, quant)
    assert len(plans) == 1
    renewed = dict(qproblem, input=torch.randn_like(qproblem["input"]))
    run_and_check(renewed, quant)
    planned = fused_moe_simple(**renewed, quant=quant)
    assert len(plans) == 2  # output allocated: another signature
    plans.clear()
    assert torch.equal(fused_moe_simple(**renewed, quant=quant), planned)
    half_scales = type(quant)(quant.fc1_scales.half(), quant.fc2_scales.half(), *(
        [quant.group_size] if isinstance(quant, W8A16) else []))
    run_and_check(renewed, half_scales)
    other = W8A8(quant.fc1_scales, quant.fc2_scales) if isinstance(quant, W8A16) and quant.group_size is None else None
    if other is not None:  # same tensors, another scheme
        run_and_check(renewed, other)
    assert len(plans) == 2 + (other is not None)


@needs_kernels
@pytest.mark.parametrize("scheme", ["w8a16", "w8a16-g32", "w8a8"])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_every_activation(activation, scheme):
    problem = make_problem(9, 64, 32, 4, 2, torch.float16, activation, bias1=True, bias2=True, seed=2)
    run_and_check(*quantized(problem, scheme))


@needs_kernels
@pytest.mark.parametrize("scheme", ["w8a16", "w8a16-g32", "w8a8"])
def test_float32_activations(scheme):
    # fp32 activations: W8A16 widens the int8 weights to fp32 for full-precision (IEEE) dots; W8A8 quantises fp32 rows.
    problem = make_problem(7, 64, 32, 4, 2, torch.float32, bias1=True, bias2=True, seed=3)
    run_and_check(*quantized(problem, scheme))


@needs_kernels
@pytest.mark.parametrize("activation", ["swiglu_bias", "swiglu_step"])
def test_activation_params(activation):
    num_experts = 4
    params = torch.rand(num_experts, 3)
    params[:, 2] = 0.3 + params[:, 2]  # limits the clamps reach
    problem = make_problem(11, 64, 32, num_experts, 2, torch.float16, activation, bias1=True, seed=4)
    for scheme in ("w8a16", "w8a8"):
        qproblem, quant = quantized(problem, scheme)
        run_and_check(qproblem, quant, activation_params=params.to(DEVICE),
                      reference_kwargs={"activation_params": params.to(DEVICE)})


@needs_kernels
@pytest.mark.parametrize("scheme", ["w8a16-g32", "w8a8"])
def test_expert_parallel_drops_foreign_rows(scheme):
    # Half the (token, k) rows belong to the other rank: GEMM1's output rows past the kept ones are never quantised or read.
    problem = make_problem(12, 64, 64, 3, 2, torch.bfloat16, bias2=True, seed=5, num_global_experts=6)
    qproblem, quant = quantized(problem, scheme)
    run_and_check(qproblem, quant, ep_size=2, ep_rank=1, reference_kwargs={"ep_size": 2, "ep_rank": 1})


@needs_kernels
def test_token_without_local_expert_is_zero_and_no_router_scales():
    problem = make_problem(6, 64, 32, 4, 2, torch.float16, seed=6)
    problem["token_selected_experts"][0] = torch.tensor([7, 9], dtype=torch.int32)  # outside [0, 4): dropped
    problem["token_final_scales"] = None
    for scheme in ("w8a16", "w8a8"):
        qproblem, quant = quantized(problem, scheme)
        out = torch.full_like(qproblem["input"], float("nan"))  # poisoned: the dropped token's row must be written as zeros
        fused_moe_simple(**qproblem, quant=quant, output=out)
        assert (out[0] == 0).all()
        check_close(out[1:], exact_reference(qproblem, quant)[1:])


@needs_kernels
def test_w8a8_quantization_error_is_the_activation_rounding():
    # Sanity of the W8A8 reference itself: ignoring the activation quantisation costs visible error, modelling it none.
    problem = make_problem(16, 64, 64, 4, 2, torch.float16, seed=7)
    qproblem, quant = quantized(problem, "w8a8")
    out = fused_moe_simple(**qproblem, quant=quant)
    exact = check_close(out, w8a8_reference(qproblem, quant))
    weights_only = ((out.double() - w8a16_reference(qproblem, quant)).norm() / w8a16_reference(qproblem, quant).norm()).item()
    assert exact < weights_only / 5


# ---------------------------------------------------------------------------------------------------------------------------------
# GEMM callbacks and the CPU fallback


@needs_kernels
@pytest.mark.parametrize("scheme", ["w8a16", "w8a16-g32", "w8a8"])
@pytest.mark.parametrize("callback", [torch_loop_gemm, cublas_gemm], ids=["torch_loop", "cublas"])
def test_builtin_callbacks(scheme, callback):
    # Several seeds and token counts: W8A8 re-quantises the intermediate, so an operand rounded where the scheme does not round
    # moves elements across int8 steps on some inputs only (cublas_gemm's fp16 operands passed one seed, missed 2e-3 on others).
    for seed, num_tokens in ((8, 9), (1, 2), (2, 5), (3, 3)):
        problem = make_problem(num_tokens, 64, 32, 4, 2, torch.float16, bias1=True, bias2=True, seed=seed)
        qproblem, quant = quantized(problem, scheme)
        run_and_check(qproblem, quant, gemm1_fn=callback, gemm2_fn=callback)


@needs_kernels
def test_callbacks_receive_int8_weights_and_scales():
    problem = make_problem(5, 64, 64, 3, 2, torch.float16, seed=9)
    qproblem, quant = quantized(problem, "w8a16-g32")
    seen = []

    def spy(output, input, weights, bias, expert_offsets, M, N, K, num_experts, is_gemm1, activation, **quant_kwargs):
        seen.append((is_gemm1, weights.dtype, quant_kwargs))
        torch_loop_gemm(output, input, weights, bias, expert_offsets, M, N, K, num_experts, is_gemm1, activation,
                        **quant_kwargs)

    fused_moe_simple(**qproblem, gemm1_fn=spy, gemm2_fn=spy, quant=quant)
    assert [s[0] for s in seen] == [True, False]
    assert all(dtype == torch.int8 for _, dtype, _ in seen)
    assert seen[0][2]["weight_scales"] is quant.fc1_scales and seen[1][2]["weight_scales"] is quant.fc2_scales
    assert all(kw["group_size"] == 32 and kw["quantize_input"] is False for _, _, kw in seen)
    # Without quant the seed's contract is unchanged: no extra keywords.
    seen.clear()
    fused_moe_simple(**dict(problem, fc1_expert_weights=problem["fc1_expert_weights"].half(),
                            fc2_expert_weights=problem["fc2_expert_weights"].half()), gemm1_fn=spy, gemm2_fn=spy)
    assert all(kw == {} for _, _, kw in seen)


def test_callback_without_quant_keywords_is_refused():
    problem = make_problem(4, 64, 32, 3, 2, torch.float16, seed=10)
    qproblem, quant = quantized(problem, "w8a16")

    def seed_signature(output, input, weights, bias, expert_offsets, M, N, K, num_experts, is_gemm1, activation):
        raise AssertionError("must not be called")

    with pytest.raises(TypeError, match="gemm2_fn.*weight_scales"):
        fused_moe_simple(**qproblem, gemm2_fn=seed_signature, quant=quant)


@pytest.mark.parametrize("scheme", ["w8a16", "w8a16-g32", "w8a8"])
def test_cpu_fallback_without_interpreter(scheme):
    # The torch loop over experts is what moe_forward runs on a CPU tensor without TRITON_INTERPRET=1.
    problem = make_problem(8, 64, 32, 4, 2, torch.bfloat16, bias1=True, bias2=True, seed=11)
    problem = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in problem.items()}
    qproblem, quant = quantized(problem, scheme)
    maps = build_routing_maps_torch(qproblem["token_selected_experts"], 4)
    act = get_activation("swiglu")
    output = torch.full(qproblem["input"].shape, float("nan"), dtype=torch.bfloat16)
    out = _torch_experts_forward(qproblem["input"], maps, qproblem["token_final_scales"], qproblem["fc1_expert_weights"],
                                 qproblem["fc2_expert_weights"], act, "gate_first", qproblem["fc1_expert_biases"],
                                 qproblem["fc2_expert_biases"], None, output, quant)
    check_close(out, exact_reference(qproblem, quant))


# ---------------------------------------------------------------------------------------------------------------------------------
# cutlass_fused_moe's use_int8_woq_per_channel


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_cutlass_int8_woq_forward(dtype, activation):
    problem = make_problem(10, 64, 32, 3, 2, dtype, activation, bias1=True, bias2=True, seed=12, num_global_experts=6)
    qproblem, quant = quantized(problem, "w8a16")  # the layout is fc1's rows as they are: read as up-first here
    scales = [quant.fc1_scales.to(dtype), quant.fc2_scales.to(dtype)]  # TensorRT-LLM passes them in the activation dtype
    output = torch.full(problem["input"].shape, float("nan"), dtype=dtype, device=DEVICE)
    out = cutlass_int8_woq_forward(
        qproblem["input"], qproblem["token_selected_experts"], qproblem["token_final_scales"], qproblem["fc1_expert_weights"],
        qproblem["fc2_expert_weights"], scales, activation=get_activation(activation).kind, act_params=None,
        fc1_expert_biases=qproblem["fc1_expert_biases"], fc2_expert_biases=qproblem["fc2_expert_biases"], output=output,
        start_expert=3, total_experts=6)
    assert out.data_ptr() == output.data_ptr()
    ref_quant = W8A16(scales[0], scales[1])
    check_close(out, w8a16_reference(qproblem, ref_quant, gate_layout="up_first", ep_size=2, ep_rank=1))


def test_cutlass_int8_woq_forward_bad_scales():
    problem = make_problem(4, 64, 32, 3, 2, torch.float16, seed=13)
    qproblem, quant = quantized(problem, "w8a16")
    args = (qproblem["input"], qproblem["token_selected_experts"], qproblem["token_final_scales"],
            qproblem["fc1_expert_weights"], qproblem["fc2_expert_weights"])
    kwargs = dict(activation="swiglu", act_params=None, fc1_expert_biases=None, fc2_expert_biases=None, output=None,
                  start_expert=0, total_experts=3)
    with pytest.raises(ValueError, match="quant_scales"):
        cutlass_int8_woq_forward(*args, [quant.fc1_scales], **kwargs)
    with pytest.raises(ValueError, match="fc2_scales"):
        cutlass_int8_woq_forward(*args, [quant.fc1_scales, quant.fc2_scales[:, :5]], **kwargs)


# ---------------------------------------------------------------------------------------------------------------------------------
# Bad input


def _bad(problem, quant=None, **changes):
    return dict(problem, **changes), quant


def test_bad_inputs_raise_naming_the_argument():
    problem = make_problem(4, 64, 48, 3, 2, torch.float16, seed=14)
    qproblem, quant = quantized(problem, "w8a16")
    e, n1, h = qproblem["fc1_expert_weights"].shape
    cases = [
        # int8 weights without scales
        (dict(qproblem), None, TypeError, "fc1_expert_weights.*scales"),
        # float weights with a scheme
        (dict(problem), quant, TypeError, "fc1_expert_weights.*int8"),
        (dict(qproblem, fc2_expert_weights=problem["fc2_expert_weights"]), quant, TypeError, "fc2_expert_weights.*int8"),
        # scales of the wrong shape, dtype or kind
        (qproblem, W8A16(quant.fc1_scales[:, :-1], quant.fc2_scales), ValueError, "fc1_scales.*shape"),
        (qproblem, W8A16(quant.fc1_scales, quant.fc2_scales.unsqueeze(-1)), ValueError, "fc2_scales"),
        (qproblem, W8A16(quant.fc1_scales.to(torch.int32), quant.fc2_scales), TypeError, "fc1_scales.*dtype"),
        (qproblem, W8A16(quant.fc1_scales.tolist(), quant.fc2_scales), TypeError, "fc1_scales"),
        (qproblem, W8A8(quant.fc1_scales, torch.ones(e, h, 2)), ValueError, "fc2_scales"),
        # per-channel scales given to a group-wise scheme
        (qproblem, W8A16(quant.fc1_scales, quant.fc2_scales, group_size=32), ValueError, "fc1_scales.*group-wise"),
        # not a scheme
        (qproblem, "w8a16", TypeError, "quant"),
    ]
    for args, q, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            fused_moe_simple(**args, quant=q)
    # group size not dividing K: I = 48 is not a multiple of 32
    s1 = torch.ones(e, n1, h // 32, device=DEVICE)
    s2 = torch.ones(e, h, 1, device=DEVICE)
    with pytest.raises(ValueError, match="group_size: 32 does not divide .*K=48"):
        fused_moe_simple(**qproblem, quant=W8A16(s1, s2, group_size=32))
    with pytest.raises(ValueError, match="group_size"):
        W8A16(quant.fc1_scales, quant.fc2_scales, group_size=48)
    with pytest.raises(ValueError, match="group_size"):
        quantize_moe_weights(problem["fc1_expert_weights"], problem["fc2_expert_weights"], "w8a8", 32)
    with pytest.raises(ValueError, match="scheme"):
        quantize_moe_weights(problem["fc1_expert_weights"], problem["fc2_expert_weights"], "w4a16")
    # valid_rows: one integer count on x's device, as expert_first_token_offset[E:] is
    x = problem["input"]
    for valid_rows, error in ((torch.tensor([], dtype=torch.int64, device=DEVICE), ValueError),
                              (torch.tensor([1, 2], dtype=torch.int64, device=DEVICE), ValueError),
                              (torch.tensor([2.0], device=DEVICE), TypeError), (2, TypeError)):
        with pytest.raises(error, match="^valid_rows"):
            quantize_activations_int8(x, valid_rows=valid_rows)


# ---------------------------------------------------------------------------------------------------------------------------------
# Error report (for the benchmark; it asserts nothing itself)


@needs_kernels
def test_quantization_error_report():
    problem = make_problem(8, 64, 32, 4, 2, torch.float16, seed=15)
    report = quantization_error(**problem)
    assert set(report) == {"unquantized", "w8a16", "w8a16-g128", "w8a16-g64", "w8a16-g32", "w8a8"}
    assert "skipped" in report["w8a16-g128"] and "skipped" in report["w8a16-g64"]  # 128 and 64 do not divide I=32
    for name in ("unquantized", "w8a16", "w8a16-g32", "w8a8"):
        assert math.isfinite(report[name]["rel_l2_vs_float64"]) and report[name]["rel_l2_vs_float64"] > 0


# ---------------------------------------------------------------------------------------------------------------------------------
# Real sizes on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("num_tokens", [1, 64, 700])
def test_gpu_sizes(scheme, dtype, num_tokens):
    # Every tile shape class (decode, mid, prefill) and both K tails; the W8A8 reference is per (token, k), so T stays moderate.
    problem = make_problem(num_tokens, 1024, 768 if scheme != "w8a16-g128" else 1024, 16, 4, dtype, bias1=True, bias2=True,
                           seed=16)
    run_and_check(*quantized(problem, scheme))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [16, 2048])
def test_gpu_w8a16_long_k_gemm2_tiles(num_tokens):
    # GEMM2 with K = I >= 8192 (Mixtral's 14336) has its own W8A16 tiles on SM90: 16 x 128 x 256 at 16 rows a tile, and
    # 256-row weights-left tiles once the average expert has 256 rows (T=2048, top_k=2, E=8).
    from simple_moe.grouped_gemm import device_arch, gemm_tile_config

    num_experts, top_k, hidden, inter = 8, 2, 512, 8192
    arch = device_arch(torch.device(DEVICE))
    if arch >= 90:  # the test runs the tiles it is about
        tile = gemm_tile_config(num_tokens * top_k, num_experts, hidden, inter, torch.bfloat16, arch, False, w_int8=True)
        assert (tile.block_m, tile.weights_left) == ((16, False) if num_tokens == 16 else (256, True))
    problem = make_problem(num_tokens, hidden, inter, num_experts, top_k, torch.bfloat16, bias2=True, seed=17)
    run_and_check(*quantized(problem, "w8a16"))


@pytest.mark.gpu
def test_gpu_nan_and_inf_rows():
    # The row quantiser's NaN-keeping max compiled (max.NaN on the GPU, not the interpreter's numpy), and the layers after it.
    for cols in (40, 5000):
        test_quantize_activations_int8_nan_and_inf_rows(cols)
    for scheme in ("w8a16", "w8a8"):
        for num_tokens in (1, 5):
            test_nan_reaches_the_output_as_in_the_float_layer(scheme, num_tokens)
