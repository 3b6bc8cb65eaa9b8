"""The decode path in one streaming kernel: each program takes a slice of one pair's intermediate and carries it through both
GEMMs, so the layer streams its weights once, in one launch, instead of in two launches that each ramp up and drain.

For a (token, k) pair with expert e and a slice of BLOCK_I intermediate columns (program (pair, slice)):
    h[slice]      = act(x[t] @ fc1[e, gate rows of the slice].T + b1, x[t] @ fc1[e, up rows of the slice].T + b1)
    partial[pair, slice, :] = fc2[e, :, slice] @ h[slice]                        (all H outputs, fp32)
and a small reduction (program (token, column block of H)) sums each pair's slices in a fixed order, then the pairs:
    out[t, n] = sum over k of round(scale[t, k] * (w2_scale[e_k, n] * sum over slices of partial[pair, slice, n] + b2[e_k, n]))
`h` is rounded to the activation dtype before GEMM2, as the two-kernel path stores its intermediate; each pair's row is rounded
once before the top_k sum, as there. The sums run in fixed orders: deterministic, no atomics. The fp32 partials
(`[T*top_k, I/BLOCK_I, H]`, Qwen3-30B T=1: 1.5 MB) stay in L2 between the two launches.

Why: at T=1 the two-kernel path's GEMMs (H100, Qwen3-30B: 50 and 25 MB of weights) each stayed ~5-8 us above their bytes at
the copy rate whatever their tiles (`benchmarks/NOTES.md`, v4-v7): ramp and tail, paid twice, and GEMM2 could not start its
loads before GEMM1 had finished every column. Here GEMM1's and GEMM2's weight loads of different programs overlap.

Weights: 16-bit or fp32, and INT8 weight-only with per-channel scales (converted in registers; fc1's scales on the reduced
gate/up rows, fc2's in the reduction, both where the two-kernel path applies them). Group-wise INT8 and W8A8 keep the
two-kernel path (W8A8 quantises the whole intermediate row before GEMM2). Which calls take this kernel: `decode.py`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_power_of_2
from ._launch import PlannedLaunch
from .activations import apply_activation, load_activation_params
from .decode import _rows_dot
from .grouped_gemm import gate_rows, gemm_launches_early, int8_exact_to_float32


@triton.jit
def _fused_decode_kernel(
    x_ptr,  # input [T, H], unit stride along H
    w1_ptr,  # fc1 [E, N1, H], unit stride along H
    w2_ptr,  # fc2 [E, H, I], unit stride along I
    partial_ptr,  # float32 [T*top_k, num_slices, H], contiguous
    bias1_ptr,  # [E, N1] or unused
    act_params_ptr,  # float32 [E, 3] or unused
    ids_ptr,  # token_selected_experts [T, top_k]
    w1_scale_ptr,  # int8 fc1: [E, N1] per channel, or unused
    num_tokens,
    H,
    I,
    num_experts,
    start_expert,
    stride_xm,
    stride_w1e,
    stride_w1n,
    stride_w2e,
    stride_w2n,
    stride_ids,
    stride_b1e,
    stride_ws1e,
    w_gate_row0,
    w_up_row0,
    w_row_step,
    GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ACT_PARAMS: tl.constexpr,
    W_INT8: tl.constexpr,
    EVEN_H: tl.constexpr,  # H % BLOCK_K == 0 and H % BLOCK_H == 0
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    K_UNROLL: tl.constexpr,  # GEMM1 K steps a loop iteration; GEMM2's loop is unrolled by H_UNROLL
    H_UNROLL: tl.constexpr,
    USE_PDL: tl.constexpr,  # SM90+: the reduction launches early and waits for this kernel
):
    pair = tl.program_id(0)
    slice_id = tl.program_id(1)
    num_slices = tl.num_programs(1)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    token = pair % num_tokens
    expert = tl.load(ids_ptr + token.to(tl.int64) * stride_ids + pair // num_tokens).to(tl.int64) - start_expert
    if (expert >= 0) & (expert < num_experts):  # a dropped pair writes nothing: the reduction skips it
        cols = slice_id * BLOCK_I + tl.arange(0, BLOCK_I)
        col_mask = cols < I
        cols_safe = tl.where(col_mask, cols, 0)
        # GEMM1 for the slice's gate and up rows, as the two-kernel path's GEMM1 computes them.
        gate_rows_ = (w_gate_row0 + cols_safe * w_row_step).to(tl.int64)
        up_rows_ = (w_up_row0 + cols_safe * w_row_step).to(tl.int64)
        x_rows = x_ptr + token.to(tl.int64) * stride_xm + tl.zeros([BLOCK_I], dtype=tl.int32)
        w1_expert = w1_ptr + expert * stride_w1e
        ws1_expert = w1_scale_ptr + expert * stride_ws1e
        gate, up = _rows_dot(x_rows, w1_expert + gate_rows_ * stride_w1n, w1_expert + up_rows_ * stride_w1n,
                             ws1_expert + gate_rows_, ws1_expert + up_rows_, x_rows, col_mask, H, 0, False, GATED,
                             1 if W_INT8 else 0, 1, False, EVEN_H, BLOCK_K, K_UNROLL)
        if HAS_BIAS:
            gate += tl.load(bias1_ptr + expert * stride_b1e + gate_rows_).to(tl.float32)
            if GATED:
                up += tl.load(bias1_ptr + expert * stride_b1e + up_rows_).to(tl.float32)
        p0, p1, p2 = load_activation_params(act_params_ptr, expert, HAS_ACT_PARAMS)
        h = apply_activation(gate, up, p0, p1, p2, ACTIVATION)
        # Rounded as the two-kernel path stores its intermediate; columns past I (clamped loads above) contribute 0.
        h = tl.where(col_mask, h.to(x_ptr.dtype.element_ty).to(tl.float32), 0.0)
        # GEMM2's partial sums over the slice for every output column: fc2[e, n, slice] . h[slice].
        w2_tile = w2_ptr + expert * stride_w2e + cols_safe[None, :]
        out_row = partial_ptr + (pair.to(tl.int64) * num_slices + slice_id) * H
        for n0 in tl.range(0, H, BLOCK_H, loop_unroll_factor=H_UNROLL):
            ns = n0 + tl.arange(0, BLOCK_H)
            if EVEN_H:
                w = tl.load(w2_tile + ns[:, None].to(tl.int64) * stride_w2n)
            else:
                w = tl.load(w2_tile + ns[:, None].to(tl.int64) * stride_w2n, mask=ns[:, None] < H, other=0)
            y = tl.sum(int8_exact_to_float32(w) * h[None, :], axis=1)
            if EVEN_H:
                tl.store(out_row + ns, y)
            else:
                tl.store(out_row + ns, y, mask=ns < H)


@triton.jit
def _fused_decode_reduce_kernel(
    partial_ptr,  # float32 [T*top_k, num_slices, H]
    out_ptr,  # [T, H]
    bias2_ptr,  # [E, H] or unused
    ids_ptr,  # [T, top_k]
    router_scales_ptr,  # [T, top_k] or unused
    w2_scale_ptr,  # int8 fc2: [E, H] per channel, or unused
    num_tokens,
    H,
    num_slices,
    num_experts,
    start_expert,
    stride_om,
    stride_ids,
    stride_rs,
    stride_b2e,
    stride_ws2e,
    TOP_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ROUTER_SCALES: tl.constexpr,
    W_INT8: tl.constexpr,
    SLICE_CHUNK: tl.constexpr,  # slices summed a step (a power of two)
    NUM_CHUNKS: tl.constexpr,  # cdiv(num_slices, SLICE_CHUNK)
    BLOCK_H: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    token = tl.program_id(0).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    n_mask = ns < H
    chunk = tl.arange(0, SLICE_CHUNK)
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    # Fully unrolled with masks rather than branches, so that every load of the program can be in flight at once (the
    # partials are in L2; a loop of dependent round trips was the cost).
    for k in tl.static_range(TOP_K):  # pairs in k order, slices in index order: one fixed order
        expert = tl.load(ids_ptr + token * stride_ids + k).to(tl.int64) - start_expert
        kept = (expert >= 0) & (expert < num_experts)
        expert = tl.where(kept, expert, 0)
        rows = partial_ptr + ((token + k * num_tokens) * num_slices) * H + ns[None, :]
        acc = tl.zeros([SLICE_CHUNK, BLOCK_H], dtype=tl.float32)
        for c in tl.static_range(NUM_CHUNKS):
            slices = c * SLICE_CHUNK + chunk
            acc += tl.load(rows + slices[:, None].to(tl.int64) * H,
                           mask=kept & (slices[:, None] < num_slices) & n_mask[None, :], other=0.0)
        y = tl.sum(acc, axis=0)
        if W_INT8:
            y *= tl.load(w2_scale_ptr + expert * stride_ws2e + ns, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(bias2_ptr + expert * stride_b2e + ns, mask=n_mask & kept, other=0.0).to(tl.float32)
        if HAS_ROUTER_SCALES:
            y *= tl.load(router_scales_ptr + token * stride_rs + k, mask=kept, other=0.0).to(tl.float32)
        total += y.to(out_ptr.dtype.element_ty).to(tl.float32)  # each pair's row rounded once, as GEMM2's rows are
    tl.store(out_ptr + token * stride_om + ns, total.to(out_ptr.dtype.element_ty), mask=n_mask)


class FusedDecodeTile:
    """BLOCK_I intermediate columns a program, BLOCK_K deep GEMM1 steps, BLOCK_H output columns a GEMM2 step, warps; the
    reduction's BLOCK_H and warps."""

    def __init__(self, block_i: int = 32, block_k: int = 128, block_h: int = 64, num_warps: int = 8,
                 reduce_block_h: int = 32, reduce_warps: int = 4, k_unroll: int = 1, h_unroll: int = 1):
        self.block_i, self.block_k, self.block_h, self.num_warps = block_i, block_k, block_h, num_warps
        self.reduce_block_h, self.reduce_warps = reduce_block_h, reduce_warps
        self.k_unroll, self.h_unroll = k_unroll, h_unroll

    def key(self):
        return (self.block_i, self.block_k, self.block_h, self.num_warps, self.reduce_block_h, self.reduce_warps,
                self.k_unroll, self.h_unroll)

    def __eq__(self, other):
        return isinstance(other, FusedDecodeTile) and self.key() == other.key()

    def __hash__(self):
        return hash(self.key())

    def __str__(self):
        return (f"i{self.block_i} k{self.block_k}u{self.k_unroll} h{self.block_h}u{self.h_unroll} w{self.num_warps} | "
                f"reduce h{self.reduce_block_h} w{self.reduce_warps}")


