"""The decode path: the whole layer in two kernel launches for a few tokens, with no routing maps and no finalize launch.

With T*top_k (token, k) pairs and T small, grouping the pairs by expert buys little: the pairs rarely share an expert (when
they do, its weights are read once per pair here). So each pair is a row of its own, and its expert is read straight from
`token_selected_experts`:

GEMM1 (`GEMM1=True`), program (pair, column block), pair = t + k*T (the expanded source row):
    intermediate[pair, n] = act(x[t] @ fc1[e, gate rows].T + b1, x[t] @ fc1[e, up rows].T + b1),  e = ids[t, k] - start_expert
GEMM2 (`GEMM1=False`), program (token t, column block of H), one weight row per (k, column) of the block:
    out[t, n] = sum over k of round(scale[t, k] * (intermediate[t + k*T] @ fc2[e_k, n].T + b2[e_k, n]))
    Each pair's row is rounded to the activation dtype once (as the grouped path's GEMM2 rows are), then the top_k rows are
    summed in fp32 in one fixed order inside the program: deterministic, with no finalize pass, no `[T*top_k, H]` buffer and
    no atomics.
Pairs whose expert lies outside [start_expert, start_expert + E) are dropped: no GEMM work, nothing added.

The products are matrix-vector ones: each weight row meets one activation row, fp32 multiply-adds on the CUDA cores over
[rows, BLOCK_K] weight tiles (GEMM1: BLOCK_N rows; GEMM2: SLOTS x BLOCK_N), reduced once after the K loop. At decode the
time is the weight bytes; the tensor cores would idle on a 1-row tile. Those bytes are read once a call, so where they fit
`streams_weights_evict_first`'s bound they are loaded evict-first: they recycle their own L2 lines instead of evicting
(and writing back) what the previous kernels left there.
The kernel also takes INT8 weight-only (W8A16) weights, converted in registers: per-channel scales on the reduced row,
group-wise scales on the tile before the multiply-add, and W8A8: int8 activation rows (quantised per row by a pass before
each GEMM) times int8 weights, summed in fp32 (exact integers below 2^24) and scaled by a_scale[row] * w_scale[col] after the
sum. Which calls take this path is `uses_decode_path`'s measured rule.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_power_of_2
from ._launch import PlannedLaunch
from ._variants import KernelVariant, register_variants
from .activations import ActivationType, apply_activation, load_activation_params
from .grouped_gemm import (MODEL_SHAPES, active_weight_bytes, gate_rows, gemm_launches_early, int8_exact_to_float32,
                           sm_count)


@triton.jit
def _decode_kernel(
    a_ptr,  # GEMM1: input [T, K]; GEMM2: intermediate [T*top_k, K] (pair order); unit stride along K
    w_ptr,  # [E, N_total, K], unit stride along K
    out_ptr,  # GEMM1: intermediate [T*top_k, N]; GEMM2: output [T, N]
    bias_ptr,  # [E, N_total] or unused
    act_params_ptr,  # float32 [E, 3] or unused
    ids_ptr,  # token_selected_experts [T, top_k], int32 or int64
    router_scales_ptr,  # [T, top_k] any float dtype, or unused
    w_scale_ptr,  # int8 weights: [E, N_total] (per channel) or [E, N_total, K/GROUP_SIZE] (group-wise), or unused
    a_scale_ptr,  # A_INT8: float32 per row of a_ptr, or unused
    num_tokens,
    N,
    K,
    num_experts,
    start_expert,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    stride_ids,
    stride_rs,
    stride_bias_e,
    stride_wse,
    stride_wsn,
    stride_wsg,
    w_gate_row0,
    w_up_row0,
    w_row_step,
    TOP_K: tl.constexpr,
    SLOTS: tl.constexpr,  # GEMM2: TOP_K rounded up to a power of two (the program's row groups); GEMM1: 1
    GEMM1: tl.constexpr,
    GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ACT_PARAMS: tl.constexpr,
    HAS_ROUTER_SCALES: tl.constexpr,
    W_QUANT: tl.constexpr,  # 0 none, 1 int8 per channel, 2 int8 group-wise
    GROUP_SIZE: tl.constexpr,
    A_INT8: tl.constexpr,  # W8A8: a_ptr holds int8 rows quantised per row (scale at a_scale_ptr), weights per channel
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_UNROLL: tl.constexpr,  # K steps unrolled into one loop iteration (the next step's loads issue before this one's math)
    K_STAGES: tl.constexpr,  # > 1: the K loop's loads go through a ring of this many shared-memory stages (cp.async)
    K_FOLD: tl.constexpr,  # products summed this many at a time into the accumulator each K step (see _rows_dot)
    EVICT_WEIGHTS: tl.constexpr,  # weight loads marked evict-first in L1 and L2 (see streams_weights_evict_first)
    USE_PDL: tl.constexpr,  # SM90+: both GEMMs are programmatic launches (see DecodePlan); each lets the next one launch early
):
    pid_n = tl.program_id(1)
    if USE_PDL:
        if GEMM1:  # waits for the previous kernel (a model's router) before reading anything; GEMM2 waits further down
            tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # after GEMM1's wait: GEMM2 reads the layer's inputs before its own
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    cols_safe = tl.where(col_mask, cols, 0)
    if GEMM1:
        pair = tl.program_id(0)
        token = pair % num_tokens
        expert = tl.load(ids_ptr + token.to(tl.int64) * stride_ids + pair // num_tokens).to(tl.int64) - start_expert
        if (expert >= 0) & (expert < num_experts):
            gate_rows = (w_gate_row0 + cols_safe * w_row_step).to(tl.int64)
            up_rows = (w_up_row0 + cols_safe * w_row_step).to(tl.int64)
            a_rows = a_ptr + token.to(tl.int64) * stride_am + tl.zeros([BLOCK_N], dtype=tl.int32)
            w_expert = w_ptr + expert * stride_we
            ws_expert = w_scale_ptr + expert * stride_wse
            gate_ws, up_ws = ws_expert + gate_rows * stride_wsn, ws_expert + up_rows * stride_wsn
            # Per-channel scales loaded before the K loop, not after it, so their latency hides under the loop's (columns
            # past N point at column 0: valid addresses).
            gate_cs = tl.load(gate_ws) if W_QUANT == 1 else 0.0
            up_cs = tl.load(up_ws) if W_QUANT == 1 and GATED else 0.0
            gate, up = _rows_dot(a_rows, w_expert + gate_rows * stride_wn, w_expert + up_rows * stride_wn, gate_ws, up_ws,
                                 gate_cs, up_cs, a_scale_ptr + token + tl.zeros([BLOCK_N], dtype=tl.int32), col_mask, K,
                                 stride_wsg, False, GATED, W_QUANT, GROUP_SIZE, A_INT8, EVEN_K, BLOCK_K, K_UNROLL, K_STAGES,
                                 K_FOLD, EVICT_WEIGHTS, 0, False)
            if HAS_BIAS:
                gate += tl.load(bias_ptr + expert * stride_bias_e + gate_rows).to(tl.float32)
                if GATED:
                    up += tl.load(bias_ptr + expert * stride_bias_e + up_rows).to(tl.float32)
            p0, p1, p2 = load_activation_params(act_params_ptr, expert, HAS_ACT_PARAMS)
            h = apply_activation(gate, up, p0, p1, p2, ACTIVATION)
            tl.store(out_ptr + pair.to(tl.int64) * stride_om + cols, h.to(out_ptr.dtype.element_ty), mask=col_mask)
        else:  # a dropped pair's row is zeros, so a pass over all rows (W8A8's row quantiser) reads defined values
            tl.store(out_ptr + pair.to(tl.int64) * stride_om + cols, tl.zeros([BLOCK_N], dtype=out_ptr.dtype.element_ty),
                     mask=col_mask)
    else:
        # Rows (k, n), k-major: the program's BLOCK_N columns for each of the token's top_k pairs, one weight row each.
        token = tl.program_id(0).to(tl.int64)
        rows = tl.arange(0, SLOTS * BLOCK_N)
        k = rows // BLOCK_N
        col_of_row = pid_n * BLOCK_N + rows % BLOCK_N
        cols_k = tl.where(col_of_row < N, col_of_row, 0).to(tl.int64)
        # Everything but the intermediate is the layer's input, complete before this grid launches: GEMM1 lets it launch
        # only once every GEMM1 program has passed its own wait for the kernel before the layer (gdc_launch_dependents
        # comes after gdc_wait above). So the ids, the first K step's weight tile and the per-channel scales are read
        # before waiting for GEMM1, in flight during that wait instead of after it. Rows off `kept` (dropped pairs,
        # padding slots) load nothing: their weights, activations, bias and router scale are masked to 0.
        expert = tl.load(ids_ptr + token * stride_ids + k, mask=k < TOP_K, other=0).to(tl.int64) - start_expert
        kept = (k < TOP_K) & (expert >= 0) & (expert < num_experts)
        expert = tl.where(kept, expert, 0)
        pair = tl.where(kept, token + k * num_tokens, 0)
        weight_rows = w_ptr + expert * stride_we + cols_k * stride_wn
        scale_rows = w_scale_ptr + expert * stride_wse + cols_k * stride_wsn
        first_weights = _load_tile(weight_rows[:, None], tl.arange(0, BLOCK_K)[None, :], K, kept[:, None], True, EVEN_K,
                                   "evict_first" if EVICT_WEIGHTS else "")
        channel_scales = tl.load(scale_rows) if W_QUANT == 1 else 0.0  # valid for every row (off rows: expert 0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()  # GEMM1's intermediate is read from here on
        y, _ = _rows_dot(a_ptr + pair * stride_am, weight_rows, weight_rows, scale_rows, scale_rows, channel_scales,
                         channel_scales, a_scale_ptr + pair, kept, K, stride_wsg, True, False, W_QUANT, GROUP_SIZE, A_INT8,
                         EVEN_K, BLOCK_K, K_UNROLL, K_STAGES, K_FOLD, EVICT_WEIGHTS, first_weights, True)
        # The bias and router scale stay after the loop: loaded before the wait too, they took the group-wise Mixtral tile
        # from 32 to 40 registers (8 -> 6 programs an SM: 155.1 -> 168.6 us) and gained nothing elsewhere (bf16 even).
        if HAS_BIAS:
            y += tl.load(bias_ptr + expert * stride_bias_e + cols_k, mask=kept, other=0.0).to(tl.float32)
        if HAS_ROUTER_SCALES:
            y *= tl.load(router_scales_ptr + token * stride_rs + k, mask=kept, other=0.0).to(tl.float32)
        # Each pair's row is rounded to the activation dtype once, as the grouped path's GEMM2 rows are; the top_k rows are
        # then summed in fp32 in one fixed (tree) order: deterministic, and no finalize pass.
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
        total = tl.sum(tl.reshape(y, [SLOTS, BLOCK_N]), axis=0)
        tl.store(out_ptr + token * stride_om + cols, total.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _weight_tile(w_rows, ws_rows, ks, k0, K, row_mask, stride_wsg, MASK_ROWS: tl.constexpr, W_QUANT: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr, EVICT_WEIGHTS: tl.constexpr):
    """fp32 `[ROWS, BLOCK_K]` weight tile at K offsets `ks` (dequantised when int8 group-wise); (MASK_ROWS) rows off
    `row_mask` read 0; (EVICT_WEIGHTS) loaded with the evict-first policy."""
    loaded = _load_tile(w_rows, ks, K, row_mask, MASK_ROWS, EVEN_K, "evict_first" if EVICT_WEIGHTS else "")
    return _weights_to_float32(loaded, ws_rows, k0, K, stride_wsg, W_QUANT, GROUP_SIZE, BLOCK_K)


@triton.jit
def _weights_to_float32(loaded, ws_rows, k0, K, stride_wsg, W_QUANT: tl.constexpr, GROUP_SIZE: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """A loaded `[ROWS, BLOCK_K]` weight tile (K offsets from `k0`) as fp32, times its group scales when int8 group-wise."""
    w = int8_exact_to_float32(loaded)
    if W_QUANT == 2:
        if BLOCK_K <= GROUP_SIZE:  # the tile lies in one group (both are powers of two and tiles start at multiples)
            w *= tl.load(ws_rows + (k0 // GROUP_SIZE) * stride_wsg).to(tl.float32)
        else:  # BLOCK_K // GROUP_SIZE whole groups
            ROWS: tl.constexpr = w.shape[0]
            groups = k0 // GROUP_SIZE + tl.arange(0, BLOCK_K // GROUP_SIZE)
            scales = tl.load(ws_rows + groups[None, :] * stride_wsg, mask=(groups * GROUP_SIZE < K)[None, :],
                             other=0.0).to(tl.float32)
            w = tl.reshape(tl.reshape(w, [ROWS, BLOCK_K // GROUP_SIZE, GROUP_SIZE]) * scales[:, :, None], [ROWS, BLOCK_K])
    return w


@triton.jit
def _load_tile(rows, ks, K, row_mask, MASK_ROWS: tl.constexpr, EVEN_K: tl.constexpr, EVICTION: tl.constexpr):
    """`rows + ks` (`[ROWS, 1]` pointers, `[1, BLOCK_K]` offsets), 0 past K when not EVEN_K and (MASK_ROWS) off `row_mask`
    `[ROWS, 1]`; EVICTION: the loads' cache eviction policy ("" or "evict_first")."""
    if MASK_ROWS:
        if EVEN_K:
            return tl.load(rows + ks, mask=row_mask, other=0, eviction_policy=EVICTION)
        return tl.load(rows + ks, mask=row_mask & (ks < K), other=0, eviction_policy=EVICTION)
    if EVEN_K:
        return tl.load(rows + ks, eviction_policy=EVICTION)
    return tl.load(rows + ks, mask=ks < K, other=0, eviction_policy=EVICTION)


