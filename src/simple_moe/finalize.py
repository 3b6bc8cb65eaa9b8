"""Finalize: unpermute GEMM2's rows and reduce each token's top_k rows, deterministically.

`out[t] = sum_k scale[t,k] * (gemm2_out[source_to_dest[t + k*T]] + b2[e])`, summed in fp32 in the fixed order k = 0..top_k-1 and
cast once. Dropped rows (expert outside this rank) contribute nothing, so a token with no local expert gets zeros. When GEMM2's
epilogue already applied the bias and the router scale (the fast path), no scales and no bias are passed (`HAS_SCALES` and
`HAS_BIAS` False): a plain sum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_power_of_2, triton_runs_on
from ._launch import PlannedLaunch
from ._variants import KernelVariant, register_variants
from .routing import RoutingMaps

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@triton.jit
def _finalize_kernel(
    gemm2_out_ptr,  # [T*top_k, H] in dest-row order
    output_ptr,  # [T, H]
    source_to_dest_ptr,
    expert_for_source_ptr,
    scales_ptr,  # float32 [T, TOP_K], or unused
    bias_ptr,  # [E, H], or unused
    num_tokens,
    hidden_size,
    num_experts,
    stride_gemm2_row,
    stride_output_row,
    TOP_K: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    USE_PDL: tl.constexpr,  # programmatic dependent launch: wait for GEMM2's writes first (see finalize's launch_early)
):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < hidden_size
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        source_row = token + k * num_tokens
        dest_row = tl.load(source_to_dest_ptr + source_row).to(tl.int64)
        expert = tl.load(expert_for_source_ptr + source_row)
        kept = expert < num_experts
        # Each GEMM2 row is read once, here, so evict-first: this stream recycles its own lines in L2 instead of evicting
        # the rows GEMM2 wrote last (dirty lines: each eviction a write-back), which it reads later. H100, T=4096, this
        # kernel inside the layer, after do_bench's flush, 2-4 profiles (kernel_times_finalize_evict_first_h100.json):
        # OLMoE 52.9-53.6 -> 46.7-47.3 us, Qwen3-30B 52.9-53.5 -> 47.3-47.4, DeepSeek-V2-Lite 43.4-43.5 -> 36.8-36.9. The
        # layer (ab_revision_v30_finalize_evict_first_r16_bf16_h100.json, 16 rounds): -0.0 to -1.2% at T=2048/4096. Unlike
        # the decode weights' evict-first rule it has no size bound: Mixtral's layer (8 rounds, its finalize not profiled,
        # ab_revision_v30_finalize_evict_first_bf16_h100.json) moved +1.9% at T=1024, -1.1% at T=4096: that run's spread.
        row = tl.load(gemm2_out_ptr + dest_row * stride_gemm2_row + cols, mask=col_mask & kept, other=0.0,
                      eviction_policy="evict_first").to(tl.float32)
        if HAS_BIAS:
            row += tl.load(bias_ptr + expert.to(tl.int64) * hidden_size + cols, mask=col_mask & kept, other=0.0).to(tl.float32)
        if HAS_SCALES:  # a dropped pair's weight counts as 0, so its row adds 0 even where that weight is Inf or NaN
            row *= tl.where(kept, tl.load(scales_ptr + token.to(tl.int64) * TOP_K + k), 0.0)
        acc += row
    tl.store(output_ptr + token.to(tl.int64) * stride_output_row + cols, acc.to(output_ptr.dtype.element_ty), mask=col_mask)


def _finalize_block(hidden_size: int) -> int:
    # 1024 columns x 4 warps = 8 bf16 elements per thread: one 16-byte load per k per thread. On the H100 every block from
    # 256 x 1 warp to 2048 x 8 warps ran within 3% of this one at T=1024/4096 (finalize_blocks_h100.json).
    return min(1024, next_power_of_2(hidden_size))


def finalize(
    gemm2_out: torch.Tensor,
    maps: RoutingMaps,
    token_final_scales: torch.Tensor | None,
    fc2_expert_biases: torch.Tensor | None = None,
    *,
    output: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    launch_early: bool = False,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Reduces `gemm2_out` `[T*top_k, H]` (dest-row order) into `[T, H]`; see the module docstring for the formula.

    `token_final_scales=None` means an unweighted sum. Writes into `output` when given. `launch_early`: a programmatic
    dependent launch (SM90+), as the GEMM before it (`grouped_gemm.gemm_launches_early`). `block`: (columns a program, warps)
    instead of the rule's (sweeps).
    """
    _check_arguments(gemm2_out, maps, token_final_scales, fc2_expert_biases, output, out_dtype)
    num_tokens, hidden_size = maps.num_tokens, gemm2_out.shape[1]
    if output is None:
        output = torch.empty(num_tokens, hidden_size, dtype=out_dtype or gemm2_out.dtype, device=gemm2_out.device)
    if num_tokens == 0 or hidden_size == 0:
        return output
    if not triton_runs_on(gemm2_out.device):
        return finalize_torch(gemm2_out, maps, token_final_scales, fc2_expert_biases, output=output)
    plan = FinalizePlan(gemm2_out, maps, token_final_scales, fc2_expert_biases, output, launch_early, block)
    return plan(gemm2_out, maps, token_final_scales, fc2_expert_biases, output)


