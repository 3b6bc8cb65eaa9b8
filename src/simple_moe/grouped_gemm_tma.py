"""Grouped GEMMs with TMA loads (SM90+): the kernels of grouped_gemm.py for the operands that are dense in memory.

GEMM2 (`out[d, n] = scale(d) * (intermediate[d] @ fc2[e].T + b2[e, n])`): its A rows are the intermediate in dest-row order,
so an expert's row block is `BLOCK_M` consecutive rows, and its weight tile is `BLOCK_N` consecutive rows of fc2 seen as
`[E * H, I]`: both tiles are boxes a tensor memory accelerator (TMA) descriptor can copy into shared memory. One thread issues
a box copy where the cp.async path has every thread compute and issue 16-byte copies, which frees the issue slots and
registers of the warps that run the tensor cores. A box may run past the expert's rows into the next expert's (they are
computed and not stored) or past the tensor (TMA fills zeros, so a K tail needs no mask).

Gated 16-bit GEMM1 with fused gate/up tiles: its A rows are gathered through the routing map, which TMA cannot do before
Blackwell, so they stay cp.async; its weight tile (each column's gate and up rows, alternating) is one box of a 4-D view of
fc1 (`fc1_pair_view`). W8A16 converts its weight tile in registers and stays on the cp.async kernel. The schedule
(device-side tile counts, persistent programs, half-height tails) and the epilogues are those of grouped_gemm.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._host import cdiv
from ._launch import launch
from ._variants import KernelVariant, register_variants
from .activations import ActivationType, apply_activation, load_activation_params
from .grouped_gemm import (_TL_NAME, TileConfig, _block_experts, device_arch, dequantize_add_bias, expert_row_tiles,
                           fused_pair_rows, gate_rows, model_gemms, num_m_tiles_bound, persistent_walks, row_block_owner,
                           scale_and_store_rows, sm_count, splits_tail_tiles, tile_coordinates, tile_rows_and_columns)


@triton.jit
def _grouped_gemm2_tma_kernel(
    c_ptr,  # [rows, N] in dest-row order
    bias_ptr,  # [E, N] or unused
    dest_to_source_ptr,  # int32 [rows]
    expert_first_token_offset_ptr,  # int64 [E+1]
    router_scales_ptr,  # float32 [T, top_k] or unused
    w_scale_ptr,  # W8A8: the weights' per-channel scales [E, N], or unused
    a_scale_ptr,  # W8A8: float32 per A row, or unused
    a_desc,  # the intermediate [rows, K], boxes of [BLOCK_M, BLOCK_K]
    a_half_desc,  # HALF_TAIL: the same tensor in boxes of [BLOCK_M // 2, BLOCK_K] (otherwise a_desc again, unused)
    w_desc,  # fc2 as [E * N, K], boxes of [BLOCK_N, BLOCK_K]
    num_tokens,
    N,
    K,
    num_experts,
    stride_cm,
    stride_bias_e,
    stride_wse,
    stride_wsn,
    top_k,
    HAS_BIAS: tl.constexpr,
    APPLY_ROUTER_SCALE: tl.constexpr,
    A_INT8: tl.constexpr,  # W8A8: int8 x int8 -> int32, dequantised with the row and channel scales
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    FLATTEN: tl.constexpr,  # one software pipeline across the tile loop (the next tile's copies overlap this epilogue)
    HALF_TAIL: tl.constexpr,  # an expert's tail of <= BLOCK_M/2 rows runs as a half-height tile (see tail_roles)
    HALF_TILE_COST: tl.constexpr,  # a half tile's time in % of a full one's (tail_roles; TileConfig.flat_tail_cost)
    EXPERT_GROUPS: tl.constexpr,  # row-block groups never straddle two experts (tile_coordinates)
):
    experts, starts, ends, tiles, tiles_through, num_m_tiles = expert_row_tiles(expert_first_token_offset_ptr, num_experts,
                                                                                BLOCK_M, BLOCK_E)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Persistent: a few programs per SM walk the real tiles (the grid is sized from host-known bounds). With half-height
    # tails, as grouped_gemm.py's flattened loop: two groups of programs walk the full-height row blocks and the tails.
    (first, step, runs_full, row_blocks, blocks, blocks_through, half_first, half_step, runs_half, num_half, half,
     half_through) = persistent_walks(starts, ends, num_m_tiles, tiles, tiles_through, num_pid_n, BLOCK_M, HALF_TAIL,
                                      HALF_TILE_COST)
    if runs_full:
        _tma_tile_loop(first, step, row_blocks, num_pid_n, experts, starts, ends, blocks, blocks_through,
                       c_ptr, bias_ptr, dest_to_source_ptr, router_scales_ptr, w_scale_ptr, a_scale_ptr, a_desc, w_desc,
                       num_tokens, N, K, stride_cm, stride_bias_e, stride_wse, stride_wsn, top_k,
                       HAS_BIAS, APPLY_ROUTER_SCALE, A_INT8, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EXPERT_GROUPS, FLATTEN)
    if HALF_TAIL:
        if runs_half:
            _tma_tile_loop(half_first, half_step, num_half, num_pid_n, experts, starts + blocks.to(tl.int64) * BLOCK_M,
                           ends, half, half_through, c_ptr, bias_ptr, dest_to_source_ptr, router_scales_ptr, w_scale_ptr,
                           a_scale_ptr, a_half_desc, w_desc, num_tokens, N, K, stride_cm, stride_bias_e, stride_wse,
                           stride_wsn, top_k, HAS_BIAS, APPLY_ROUTER_SCALE, A_INT8, BLOCK_M // 2, BLOCK_N, BLOCK_K,
                           GROUP_M, EXPERT_GROUPS, FLATTEN)


@triton.jit
def _tma_tile_loop(
    first_tile, step, num_m_tiles, num_pid_n, experts, starts, ends, tiles, tiles_through,
    c_ptr, bias_ptr, dest_to_source_ptr, router_scales_ptr, w_scale_ptr, a_scale_ptr, a_desc, w_desc,
    num_tokens, N, K, stride_cm, stride_bias_e, stride_wse, stride_wsn, top_k,
    HAS_BIAS: tl.constexpr, APPLY_ROUTER_SCALE: tl.constexpr, A_INT8: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EXPERT_GROUPS: tl.constexpr, FLATTEN: tl.constexpr,
):
    """Tiles first_tile, first_tile + step, ... of num_m_tiles row blocks of BLOCK_M rows (a_desc's box height, counted
    per expert by `tiles`) x num_pid_n column blocks: the TMA K loop and the epilogue of each."""
    acc_dtype = tl.int32 if A_INT8 else tl.float32
    for tile in tl.range(first_tile, num_m_tiles * num_pid_n, step, flatten=FLATTEN):
        pid_m, pid_n = tile_coordinates(tile, num_m_tiles, num_pid_n, tiles, tiles_through, GROUP_M, EXPERT_GROUPS)
        expert, row_start, row_end = row_block_owner(pid_m, experts, starts, ends, tiles, tiles_through, BLOCK_M)
        a_row = row_start.to(tl.int32)  # rows < 2^31: the launcher checks it
        w_row = expert * N + pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([a_row, k0])
            w = w_desc.load([w_row, k0])
            acc = tl.dot(a, w.T, acc, out_dtype=acc_dtype)

        # ---- epilogue (as grouped_gemm's): dequantise, bias, router scale, one masked store of this expert's rows.
        rows, row_mask, cols, col_mask, cols_safe = tile_rows_and_columns(row_start, row_end, pid_n, N, BLOCK_M, BLOCK_N)
        out = dequantize_add_bias(acc, cols_safe, rows, expert, a_scale_ptr, w_scale_ptr, bias_ptr, stride_wse, stride_wsn,
                                  stride_bias_e, 1 if A_INT8 else 0, A_INT8, HAS_BIAS)
        scale_and_store_rows(out, rows, row_mask, cols, col_mask, c_ptr, stride_cm, dest_to_source_ptr, router_scales_ptr,
                             num_tokens, top_k, APPLY_ROUTER_SCALE)


@triton.jit
def _grouped_gemm1_tma_kernel(
    a_ptr,  # the input [T, K]; rows gathered through dest_to_source
    c_ptr,  # the intermediate [rows, N] in dest-row order
    bias_ptr,  # [E, 2N] or unused
    act_params_ptr,  # float32 [E, 3] or unused
    dest_to_source_ptr,  # int32 [rows]
    expert_first_token_offset_ptr,  # int64 [E+1]
    w_desc,  # fc1 seen as [E, N, 2, K] (fc1_pair_view): a box is BLOCK_N columns' two rows, gate and up alternating
    num_tokens,
    N,
    K,
    num_experts,
    stride_am,
    stride_cm,
    stride_bias_e,
    w_first_row0,  # fc1 row of column 0's first pair row (the lower of the gate's and the up's first rows)
    w_second_row0,  # and of its second
    w_row_step,
    ACTIVATION: tl.constexpr,
    UP_FIRST: tl.constexpr,  # a pair's first row is the up row
    HAS_BIAS: tl.constexpr,
    HAS_ACT_PARAMS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    HALF_TAIL: tl.constexpr,
    HALF_TILE_COST: tl.constexpr,
    EXPERT_GROUPS: tl.constexpr,
):
    """Gated GEMM1 with fused gate/up tiles (grouped_gemm.py's FUSED_GATE_UP), persistent and flattened: the A rows gathered
    by cp.async as there, the weight tile one TMA box."""
    experts, starts, ends, tiles, tiles_through, num_m_tiles = expert_row_tiles(expert_first_token_offset_ptr, num_experts,
                                                                                BLOCK_M, BLOCK_E)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    (first, step, runs_full, row_blocks, blocks, blocks_through, half_first, half_step, runs_half, num_half, half,
     half_through) = persistent_walks(starts, ends, num_m_tiles, tiles, tiles_through, num_pid_n, BLOCK_M, HALF_TAIL,
                                      HALF_TILE_COST)
    if runs_full:
        _tma_gemm1_tile_loop(first, step, row_blocks, num_pid_n, experts, starts, ends, blocks, blocks_through,
                             a_ptr, c_ptr, bias_ptr, act_params_ptr, dest_to_source_ptr, w_desc, num_tokens, N, K,
                             stride_am, stride_cm, stride_bias_e, w_first_row0, w_second_row0, w_row_step,
                             ACTIVATION, UP_FIRST, HAS_BIAS, HAS_ACT_PARAMS, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                             EXPERT_GROUPS)
    if HALF_TAIL:
        if runs_half:
            _tma_gemm1_tile_loop(half_first, half_step, num_half, num_pid_n, experts, starts + blocks.to(tl.int64) * BLOCK_M,
                                 ends, half, half_through, a_ptr, c_ptr, bias_ptr, act_params_ptr, dest_to_source_ptr,
                                 w_desc, num_tokens, N, K, stride_am, stride_cm, stride_bias_e, w_first_row0,
                                 w_second_row0, w_row_step, ACTIVATION, UP_FIRST, HAS_BIAS, HAS_ACT_PARAMS, EVEN_K,
                                 BLOCK_M // 2, BLOCK_N, BLOCK_K, GROUP_M, EXPERT_GROUPS)


@triton.jit
def _tma_gemm1_tile_loop(
    first_tile, step, num_m_tiles, num_pid_n, experts, starts, ends, tiles, tiles_through,
    a_ptr, c_ptr, bias_ptr, act_params_ptr, dest_to_source_ptr, w_desc, num_tokens, N, K,
    stride_am, stride_cm, stride_bias_e, w_first_row0, w_second_row0, w_row_step,
    ACTIVATION: tl.constexpr, UP_FIRST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ACT_PARAMS: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EXPERT_GROUPS: tl.constexpr,
):
    """Tiles first_tile, first_tile + step, ... of num_m_tiles row blocks of BLOCK_M rows x num_pid_n column blocks of
    BLOCK_N output columns (2 x BLOCK_N weight rows): the gathered K loop and the activation epilogue of each."""
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(first_tile, num_m_tiles * num_pid_n, step, flatten=True):
        pid_m, pid_n = tile_coordinates(tile, num_m_tiles, num_pid_n, tiles, tiles_through, GROUP_M, EXPERT_GROUPS)
        expert, row_start, row_end = row_block_owner(pid_m, experts, starts, ends, tiles, tiles_through, BLOCK_M)
        rows, row_mask, cols, col_mask, cols_safe = tile_rows_and_columns(row_start, row_end, pid_n, N, BLOCK_M, BLOCK_N)
        a_rows = (tl.load(dest_to_source_ptr + rows) % num_tokens).to(tl.int64)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
        acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0)
            # [1, BLOCK_N, 2, BLOCK_K] -> [2 * BLOCK_N, BLOCK_K]: a view of the same shared memory, rows in pair order.
            w = w_desc.load([expert, pid_n * BLOCK_N, 0, k0]).reshape(2 * BLOCK_N, BLOCK_K)
            acc = tl.dot(a, w.T, acc)
            a_ptrs += BLOCK_K

        # ---- epilogue, as grouped_gemm.py's fused one: bias, split the pairs, activation, one store.
        pair_rows = fused_pair_rows(pid_n, N, w_first_row0, w_second_row0, w_row_step, BLOCK_N)
        out = dequantize_add_bias(acc, pair_rows, a_rows, expert, a_ptr, a_ptr, bias_ptr, 0, 0, stride_bias_e, 0, False,
                                  HAS_BIAS)
        first_half, second_half = tl.split(tl.reshape(out, [BLOCK_M, BLOCK_N, 2]))
        if UP_FIRST:
            gate, up = second_half, first_half
        else:
            gate, up = first_half, second_half
        p0, p1, p2 = load_activation_params(act_params_ptr, expert, HAS_ACT_PARAMS)
        out = apply_activation(gate, up, p0, p1, p2, ACTIVATION)
        scale_and_store_rows(out, rows, row_mask, cols, col_mask, c_ptr, stride_cm, dest_to_source_ptr, a_ptr,
                             num_tokens, 0, False)


def _box_ready(t: torch.Tensor) -> bool:
    """A 2-D tensor TMA can copy boxes of: innermost stride 1, base and row stride multiples of 16 bytes."""
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
            and t.shape[0] > 0 and t.shape[1] > 0)


def weights_box_ready(weights: torch.Tensor) -> bool:
    """`[E, N, K]` weights whose rows TMA can copy as one `[E*N, K]` matrix (32-bit row coordinates)."""
    return (weights.shape[0] * weights.shape[1] < 2**31 and weights.stride(2) == 1
            and weights.stride(0) == weights.shape[1] * weights.stride(1) and _box_ready(weights.view(-1, weights.shape[2])))


def fc1_pair_view(weights: torch.Tensor, gate_layout: str) -> tuple[torch.Tensor, list[int], list[int], int, int, int]:
    """Gated fc1 `[E, 2N, K]` seen as `[E, N, 2, K]`: element (e, j, s, k) is pair row s (0: the lower of column j's gate and
    up rows, 1: the higher) of column j. A TMA box [1, BLOCK_N, 2, BLOCK_K] of it lands in shared memory as the fused
    tile's 2 x BLOCK_N rows, gate and up alternating, whatever the layout (gate-first, up-first, interleaved): no weight is
    copied. Returns (base tensor, shape, strides, first pair row 0, second pair row 0, row step)."""
    n_out = weights.shape[1] // 2
    gate_row0, up_row0, row_step = gate_rows(gate_layout, n_out)
    first, second = min(gate_row0, up_row0), max(gate_row0, up_row0)
    base = weights[:, first:]
    shape = [weights.shape[0], n_out, 2, weights.shape[2]]
    strides = [weights.stride(0), row_step * weights.stride(1), (second - first) * weights.stride(1), weights.stride(2)]
    return base, shape, strides, first, second, row_step


def _pair_view_ready(weights: torch.Tensor, gate_layout: str) -> bool:
    """Whether TMA can copy boxes of `fc1_pair_view` (innermost stride 1, the rest and the base multiples of 16 bytes)."""
    base, _, strides, _, _, _ = fc1_pair_view(weights, gate_layout)
    return (strides[-1] == 1 and base.data_ptr() % 16 == 0 and weights.shape[0] * weights.shape[1] < 2**31
            and all(stride * weights.element_size() % 16 == 0 for stride in strides[:-1]))


def takes_tma(cfg: TileConfig, a: torch.Tensor, weights: torch.Tensor, *, gather_a: bool, gated: bool, w_quant: int,
              a_int8: bool, gate_layout: str = "gate_first") -> bool:
    """Whether this GEMM runs on a TMA kernel: the tile asks for it (`TileConfig.tma`, persistent) on an SM90+ GPU (or the
    interpreter, which tests it), and its dense operands are boxes TMA can copy: GEMM2 in 16-bit or W8A8 (both operands), or
    16-bit gated GEMM1 with fused gate/up tiles in one flattened loop (the weights; its A rows stay gathered by cp.async).
    Otherwise the cp.async kernel runs the same tile."""
    if not cfg.tma or not cfg.programs_per_sm:
        return False
    if a.dtype not in (torch.float16, torch.bfloat16, torch.int8):
        return False  # fp32 GEMMs run exact fp32 dots on the FMA units: no tensor-core pipeline to feed
    if a.device.type == "cuda" and device_arch(a.device) < 90:
        return False
    if gather_a:
        return (gated and cfg.fused_gate_up and cfg.flatten and w_quant == 0 and not a_int8 and a.stride(1) == 1
                and _pair_view_ready(weights, gate_layout))
    if gated or w_quant not in ((1,) if a_int8 else (0,)):
        return False  # the GEMM2 kernel takes, of int8 weights, only W8A8's per-channel scales
    return a.shape[0] < 2**31 and _box_ready(a) and weights_box_ready(weights)  # TMA coordinates are 32-bit


def tma_splits_tails(cfg: TileConfig) -> bool:
    """Whether this kernel runs tails of <= BLOCK_M/2 rows as half-height tiles. It only has the two groups of programs of
    tail_roles, which need a split (`TileConfig.flat_tail_cost`); without one its tails stay full height. (Taking
    `splits_tail_tiles` alone left one program walking every tail of the not-flattened W8A8 tile: Mixtral's W8A8 GEMM2 at
    T=1024 ran ~4x slower in the H100 bench of d38195b.)"""
    return cfg.flat_tail_cost > 0 and splits_tail_tiles(cfg)


def _tma_constexprs(cfg: TileConfig, num_experts: int, *, has_bias: bool, apply_router_scale: bool, a_int8: bool) -> dict:
    """The kernel's constexprs in its signature's order (the direct launch passes them in this order), in one place for the
    launcher and check-build."""
    return {"HAS_BIAS": has_bias, "APPLY_ROUTER_SCALE": apply_router_scale, "A_INT8": a_int8, "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, "BLOCK_E": _block_experts(num_experts),
            "FLATTEN": cfg.flatten, "HALF_TAIL": tma_splits_tails(cfg), "HALF_TILE_COST": cfg.flat_tail_cost,
            "EXPERT_GROUPS": cfg.expert_groups}


def grouped_gemm2_tma(a, weights, out, maps, *, bias, router_scales, w_scale, a_scale, cfg: TileConfig):
    """Launches GEMM2 on the TMA kernel (the caller checked `takes_tma`); arguments as `grouped_gemm.grouped_gemm`'s."""
    rows, n_out = out.shape
    num_experts, _, k = weights.shape
    a_desc = TensorDescriptor.from_tensor(a, [cfg.block_m, cfg.block_k])
    half_tail = tma_splits_tails(cfg)
    a_half_desc = TensorDescriptor.from_tensor(a, [cfg.block_m // 2, cfg.block_k]) if half_tail else a_desc
    w_desc = TensorDescriptor.from_tensor(weights.view(-1, k), [cfg.block_n, cfg.block_k])
    num_tiles = num_m_tiles_bound(rows, num_experts, cfg.block_m) * cdiv(n_out, cfg.block_n)
    unused = maps.expert_first_token_offset
    launch(
        _grouped_gemm2_tma_kernel,
        (min(num_tiles, cfg.programs_per_sm * sm_count(a.device)),),
        (out, bias if bias is not None else unused, maps.expanded_dest_row_to_expanded_source_row,
         maps.expert_first_token_offset, router_scales if router_scales is not None else unused,
         w_scale if w_scale is not None else unused, a_scale if a_scale is not None else unused,
         a_desc, a_half_desc, w_desc,
         maps.num_tokens, n_out, k, num_experts, out.stride(0),
         bias.stride(0) if bias is not None else 0,
         w_scale.stride(0) if w_scale is not None else 0,
         w_scale.stride(1) if w_scale is not None else 0,
         maps.top_k),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **_tma_constexprs(cfg, num_experts, has_bias=bias is not None, apply_router_scale=router_scales is not None,
                          a_int8=a_scale is not None),
    )
    return out


def _tma_gemm1_constexprs(cfg: TileConfig, num_experts: int, *, activation: int, up_first: bool, has_bias: bool,
                          has_act_params: bool, even_k: bool) -> dict:
    """`_grouped_gemm1_tma_kernel`'s constexprs in its signature's order, for the launcher and check-build."""
    return {"ACTIVATION": activation, "UP_FIRST": up_first, "HAS_BIAS": has_bias, "HAS_ACT_PARAMS": has_act_params,
            "EVEN_K": even_k, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
            "GROUP_M": cfg.group_m, "BLOCK_E": _block_experts(num_experts), "HALF_TAIL": tma_splits_tails(cfg),
            "HALF_TILE_COST": cfg.flat_tail_cost, "EXPERT_GROUPS": cfg.expert_groups}


def grouped_gemm1_tma(a, weights, out, maps, *, activation, gate_layout: str, bias, act_params, cfg: TileConfig):
    """Launches gated GEMM1 on the TMA-weights kernel (the caller checked `takes_tma`); arguments as
    `grouped_gemm.grouped_gemm`'s."""
    rows, n_out = out.shape
    num_experts, _, k = weights.shape
    base, shape, strides, first_row0, second_row0, row_step = fc1_pair_view(weights, gate_layout)
    w_desc = TensorDescriptor(base, shape, strides, [1, cfg.block_n, 2, cfg.block_k])
    num_tiles = num_m_tiles_bound(rows, num_experts, cfg.block_m) * cdiv(n_out, cfg.block_n)
    unused = maps.expert_first_token_offset
    gate_row0, up_row0, _ = gate_rows(gate_layout, n_out)
    launch(
        _grouped_gemm1_tma_kernel,
        (min(num_tiles, cfg.programs_per_sm * sm_count(a.device)),),
        (a, out, bias if bias is not None else unused, act_params if act_params is not None else unused,
         maps.expanded_dest_row_to_expanded_source_row, maps.expert_first_token_offset, w_desc,
         maps.num_tokens, n_out, k, num_experts, a.stride(0), out.stride(0), bias.stride(0) if bias is not None else 0,
         first_row0, second_row0, row_step),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **_tma_gemm1_constexprs(cfg, num_experts, activation=int(activation.kind), up_first=up_row0 < gate_row0,
                                has_bias=bias is not None, has_act_params=act_params is not None,
                                even_k=k % cfg.block_k == 0),
    )
    return out


# ---------------------------------------------------------------------------------------------------------------------------------
# check-build: the TMA tiles the rules pick for the model shapes (SM90), 16-bit and W8A8.


def tma_variant(g, *, a_int8: bool) -> tuple[tuple, KernelVariant]:
    """The check-build variant of the TMA GEMM2 for `g` (a `grouped_gemm.ModelGemm` whose tile has `tma`), with the router
    scale, as a launch from the pipeline specialises it."""
    tile, c = g.tile, _TL_NAME[g.dtype]
    a = "i8" if a_int8 else c
    half_tail = tma_splits_tails(tile)
    signature = {"c_ptr": f"*{c}", "bias_ptr": f"*{c}", "dest_to_source_ptr": "*i32",
                 "expert_first_token_offset_ptr": "*i64", "router_scales_ptr": "*fp32", "w_scale_ptr": "*fp32",
                 "a_scale_ptr": "*fp32", "a_desc": f"tensordesc<{a}[{tile.block_m}, {tile.block_k}]>",
                 "a_half_desc": f"tensordesc<{a}[{tile.block_m // 2 if half_tail else tile.block_m}, {tile.block_k}]>",
                 "w_desc": f"tensordesc<{a}[{tile.block_n}, {tile.block_k}]>", "num_tokens": "i32", "N": "i32:16",
                 "K": "i32:16", "num_experts": "i32", "stride_cm": "i32:16", "stride_bias_e": "i32:16",
                 "stride_wse": "i32:16", "stride_wsn": "constexpr" if a_int8 else "i32:16", "top_k": "i32"}
    # Unused strides are 0 (a multiple of 16 to Triton); W8A8's per-channel scales have a unit stride, a constant at launch.
    constexprs = {**({"stride_wsn": 1} if a_int8 else {}),
                  **_tma_constexprs(tile, g.num_experts, has_bias=False, apply_router_scale=True, a_int8=a_int8)}
    key = ("grouped_gemm2_tma", g.arch, tuple(signature.items()), tuple(constexprs.items()), tile.num_warps, tile.num_stages)
    return key, KernelVariant(kernel="grouped_gemm2_tma", variant=f"{'w8a8 ' if a_int8 else ''}{c} {tile} ({g.label})",
                              fn=_grouped_gemm2_tma_kernel, signature=signature, constexprs=constexprs,
                              num_warps=tile.num_warps, num_stages=tile.num_stages, has_matrix_loop=True, archs=(g.arch,))


def tma_gemm1_variant(g) -> tuple[tuple, KernelVariant]:
    """The check-build variant of the TMA-weights GEMM1 for `g` (16-bit, its tile with `tma`), SwiGLU on gate-first fc1
    (the row step 1 and K % 16 == 0 become what Triton's JIT specialises them to)."""
    tile, c = g.tile, _TL_NAME[g.dtype]
    signature = {"a_ptr": f"*{c}", "c_ptr": f"*{c}", "bias_ptr": f"*{c}", "act_params_ptr": "*fp32",
                 "dest_to_source_ptr": "*i32", "expert_first_token_offset_ptr": "*i64",
                 "w_desc": f"tensordesc<{c}[1, {tile.block_n}, 2, {tile.block_k}]>", "num_tokens": "i32", "N": "i32:16",
                 "K": "i32:16", "num_experts": "i32", "stride_am": "i32:16", "stride_cm": "i32:16",
                 "stride_bias_e": "i32:16", "w_first_row0": "i32", "w_second_row0": "i32:16", "w_row_step": "constexpr"}
    constexprs = {"w_row_step": 1, **_tma_gemm1_constexprs(tile, g.num_experts, activation=int(ActivationType.Swiglu),
                                                           up_first=False, has_bias=False, has_act_params=False,
                                                           even_k=g.k % tile.block_k == 0)}
    key = ("grouped_gemm1_tma", g.arch, tuple(signature.items()), tuple(constexprs.items()), tile.num_warps,
           tile.num_stages)
    return key, KernelVariant(kernel="grouped_gemm1_tma", variant=f"{c} {tile} ({g.label})", fn=_grouped_gemm1_tma_kernel,
                              signature=signature, constexprs=constexprs, num_warps=tile.num_warps,
                              num_stages=tile.num_stages, has_matrix_loop=True, archs=(g.arch,))


@register_variants
def _tma_variants():
    seen = {}
    gemms = [(g, False) for g in model_gemms((torch.float16, torch.bfloat16))]
    gemms += [(g, True) for g in model_gemms((torch.bfloat16,), w_int8=True, a_int8=True)]
    for g, a_int8 in gemms:
        if g.tile.tma and g.tile.programs_per_sm and g.arch >= 90:
            if not g.gemm1:
                key, variant = tma_variant(g, a_int8=a_int8)
            elif not a_int8 and g.tile.fused_gate_up and g.tile.flatten:
                key, variant = tma_gemm1_variant(g)
            else:
                continue
            seen.setdefault(key, variant)
    return list(seen.values())