@triton.jit
def _fold(products, K_FOLD: tl.constexpr):
    """`[ROWS, BLOCK_K]` products summed over each K_FOLD consecutive columns: `[ROWS, BLOCK_K / K_FOLD]`."""
    if K_FOLD == 1:
        return products
    return tl.sum(tl.reshape(products, [products.shape[0], products.shape[1] // K_FOLD, K_FOLD]), axis=2)


@triton.jit
def _rows_dot(a_rows, gate_w, up_w, gate_ws, up_ws, gate_cs, up_cs, a_scales, row_mask, K, stride_wsg,
              MASK_ROWS: tl.constexpr, GATED: tl.constexpr, W_QUANT: tl.constexpr, GROUP_SIZE: tl.constexpr,
              A_INT8: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr, K_UNROLL: tl.constexpr,
              K_STAGES: tl.constexpr, K_FOLD: tl.constexpr, EVICT_WEIGHTS: tl.constexpr, first_weights,
              FIRST_LOADED: tl.constexpr):
    """fp32 `[ROWS]` x2: row i of the activations (at `a_rows[i]`) times weight row `gate_w[i]` and (GATED) `up_w[i]`, each
    dequantised when int8: group-wise with the scales at `gate_ws[i]` / `up_ws[i]`, per channel with the scales `gate_cs[i]` /
    `up_cs[i]` the caller loaded (early: see _decode_kernel); without GATED the second result is the first. With
    MASK_ROWS, rows off `row_mask` load nothing and give 0. A_INT8: the activations are int8, times their row's scale at
    `a_scales[i]` after the sum (an fp32 sum of int8 products: exact while it stays under 2^24, within 2^-24 of it beyond).

    Both tiles of a K step are loaded in one loop, and the activations' K slice is loaded once per weight row, as a
    `[ROWS, BLOCK_K]` tile in the weight tile's layout (GEMM1's rows all point at one token row: the repeats hit L1): loaded as
    a vector it went through shared memory behind a barrier, which kept each step's weight loads waiting for the row's load
    (two round trips a step). With K_STAGES > 1 Triton software-pipelines the loop: each step's tiles are copied (cp.async)
    into a ring of K_STAGES shared-memory buffers, K_STAGES - 1 steps ahead of the multiply-adds, instead of one step in
    flight in registers. With K_FOLD > 1 each step's products are summed K_FOLD neighbouring columns at a time (adds inside a
    thread, which holds that many neighbours of a vector load) into a `[ROWS, BLOCK_K / K_FOLD]` accumulator instead of a
    full-tile one: a deeper step in the registers of a shallower one (another fixed summation order). FIRST_LOADED (not
    GATED): the first K step's weight tile is `first_weights`, loaded by the caller (the same bits and order as here)."""
    offs_k = tl.arange(0, BLOCK_K)[None, :]
    mask = row_mask[:, None]
    a_tile_rows = a_rows[:, None]
    ROWS: tl.constexpr = a_rows.shape[0]
    gate_acc = tl.zeros([ROWS, BLOCK_K // K_FOLD], dtype=tl.float32)
    up_acc = tl.zeros([ROWS, BLOCK_K // K_FOLD], dtype=tl.float32)
    k_first = 0
    if FIRST_LOADED:
        tl.static_assert(not GATED, "FIRST_LOADED: one weight tile a step (GEMM2)")
        a = int8_exact_to_float32(_load_tile(a_tile_rows, offs_k, K, mask, MASK_ROWS, EVEN_K, ""))
        gate_acc += _fold(_weights_to_float32(first_weights, gate_ws[:, None], 0, K, stride_wsg, W_QUANT, GROUP_SIZE,
                                              BLOCK_K) * a, K_FOLD)
        k_first = BLOCK_K
    for k0 in tl.range(k_first, K, BLOCK_K, loop_unroll_factor=K_UNROLL, num_stages=K_STAGES if K_STAGES > 1 else None):
        ks = k0 + offs_k
        a = int8_exact_to_float32(_load_tile(a_tile_rows, ks, K, mask, MASK_ROWS, EVEN_K, ""))
        gate_acc += _fold(_weight_tile(gate_w[:, None], gate_ws[:, None], ks, k0, K, mask, stride_wsg, MASK_ROWS, W_QUANT,
                                       GROUP_SIZE, EVEN_K, BLOCK_K, EVICT_WEIGHTS) * a, K_FOLD)
        if GATED:
            up_acc += _fold(_weight_tile(up_w[:, None], up_ws[:, None], ks, k0, K, mask, stride_wsg, MASK_ROWS, W_QUANT,
                                         GROUP_SIZE, EVEN_K, BLOCK_K, EVICT_WEIGHTS) * a, K_FOLD)
    gate = tl.sum(gate_acc, axis=1)
    up = tl.sum(up_acc, axis=1) if GATED else gate
    if W_QUANT == 1:
        gate *= gate_cs.to(tl.float32)
        if GATED:
            up *= up_cs.to(tl.float32)
    if A_INT8:  # valid addresses for every row (off rows point at pair 0)
        a_scale = tl.load(a_scales)
        gate *= a_scale
        if GATED:
            up *= a_scale
    return gate, up


# ---------------------------------------------------------------------------------------------------------------------------------
# When and with which tiles

# At most this many tokens take the decode path (tokens that share an expert read its weights once each here, once in all on
# the grouped path). Whole layer in a CUDA graph, decode path vs grouped path:
# - H100, the previous GEMM2 (a program per pair; decode_tiles_h100.json, decode_tiles_bf16_h100.json): T=1 won on all four
#   shapes (Qwen3-30B 44.2 vs 47.2 us, DeepSeek-V2-Lite 55.9 vs 58.4, OLMoE 52.8 vs 56.5, Mixtral 248.5 vs 259.5), T=2 lost on
#   three of four.
# - H200, today's GEMM2 (a program per token summing its top_k rows; decode_tiles_gemm1_bf16_h200.json): bf16 T=2 wins on all
#   four (Qwen3-30B 49.4 vs 57.1, DeepSeek-V2-Lite 65.9 vs 73.4, OLMoE 64.7 vs 72.7, Mixtral 335.2 vs 344.7), T=4 on the three
#   with 64+ experts but not Mixtral (483.5 vs 450.6); W8A16 T=2 is mixed (Qwen3-30B 40.3 vs 43.8, DeepSeek-V2-Lite 55.1 vs
#   54.3, Mixtral 217.6 vs 167.9), so W8A16 keeps T=1.
# Eagerly, two launches instead of four (no routing, no finalize) also halve the host's launch work. Tried and dropped:
# GEMM2's early-launched (PDL) programs prefetching their weight rows into L2 before waiting for GEMM1 (Qwen3-30B 48.9 vs
# 46.5 us, DeepSeek-V2-Lite 58.9 vs 56.2, OLMoE 56.6 vs 54.4; decode_latency_h100_v5b.json).
DECODE_MAX_TOKENS = 2  # unquantised weights
DECODE_MAX_TOKENS_W8A16 = 1  # INT8 weight-only, per-channel scales
# W8A16 with group-wise scales, by group size. 128-wide groups at T=1, H200, CUDA graph (decode_tiles_w8a16_h200_v9.json): decode
# path vs grouped path Qwen3-30B 26.7 vs 35.6 us, DeepSeek-V2-Lite 37.4 vs 40.6, OLMoE 34.4 vs 37.1, Mixtral 143.7 vs 216.0.
# 32- and 64-wide groups (several groups a 256-deep decode K tile) were not measured: they keep the grouped path.
DECODE_MAX_TOKENS_W8A16_GROUPWISE = {128: 1}
# W8A8 (per-channel weights, activations quantised per row in a pass before each GEMM): four launches at T=1 (two row
# quantisers, two decode GEMMs) against six on the grouped path (routing, quantiser, two GEMMs, quantiser, finalize). H200, CUDA
# graph, decode vs grouped path (ab_revision_w8a8_decode_h200.json, bitwise equal): T=1 Qwen3-30B 29.8 vs 33.4 us,
# DeepSeek-V2-Lite 37.6 vs 38.0, OLMoE 33.9 vs 36.2, Mixtral 133.6 vs 132.6 (even); T=2 loses on all four (Mixtral 240.6 vs 179.5).
DECODE_MAX_TOKENS_W8A8 = 1


@dataclass(frozen=True)
class DecodeTile:
    block_n: int
    block_k: int
    num_warps: int
    unroll: int = 1
    stages: int = 1  # K steps in flight through shared memory (cp.async ring); 1: loads straight into registers
    fold: int = 1  # products summed this many at a time into the accumulator (BLOCK_K / fold partial sums a row)
    max_registers: int | None = None  # per thread (ptxas's cap), None: the compiler's choice

    def __str__(self) -> str:
        return (f"{self.block_n}x{self.block_k} w{self.num_warps}" + (f" u{self.unroll}" if self.unroll > 1 else "")
                + (f" s{self.stages}" if self.stages > 1 else "") + (f" f{self.fold}" if self.fold > 1 else "")
                + (f" r{self.max_registers}" if self.max_registers else ""))


@functools.lru_cache(maxsize=1024)
def decode_tile(gemm1: bool, n: int, k: int, w_elem: int, slots: int = 1, pairs: int = 0,
                num_sms: int = 0, group_size: int = 0, a_int8: bool = False) -> DecodeTile:
    """Columns a program, K tile, warps, unroll for `pairs` (T*top_k) on a GPU of `num_sms` SMs. A GEMM2 program reads
    `slots` (top_k rounded up to a power of two) weight rows per column, so its tile is sized in rows: columns = rows / slots.
    GEMM1, the T=1 sweep of decode_tiles_bf16_h100.json / decode_tiles_w8a16_h100.json (whole layer in a CUDA graph, four
    model shapes; score = mean over the shapes of time / that shape's best time):
    - 16-bit weights: 8 x 256, 8 warps (1.006; the old 16 x 256 1.02); the top ten tiles lie within 2% of each other.
    - INT8 (W8A16): 8 x 256, 8 warps (1.004).
    - H200 (decode_tiles_gemm1_{bf16,w8a16}_h200.json): the rule is the best W8A16 tile on all four shapes and within 2% of
      the best bf16 one on each.
    - 16-bit, a grid of one to 4/3 waves (`pairs` x N/8 programs against the 256-deep tile's 6 resident 8-warp programs an
      SM at <= 40 registers: DeepSeek-V2-Lite's 1056 and OLMoE's 1024 on 132 SMs): 512 deep instead (72 registers on sm_90,
      so 3 resident an SM, each with twice the bytes of a K step in flight), which streams the ragged grid better.
      H100 sweep (decode_tiles_bf16_h100_v13.json): 8 x 512 the fastest GEMM1 tile for both (53.2 vs 54.3 us, 51.0 vs 52.1);
      H200 (decode_tiles_gemm1_bf16_h200.json) 43.3 vs 43.7, 40.7 vs 41.2; but slower for Qwen3-30B's single wave on the
      H200 (35.7 vs 33.2) and Mixtral's 4.5 waves (183.0 vs 180.0), so only there.
    - INT8 with per-channel scales: 8 x 512 with products folded 8 at a time (`DecodeTile.fold`, as GEMM2's below), after
      the evict-first loads. H100 fold sweep (decode_folds_w8a16_h100_v18.json, 3 rounds): the fastest GEMM1 tile on
      Qwen3-30B (23.8 vs 24.3 us) and DeepSeek-V2-Lite (30.4 vs 30.7), within 0.1 us on OLMoE. Whole layer against the
      8 x 256 tile, T=1, in a graph (ab_decode_gemm1_fold_{w8a16,w8a8}_h100.json 3 rounds, ab_decode_int8_folds_*_h100.json
      5 rounds): W8A16 Qwen3-30B 23.7 -> 23.4 us, OLMoE 28.6 -> 28.4, Mixtral 143.9 -> 141.1, DeepSeek-V2-Lite 30.3 ->
      30.4 (+0.4 to +0.7%); W8A8 -0.9 to -2.1% but DeepSeek even; the H200 (ab_decode_gemm1_fold_w8a16_h200.json) the
      same pattern. Group-wise scales (a scale every 32-128 of K) keep 256 deep, unfolded (not measured folded).
    GEMM2 (one program per token and column block, summing its top_k rows itself): 8 rows a program (one column for top_k
    of 5-8, four for Mixtral's 2), K tiles of 256, 8 warps, for 16-bit and INT8 weights alike (H200 sweeps
    decode_tiles_{bf16,w8a16}_h200.json: scores 1.012 and 1.007, the best of each; 16 rows x 128 scores 1.016 in bf16
    but Mixtral 191 vs 180 us; 32 rows 1.08-1.11, 64 rows 1.07-1.09). Small programs win: many in flight, short tails.
    16-bit weights with top_k of 5-8 (one column, eight rows): 128 deep and 4 warps, the fastest or within 0.2 us of it on
    all three such shapes on the H100 (decode_tiles_bf16_h100_v13.json: Qwen3-30B 41.6 vs 41.9 us, DeepSeek-V2-Lite 52.5 vs
    53.2, OLMoE 50.9 vs 51.0) and on the H200 (decode_tiles_bf16_h200.json: 32.4 vs 32.9, 42.5 vs 43.4, 41.0 vs 41.2).
    Both 16-bit rules together, whole layer, interleaved A/B on the H100 (ab_decode_rules_deep_h100.json): T=1
    DeepSeek-V2-Lite 54.4 -> 53.0 us, OLMoE 52.2 -> 51.3, Qwen3-30B and Mixtral even; T=2 -0.5 to -1.1%.
    INT8 weights with 8 rows a column (top_k 5-8): two columns (16 rows), 8 warps, 256 deep with products folded 8 at a time
    (`DecodeTile.fold`: 31 registers on sm_90 instead of 45, so twice the 128-deep tile's bytes a K step at its occupancy).
    H100 sweep (decode_folds_w8a16_h100.json, 3 interleaved rounds): the fastest GEMM2 tile on all three such shapes,
    Qwen3-30B 25.8 vs 27.0 us with the 128-deep tile, DeepSeek-V2-Lite 33.6 vs 36.3, OLMoE 31.6 vs 33.2. Whole layer against
    the 128-deep tile (ab_decode_fold_*_h100.json): W8A16 per channel -2.1 to -6.7% (Qwen3-30B 27.4 -> 26.5 us,
    DeepSeek-V2-Lite 36.4 -> 34.0), W8A8 -2.4 to -4.6%; with group-wise scales (`group_size`) even to +2%, so those keep
    128 deep and unfolded, which beat the 8-row 256-deep tile by 3.5-5% (ab_decode_gemm2_int8_w8a16g128_h100.json).
    W8A8 (`a_int8`: the activations int8 too) with a K of more than four 256-deep steps (DeepSeek-V2-Lite: I = 1408, six
    steps): 512 deep, 4 warps, products folded 16 at a time. H100, T=1, the layer in CUDA graphs, 8 rounds with the sides
    alternating, bitwise equal (ab_decode_gemm2_w8a8_deep_h100.json, two runs): 37.3 -> 35.9 us and 37.5 -> 36.1. W8A16
    loses with the same tile (29.0 -> 30.0 us; on sm_90 it takes 70 registers against W8A8's 48: its 16-bit activation
    tile); with K <= 1024 so does W8A8 (Qwen3-30B 29.1 -> 33.1, OLMoE 33.7 -> 36.1), as does 512 deep at 8 warps folded 8
    (DeepSeek-V2-Lite 37.6 -> 38.6).
    W8A16 per channel with the same long K: four columns (32 rows), 512 deep, 4 warps, folded 8 (128 registers on sm_90,
    no spills). The fastest GEMM2 tile on DeepSeek-V2-Lite in two T=1 sweeps (decode_folds_w8a16_gemm2_preload_h100.json
    28.80 vs 28.96 us, decode_unrolls_w8a16_h100.json 28.96 vs 29.22), 4 us slower than the rule's on Qwen3-30B and OLMoE
    (K 768 / 1024). Whole layer, T=1, CUDA graphs, bitwise equal (ab_decode_gemm2_w8a16_deep_h100_v38{,_run2}.json, 8 and
    12 rounds): 29.0 -> 28.4 us and 28.7 -> 28.3; the untouched Qwen3-30B moved +0.32 and +0.35 us, so the A/B carries a
    bias of that size (NOTES item 38).
    fp32 (not measured): the 16-bit tiles at the same bytes a K step (half the depth). Never much deeper than K."""
    fit = lambda depth: min(max(32, next_power_of_2(k)), depth)  # noqa: E731
    depth = 256 if w_elem <= 2 else 128
    if gemm1:
        if w_elem == 2 and 6 * num_sms < pairs * cdiv(n, 8) <= 8 * num_sms:
            return DecodeTile(8, fit(512), 8)
        if w_elem == 1 and not group_size:
            return DecodeTile(8, fit(512), 8, fold=8)
        return DecodeTile(8, fit(depth), 8)
    if w_elem == 2 and slots >= 8:
        return DecodeTile(1, fit(128), 4)
    if w_elem == 1 and slots == 8:
        if k > 4 * 256 and not group_size:  # W8A8 or per-channel W8A16 (W8A8 has no group-wise scales)
            return DecodeTile(2, fit(512), 4, fold=16) if a_int8 else DecodeTile(4, fit(512), 4, fold=8)
        return DecodeTile(2, fit(128), 8) if group_size else DecodeTile(2, fit(256), 8, fold=8)
    return DecodeTile(max(1, 8 // slots), fit(depth), 8)


# Up to this many bytes of weights a decode GEMM streams (its active experts') are loaded evict-first (EVICT_WEIGHTS).
EVICT_FIRST_MAX_WEIGHT_BYTES = 128 * 2**20


def streams_weights_evict_first(pairs: int, num_experts: int, expert_bytes: int) -> bool:
    """Whether a decode GEMM over `num_experts` experts' weights of `expert_bytes` each loads them with the evict-first cache
    policy, for `pairs` (T*top_k) rows.

    At decode each weight byte is read once a call, and every line it brings into L2 evicts one that was there; when that one
    is dirty (what the previous kernels wrote: here do_bench's 256 MB L2 flush) the eviction is a write-back to DRAM beside
    the read. Evict-first lines are their set's next victims, so the stream recycles its own clean lines and leaves the
    rest of L2 alone. H200 (benchmarks/l2_dirty.py, l2_dirty_h200.json): a 75 MB read takes 30.0 us after the flush, 20.5
    with L2 clean, 25.9 evict-first. Whole layer in a CUDA graph, T=1, against the same kernels without it (ab_revision.py,
    ab_decode_evict_{bf16,fp16}_t1_h200.json, bitwise equal): bf16 Qwen3-30B 32.5 -> 28.9 us, DeepSeek-V2-Lite 41.4 -> 37.2,
    OLMoE 39.8 -> 36.1; fp16 -4.7 to -6.7%; W8A16 -5 to -6% (ab_decode_evict_w8a16_h200.json). Mixtral, whose decode GEMMs
    each read 235-470 MB (several times L2), lost: bf16 174.9 -> 182.0, fp16 175.0 -> 191.9 (not explained yet); so only
    streams up to EVICT_FIRST_MAX_WEIGHT_BYTES, the bound PDL uses (PDL_MAX_WEIGHT_BYTES). At T=2 with it on both GEMMs
    (ab_decode_evict_bf16_h200.json): -2.5 to -5.6% on the three smaller shapes; under this bound DeepSeek-V2-Lite's GEMM1
    at T=2 (12 experts, 132 MiB) stays without it. H100 (ab_decode_evict_{bf16,w8a16}_h100.json, bitwise equal): bf16 T=1
    Qwen3-30B 41.7 -> 36.7 us, DeepSeek-V2-Lite 52.9 -> 47.6, OLMoE 51.0 -> 45.7, W8A16 -10 to -11%, Mixtral (under the
    bound's old loads) even. In a model the saving is whatever dirty data the previous kernels left in L2: on a clean L2
    (ab_revision.py --l2 clean, ab_decode_evict_bf16_t1_clean_h100.json) the two load policies take the same time (Qwen3-30B
    32.6 vs 32.9 us), so the policy costs nothing there. The results are bitwise the same either way: the policy changes
    what L2 keeps, not what is loaded."""
    return active_weight_bytes(pairs, num_experts, expert_bytes) <= EVICT_FIRST_MAX_WEIGHT_BYTES


def uses_decode_path(num_tokens: int, fc1, fc2, input, quant, token_selected_experts, token_final_scales) -> bool:
    """Few tokens (DECODE_MAX_TOKENS, DECODE_MAX_TOKENS_W8A16, DECODE_MAX_TOKENS_W8A16_GROUPWISE, DECODE_MAX_TOKENS_W8A8),
    weights with unit stride along K, expert ids and router scales with unit stride along top_k (the kernel reads a token's
    k-th as `row + k`; other layouts take the grouped path, which copies them): unquantised, W8A16 with per-channel scales or
    128-wide groups, or W8A8.

    W8A16 per channel at T=1 (decode_tiles_w8a16_h100.json, CUDA graph): Qwen3-30B 28.6 vs 35.1 us on the grouped path,
    DeepSeek-V2-Lite 36.8 vs 43.1, OLMoE 34.0 vs 39.5, Mixtral 140.4 vs 197.4. Group-wise W8A16: see
    DECODE_MAX_TOKENS_W8A16_GROUPWISE (the decode kernel runs every group size; tested); W8A8: DECODE_MAX_TOKENS_W8A8 (its
    activations quantised per row in a pass before each GEMM)."""
    if quant is None:
        max_tokens = DECODE_MAX_TOKENS
    elif quant.quantize_input:
        max_tokens = DECODE_MAX_TOKENS_W8A8
    else:
        max_tokens = (DECODE_MAX_TOKENS_W8A16 if quant.group_size is None
                      else DECODE_MAX_TOKENS_W8A16_GROUPWISE.get(quant.group_size, 0))
    top_k_unit_stride = all(t is None or t.shape[1] == 1 or t.stride(1) == 1 for t in (token_selected_experts, token_final_scales))
    return (0 < num_tokens <= max_tokens and fc1.stride(2) == 1 and fc2.stride(2) == 1 and input.stride(1) == 1
            and top_k_unit_stride)


def decode_constexprs(tile: DecodeTile, *, gemm1: bool, top_k: int, slots: int, gated: bool, activation: int, has_bias: bool,
                      has_act_params: bool, has_router_scales: bool, w_quant: int, group_size: int, a_int8: bool, k: int,
                      evict_weights: bool, use_pdl: bool) -> dict:
    """`_decode_kernel`'s constexprs in its signature's order (the direct launch passes them in this order), in one place
    for the launcher and check-build. GEMM1 reads neither TOP_K nor SLOTS: 1, so one GEMM1 binary serves every top_k."""
    return {"TOP_K": 1 if gemm1 else top_k, "SLOTS": 1 if gemm1 else slots, "GEMM1": gemm1, "GATED": gated,
            "ACTIVATION": activation, "HAS_BIAS": has_bias, "HAS_ACT_PARAMS": has_act_params,
            "HAS_ROUTER_SCALES": has_router_scales, "W_QUANT": w_quant, "GROUP_SIZE": group_size, "A_INT8": a_int8,
            "EVEN_K": k % tile.block_k == 0, "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k, "K_UNROLL": tile.unroll,
            "K_STAGES": tile.stages, "K_FOLD": tile.fold, "EVICT_WEIGHTS": evict_weights, "USE_PDL": use_pdl}


class DecodePlan:
    """The decode path for one call signature, prepared once: the tiles, grids, int arguments and constexprs of its two launches
    (each a `PlannedLaunch`). Calling it runs the layer on tensors of that signature (shapes, strides, dtypes, 16-byte
    alignments, which optional tensors are given, the quant scheme's kind): all that varies between such calls is the tensors'
    addresses. It checks nothing; whoever keeps a plan keys it by that signature and validated it once (pipeline.py).

    The intermediate `[T*top_k, I]` (and W8A8's int8 copies) are allocated per call by torch's CUDA allocators, whose blocks
    start at multiples of 512 bytes: the 16-byte alignment the launches were specialised on."""

    def __init__(self, input, token_selected_experts, token_final_scales, fc1, fc2, activation, gate_layout, fc1_bias,
                 fc2_bias, act_params, output, quant, start_expert: int = 0, tiles: tuple | None = None):
        num_tokens, hidden = input.shape
        top_k = token_selected_experts.shape[1]
        num_experts, _, inter = fc2.shape
        self.pairs, self.inter = num_tokens * top_k, inter
        slots = next_power_of_2(top_k)
        group = 0 if quant is None else (quant.group_size or 0)
        self.a_int8 = quant is not None and quant.quantize_input
        tile1, tile2 = tiles or (decode_tile(True, inter, hidden, fc1.element_size(), 1, self.pairs,
                                             sm_count(input.device), group_size=group),
                                 decode_tile(False, hidden, inter, fc2.element_size(), slots, group_size=group,
                                             a_int8=self.a_int8))
        pdl = gemm_launches_early(input.device, self.pairs, num_experts, fc2)

        def planned(gemm1, a_stride, w, out_stride, bias, tile, n, k, scales):
            gated = gemm1 and activation.gated
            gate_row0, up_row0, row_step = gate_rows(gate_layout, inter) if gated else (0, 0, 1)
            ints = (num_tokens, n, k, num_experts, start_expert, a_stride, w.stride(0), w.stride(1), out_stride,
                    token_selected_experts.stride(0),
                    token_final_scales.stride(0) if token_final_scales is not None and not gemm1 else 0,
                    bias.stride(0) if bias is not None else 0,
                    scales.stride(0) if scales is not None else 0, scales.stride(1) if scales is not None else 0,
                    scales.stride(2) if scales is not None and scales.dim() == 3 else 0,
                    gate_row0, up_row0, row_step)
            return PlannedLaunch(
                _decode_kernel,
                (self.pairs if gemm1 else num_tokens, cdiv(n, tile.block_n)),
                ints,
                num_warps=tile.num_warps,
                num_stages=1,
                # GEMM1 too is a programmatic launch: it waits for the kernel before it (a model's router; W8A8's row
                # quantiser) first thing, so only its launch overlaps that kernel's tail. H100, T=1, against GEMM1 launched
                # normally, 5 interleaved rounds, bitwise equal (ab_decode_gemm1_pdl_*_h100.json): W8A8 eager Qwen3-30B
                # 30.3 -> 28.7 us, DeepSeek-V2-Lite 39.4 -> 38.5, OLMoE 35.6 -> 34.6 (in a graph -0.1 to -0.7 us); bf16 and
                # W8A16, whose GEMM1 follows do_bench's L2 flush there, within +-0.4 us.
                launch_pdl=pdl,
                maxnreg=tile.max_registers,
                **decode_constexprs(tile, gemm1=gemm1, top_k=top_k, slots=slots, gated=gated,
                                    activation=int(activation.kind) if gemm1 else int(ActivationType.Identity),
                                    has_bias=bias is not None, has_act_params=gemm1 and act_params is not None,
                                    has_router_scales=not gemm1 and token_final_scales is not None,
                                    w_quant=0 if quant is None else (2 if group else 1), group_size=group or 1,
                                    a_int8=self.a_int8, k=k, evict_weights=streams_weights_evict_first(
                                        self.pairs, num_experts, w[0].numel() * w.element_size()),
                                    use_pdl=pdl),
            )

        # W8A8 reads int8 copies of the input and the intermediate, contiguous rows (quantize_activations_int8's layout), made
        # by planned row quantisers.
        self.quantizers = (None, None)
        if self.a_int8:
            from .quant import RowQuantizerPlan  # (quant.py imports pipeline.py, which imports this module)

            self.quantizers = (RowQuantizerPlan.like(input),
                               RowQuantizerPlan(self.pairs, inter, inter, 1, False, input.device))
        self.gemm1 = planned(True, hidden if self.a_int8 else input.stride(0), fc1, inter, fc1_bias, tile1, inter, hidden,
                             None if quant is None else quant.fc1_scales)
        self.gemm2 = planned(False, inter, fc2, output.stride(0), fc2_bias, tile2, hidden, inter,
                             None if quant is None else quant.fc2_scales)

    def __call__(self, input, token_selected_experts, token_final_scales, fc1, fc2, fc1_bias, fc2_bias, act_params, output,
                 quant):
        intermediate = torch.empty(self.pairs, self.inter, dtype=input.dtype, device=input.device)
        unused = token_selected_experts  # any tensor, for pointers a variant never reads
        fc1_scales, fc2_scales = (unused, unused) if quant is None else (quant.fc1_scales, quant.fc2_scales)
        for gemm, a, w, out, bias, params, router_scales, w_scales, quantize in (
                (self.gemm1, input, fc1, intermediate, fc1_bias, act_params, None, fc1_scales, self.quantizers[0]),
                (self.gemm2, intermediate, fc2, output, fc2_bias, None, token_final_scales, fc2_scales, self.quantizers[1])):
            a_scales = unused
            if self.a_int8:  # W8A8: the GEMM's input rows quantised per row (every intermediate row is written: dropped as 0)
                a, a_scales = quantize(a)
            gemm(a, w, out, unused if bias is None else bias, unused if params is None else params, token_selected_experts,
                 unused if router_scales is None else router_scales, w_scales, a_scales)
        return output


def decode_forward(input, token_selected_experts, token_final_scales, fc1, fc2, activation, gate_layout, fc1_bias, fc2_bias,
                   act_params, output, quant, start_expert: int = 0, tiles: tuple | None = None):
    """The layer for `input` `[T, H]` (a few tokens: `uses_decode_path`) into `output` `[T, H]`; inputs validated by the caller."""
    plan = DecodePlan(input, token_selected_experts, token_final_scales, fc1, fc2, activation, gate_layout, fc1_bias, fc2_bias,
                      act_params, output, quant, start_expert, tiles)
    return plan(input, token_selected_experts, token_final_scales, fc1, fc2, fc1_bias, fc2_bias, act_params, output, quant)


# ---------------------------------------------------------------------------------------------------------------------------------
# check-build: the decode kernel as the model shapes launch it.

_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# SM counts of the GPUs we serve (A30 56, L4 58, RTX 3080 68, A10 72, RTX 3090 82, A100 108, H100 PCIe 114, RTX 4090 128,
# H100/H200 SXM 132, L40S 142): the decode tiles depend on how many waves a grid makes.
_SM_COUNTS = (56, 58, 68, 72, 82, 108, 114, 128, 132, 142)


def _add_decode_variants(seen, tile, dtype, w_quant, group, num_tokens, a_int8, name, num_experts, top_k, gemm1, n, k, slots,
                         w_elem):
    """The decode kernel's launches of one tile at one model shape, with and without PDL, into `seen` (keyed by what compiles)."""
    w_int8 = w_quant > 0
    tname = _TL_NAME[dtype]
    # What a launch specialises on: num_tokens == 1 (at T=1) and the unit strides become constants, sizes and the
    # other strides are multiples of 16; the unused pointers are the int32 expert ids.
    signature = {"a_ptr": "*i8" if a_int8 else f"*{tname}", "w_ptr": "*i8" if w_int8 else f"*{tname}", "out_ptr": f"*{tname}",
                 "bias_ptr": "*i32", "act_params_ptr": "*i32",
                 "ids_ptr": "*i32", "router_scales_ptr": "*i32" if gemm1 else "*fp32",
                 "w_scale_ptr": "*fp32" if w_int8 else "*i32",  # quantize_weights_int8's scales
                 "a_scale_ptr": "*fp32" if a_int8 else "*i32",  # quantize_activations_int8's scales
                 "num_tokens": "i32", "N": "i32:16", "K": "i32:16",
                 "num_experts": "i32:16" if num_experts % 16 == 0 else "i32",
                 "start_expert": "i32:16", "stride_am": "i32:16", "stride_we": "i32:16",
                 "stride_wn": "i32:16", "stride_om": "i32:16", "stride_ids": "i32",
                 "stride_rs": "i32:16" if gemm1 else "i32",  # GEMM1 reads no router scales: its stride is 0
                 "stride_bias_e": "i32:16", "stride_wse": "i32:16", "stride_wsn": "i32:16",
                 "stride_wsg": "i32:16", "w_gate_row0": "i32:16", "w_up_row0": "i32:16", "w_row_step": "constexpr"}
    # Per-channel scales `[E, N]` have a unit stride along N (a constant at launch), group-wise ones `[E, N, K/g]`
    # along the groups; without scales both are 0.
    if w_quant == 2:
        signature["stride_wsn"] = "i32:16" if (k // group) % 16 == 0 else "i32"
    unit_strides = {**({"num_tokens": 1} if num_tokens == 1 else {}), "w_row_step": 1,
                    **({"stride_wsn": 1} if w_quant == 1 else {"stride_wsg": 1} if w_quant == 2 else {})}
    scheme = "w8a8 " if a_int8 else ("", "w8a16 ", f"w8a16-g{group} ")[w_quant]
    for use_pdl in (False, True):
        constexprs = {**unit_strides, **decode_constexprs(
            tile, gemm1=gemm1, top_k=top_k, slots=slots, gated=gemm1,
            activation=int(ActivationType.Swiglu if gemm1 else ActivationType.Identity), has_bias=False, has_act_params=False,
            has_router_scales=not gemm1, w_quant=w_quant, group_size=group, a_int8=a_int8, k=k,
            evict_weights=streams_weights_evict_first(num_tokens * top_k, num_experts, (2 * n if gemm1 else n) * k * w_elem),
            use_pdl=use_pdl)}
        signature.update({arg: "constexpr" for arg in constexprs})
        key = (tname, tuple(signature.items()), tuple(constexprs.items()), tile.num_warps)
        seen.setdefault(key, KernelVariant(
            kernel="decode",
            variant=f"{'gemm1' if gemm1 else 'gemm2'} {scheme}{tname} {tile} "
                    f"even_k={int(constexprs['EVEN_K'])}{' evict' if constexprs['EVICT_WEIGHTS'] else ''}"
                    f"{' pdl' if use_pdl else ''} ({name} T={num_tokens})",
            fn=_decode_kernel,
            signature=signature,
            constexprs=constexprs,
            num_warps=tile.num_warps,
            num_stages=1,
            archs=(90,) if use_pdl else (80, 86, 89, 90),
        ))


@register_variants
def _decode_variants():
    seen = {}
    # (activation dtype, W_QUANT, group size, tokens, A_INT8): the unquantised path in every float dtype at T=1 and at its largest
    # T; W8A16 per channel and with the group sizes that take the decode path, and W8A8, in the 16-bit dtypes at T=1.
    half = (torch.float16, torch.bfloat16)
    schemes = ([(dtype, 0, 1, tokens, False) for dtype in _TL_NAME for tokens in sorted({1, DECODE_MAX_TOKENS})]
               + [(dtype, 1, 1, 1, False) for dtype in half]
               + [(dtype, 2, group, 1, False) for dtype in half
                  for group, max_tokens in DECODE_MAX_TOKENS_W8A16_GROUPWISE.items() if max_tokens >= 1]
               + [(dtype, 1, 1, 1, True) for dtype in half if DECODE_MAX_TOKENS_W8A8 >= 1])
    for dtype, w_quant, group, num_tokens, a_int8 in schemes:
        w_elem = 1 if w_quant else dtype.itemsize
        for name, (num_experts, top_k, hidden, inter) in MODEL_SHAPES.items():
            for gemm1, n, k in ((True, inter, hidden), (False, hidden, inter)):
                slots = 1 if gemm1 else next_power_of_2(top_k)
                pairs = num_tokens * top_k
                for tile in dict.fromkeys(decode_tile(gemm1, n, k, w_elem, slots, pairs, sms, group if w_quant == 2 else 0,
                                                      a_int8) for sms in _SM_COUNTS):
                    _add_decode_variants(seen, tile, dtype, w_quant, group, num_tokens, a_int8, name, num_experts, top_k, gemm1,
                                         n, k, slots, w_elem)
    return list(seen.values())