def _check_arguments(gemm2_out, maps: RoutingMaps, token_final_scales, fc2_expert_biases, output, out_dtype) -> None:
    """`finalize`'s arguments against the maps (the kernel reads `[T*top_k, H]`, `[T, top_k]`, `[E, H]` and writes `[T, H]`
    rows): TypeError/ValueError naming the argument."""
    from .pipeline import FLOAT_DTYPES, _check_rows, _check_shape, _check_tensor  # pipeline.py imports this module

    if not isinstance(maps, RoutingMaps):
        raise TypeError(f"maps: expected the RoutingMaps of build_routing_maps, got {type(maps).__name__}")
    _check_tensor("gemm2_out", gemm2_out, 2, FLOAT_DTYPES)
    device, hidden = gemm2_out.device, gemm2_out.shape[1]
    if gemm2_out.shape[0] != maps.expanded_num_rows:
        raise ValueError(f"gemm2_out: expected T*top_k = {maps.expanded_num_rows} rows (dest-row order), got "
                         f"{gemm2_out.shape[0]}")
    if maps.expert_first_token_offset.device != device:
        raise ValueError(f"maps: expected tensors on {device} (where gemm2_out is), got {maps.expert_first_token_offset.device}")
    _check_tensor("token_final_scales", token_final_scales, 2, FLOAT_DTYPES, device, optional=True)
    _check_shape("token_final_scales", token_final_scales, (maps.num_tokens, maps.top_k))
    _check_tensor("fc2_expert_biases", fc2_expert_biases, 2, FLOAT_DTYPES, device, optional=True)
    _check_shape("fc2_expert_biases", fc2_expert_biases, (maps.num_experts, hidden))
    if output is not None:
        _check_tensor("output", output, 2, FLOAT_DTYPES, device)
        _check_shape("output", output, (maps.num_tokens, hidden))
        if out_dtype is not None and output.dtype != out_dtype:
            raise TypeError(f"output: expected dtype {out_dtype} (out_dtype), got {output.dtype}")
    if gemm2_out.numel() and gemm2_out.stride(1) != 1:  # read only: its rows may repeat (a broadcast), not its columns
        raise ValueError(f"gemm2_out: expected a contiguous last dimension (strides {gemm2_out.stride()})")
    if output is not None and output.numel():
        _check_rows("output", output, hidden)


def finalize_torch(gemm2_out, maps: RoutingMaps, token_final_scales, fc2_expert_biases=None, *, output):
    """The finalize formula in torch (CPU without the interpreter): fp32, fixed k order; `finalize` on such tensors."""
    num_tokens, top_k = maps.num_tokens, maps.top_k
    acc = torch.zeros(num_tokens, gemm2_out.shape[1], dtype=torch.float32, device=gemm2_out.device)
    for k in range(top_k):
        source = torch.arange(num_tokens, device=gemm2_out.device) + k * num_tokens
        dest = maps.expanded_source_row_to_expanded_dest_row[source].long()
        expert = maps.expert_for_source_row[source].long()
        kept = (expert < maps.num_experts).unsqueeze(1)
        row = gemm2_out[dest].float()
        if fc2_expert_biases is not None:
            row = row + fc2_expert_biases[expert.clamp(max=maps.num_experts - 1)].float()
        if token_final_scales is not None:
            row = row * token_final_scales[:, k].float().unsqueeze(1)
        acc += torch.where(kept, row, torch.zeros_like(row))
    output.copy_(acc.to(output.dtype))
    return output