def fused_decode_tile(inter: int, hidden: int, w_elem: int) -> FusedDecodeTile:
    """The fused kernel's tile (not yet swept: 32 intermediate columns a program, 16 KiB of fc1 a K step)."""
    return FusedDecodeTile(32, 128 if w_elem >= 2 else 256, 64, 8)


class FusedDecodePlan:
    """The one-kernel decode path for one call signature (the counterpart of `decode.DecodePlan`, same call)."""

    def __init__(self, input, token_selected_experts, token_final_scales, fc1, fc2, activation, gate_layout, fc1_bias,
                 fc2_bias, act_params, output, quant, start_expert: int = 0, tile: FusedDecodeTile | None = None):
        num_tokens, hidden = input.shape
        top_k = token_selected_experts.shape[1]
        num_experts, _, inter = fc2.shape
        tile = tile or fused_decode_tile(inter, hidden, fc1.element_size())
        self.pairs, self.slices, self.hidden = num_tokens * top_k, cdiv(inter, tile.block_i), hidden
        w_int8 = quant is not None
        gated = activation.gated
        gate_row0, up_row0, row_step = gate_rows(gate_layout, inter) if gated else (0, 0, 1)
        pdl = gemm_launches_early(input.device, self.pairs, num_experts, fc2)
        even = hidden % tile.block_k == 0 and hidden % tile.block_h == 0
        fc1_scales = quant.fc1_scales if w_int8 else None
        self.gemms = PlannedLaunch(
            _fused_decode_kernel,
            (self.pairs, self.slices),
            (num_tokens, hidden, inter, num_experts, start_expert, input.stride(0), fc1.stride(0), fc1.stride(1),
             fc2.stride(0), fc2.stride(1), token_selected_experts.stride(0),
             fc1_bias.stride(0) if fc1_bias is not None else 0, fc1_scales.stride(0) if w_int8 else 0,
             gate_row0, up_row0, row_step),
            num_warps=tile.num_warps,
            num_stages=1,
            GATED=gated,
            ACTIVATION=int(activation.kind),
            HAS_BIAS=fc1_bias is not None,
            HAS_ACT_PARAMS=act_params is not None,
            W_INT8=w_int8,
            EVEN_H=even,
            BLOCK_I=tile.block_i,
            BLOCK_K=tile.block_k,
            BLOCK_H=tile.block_h,
            K_UNROLL=tile.k_unroll,
            H_UNROLL=tile.h_unroll,
            USE_PDL=pdl,
        )
        self.reduce = PlannedLaunch(
            _fused_decode_reduce_kernel,
            (num_tokens, cdiv(hidden, tile.reduce_block_h)),
            (num_tokens, hidden, self.slices, num_experts, start_expert, output.stride(0), token_selected_experts.stride(0),
             token_final_scales.stride(0) if token_final_scales is not None else 0,
             fc2_bias.stride(0) if fc2_bias is not None else 0, quant.fc2_scales.stride(0) if w_int8 else 0),
            num_warps=tile.reduce_warps,
            num_stages=1,
            launch_pdl=pdl,
            TOP_K=top_k,
            HAS_BIAS=fc2_bias is not None,
            HAS_ROUTER_SCALES=token_final_scales is not None,
            W_INT8=w_int8,
            SLICE_CHUNK=min(64, next_power_of_2(self.slices)),
            NUM_CHUNKS=cdiv(self.slices, min(64, next_power_of_2(self.slices))),
            BLOCK_H=tile.reduce_block_h,
            USE_PDL=pdl,
        )

    def __call__(self, input, token_selected_experts, token_final_scales, fc1, fc2, fc1_bias, fc2_bias, act_params, output,
                 quant):
        partial = torch.empty(self.pairs, self.slices, self.hidden, dtype=torch.float32, device=input.device)
        unused = token_selected_experts  # any tensor, for pointers a variant never reads
        fc1_scales, fc2_scales = (unused, unused) if quant is None else (quant.fc1_scales, quant.fc2_scales)
        self.gemms(input, fc1, fc2, partial, unused if fc1_bias is None else fc1_bias,
                   unused if act_params is None else act_params, token_selected_experts, fc1_scales)
        self.reduce(partial, output, unused if fc2_bias is None else fc2_bias, token_selected_experts,
                    unused if token_final_scales is None else token_final_scales, fc2_scales)
        return output
