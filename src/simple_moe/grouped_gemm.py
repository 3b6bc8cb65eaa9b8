"""The fast path: one Triton grouped GEMM over experts, used for both MoE GEMMs.

GEMM1 (`GATHER_A=True`): `out[d, n] = act(input[s(d) % T] @ fc1[e, gate rows].T, input[s(d) % T] @ fc1[e, up rows].T)`.
  Rows of the input are gathered through `expanded_dest_row_to_expanded_source_row` while the A tiles load (no permuted copy),
  the gate and the up tiles of the same output columns are computed by the same program, and the activation (plus fc1 bias) runs
  on the fp32 accumulators before the single store of `[rows, I]`. Where the gate lives in fc1 is three integers
  (first gate row, first up row, row step), so gate-first, up-first and interleaved (GPT-OSS) layouts share one kernel and no
  weight is ever copied.
GEMM2 (`GATHER_A=False`): `out[d, n] = scale(d) * (intermediate[d] @ fc2[e].T + b2[e, n])`, the router scale folded into the epilogue
  so finalize is a plain sum.

Scheduling is on the device: each program reads `expert_first_token_offset` (E+1 int64), computes every expert's tile count for its
BLOCK_M with a prefix sum, and finds its expert and row block. The grid is a host-known bound, `cdiv(rows, BLOCK_M) + min(E, rows)`
row blocks (each non-empty expert wastes at most one partial tile) times the column blocks; programs past the real tile count exit
at once. Or, persistent (`TileConfig.programs_per_sm`), a few programs per SM walk the real tiles in a loop, optionally as one
software pipeline across tiles (`flatten`). An expert's last row block of at most BLOCK_M/2 rows runs as a half-height tile
(`HALF_TAIL`, `splits_tail_tiles`); in a flattened loop, whose pipeline holds one tile height, a second group of programs
walks those tiles alongside the full ones (`TileConfig.flat_tail_cost`, `tail_roles`). Nothing reads device memory from the
host, so the layer captures into a CUDA graph.

INT8 (see quant.py): `W_QUANT=1` int8 weights with per-output-channel scales applied to the fp32 accumulator in the epilogue;
`W_QUANT=2` group-wise scales along K applied to the weight tile inside the K loop (BLOCK_K divides the group; the scaled weight
is rounded once to the activation dtype before the dot);
`A_INT8` int8 activations with a per-row scale, int8 x int8 -> int32 on the tensor cores, dequantised in the epilogue.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._host import cdiv, env_flag, next_power_of_2
from ._launch import PlannedLaunch
from ._variants import KernelVariant, register_variants
from .activations import ACTIVATIONS, GATE_LAYOUTS, ActivationType, apply_activation, load_activation_params
from .grouped_gemm_tiles import SMEM_BY_ARCH, TileConfig, block_m_for, gemm_tile_config


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # GEMM1: input [T, K]; GEMM2: intermediate [rows, K] in dest-row order
    w_ptr,  # [E, N_total, K], any strides
    c_ptr,  # [rows, N] in dest-row order
    bias_ptr,  # [E, N_total] or unused
    act_params_ptr,  # float32 [E, 3] or unused
    dest_to_source_ptr,  # int32 [rows]
    expert_first_token_offset_ptr,  # int64 [E+1]
    router_scales_ptr,  # float32 [T, top_k] or unused
    w_scale_ptr,  # int8 weight scales: [E, N_total] (per channel) or [E, N_total, K/GROUP_SIZE] (group-wise), or unused
    a_scale_ptr,  # float32 per A row (indexed like A's rows) or unused
    num_tokens,
    N,  # output columns (I for gated GEMM1)
    K,
    num_experts,
    num_m_tiles_bound,
    stride_am,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_cm,
    stride_bias_e,
    stride_wse,
    stride_wsn,
    stride_wsg,
    w_gate_row0,  # first fc1 row of the gate (or of the only half when not gated)
    w_up_row0,  # first fc1 row of the up projection
    w_row_step,  # 1 for contiguous halves, 2 for interleaved gate/up
    top_k,
    GATHER_A: tl.constexpr,
    GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,  # ActivationType value; Identity for GEMM2
    HAS_BIAS: tl.constexpr,
    HAS_ACT_PARAMS: tl.constexpr,
    APPLY_ROUTER_SCALE: tl.constexpr,
    W_QUANT: tl.constexpr,  # 0 none, 1 int8 per channel, 2 int8 group-wise
    GROUP_SIZE: tl.constexpr,
    A_INT8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), "tf32" otherwise (ignored for 16-bit and int8)
    EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr,  # launched as a programmatic dependent launch (SM90+): wait for the previous kernel's writes
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PERSISTENT: tl.constexpr,  # grid = a few programs per SM, each looping over tiles (see TileConfig.programs_per_sm)
    FLATTEN: tl.constexpr,  # persistent only: pipeline across tiles (the next tile's loads overlap this tile's epilogue)
    HALF_TAIL: tl.constexpr,  # an expert's last row block of <= BLOCK_M/2 rows runs as a half-height tile
    WEIGHTS_LEFT: tl.constexpr = False,  # compute the tile transposed, weights as the dot's left operand (TileConfig)
    FUSED_GATE_UP: tl.constexpr = False,  # gated: gate and up columns interleaved in one weight tile and one dot (TileConfig)
    HALF_TILE_COST: tl.constexpr = 0,  # flattened half-height tails: a half tile's time in % of a full one's (tail_roles)
    EXPERT_GROUPS: tl.constexpr = False,  # persistent: row-block groups never straddle two experts (tile_coordinates)
):
    if USE_PDL:
        # This grid may be resident before the previous kernel ends: nothing is read or written before the wait. Then the next
        # kernel's programs may launch (they wait in turn), so its launch latency hides behind this kernel.
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    experts, starts, ends, tiles, tiles_through, num_m_tiles = expert_row_tiles(expert_first_token_offset_ptr, num_experts,
                                                                                BLOCK_M, BLOCK_E)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        # Each program walks tiles pid, pid + programs, ...: the offsets and the prefix sum above are read once per program
        # rather than once per tile, and no program is launched for the bound's empty tiles.
        # One software pipeline holds one tile height, so with flattened half-height tails the two heights get a loop each.
        (first, step, runs_full, row_blocks, blocks, blocks_through, half_first, half_step, runs_half, num_half, half,
         half_through) = persistent_walks(starts, ends, num_m_tiles, tiles, tiles_through, num_pid_n, BLOCK_M,
                                          HALF_TAIL and FLATTEN, HALF_TILE_COST)
        if runs_full:
            _tile_loop(
                first, step, row_blocks, num_pid_n, experts, starts, ends, blocks, blocks_through,
                a_ptr, w_ptr, c_ptr, bias_ptr, act_params_ptr, dest_to_source_ptr, router_scales_ptr, w_scale_ptr,
                a_scale_ptr, num_tokens, N, K, stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm,
                stride_bias_e, stride_wse, stride_wsn, stride_wsg, w_gate_row0, w_up_row0, w_row_step, top_k,
                GATHER_A, GATED, ACTIVATION, HAS_BIAS, HAS_ACT_PARAMS, APPLY_ROUTER_SCALE, W_QUANT, GROUP_SIZE, A_INT8,
                DOT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EXPERT_GROUPS, FLATTEN, HALF_TAIL and not FLATTEN,
                WEIGHTS_LEFT, FUSED_GATE_UP,
            )
        if HALF_TAIL and FLATTEN:
            if runs_half:
                _tile_loop(
                    half_first, half_step, num_half, num_pid_n, experts, starts + blocks.to(tl.int64) * BLOCK_M, ends, half,
                    half_through, a_ptr, w_ptr, c_ptr, bias_ptr, act_params_ptr, dest_to_source_ptr, router_scales_ptr,
                    w_scale_ptr, a_scale_ptr, num_tokens, N, K, stride_am, stride_ak, stride_we, stride_wn, stride_wk,
                    stride_cm, stride_bias_e, stride_wse, stride_wsn, stride_wsg, w_gate_row0, w_up_row0, w_row_step, top_k,
                    GATHER_A, GATED, ACTIVATION, HAS_BIAS, HAS_ACT_PARAMS, APPLY_ROUTER_SCALE, W_QUANT, GROUP_SIZE, A_INT8,
                    DOT_PRECISION, EVEN_K, BLOCK_M // 2, BLOCK_N, BLOCK_K, GROUP_M, EXPERT_GROUPS, True, False,
                    WEIGHTS_LEFT, FUSED_GATE_UP,
                )
    else:
        # One program per tile of the host-known bound; programs past the real tile count exit at once.
        pid_m, pid_n = grouped_tile(tl.program_id(0), num_m_tiles_bound, num_pid_n, GROUP_M)
        if pid_m < num_m_tiles:
            _gemm_tile(
                pid_m, pid_n, experts, starts, ends, tiles, tiles_through,
                a_ptr, w_ptr, c_ptr, bias_ptr, act_params_ptr, dest_to_source_ptr, router_scales_ptr, w_scale_ptr, a_scale_ptr,
                num_tokens, N, K, stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_bias_e, stride_wse,
                stride_wsn, stride_wsg, w_gate_row0, w_up_row0, w_row_step, top_k,
                GATHER_A, GATED, ACTIVATION, HAS_BIAS, HAS_ACT_PARAMS, APPLY_ROUTER_SCALE, W_QUANT, GROUP_SIZE, A_INT8,
                DOT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, HALF_TAIL, WEIGHTS_LEFT, FUSED_GATE_UP,
            )


@triton.jit
def _tile_loop(
    first_tile, step, num_m_tiles, num_pid_n, experts, starts, ends, tiles, tiles_through,
    a_ptr, w_ptr, c_ptr, bias_ptr, act_params_ptr, dest_to_source_ptr, router_scales_ptr, w_scale_ptr, a_scale_ptr,
    num_tokens, N, K, stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_bias_e, stride_wse,
    stride_wsn, stride_wsg, w_gate_row0, w_up_row0, w_row_step, top_k,
    GATHER_A: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ACT_PARAMS: tl.constexpr, APPLY_ROUTER_SCALE: tl.constexpr, W_QUANT: tl.constexpr, GROUP_SIZE: tl.constexpr,
    A_INT8: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EXPERT_GROUPS: tl.constexpr, FLATTEN: tl.constexpr, HALF_TAIL: tl.constexpr,
    WEIGHTS_LEFT: tl.constexpr, FUSED_GATE_UP: tl.constexpr,
):
    """A persistent program's walk over tiles first_tile, first_tile + step, ... of num_m_tiles row blocks (of BLOCK_M
    rows, counted per expert by `tiles`) x num_pid_n column blocks; FLATTEN: one software pipeline across the walk."""
    for tile in tl.range(first_tile, num_m_tiles * num_pid_n, step, flatten=FLATTEN):
        pid_m, pid_n = tile_coordinates(tile, num_m_tiles, num_pid_n, tiles, tiles_through, GROUP_M, EXPERT_GROUPS)
        _gemm_tile(
            pid_m, pid_n, experts, starts, ends, tiles, tiles_through,
            a_ptr, w_ptr, c_ptr, bias_ptr, act_params_ptr, dest_to_source_ptr, router_scales_ptr, w_scale_ptr, a_scale_ptr,
            num_tokens, N, K, stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_bias_e, stride_wse,
            stride_wsn, stride_wsg, w_gate_row0, w_up_row0, w_row_step, top_k,
            GATHER_A, GATED, ACTIVATION, HAS_BIAS, HAS_ACT_PARAMS, APPLY_ROUTER_SCALE, W_QUANT, GROUP_SIZE, A_INT8,
            DOT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, HALF_TAIL, WEIGHTS_LEFT, FUSED_GATE_UP,
        )


@triton.jit
def expert_row_tiles(expert_first_token_offset_ptr, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Every expert's row-block count for BLOCK_M from the device-side offsets, and its prefix sum: (experts, starts, ends,
    tiles, tiles_through, num_m_tiles), num_m_tiles the real row-block count (grids are sized from num_m_tiles_bound)."""
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < num_experts
    starts = tl.load(expert_first_token_offset_ptr + experts, mask=expert_mask, other=0)
    ends = tl.load(expert_first_token_offset_ptr + experts + 1, mask=expert_mask, other=0)
    tiles = ((ends - starts + BLOCK_M - 1) // BLOCK_M).to(tl.int32)
    tiles_through = tl.cumsum(tiles, axis=0)
    return experts, starts, ends, tiles, tiles_through, tl.sum(tiles, axis=0)


@triton.jit
def split_tail_tiles(starts, ends, BLOCK_M: tl.constexpr):
    """Each expert's rows as full-height row blocks plus at most one half-height tail: a last block of more than BLOCK_M/2
    rows stays a (masked) full-height one, a tail of 1..BLOCK_M/2 rows becomes a half-height one. Returns (full, full_through,
    num_full, half, half_through, num_half): per-expert counts, their running sums and totals."""
    rows = ends - starts
    rest = rows % BLOCK_M
    full = (rows // BLOCK_M + (rest > BLOCK_M // 2)).to(tl.int32)
    half = ((rest > 0) & (rest <= BLOCK_M // 2)).to(tl.int32)
    full_through = tl.cumsum(full, axis=0)
    half_through = tl.cumsum(half, axis=0)
    return full, full_through, tl.sum(full, axis=0), half, half_through, tl.sum(half, axis=0)


@triton.jit
def tail_roles(num_full_tiles, num_half_tiles, HALF_TILE_COST: tl.constexpr):
    """Which tiles this persistent program walks when full-height and half-height tiles run side by side: the programs split
    in proportion to the two kinds' work (a half tile costing HALF_TILE_COST % of a full one), so both groups move through
    the experts at the same pace. Returns (first full tile, stride, whether it walks full tiles, first half tile, stride,
    whether it walks half tiles); a lone program walks both."""
    tl.static_assert(HALF_TILE_COST > 0, "a split needs the half tile's cost (TileConfig.flat_tail_cost)")
    programs = tl.num_programs(0)
    pid = tl.program_id(0)
    work_full = num_full_tiles.to(tl.int64) * 100
    work_half = num_half_tiles.to(tl.int64) * HALF_TILE_COST
    total = tl.maximum(work_full + work_half, 1)
    half_programs = ((programs * work_half + total // 2) // total).to(tl.int32)  # rounded to the nearest
    half_programs = tl.where(num_half_tiles > 0, tl.maximum(half_programs, 1), 0)
    half_programs = tl.where(num_full_tiles > 0, tl.minimum(half_programs, programs - 1), half_programs)
    full_programs = programs - half_programs
    runs_half = (pid >= full_programs) | (half_programs == 0)  # with no half group, program 0 (the only one) takes them
    return (pid, tl.maximum(full_programs, 1), pid < full_programs,
            tl.where(half_programs > 0, pid - full_programs, 0), tl.maximum(half_programs, 1), runs_half)


@triton.jit
def persistent_walks(starts, ends, num_m_tiles, tiles, tiles_through, num_pid_n, BLOCK_M: tl.constexpr,
                     HALF_TAIL: tl.constexpr, HALF_TILE_COST: tl.constexpr):
    """The tiles a persistent program walks: program_id, + num_programs, ... of every row block x num_pid_n column blocks.
    With HALF_TAIL, two groups of programs walk side by side (tail_roles): the full-height row blocks, and every expert's tail of
    at most BLOCK_M/2 rows as a half-height tile. Both walk the experts in order at about the same pace, so an expert's tail
    is mostly computed while its weights are in L2 for its full tiles (one walk after the other read them from DRAM again:
    NOTES v14; side by side, GEMM1 at T=4096 still reads 0.07-0.11 GB more than with no split: NOTES v34, as experts with a
    tail come unevenly). Returns the full walk (first tile, stride, whether this program takes it, row blocks, per-expert row
    blocks, their running sums) and the half walk (the same six; an expert's tail starts after its full blocks); without
    HALF_TAIL the half walk is empty."""
    first, step, runs_full = tl.program_id(0), tl.num_programs(0), True
    num_full, full, full_through = num_m_tiles, tiles, tiles_through
    half_first, half_step, runs_half = 0, 1, False
    num_half, half, half_through = 0, tiles, tiles_through
    if HALF_TAIL:
        full, full_through, num_full, half, half_through, num_half = split_tail_tiles(starts, ends, BLOCK_M)
        first, step, runs_full, half_first, half_step, runs_half = tail_roles(num_full * num_pid_n, num_half * num_pid_n,
                                                                               HALF_TILE_COST)
    return first, step, runs_full, num_full, full, full_through, half_first, half_step, runs_half, num_half, half, half_through


@triton.jit
def row_block_owner(pid_m, experts, starts, ends, tiles, tiles_through, BLOCK_M: tl.constexpr):
    """(expert, first row, the expert's end row) of row block pid_m: its expert is the first whose running tile count passes
    it."""
    before_mine = tiles_through <= pid_m
    expert = tl.sum(before_mine.to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(before_mine, tiles, 0), axis=0)
    is_mine = experts == expert
    row_start = tl.sum(tl.where(is_mine, starts, 0), axis=0) + (pid_m - first_tile).to(tl.int64) * BLOCK_M
    row_end = tl.sum(tl.where(is_mine, ends, 0), axis=0)
    return expert, row_start, row_end


@triton.jit
def grouped_tile(tile, num_m_tiles, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column block) of a linear tile id, GROUP_M row blocks at a time so programs in flight share weight tiles in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_m_tiles - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile % num_pid_in_group) % group_size_m
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def tile_coordinates(tile, num_m_tiles, num_pid_n, tiles, tiles_through, GROUP_M: tl.constexpr, EXPERT_GROUPS: tl.constexpr):
    """(row block, column block) of a persistent loop's linear tile id: grouped_tile's order, or with EXPERT_GROUPS the
    same order inside each expert, so a group of row blocks never straddles two experts.

    grouped_tile runs GROUP_M row blocks over every column block before the next group; those row blocks share each weight
    tile in L2. When an expert's row blocks cross a group boundary its weights are read once per group it touches, and a
    group that spans two experts holds two experts' weight tiles. EXPERT_GROUPS gives tiles out expert by expert (the tile
    ids of expert e start at its first row block x num_pid_n) and cuts each expert's row blocks into the fewest groups of at
    most GROUP_M, of equal height. Measured: a gain for the 16-bit TMA GEMM2, mixed for GEMM1 (gemm_tile_config)."""
    if EXPERT_GROUPS:
        before = tiles_through * num_pid_n <= tile  # experts whose tiles all come before this one
        first_row_block = tl.sum(tl.where(before, tiles, 0), axis=0)
        row_blocks = tl.min(tl.where(before, num_m_tiles, tiles_through), axis=0) - first_row_block  # the owner's
        height = tl.cdiv(row_blocks, tl.cdiv(row_blocks, GROUP_M))
        local = tile - first_row_block * num_pid_n
        group_first = (local // (height * num_pid_n)) * height
        group_rows = tl.minimum(row_blocks - group_first, height)
        in_group = local % (height * num_pid_n)
        return first_row_block + group_first + in_group % group_rows, in_group // group_rows
    else:
        return grouped_tile(tile, num_m_tiles, num_pid_n, GROUP_M)


@triton.jit
def _gemm_tile(
    pid_m, pid_n, experts, starts, ends, tiles, tiles_through,
    a_ptr, w_ptr, c_ptr, bias_ptr, act_params_ptr, dest_to_source_ptr, router_scales_ptr, w_scale_ptr, a_scale_ptr,
    num_tokens, N, K, stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_bias_e, stride_wse,
    stride_wsn, stride_wsg, w_gate_row0, w_up_row0, w_row_step, top_k,
    GATHER_A: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ACT_PARAMS: tl.constexpr, APPLY_ROUTER_SCALE: tl.constexpr, W_QUANT: tl.constexpr, GROUP_SIZE: tl.constexpr,
    A_INT8: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, HALF_TAIL: tl.constexpr, WEIGHTS_LEFT: tl.constexpr, FUSED_GATE_UP: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N output tile (row block pid_m, which must exist): find its expert, run the K loop, the epilogue."""
    expert, row_start, row_end = row_block_owner(pid_m, experts, starts, ends, tiles, tiles_through, BLOCK_M)
    # An expert's last row block holds what is left of its rows; when that is at most half a tile, a half-height tile
    # computes it (the same K loop and epilogue at BLOCK_M / 2 rows) instead of multiplying masked rows.
    if HALF_TAIL and row_end - row_start <= BLOCK_M // 2:
        _gemm_rows(
            expert, row_start, row_end, pid_n,
            a_ptr, w_ptr, c_ptr, bias_ptr, act_params_ptr, dest_to_source_ptr, router_scales_ptr, w_scale_ptr, a_scale_ptr,
            num_tokens, N, K, stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_bias_e, stride_wse,
            stride_wsn, stride_wsg, w_gate_row0, w_up_row0, w_row_step, top_k,
            GATHER_A, GATED, ACTIVATION, HAS_BIAS, HAS_ACT_PARAMS, APPLY_ROUTER_SCALE, W_QUANT, GROUP_SIZE, A_INT8,
            DOT_PRECISION, EVEN_K, BLOCK_M // 2, BLOCK_N, BLOCK_K, WEIGHTS_LEFT, FUSED_GATE_UP,
        )
    else:
        _gemm_rows(
            expert, row_start, row_end, pid_n,
            a_ptr, w_ptr, c_ptr, bias_ptr, act_params_ptr, dest_to_source_ptr, router_scales_ptr, w_scale_ptr, a_scale_ptr,
            num_tokens, N, K, stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_bias_e, stride_wse,
            stride_wsn, stride_wsg, w_gate_row0, w_up_row0, w_row_step, top_k,
            GATHER_A, GATED, ACTIVATION, HAS_BIAS, HAS_ACT_PARAMS, APPLY_ROUTER_SCALE, W_QUANT, GROUP_SIZE, A_INT8,
            DOT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, WEIGHTS_LEFT, FUSED_GATE_UP,
        )


@triton.jit
def _gemm_rows(
    expert, row_start, row_end, pid_n,
    a_ptr, w_ptr, c_ptr, bias_ptr, act_params_ptr, dest_to_source_ptr, router_scales_ptr, w_scale_ptr, a_scale_ptr,
    num_tokens, N, K, stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_bias_e, stride_wse,
    stride_wsn, stride_wsg, w_gate_row0, w_up_row0, w_row_step, top_k,
    GATHER_A: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ACT_PARAMS: tl.constexpr, APPLY_ROUTER_SCALE: tl.constexpr, W_QUANT: tl.constexpr, GROUP_SIZE: tl.constexpr,
    A_INT8: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, WEIGHTS_LEFT: tl.constexpr, FUSED_GATE_UP: tl.constexpr,
):
    """Rows [row_start, min(row_start + BLOCK_M, row_end)) of `expert` times column block pid_n: the K loop, the epilogue."""
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows = tl.where(row_mask, rows, row_start)  # keep masked lanes on a real row so loads need no row mask
    if GATHER_A:
        source_rows = tl.load(dest_to_source_ptr + rows)
        a_rows = (source_rows % num_tokens).to(tl.int64)
    else:
        a_rows = rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    cols_safe = tl.where(col_mask, cols, 0)
    if FUSED_GATE_UP:
        # One weight tile of 2 x BLOCK_N rows, gate and up alternating (tile column 2j is output column j's gate row, 2j + 1
        # its up row), so one dot of twice the width replaces two that read the same A tile; the epilogue splits the pairs.
        tl.static_assert(GATED, "FUSED_GATE_UP is for gated GEMM1")
        gate_rows = fused_pair_rows(pid_n, N, w_gate_row0, w_up_row0, w_row_step, BLOCK_N)
        TILE_N: tl.constexpr = 2 * BLOCK_N
        TWO_TILES: tl.constexpr = False
    else:
        gate_rows = w_gate_row0 + cols_safe * w_row_step
        TILE_N: tl.constexpr = BLOCK_N
        TWO_TILES: tl.constexpr = GATED
    up_rows = w_up_row0 + cols_safe * w_row_step

    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    w_gate_ptrs = w_expert + gate_rows.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk
    w_up_ptrs = w_expert + up_rows.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk
    if W_QUANT == 2:
        ws_expert = w_scale_ptr + expert.to(tl.int64) * stride_wse
        ws_gate_ptrs = ws_expert + gate_rows * stride_wsn
        ws_up_ptrs = ws_expert + up_rows * stride_wsn

    acc_dtype = tl.int32 if A_INT8 else tl.float32
    if WEIGHTS_LEFT:
        acc_gate = tl.zeros([TILE_N, BLOCK_M], dtype=acc_dtype)
        acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=acc_dtype)
    else:
        acc_gate = tl.zeros([BLOCK_M, TILE_N], dtype=acc_dtype)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w_gate = tl.load(w_gate_ptrs)
        else:
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0)
            w_gate = tl.load(w_gate_ptrs, mask=k_mask[:, None], other=0)
        if TWO_TILES:
            if EVEN_K:
                w_up = tl.load(w_up_ptrs)
            else:
                w_up = tl.load(w_up_ptrs, mask=k_mask[:, None], other=0)
        if W_QUANT == 1 and not A_INT8:
            # W8A16 per channel: int8 -> activation dtype in registers (exact: |w| <= 127 fits fp16/bf16 mantissas).
            w_gate = w_gate.to(a.dtype)
            if TWO_TILES:
                w_up = w_up.to(a.dtype)
        if W_QUANT == 2:
            # W8A16 group-wise: the tile's K range lies in one group; scale each column by its group scale in fp32 and round
            # once to the activation dtype, so the dot accumulates in place (scaling the partial product instead needs a
            # second accumulator tile per half: register spills and several times slower prefill tiles on H100).
            group = k0 // GROUP_SIZE
            scale_gate = tl.load(ws_gate_ptrs + group * stride_wsg).to(tl.float32)
            w_gate = (int8_exact_to_float32(w_gate) * scale_gate[None, :]).to(a.dtype)
            if TWO_TILES:
                scale_up = tl.load(ws_up_ptrs + group * stride_wsg).to(tl.float32)
                w_up = (int8_exact_to_float32(w_up) * scale_up[None, :]).to(a.dtype)
        # out_dtype: int8 x int8 accumulates in int32 (W8A8); fp32 otherwise.
        if WEIGHTS_LEFT:
            # out^T = W @ A^T: on SM90 the left operand of wgmma may come from registers, so an int8 weight tile converted
            # there feeds the tensor cores directly instead of being written back to shared memory as the right operand.
            acc_gate = tl.dot(tl.trans(w_gate), tl.trans(a), acc_gate, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
            if TWO_TILES:
                acc_up = tl.dot(tl.trans(w_up), tl.trans(a), acc_up, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        else:
            acc_gate = tl.dot(a, w_gate, acc_gate, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
            if TWO_TILES:
                acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        a_ptrs += BLOCK_K * stride_ak
        w_gate_ptrs += BLOCK_K * stride_wk
        w_up_ptrs += BLOCK_K * stride_wk

    # ---- epilogue, all in fp32: dequantise, bias, activation, router scale, one store.
    if WEIGHTS_LEFT:
        acc_gate = tl.trans(acc_gate)
        acc_up = tl.trans(acc_up)
    gate = dequantize_add_bias(acc_gate, gate_rows, a_rows, expert, a_scale_ptr, w_scale_ptr, bias_ptr, stride_wse, stride_wsn,
                               stride_bias_e, W_QUANT, A_INT8, HAS_BIAS)
    if FUSED_GATE_UP:
        gate, up = tl.split(tl.reshape(gate, [BLOCK_M, BLOCK_N, 2]))
    elif GATED:
        up = dequantize_add_bias(acc_up, up_rows, a_rows, expert, a_scale_ptr, w_scale_ptr, bias_ptr, stride_wse, stride_wsn,
                                 stride_bias_e, W_QUANT, A_INT8, HAS_BIAS)
    else:
        up = gate  # unused by an ungated activation
    p0, p1, p2 = load_activation_params(act_params_ptr, expert, HAS_ACT_PARAMS)
    out = apply_activation(gate, up, p0, p1, p2, ACTIVATION)
    scale_and_store_rows(out, rows, row_mask, cols, col_mask, c_ptr, stride_cm, dest_to_source_ptr, router_scales_ptr,
                         num_tokens, top_k, APPLY_ROUTER_SCALE)


@triton.jit
def tile_rows_and_columns(row_start, row_end, pid_n, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A tile's dest rows [row_start, min(row_start + BLOCK_M, row_end)) and columns of block pid_n, with their masks: rows
    off the mask point at row_start (a real row, so loads need no row mask), `cols_safe` at column 0. (_gemm_rows computes
    the same inline, its A-row gather between the rows and the columns: moved after both, its sm_90 SASS changed.)"""
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows = tl.where(row_mask, rows, row_start)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    return rows, row_mask, cols, col_mask, tl.where(col_mask, cols, 0)


@triton.jit
def scale_and_store_rows(out, rows, row_mask, cols, col_mask, c_ptr, stride_cm, dest_to_source_ptr, router_scales_ptr,
                         num_tokens, top_k, APPLY_ROUTER_SCALE: tl.constexpr):
    """The epilogue's last step: (APPLY_ROUTER_SCALE) each dest row times the router scale of its (token, k), then one masked
    store of the tile in the output dtype."""
    if APPLY_ROUTER_SCALE:
        source_rows = tl.load(dest_to_source_ptr + rows)
        token = source_rows % num_tokens
        k = source_rows // num_tokens
        out *= tl.load(router_scales_ptr + token.to(tl.int64) * top_k + k)[:, None]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def int8_exact_to_float32(w):
    """`w` as fp32; int8 without a conversion instruction. The bits 0x4B000000 are the float 2^23, and for an integer
    0 <= m < 2^23 those bits plus m are the float 2^23 + m; with m = w + 128 the float minus 2^23 + 128 is w, exactly. An
    integer add and a float add (full rate) replace I2F, which SM80-SM90 issue at 16 a clock an SM, a quarter of the FFMA rate
    (the sm_90 SASS of the W8A16 decode loop had one I2F per weight, the group-wise K loop 64 per 16x64x128 tile and thread
    group). int8 -> fp16/bf16 needs none of this: Triton lowers it to byte permutes and a packed add already."""
    if w.dtype == tl.int8:
        return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    return w.to(tl.float32)


@triton.jit
def fused_pair_rows(pid_n, N, first_row0, second_row0, w_row_step, BLOCK_N: tl.constexpr):
    """The fc1 rows of a fused gate/up tile of column block pid_n: tile row 2j is output column j's first row of the pair,
    2j + 1 its second (columns past N read column 0's rows)."""
    pair = tl.arange(0, 2 * BLOCK_N)
    pair_cols = pid_n * BLOCK_N + pair // 2
    pair_cols = tl.where(pair_cols < N, pair_cols, 0)
    return tl.where(pair % 2 == 0, first_row0, second_row0) + pair_cols * w_row_step


@triton.jit
def dequantize_add_bias(acc, w_rows, a_rows, expert, a_scale_ptr, w_scale_ptr, bias_ptr, stride_wse, stride_wsn,
                        stride_bias_e, W_QUANT: tl.constexpr, A_INT8: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The accumulator of the columns whose fc rows are `w_rows`, in fp32: times the row and channel scales, plus the bias."""
    out = acc.to(tl.float32)
    if A_INT8:
        out *= tl.load(a_scale_ptr + a_rows).to(tl.float32)[:, None]
    if W_QUANT == 1:
        out *= tl.load(w_scale_ptr + expert.to(tl.int64) * stride_wse + w_rows * stride_wsn).to(tl.float32)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + expert.to(tl.int64) * stride_bias_e + w_rows).to(tl.float32)[None, :]
    return out


class DeviceFacts(NamedTuple):
    arch: int  # 80 for SM80, 90 for SM90
    sm_count: int


def device_arch(device: torch.device) -> int:
    return _device_facts(device).arch


def sm_count(device: torch.device) -> int:
    return _device_facts(device).sm_count


def _device_facts(device: torch.device) -> DeviceFacts:
    """The CPU interpreter stands in as SM80 with 4 SMs, so persistent programs loop there."""
    if device.type != "cuda":
        return DeviceFacts(80, 4)
    return _cuda_facts(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_facts(index: int) -> DeviceFacts:
    props = torch.cuda.get_device_properties(index)
    return DeviceFacts(props.major * 10 + props.minor, props.multi_processor_count)


_PDL_ENABLED = env_flag("SIMPLE_MOE_PDL", True)
# Programmatic launches pay off below this much weight read by one decode GEMM (see gemm_launches_early).
PDL_MAX_WEIGHT_BYTES = 128 << 20


def gemm_launches_early(device: torch.device, rows: int, num_experts: int, weights: torch.Tensor) -> bool:
    """Whether a grouped GEMM over `weights` `[E, N, K]` (and the finalize after GEMM2) is a programmatic dependent launch: it may
    start while the previous kernel drains and waits for it first thing, so its launch latency hides (SM90+, CUDA).

    Measured in a CUDA graph at T=1 on the H100 (decode_latency_h100_v5.json): Qwen3-30B 50.0 -> 48.2 us, DeepSeek-V2-Lite 60.7 ->
    58.9, OLMoE 58.7 -> 56.8 (bf16; W8A16 and W8A8 gain 0.6-2.3 us); Mixtral, whose decode GEMMs each read 235-470 MB, lost
    (260.6 -> 268.8 us bf16, 184.5 -> 212.0 W8A16). So only decode tiles whose active experts' weights (at most min(E, rows)
    experts) stay under PDL_MAX_WEIGHT_BYTES. `SIMPLE_MOE_PDL=0` turns it off. Re-measured with the decode path's kernels
    (decode_latency_h100_v6.json): -0.6 to -1.4 us a T=1 layer for every shape and scheme it allows, Mixtral W8A16 included
    (2 experts x 59 MB of int8 fc2: 145.2 vs 145.9 us).
    """
    if not _PDL_ENABLED or device.type != "cuda" or _device_facts(device).arch < 90:
        return False
    return (block_m_for(rows, num_experts) <= 64
            and active_weight_bytes(rows, num_experts, weights[0].numel() * weights.element_size()) <= PDL_MAX_WEIGHT_BYTES)


def active_weight_bytes(rows: int, num_experts: int, expert_bytes: int) -> int:
    """The weight bytes a GEMM over `rows` (token, expert) rows can read: at most min(E, rows) experts of `expert_bytes`
    each. What PDL's rule (above) and the decode path's evict-first rule bound."""
    return min(num_experts, rows) * expert_bytes


_HALF_TAIL_ENABLED = env_flag("SIMPLE_MOE_HALF_TAIL", True)


def splits_tail_tiles(cfg: TileConfig) -> bool:
    """Whether an expert's last row block, when it holds at most half a tile, runs as a half-height tile (HALF_TAIL).

    Prefill tiles are 128 rows and every expert's rows end in a partial tile that costs a full one on the tensor cores: with
    the benchmark's routing (near-equal expert loads) Qwen3-30B at T=4096 has 256 +- 16 rows an expert, so half the experts
    take a third tile of a few rows (2.47 tiles for 2 tiles of rows). Measured on the H100 (stage_times_h100_v6_half*.txt),
    GEMM1 bf16 at T=4096: Qwen3-30B 509 -> 465 us, DeepSeek-V2-Lite 604 -> 573, OLMoE 572 -> 564, Mixtral 3595 -> 3646; at
    T=1024 Mixtral 1056 -> 997, OLMoE 248 -> 237. A flattened persistent loop (one pipeline, one tile height) keeps its tails
    full height unless `TileConfig.flat_tail_cost` asks for a second group of programs to run them (tail_roles;
    flat_tail_cost_for says where the rules do). `SIMPLE_MOE_HALF_TAIL=0` turns it off."""
    flattened = cfg.programs_per_sm > 0 and cfg.flatten
    return (_HALF_TAIL_ENABLED and cfg.half_tail and cfg.block_m >= 128
            and (not flattened or cfg.flat_tail_cost > 0))


def num_m_tiles_bound(rows: int, num_experts: int, block_m: int) -> int:
    """Host-known upper bound of sum_e cdiv(rows_e, block_m): each non-empty expert adds at most one partial tile."""
    return cdiv(rows, block_m) + min(num_experts, rows)


# ---------------------------------------------------------------------------------------------------------------------------------
# Launcher


def gate_rows(gate_layout: str, n_out: int) -> tuple[int, int, int]:
    """Where the gate and up halves of a gated fc1 sit: rows `gate_row0 + j*row_step` and `up_row0 + j*row_step`, j < n_out."""
    if gate_layout == "gate_first":
        return 0, n_out, 1
    if gate_layout == "up_first":
        return n_out, 0, 1
    if gate_layout == "interleaved":  # GPT-OSS: gate = rows 0::2, up = rows 1::2
        return 0, 1, 2
    raise ValueError(f"gate_layout: expected one of {GATE_LAYOUTS}, got {gate_layout!r}")


def grouped_gemm(
    a: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    maps,
    *,
    gather_a: bool,
    activation=None,
    gate_layout: str = "gate_first",
    bias: torch.Tensor | None = None,
    act_params: torch.Tensor | None = None,
    router_scales: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
    group_size: int = 0,
    a_scale: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Runs one grouped GEMM (see the module docstring). Inputs are assumed validated by the caller (`pipeline.py`).

    `out` is `[rows, N]` in dest-row order; `weights` `[E, N_total, K]` with any strides; `w_scale`/`a_scale` select INT8 modes.
    """
    plan = GroupedGemmPlan(a, weights, out, maps, gather_a=gather_a, activation=activation, gate_layout=gate_layout, bias=bias,
                           act_params=act_params, router_scales=router_scales, w_scale=w_scale, group_size=group_size,
                           a_scale=a_scale, config=config)
    return plan(a, weights, out, maps, bias=bias, act_params=act_params, router_scales=router_scales, w_scale=w_scale,
                a_scale=a_scale)


class GroupedGemmPlan:
    """`grouped_gemm` for one signature (shapes, strides, dtypes, 16-byte alignments, which optional tensors are given, the
    options): the tile, grid, int arguments and constexprs chosen once. Calling it with tensors of that signature launches;
    the TMA kernels' launches are not planned (their descriptors are built per call), they run `grouped_gemm1_tma` (gated,
    the activation kept here) or `grouped_gemm2_tma`, and neither are W8A8's on SM90 (`grouped_gemm_gluon`): `gluon` says
    which of its GEMMs runs (1 or 2; 0: none)."""

    def __init__(self, a, weights, out, maps, *, gather_a: bool, activation=None, gate_layout: str = "gate_first", bias=None,
                 act_params=None, router_scales=None, w_scale=None, group_size: int = 0, a_scale=None,
                 config: TileConfig | None = None):
        rows, n_out = out.shape
        num_experts, _, k = weights.shape
        self.launch = self.tma_config = self.activation = None
        self.gluon = 0
        if rows == 0 or n_out == 0:
            return
        act = ActivationType.Identity if activation is None else activation.kind
        gated = activation is not None and activation.gated
        w_quant = 0 if w_scale is None else (2 if group_size else 1)
        a_int8 = a_scale is not None
        arch = device_arch(a.device)
        cfg = config or gemm_tile_config(rows, num_experts, n_out, k, a.dtype if not a_int8 else torch.bfloat16, arch, gated,
                                         w_int8=w_quant != 0, a_int8=a_int8)
        if config is None:
            from . import autotune  # optional, off by default (SIMPLE_MOE_AUTOTUNE=1)

            if autotune.enabled():
                key = autotune.problem_key(a.device, arch, rows, num_experts, n_out, k, a.dtype, weights.dtype, gather_a,
                                           int(act), bias is not None, router_scales is not None, w_quant, group_size, a_int8)
                rerun = lambda c: grouped_gemm(a, weights, out, maps, gather_a=gather_a, activation=activation,  # noqa: E731
                                               gate_layout=gate_layout, bias=bias, act_params=act_params,
                                               router_scales=router_scales, w_scale=w_scale, group_size=group_size,
                                               a_scale=a_scale, config=c)
                cfg = autotune.tuned_config(key, rerun, cfg, gated)
        # Imported here: these modules build on this one. W8A8 GEMM1, and a W8A8 GEMM2 the TMA kernel would take, run on
        # SM90 from MIN_ROWS_PER_EXPERT rows an expert with the same tile on the warp-specialised Gluon kernels.
        from .grouped_gemm_gluon import takes_gluon
        from .grouped_gemm_tma import takes_tma

        if a_int8 and gated and gather_a:
            if takes_gluon(cfg, a, weights, rows, gather_a=True, gate_layout=gate_layout, activation=activation):
                self.gluon, self.activation, self.gate_layout = 1, activation, gate_layout
                return
        if cfg.tma and takes_tma(cfg, a, weights, gather_a=gather_a, gated=gated, w_quant=w_quant, a_int8=a_int8,
                                 gate_layout=gate_layout):
            if not gather_a and takes_gluon(cfg, a, weights, rows, gather_a=False):
                self.gluon = 2
            else:
                self.tma_config, self.activation, self.gate_layout = cfg, activation, gate_layout
            return
        block_k = cfg.block_k
        if w_quant == 2 and group_size % block_k:
            block_k = group_size  # a K tile must not straddle two scale groups (group sizes 32/64/128 are powers of two)
        gate_row0, up_row0, row_step = gate_rows(gate_layout, n_out) if gated else (0, 0, 1)
        m_tiles = num_m_tiles_bound(rows, num_experts, cfg.block_m)
        num_tiles = m_tiles * cdiv(n_out, cfg.block_n)
        use_pdl = gemm_launches_early(a.device, rows, num_experts, weights)
        self.launch = PlannedLaunch(
            _grouped_gemm_kernel,
            (min(num_tiles, cfg.programs_per_sm * sm_count(a.device)) if cfg.programs_per_sm else num_tiles,),
            (maps.num_tokens, n_out, k, num_experts, m_tiles,
             a.stride(0), a.stride(1), weights.stride(0), weights.stride(1), weights.stride(2), out.stride(0),
             bias.stride(0) if bias is not None else 0,
             w_scale.stride(0) if w_scale is not None else 0,
             w_scale.stride(1) if w_scale is not None else 0,
             w_scale.stride(2) if w_scale is not None and w_scale.dim() == 3 else 0,
             gate_row0, up_row0, row_step, maps.top_k),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            launch_pdl=use_pdl,
            **gemm_constexprs(cfg, gather_a=gather_a, gated=gated, activation=int(act), even_k=k % block_k == 0,
                              dtype=a.dtype, num_experts=num_experts, has_bias=bias is not None,
                              has_act_params=act_params is not None, apply_router_scale=router_scales is not None,
                              w_quant=w_quant, group_size=group_size or 1, a_int8=a_int8, use_pdl=use_pdl,
                              block_k=block_k),
        )

    def __call__(self, a, weights, out, maps, *, bias=None, act_params=None, router_scales=None, w_scale=None, a_scale=None,
                 tables: dict | None = None):
        """`tables`: a dict kept for one set of maps, so that Gluon GEMMs on them share one row-block table launch."""
        if self.gluon:
            from .grouped_gemm_gluon import grouped_gemm1_w8a8_gluon, grouped_gemm2_w8a8_gluon

            if self.gluon == 1:
                return grouped_gemm1_w8a8_gluon(a, weights, out, maps, activation=self.activation,
                                                gate_layout=self.gate_layout, bias=bias, act_params=act_params,
                                                w_scale=w_scale, a_scale=a_scale, tables=tables)
            return grouped_gemm2_w8a8_gluon(a, weights, out, maps, bias=bias, router_scales=router_scales, w_scale=w_scale,
                                            a_scale=a_scale, tables=tables)
        if self.tma_config is not None:
            from .grouped_gemm_tma import grouped_gemm1_tma, grouped_gemm2_tma

            if self.activation is not None:
                return grouped_gemm1_tma(a, weights, out, maps, activation=self.activation, gate_layout=self.gate_layout,
                                         bias=bias, act_params=act_params, cfg=self.tma_config)
            return grouped_gemm2_tma(a, weights, out, maps, bias=bias, router_scales=router_scales, w_scale=w_scale,
                                     a_scale=a_scale, cfg=self.tma_config)
        if self.launch is not None:
            unused = maps.expert_first_token_offset  # any tensor, for pointers a variant never reads
            self.launch(a, weights, out, unused if bias is None else bias, unused if act_params is None else act_params,
                        maps.expanded_dest_row_to_expanded_source_row, maps.expert_first_token_offset,
                        unused if router_scales is None else router_scales, unused if w_scale is None else w_scale,
                        unused if a_scale is None else a_scale)
        return out


# ---------------------------------------------------------------------------------------------------------------------------------
# check-build: every config the heuristics pick for the model shapes we measure on, per arch and dtype.

# (E, top_k, H, I) of baselines.md's four shapes plus GPT-OSS-20B, Qwen3-235B and DeepSeek-V3's routed experts.
MODEL_SHAPES = {
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "deepseek-v2-lite": (64, 6, 2048, 1408),
    "olmoe-1b-7b": (64, 8, 2048, 1024),
    "gpt-oss-20b": (32, 4, 2880, 2880),
    "qwen3-235b-a22b": (128, 8, 4096, 1536),
    "deepseek-v3": (256, 8, 7168, 2048),
}
BENCH_TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "i8"}


def gemm_signature(a_dtype: torch.dtype, w_dtype: torch.dtype, c_dtype: torch.dtype) -> dict:
    a, w, c = _TL_NAME[a_dtype], _TL_NAME[w_dtype], _TL_NAME[c_dtype]
    sig = {"a_ptr": f"*{a}", "w_ptr": f"*{w}", "c_ptr": f"*{c}", "bias_ptr": f"*{c}", "act_params_ptr": "*fp32",
           "dest_to_source_ptr": "*i32", "expert_first_token_offset_ptr": "*i64", "router_scales_ptr": "*fp32",
           "w_scale_ptr": f"*{c}", "a_scale_ptr": "*fp32"}
    for name in ("num_tokens", "N", "K", "num_experts", "num_m_tiles_bound"):
        sig[name] = "i32"
    for name in ("stride_am", "stride_ak", "stride_we", "stride_wn", "stride_wk", "stride_cm", "stride_bias_e", "stride_wse",
                 "stride_wsn", "stride_wsg"):
        sig[name] = "i64"
    for name in ("w_gate_row0", "w_up_row0", "w_row_step", "top_k"):
        sig[name] = "i32"
    return sig  # the constexprs: gemm_constexprs


def launch_signature(signature: dict, w_quant: int = 0) -> tuple[dict, dict]:
    """The types Triton's JIT specialises the arguments to at launch for the model shapes, so check-build compiles what runs.

    Integer arguments equal to 1 become compile-time constants (the contiguous K strides, the scales' innermost stride, the row
    step of gate-first/up-first fc1) and multiples of 16 carry the divisibility hint (H, I and the strides built from them are
    multiples of 16 for every model shape); without these the loads are neither vectorised nor turned into cp.async.
    Returns (signature, constexprs of the unit strides).
    """
    sig = dict(signature)
    unit = {"stride_ak": 1, "stride_wk": 1, "w_row_step": 1}
    if w_quant:
        unit["stride_wsn" if w_quant == 1 else "stride_wsg"] = 1
    for name in unit:
        sig[name] = "constexpr"
    for name in ("N", "K", "stride_am", "stride_we", "stride_wn", "stride_cm", "w_gate_row0", "w_up_row0"):
        sig[name] = "i32:16"
    if w_quant:
        sig["stride_wse"] = "i32:16"
    for name in ("stride_bias_e", "stride_wse", "stride_wsn", "stride_wsg"):
        if sig[name] == "i64":
            sig[name] = "i32"
    return sig, unit


def _block_experts(num_experts: int) -> int:
    return max(16, next_power_of_2(num_experts))  # BLOCK_E: the lanes of the per-expert tile prefix sum


def gemm_constexprs(cfg: TileConfig, *, gather_a: bool, gated: bool, activation: int, even_k: bool, dtype: torch.dtype,
                    num_experts: int, has_bias: bool = False, has_act_params: bool = False, apply_router_scale: bool = False,
                    w_quant: int = 0, group_size: int = 1, a_int8: bool = False, use_pdl: bool = False,
                    block_k: int | None = None) -> dict:
    """`_grouped_gemm_kernel`'s constexprs in its signature's order (the direct launch passes them in this order), in one
    place for the launcher and check-build. `block_k`: the K tile when the launcher shrank it to a scale group."""
    persistent = cfg.programs_per_sm > 0
    return {"GATHER_A": gather_a, "GATED": gated, "ACTIVATION": activation, "HAS_BIAS": has_bias,
            "HAS_ACT_PARAMS": has_act_params, "APPLY_ROUTER_SCALE": apply_router_scale, "W_QUANT": w_quant,
            "GROUP_SIZE": group_size, "A_INT8": a_int8, "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "EVEN_K": even_k, "USE_PDL": use_pdl, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
            "BLOCK_K": block_k or cfg.block_k, "GROUP_M": cfg.group_m, "BLOCK_E": _block_experts(num_experts),
            "PERSISTENT": persistent, "FLATTEN": persistent and cfg.flatten, "HALF_TAIL": splits_tail_tiles(cfg),
            "WEIGHTS_LEFT": cfg.weights_left, "FUSED_GATE_UP": cfg.fused_gate_up and gated,
            "HALF_TILE_COST": cfg.flat_tail_cost, "EXPERT_GROUPS": persistent and cfg.expert_groups}


@dataclass(frozen=True)
class ModelGemm:
    """One GEMM of a model shape at one token count, with the tile the heuristics give it on one arch."""

    arch: int
    dtype: torch.dtype
    label: str  # "qwen3-30b-a3b T=1"
    num_experts: int
    hidden: int
    inter: int
    gemm1: bool
    k: int
    tile: TileConfig


def model_gemms(dtypes, w_int8: bool = False, a_int8: bool = False):
    """Every (arch, dtype, MODEL_SHAPES x BENCH_TOKENS, GEMM1/GEMM2) with its heuristic tile: what check-build must compile."""
    for arch in SMEM_BY_ARCH:
        for dtype in dtypes:
            for name, (num_experts, top_k, hidden, inter) in MODEL_SHAPES.items():
                for tokens in BENCH_TOKENS:
                    for gemm1, n, k in ((True, inter, hidden), (False, hidden, inter)):
                        tile = gemm_tile_config(tokens * top_k, num_experts, n, k, dtype, arch, gated=gemm1, w_int8=w_int8,
                                                a_int8=a_int8)
                        yield ModelGemm(arch, dtype, f"{name} T={tokens}", num_experts, hidden, inter, gemm1, k, tile)


def pdl_modes(g: ModelGemm) -> tuple[bool, ...]:
    """Decode tiles on SM90 run either way (gemm_launches_early also looks at the weight bytes): check-build builds both."""
    return (False, True) if g.arch >= 90 and g.tile.block_m <= 64 else (False,)


def gemm_variant(kernel: str, mode: str, g: ModelGemm, tile: TileConfig, *, a_dtype=None, w_dtype=None, w_quant: int = 0,
                 group_size: int = 1, a_int8: bool = False, use_pdl: bool = False) -> tuple[tuple, KernelVariant]:
    """The check-build variant of the grouped GEMM for `g` with `tile` (GEMM1 with SwiGLU, GEMM2 with the router scale), and a
    key that is equal for variants that differ only in what the proof does not depend on. `use_pdl`: built as a programmatic
    launch (see `pdl_modes`)."""
    even_k = g.k % tile.block_k == 0
    signature, unit_strides = launch_signature(gemm_signature(a_dtype or g.dtype, w_dtype or g.dtype, g.dtype), w_quant)
    if w_quant:
        signature["w_scale_ptr"] = "*fp32"  # quantize_weights_int8's scales
    activation = ActivationType.Swiglu if g.gemm1 else ActivationType.Identity
    constexprs = {**unit_strides, **gemm_constexprs(tile, gather_a=g.gemm1, gated=g.gemm1 and ACTIVATIONS[activation].gated,
                                                    activation=int(activation), even_k=even_k, dtype=g.dtype,
                                                    num_experts=g.num_experts, apply_router_scale=not g.gemm1,
                                                    w_quant=w_quant, group_size=group_size, a_int8=a_int8,
                                                    use_pdl=use_pdl)}
    # BLOCK_E (from E) only sizes the tile prefix sum: one expert count stands for all in the proof.
    code = tuple((name, value) for name, value in constexprs.items() if name != "BLOCK_E")
    key = (kernel, g.arch, tuple(signature.items()), code, tile.num_warps, tile.num_stages)
    return key, KernelVariant(
        kernel=kernel,
        variant=f"{mode}gemm{1 if g.gemm1 else 2} {_TL_NAME[g.dtype]} {tile} even_k={int(even_k)}{' pdl' if use_pdl else ''}"
                f" ({g.label})",
        fn=_grouped_gemm_kernel,
        signature=signature,
        constexprs=constexprs,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
        # fp32 dots run in exact fp32 (input_precision="ieee", no TF32): FMA by design, no tensor cores.
        has_matrix_loop=g.dtype != torch.float32,
        archs=(g.arch,),
    )


@register_variants
def _grouped_gemm_variants():
    seen = {}
    for g in model_gemms((torch.float16, torch.bfloat16, torch.float32)):
        for use_pdl in pdl_modes(g):
            key, variant = gemm_variant(f"grouped_gemm{1 if g.gemm1 else 2}", "", g, g.tile, use_pdl=use_pdl)
            seen.setdefault(key, variant)
    return list(seen.values())