class FinalizePlan:
    """`finalize` for one signature (T, H, top_k, which optional tensors are given, strides): grid, int arguments and
    constexprs fixed once; the tensors given per call (those of `finalize`'s checks, made by the caller)."""

    def __init__(self, gemm2_out, maps: RoutingMaps, token_final_scales, fc2_expert_biases, output, launch_early: bool = False,
                 block: tuple[int, int] | None = None):
        num_tokens, hidden_size = maps.num_tokens, gemm2_out.shape[1]
        self.launch = None
        if num_tokens == 0 or hidden_size == 0:
            return
        block_h, num_warps = block or (_finalize_block(hidden_size), 4)
        self.launch = PlannedLaunch(
            _finalize_kernel,
            (num_tokens, cdiv(hidden_size, block_h)),
            (num_tokens, hidden_size, maps.num_experts, gemm2_out.stride(0), output.stride(0)),
            num_warps=num_warps,
            launch_pdl=launch_early,
            TOP_K=maps.top_k,
            HAS_SCALES=token_final_scales is not None,
            HAS_BIAS=fc2_expert_biases is not None,
            BLOCK_H=block_h,
            USE_PDL=launch_early,
        )

    def __call__(self, gemm2_out, maps: RoutingMaps, token_final_scales, fc2_expert_biases, output):
        if self.launch is not None:
            scales = token_final_scales.float().contiguous() if token_final_scales is not None else gemm2_out
            bias = fc2_expert_biases.contiguous() if fc2_expert_biases is not None else gemm2_out
            self.launch(gemm2_out, output, maps.expanded_source_row_to_expanded_dest_row, maps.expert_for_source_row, scales,
                        bias)
        return output


@register_variants
def _finalize_variants():
    variants = []
    signature = {"gemm2_out_ptr": None, "output_ptr": None, "source_to_dest_ptr": "*i32", "expert_for_source_ptr": "*i32",
                 "scales_ptr": "*fp32", "bias_ptr": None, "num_tokens": "i32", "hidden_size": "i32", "num_experts": "i32",
                 "stride_gemm2_row": "i64", "stride_output_row": "i64", "TOP_K": "constexpr", "HAS_SCALES": "constexpr",
                 "HAS_BIAS": "constexpr", "BLOCK_H": "constexpr", "USE_PDL": "constexpr"}
    for dtype, tname in _TRITON_DTYPE.items():
        for top_k in (2, 4, 6, 8):  # the top_k of every shape in baselines.md, and GPT-OSS's 4
            # (False, False): the fast path's plain sum (also as a programmatic launch on SM90); the others: the pluggable
            # path (scales) and direct `finalize` calls with a bias.
            for has_scales, has_bias, use_pdl in ((False, False, False), (False, False, True), (True, False, False),
                                                  (True, True, False)):
                variants.append(KernelVariant(
                    kernel="finalize",
                    variant=f"{tname} top_k={top_k} scales={int(has_scales)} bias={int(has_bias)}{' pdl' if use_pdl else ''}",
                    fn=_finalize_kernel,
                    signature={**signature, "gemm2_out_ptr": f"*{tname}", "output_ptr": f"*{tname}", "bias_ptr": f"*{tname}"},
                    constexprs={"TOP_K": top_k, "HAS_SCALES": has_scales, "HAS_BIAS": has_bias, "BLOCK_H": 1024,
                                "USE_PDL": use_pdl},
                    num_warps=4,
                    num_stages=1,
                    **({"archs": (90,)} if use_pdl else {}),
                ))
    return variants
