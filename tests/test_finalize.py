"""Finalize: `out[t] = sum_k scale[t,k] * (gemm2_out[source_to_dest[t + k*T]] + b2[e])` over the kept rows, fp32, k = 0..top_k-1.

The Triton `finalize` and the CPU fallback `finalize_torch` are checked against that formula written here in torch.
"""
from __future__ import annotations

import os

import pytest
import torch

import _triton_interpreter  # noqa: F401  (exact bf16 casts in the interpreter)
from simple_moe.finalize import finalize, finalize_torch
from simple_moe.routing import build_routing_maps

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_case(num_tokens, top_k, num_experts, hidden, dtype, *, drop_fraction=0.25, seed=0):
    """Random routing with some dropped ids, a gemm2_out whose dropped rows are NaN (finalize must never read them)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=generator)
    dropped = torch.rand(num_tokens, top_k, generator=generator) < drop_fraction
    ids = torch.where(dropped, torch.randint(num_experts, 3 * num_experts, ids.shape, generator=generator), ids)
    if num_tokens > 1:
        ids[0] = -1  # token 0: no local expert at all
    ids = ids.int().to(DEVICE)
    maps = build_routing_maps(ids, num_experts)
    rows = num_tokens * top_k
    gemm2_out = torch.randn(rows, hidden, generator=generator).to(dtype).to(DEVICE)
    valid = int(maps.expert_first_token_offset[-1])
    gemm2_out[valid:] = float("nan")
    scales = torch.rand(num_tokens, top_k, generator=generator).to(DEVICE)
    bias = torch.randn(num_experts, hidden, generator=generator).to(dtype).to(DEVICE)
    return maps, gemm2_out, scales, bias


def formula(gemm2_out, maps, scales, bias, accumulate=torch.float64):
    """The finalize formula, one k at a time in order, accumulated in `accumulate`."""
    num_tokens, top_k, hidden = maps.num_tokens, maps.top_k, gemm2_out.shape[1]
    out = torch.zeros(num_tokens, hidden, dtype=accumulate, device=gemm2_out.device)
    for k in range(top_k):
        source = torch.arange(num_tokens, device=gemm2_out.device) + k * num_tokens
        dest = maps.expanded_source_row_to_expanded_dest_row[source].long()
        expert = maps.expert_for_source_row[source].long()
        kept = expert < maps.num_experts
        row = gemm2_out[dest].to(accumulate)
        if bias is not None:
            row = row + bias[expert.clamp(max=maps.num_experts - 1)].to(accumulate)
        if scales is not None:
            row = row * scales[:, k].to(accumulate).unsqueeze(1)
        out += torch.where(kept.unsqueeze(1), row, torch.zeros_like(row))
    return out


def relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("implementation", [finalize, finalize_torch], ids=["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_scales, with_bias", [(True, False), (False, False), (True, True), (False, True)])
@pytest.mark.parametrize("num_tokens, top_k, num_experts, hidden", [(9, 2, 4, 40), (1, 1, 1, 8), (6, 8, 8, 1100)])
def test_finalize_matches_formula(implementation, dtype, with_scales, with_bias, num_tokens, top_k, num_experts, hidden):
    maps, gemm2_out, scales, bias = make_case(num_tokens, top_k, num_experts, hidden, dtype)
    scales = scales if with_scales else None
    bias = bias if with_bias else None
    output = torch.full((num_tokens, hidden), float("nan"), dtype=dtype, device=DEVICE)
    result = implementation(gemm2_out, maps, scales, bias, output=output)
    assert result.data_ptr() == output.data_ptr() and result.dtype == dtype
    assert torch.isfinite(result).all()  # every row written, no NaN read from dropped rows
    ref = formula(gemm2_out, maps, scales, bias)
    assert relative_error(result, ref) < TOLERANCE[dtype]
    if num_tokens > 1:
        assert (result[0] == 0).all()  # token 0 has no local expert
    if dtype == torch.float32 and INTERPRETED:
        # Fixed order: the same fp32 operations in the same k order give the same bits (a GPU may contract into FMAs).
        assert torch.equal(result, formula(gemm2_out, maps, scales, bias, accumulate=torch.float32))


def test_every_row_dropped_gives_zeros():
    maps = build_routing_maps(torch.full((5, 2), 7, dtype=torch.int32, device=DEVICE), 4)
    gemm2_out = torch.full((10, 16), float("nan"), device=DEVICE)
    out = finalize(gemm2_out, maps, torch.rand(5, 2, device=DEVICE), torch.randn(4, 16, device=DEVICE))
    assert torch.equal(out, torch.zeros(5, 16, device=DEVICE))


@pytest.mark.parametrize("implementation", [finalize, finalize_torch], ids=["triton", "torch"])
def test_dropped_pair_adds_nothing_whatever_its_router_weight(implementation):
    # A dropped pair (expert off this rank) contributes 0 even where its router weight is Inf or NaN: 0 * Inf would be NaN.
    maps, gemm2_out, scales, bias = make_case(9, 3, 4, 40, torch.float32, drop_fraction=0.4, seed=5)
    dropped = (maps.expert_for_source_row >= maps.num_experts).reshape(maps.top_k, maps.num_tokens).t()
    assert dropped.any() and (~dropped).any()
    scales = torch.where(dropped, torch.full_like(scales, float("inf")), scales)
    scales[dropped.nonzero()[0, 0], dropped.nonzero()[0, 1]] = float("nan")
    out = implementation(gemm2_out, maps, scales, bias, output=torch.full((9, 40), float("nan"), device=DEVICE))
    assert torch.isfinite(out).all()
    assert relative_error(out, formula(gemm2_out, maps, scales, bias)) < 1e-6


def test_deterministic():
    maps, gemm2_out, scales, bias = make_case(33, 4, 6, 300, torch.bfloat16, seed=3)
    first = finalize(gemm2_out, maps, scales, bias)
    second = finalize(gemm2_out, maps, scales, bias)
    assert torch.equal(first.view(torch.int16), second.view(torch.int16))


def test_zero_tokens():
    maps = build_routing_maps(torch.empty(0, 2, dtype=torch.int32, device=DEVICE), 4)
    out = finalize(torch.empty(0, 24, device=DEVICE), maps, torch.empty(0, 2, device=DEVICE))
    assert tuple(out.shape) == (0, 24) and out.dtype == torch.float32


def test_out_dtype_and_strided_gemm2_out():
    maps, wide, scales, bias = make_case(7, 2, 3, 64, torch.float16, seed=5)
    gemm2_out = wide[:, :48]  # row stride 64, 48 columns
    out = finalize(gemm2_out, maps, scales, bias[:, :48].contiguous(), out_dtype=torch.float32)
    assert out.dtype == torch.float32 and tuple(out.shape) == (7, 48)
    ref = formula(gemm2_out, maps, scales, bias[:, :48])
    assert relative_error(out, ref) < 1e-5  # fp32 output of fp16 rows: only the fp32 sum rounds


def test_bad_arguments_name_the_argument():
    """Arguments that do not match the maps are refused before the kernel could read or write out of bounds."""
    maps, gemm2_out, scales, bias = make_case(4, 2, 3, 32, torch.float32, seed=9)
    cases = [
        (dict(gemm2_out=gemm2_out[:7]), ValueError, "gemm2_out: expected T\\*top_k = 8 rows"),
        (dict(gemm2_out=gemm2_out[0]), ValueError, "gemm2_out: expected a 2-D"),
        (dict(gemm2_out=gemm2_out.int()), TypeError, "gemm2_out: expected dtype"),
        (dict(gemm2_out=gemm2_out.t().contiguous().t()), ValueError, "gemm2_out: expected a contiguous last dimension"),
        (dict(maps=maps.expert_first_token_offset), TypeError, "maps"),
        (dict(token_final_scales=scales[:1]), ValueError, "token_final_scales: expected shape \\(4, 2\\)"),
        (dict(token_final_scales=scales.flatten()), ValueError, "token_final_scales: expected a 2-D"),
        (dict(fc2_expert_biases=bias[:1]), ValueError, "fc2_expert_biases: expected shape \\(3, 32\\)"),
        (dict(fc2_expert_biases=bias[:, :3]), ValueError, "fc2_expert_biases"),
        (dict(output=torch.empty(1, 32, device=DEVICE)), ValueError, "output: expected shape \\(4, 32\\)"),
        (dict(output=torch.empty(4, 32, dtype=torch.int32, device=DEVICE)), TypeError, "output: expected dtype"),
        (dict(output=torch.empty(1, 32, device=DEVICE).expand(4, 32)), ValueError, "output: rows overlap"),
        (dict(output=torch.empty(4, 32, dtype=torch.float16, device=DEVICE), out_dtype=torch.float32), TypeError,
         "output: expected dtype torch.float32"),
    ]
    for changes, error, pattern in cases:
        arguments = dict(dict(gemm2_out=gemm2_out, maps=maps, token_final_scales=scales, fc2_expert_biases=bias), **changes)
        with pytest.raises(error, match=f"^{pattern}"):
            finalize(**arguments)
