"""W8A8 grouped GEMMs on SM90 in Gluon, with the warp specialisation written by hand:

- GEMM1 `inter[d, j] = act(gate, up)`, `gate = a_scale[t] * w_scale[e, g(j)] * (x_q[t] @ q_fc1[e, g(j)]) + b1[e, g(j)]` (up
  alike) for the dest rows d of expert e, t = token of d: A rows gathered from the quantised input;
- GEMM2 `out[d, n] = scale(d) * (a_scale[d] * w_scale[e, n] * (q_in[d] @ q_fc2[e, n]) + b2[e, n])`.

Why: the Triton kernels feed their int8 wgmma from a software pipeline that every warp runs, and on an H100 the TMA GEMM2's
tensor pipe was 34-40% busy with ~40% of the warps' stalls at the K loop's CTA barrier (NOTES v19). Triton 3.6's automatic warp
specialisation hung on that kernel (NOTES experiment 19). Gluon, Triton's lower-level language (shipped with it), lets the
partitions be written out. Both kernels share one plan:

- a producer keeps a ring of `STAGES` shared-memory slots filled, each slot an A tile (128 rows x 128 of K) and two weight
  boxes of 128 fc rows (GEMM2: the tile's 256 output columns; GEMM1: the gate and the up rows of its 128 output columns).
  Each slot has a `ready` mbarrier and an `empty` one (completed when both consumers have released the slot). GEMM2's producer
  is one warp (40 registers) issuing TMA copies. GEMM1's A rows are gathered, which a Hopper TMA box cannot do, so its
  producer is a warpgroup (56 registers): each thread copies 16-byte pieces of the gathered rows with cp.async and makes one
  `noinc` arrival on `ready` when they land, and one thread adds the TMA copies of the weight boxes;
- two consumer warpgroups take the top and the bottom 64 rows of each tile: per K step an async wgmma per weight box into two
  64 x 128 int32 accumulators (128 registers), then the epilogue of grouped_gemm.py (dequantise, bias, activation or router
  scale) and stores in 16-byte rows, while the producer already fills the ring for the next tile.

Outputs are bitwise equal to the Triton kernels' (int32 accumulation is exact; the epilogue is the same code, in the same
order). A consumer whose half of a tile lies past its expert's last row (a tail of <= 64 rows) skips its wgmmas, which gives
the other the tensor cores: half-height tails, as the Triton kernels have. H100, each GEMM alone in CUDA graphs with its table
launch, against the Triton kernel of the same tile (`gluon_gemms_h100.json`): T=4096, GEMM1 Qwen3-30B 284 vs 311 us,
DeepSeek-V2-Lite 347 vs 396, OLMoE 308 vs 363; GEMM2 172 vs 200, 170 vs 199, 170 vs 204; T=1024 0-9% faster
(`MIN_ROWS_PER_EXPERT`). 16-bit operands stay on Triton: the GEMM2 probe (`benchmarks/gluon_gemm2.py` at 5990dde) ran bf16 even
with the TMA kernel (245 vs 251, 281 vs 273 us), and this GEMM1 on bf16 (598eaee, `gluon_gemm1_bf16_h100.json`) lost at every
point, T=4096 495 vs 451, 595 vs 536, 562 vs 449: the Triton bf16 GEMM1 is bound by its L2 traffic (NOTES v19), not by the
latency that warp specialisation hides.

The tile schedule needs each row block's (first row, end row, expert). A small Triton kernel writes that table from
`expert_first_token_offset` (`_row_block_table_kernel`, with grouped_gemm.py's own lookup); a layer's two GEMMs share it. The
CPU interpreter does not run Gluon: the table kernel is tested there, the GEMMs on the GPU, and check-build compiles them for
sm_90.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._host import cdiv
from ._launch import launch
from ._variants import KernelVariant, register_variants
from .activations import ActivationType, apply_activation, load_activation_params
from .grouped_gemm import (_TL_NAME, _block_experts, dequantize_add_bias, expert_row_tiles, gate_rows, grouped_tile,
                           num_m_tiles_bound, row_block_owner, sm_count)

try:  # Gluon ships with Triton >= 3.5; without it the W8A8 GEMMs stay on the Triton kernels
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None

# The kernels' fixed tiles, the W8A8 prefill tiles the rules already pick on SM90 (grouped_gemm_tiles.gemm_tile_config): GEMM2
# 128 x 256 x 128, GEMM1 128 x (gate 128 + up 128) x 128; 4 stages of 48 KB. Consumers 232 registers and a one-warp producer
# at 40 (GEMM2), or 224 and a warpgroup at 56 (GEMM1): 4 + 4 + 4 warps at 168 a thread fill the 64K-register file (CUTLASS's
# SM90 warp-specialised GEMMs split it the same way).
BLOCK_M, BLOCK_K, WEIGHT_BOX, STAGES, GROUP_M = 128, 128, 128, 4, 8
GEMM2_BLOCK_N, GEMM1_BLOCK_N = 2 * WEIGHT_BOX, WEIGHT_BOX
KERNEL_MAXNREG = 168


@triton.jit
def _row_block_table_kernel(expert_first_token_offset_ptr, table_ptr, num_row_blocks_ptr, num_experts,
                            BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program m: row block m's (first dest row, its expert's end row, expert) as int32 [3], if it exists; program 0 also
    writes the real number of row blocks. The grid is the host-known bound (`num_m_tiles_bound`)."""
    pid_m = tl.program_id(0)
    experts, starts, ends, tiles, tiles_through, num_m_tiles = expert_row_tiles(expert_first_token_offset_ptr, num_experts,
                                                                                BLOCK_M, BLOCK_E)
    if pid_m == 0:
        tl.store(num_row_blocks_ptr, num_m_tiles)
    if pid_m < num_m_tiles:
        expert, row_start, row_end = row_block_owner(pid_m, experts, starts, ends, tiles, tiles_through, BLOCK_M)
        tl.store(table_ptr + 3 * pid_m, row_start.to(tl.int32))
        tl.store(table_ptr + 3 * pid_m + 1, row_end.to(tl.int32))
        tl.store(table_ptr + 3 * pid_m + 2, expert.to(tl.int32))


def row_block_table(expert_first_token_offset: torch.Tensor, num_rows: int, block_m: int = BLOCK_M):
    """`(table int32 [bound, 3], num_row_blocks int32 [1])` for row blocks of `block_m` rows (expert 0's first, then expert
    1's, ...); entries from `num_row_blocks` on are not written. One launch, no host sync."""
    num_experts = expert_first_token_offset.numel() - 1
    bound = num_m_tiles_bound(num_rows, num_experts, block_m)
    device = expert_first_token_offset.device
    table = torch.empty(bound, 3, dtype=torch.int32, device=device)
    num_row_blocks = torch.empty(1, dtype=torch.int32, device=device)
    launch(_row_block_table_kernel, (bound,), (expert_first_token_offset, table, num_row_blocks, num_experts), num_warps=1,
           BLOCK_M=block_m, BLOCK_E=_block_experts(num_experts))
    return table, num_row_blocks


if gluon is not None:

    @gluon.jit
    def _tile_loop_start(num_row_blocks_ptr, N, BLOCK_N: gl.constexpr):
        """What every partition's persistent tile loop starts from: (real row blocks, column blocks, ring slot 0, phase 0).
        All partitions walk tiles program_id, program_id + num_programs, ... in the same order, and the ring in step."""
        return gl.load(num_row_blocks_ptr), gl.cdiv(N, BLOCK_N), gl.to_tensor(0), gl.to_tensor(0)

    @gluon.jit
    def _row_block(row_block_table_ptr, pid_m):
        """Row block pid_m's (first dest row, its expert's end row, expert) from `row_block_table`."""
        entry = row_block_table_ptr + 3 * pid_m
        return gl.load(entry), gl.load(entry + 1), gl.load(entry + 2)

    @gluon.jit
    def _next_slot(slot, phase, STAGES: gl.constexpr):
        wrap = slot == STAGES - 1
        return gl.where(wrap, 0, slot + 1), gl.where(wrap, phase ^ 1, phase)

    @gluon.jit
    def _previous_slot(slot, STAGES: gl.constexpr):
        return gl.where(slot == 0, STAGES - 1, slot - 1)

    @gluon.jit
    def _copy_weight_boxes(w_desc, ready, w_slot, first_row, second_row, k):
        """TMA copies of the weight rows [first_row, +128) and [second_row, +128), K columns [k, +128), into the two halves
        of a ring slot, counted on `ready` (whose one expect, an arrival, the caller made for all of the slot's bytes);
        past the weights' last row or column TMA writes zeros."""
        BOX: gl.constexpr = w_desc.block_type.shape[0]
        tma.async_copy_global_to_shared(w_desc, [first_row, k], ready, w_slot.slice(0, BOX))
        tma.async_copy_global_to_shared(w_desc, [second_row, k], ready, w_slot.slice(BOX, BOX))

    @gluon.jit
    def _wgmma_k_loop(a_bufs, w_bufs, ready_bars, empty_bars, slot, phase, K, has_rows, HALF: gl.constexpr,
                      A_BY_CP_ASYNC: gl.constexpr):
        """One tile's K loop of consumer warpgroup HALF (0: rows 0..63 of the tile, 1: rows 64..127): its A rows times the
        slot's two weight boxes, into two 64 x 128 int32 accumulators. Returns them and where the ring stands.

        A consumer whose half of the tile lies past the expert's last row (`has_rows` false: a tail of <= 64 rows) runs no
        wgmma and only keeps the ring in step, so the other one has the SM's tensor cores to itself: the tail tile costs
        about half a tile, as the Triton kernels' half-height tails do."""
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        SUB_M: gl.constexpr = a_bufs.type.shape[1] // 2
        BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
        BOX: gl.constexpr = w_bufs.type.shape[1] // 2
        # wgmma's instruction is 16 rows x n x 32 bytes of K; for int8, n stops at 224, so each box is one of 128.
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BOX, 32])
        acc_first = gl.zeros([SUB_M, BOX], gl.int32, acc_layout)
        acc_second = gl.zeros([SUB_M, BOX], gl.int32, acc_layout)
        num_steps = gl.cdiv(K, BLOCK_K)
        mma_steps = gl.where(has_rows, num_steps, 0)
        for step in range(0, mma_steps):
            mbarrier.wait(ready_bars.index(slot), phase)
            if A_BY_CP_ASYNC:
                fence_async_shared()  # cp.async wrote A through the generic proxy; wgmma reads through the async one
            a = a_bufs.index(slot).slice(HALF * SUB_M, SUB_M)
            w = w_bufs.index(slot)
            acc_first = warpgroup_mma(a, w.slice(0, BOX).permute((1, 0)), acc_first, is_async=True)
            acc_second = warpgroup_mma(a, w.slice(BOX, BOX).permute((1, 0)), acc_second, is_async=True)
            # At most this step's wgmmas in flight: the previous step's slot is read, hand it back to the producer.
            # (That slot is computed, not kept in a variable: Triton 3.6 did not carry `previous = slot` through this
            # loop, so every release went to the slot the loop started with and the producer waited forever.)
            acc_first, acc_second = warpgroup_mma_wait(num_outstanding=2, deps=(acc_first, acc_second))
            mbarrier.arrive(empty_bars.index(_previous_slot(slot, STAGES)), pred=step > 0)
            slot, phase = _next_slot(slot, phase, STAGES)
        acc_first, acc_second = warpgroup_mma_wait(num_outstanding=0, deps=(acc_first, acc_second))
        mbarrier.arrive(empty_bars.index(_previous_slot(slot, STAGES)), pred=mma_steps > 0)
        # Without rows: release each slot once it is filled (waiting for `ready` keeps this consumer from releasing a slot
        # of a later pass of the ring before the other consumer has read this one).
        for step in range(mma_steps, num_steps):
            mbarrier.wait(ready_bars.index(slot), phase)
            mbarrier.arrive(empty_bars.index(slot))
            slot, phase = _next_slot(slot, phase, STAGES)
        return acc_first, acc_second, slot, phase

    @gluon.jit
    def _consume_tile(tile, num_m_tiles, num_pid_n, row_block_table_ptr, a_bufs, w_bufs, ready_bars, empty_bars, slot, phase,
                      K, HALF: gl.constexpr, GROUP_M: gl.constexpr, A_BY_CP_ASYNC: gl.constexpr):
        """A consumer's part of one tile: where it is (column block, row block's first and end rows, expert, whether this
        consumer's half has rows) and `_wgmma_k_loop`'s accumulators and ring position."""
        SUB_M: gl.constexpr = a_bufs.type.shape[1] // 2
        pid_m, pid_n = grouped_tile(tile, num_m_tiles, num_pid_n, GROUP_M)
        row_start, row_end, expert = _row_block(row_block_table_ptr, pid_m)
        has_rows = row_start + HALF * SUB_M < row_end
        acc_first, acc_second, slot, phase = _wgmma_k_loop(a_bufs, w_bufs, ready_bars, empty_bars, slot, phase, K, has_rows,
                                                           HALF, A_BY_CP_ASYNC)
        return pid_n, row_start, row_end, expert, has_rows, acc_first, acc_second, slot, phase

    @gluon.jit
    def _epilogue_rows(acc, row_start, row_end, HALF: gl.constexpr):
        """Consumer HALF's rows of a row block in the accumulator's layout: (its first row, the rows with those past the
        expert's end on the block's first row, so that loads need no mask)."""
        SUB_M: gl.constexpr = acc.shape[0]
        row0 = row_start + HALF * SUB_M
        rows = row0 + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, acc.type.layout))
        return row0, gl.where(rows < row_end, rows, row_start)

    @gluon.jit
    def _box_columns(acc, col0, N):
        """Columns col0 .. col0 + 127 of a weight box's accumulator in its layout, those past N on column 0."""
        BOX: gl.constexpr = acc.shape[1]
        cols = col0 + gl.arange(0, BOX, layout=gl.SliceLayout(0, acc.type.layout))
        return gl.where(cols < N, cols, 0)

    @gluon.jit
    def _store_box(out, c_ptr, row0, row_end, col0, N, stride_cm):
        """Stores a 64 x 128 fp32 tile at (row0, col0) in c's dtype, rows from row_end and columns from N masked: 8
        consecutive columns a thread (16 bytes) where the wgmma layout gives each thread pairs of columns (4-byte stores):
        GEMM2 alone at Qwen3-30B T=4096, W8A8, 168 vs 200 us (gluon_gemm2_split1_h100.json)."""
        SUB_M: gl.constexpr = out.shape[0]
        BOX: gl.constexpr = out.shape[1]
        store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        out = gl.convert_layout(out.to(c_ptr.dtype.element_ty), store_layout)
        rows = row0 + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, store_layout))
        cols = col0 + gl.arange(0, BOX, layout=gl.SliceLayout(0, store_layout))
        c_ptrs = c_ptr + gl.expand_dims(rows.to(gl.int64) * stride_cm, 1) + gl.expand_dims(cols, 0)
        gl.store(c_ptrs, out, mask=gl.expand_dims(rows < row_end, 1) & gl.expand_dims(cols < N, 0))

    @gluon.jit
    def _allocate_ring(w_desc, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, READY_ARRIVALS: gl.constexpr):
        """The ring: STAGES slots of an A tile (BLOCK_M rows) and two weight boxes (`w_desc`'s), int8, a `ready` mbarrier a
        slot expecting READY_ARRIVALS arrivals (plus the copies' bytes), an `empty` one expecting one release from each
        consumer warpgroup."""
        BOX: gl.constexpr = w_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.int8)
        a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, BLOCK_K], a_layout)
        w_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, 2 * BOX, BLOCK_K], w_desc.layout)
        ready_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready_bars.index(i), count=READY_ARRIVALS)
            mbarrier.init(empty_bars.index(i), count=2)
        return a_bufs, w_bufs, ready_bars, empty_bars

    # ---- GEMM2: the tile's own A rows (TMA), two boxes of output columns.

    @gluon.jit
    def _gemm2_load_partition(a_desc, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, row_block_table_ptr,
                              num_row_blocks_ptr, N, K, GROUP_M: gl.constexpr):
        """Producer warp: TMA copies of each tile's K steps into the ring, in the consumers' order."""
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BOX: gl.constexpr = w_desc.block_type.shape[0]
        num_m_tiles, num_pid_n, slot, phase = _tile_loop_start(num_row_blocks_ptr, N, 2 * BOX)
        for tile in range(gl.program_id(0), num_m_tiles * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = grouped_tile(tile, num_m_tiles, num_pid_n, GROUP_M)
            a_row, _, expert = _row_block(row_block_table_ptr, pid_m)
            w_row = expert * N + pid_n * 2 * BOX
            for k in range(0, K, BLOCK_K):
                # A fresh mbarrier counts as having completed the phase before phase 0: the first STAGES waits pass.
                mbarrier.wait(empty_bars.index(slot), phase ^ 1)
                ready = ready_bars.index(slot)
                mbarrier.expect(ready, a_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [a_row, k], ready, a_bufs.index(slot))
                _copy_weight_boxes(w_desc, ready, w_bufs.index(slot), w_row, w_row + BOX, k)
                slot, phase = _next_slot(slot, phase, STAGES)

    @gluon.jit
    def _gemm2_store_box(acc, col0, row0, row_end, row_safe, expert, router_scale, c_ptr, bias_ptr, a_scale_ptr,
                         w_scale_ptr, N, stride_cm, stride_bias_e, stride_wse, stride_wsn, HAS_BIAS: gl.constexpr,
                         APPLY_ROUTER_SCALE: gl.constexpr):
        """One box of GEMM2's epilogue, grouped_gemm.py's steps in their order: dequantise and bias, router scale, store."""
        out = dequantize_add_bias(acc, _box_columns(acc, col0, N), row_safe, expert, a_scale_ptr, w_scale_ptr, bias_ptr,
                                  stride_wse, stride_wsn, stride_bias_e, 1, True, HAS_BIAS)
        if APPLY_ROUTER_SCALE:
            out *= gl.expand_dims(router_scale, 1)
        _store_box(out, c_ptr, row0, row_end, col0, N, stride_cm)

    @gluon.jit
    def _gemm2_mma_partition(a_bufs, w_bufs, ready_bars, empty_bars, c_ptr, bias_ptr, row_block_table_ptr,
                             num_row_blocks_ptr, dest_to_source_ptr, router_scales_ptr, a_scale_ptr, w_scale_ptr, N, K,
                             num_tokens, top_k, stride_cm, stride_bias_e, stride_wse, stride_wsn, HALF: gl.constexpr,
                             HAS_BIAS: gl.constexpr, APPLY_ROUTER_SCALE: gl.constexpr, GROUP_M: gl.constexpr):
        """Consumer warpgroup HALF: the K loop, then the epilogue of both column boxes."""
        BLOCK_N: gl.constexpr = w_bufs.type.shape[1]
        num_m_tiles, num_pid_n, slot, phase = _tile_loop_start(num_row_blocks_ptr, N, BLOCK_N)
        for tile in range(gl.program_id(0), num_m_tiles * num_pid_n, gl.num_programs(0)):
            pid_n, row_start, row_end, expert, has_rows, acc_left, acc_right, slot, phase = _consume_tile(
                tile, num_m_tiles, num_pid_n, row_block_table_ptr, a_bufs, w_bufs, ready_bars, empty_bars, slot, phase, K,
                HALF, GROUP_M, False)
            if has_rows:
                row0, row_safe = _epilogue_rows(acc_left, row_start, row_end, HALF)
                router_scale = 1.0
                if APPLY_ROUTER_SCALE:
                    source_rows = gl.load(dest_to_source_ptr + row_safe)
                    token = source_rows % num_tokens
                    router_scale = gl.load(router_scales_ptr + token.to(gl.int64) * top_k + source_rows // num_tokens)
                col0 = pid_n * BLOCK_N
                _gemm2_store_box(acc_left, col0, row0, row_end, row_safe, expert, router_scale, c_ptr, bias_ptr,
                                 a_scale_ptr, w_scale_ptr, N, stride_cm, stride_bias_e, stride_wse, stride_wsn, HAS_BIAS,
                                 APPLY_ROUTER_SCALE)
                _gemm2_store_box(acc_right, col0 + BLOCK_N // 2, row0, row_end, row_safe, expert, router_scale, c_ptr,
                                 bias_ptr, a_scale_ptr, w_scale_ptr, N, stride_cm, stride_bias_e, stride_wse, stride_wsn,
                                 HAS_BIAS, APPLY_ROUTER_SCALE)

    @gluon.jit
    def _grouped_gemm2_w8a8_kernel(c_ptr, bias_ptr, row_block_table_ptr, num_row_blocks_ptr, dest_to_source_ptr,
                                   router_scales_ptr, a_scale_ptr, w_scale_ptr, a_desc, w_desc, N, K, num_tokens, top_k,
                                   stride_cm, stride_bias_e, stride_wse, stride_wsn, HAS_BIAS: gl.constexpr,
                                   APPLY_ROUTER_SCALE: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
        # `ready`: the producer's expects; the copies' bytes complete it.
        a_bufs, w_bufs, ready_bars, empty_bars = _allocate_ring(w_desc, a_desc.block_type.shape[0], STAGES, 1)
        # The default partition (this kernel's 4 warps) is the top consumer; the workers are the producer and the bottom one.
        gl.warp_specialize([
            (_gemm2_mma_partition, (a_bufs, w_bufs, ready_bars, empty_bars, c_ptr, bias_ptr, row_block_table_ptr,
                                    num_row_blocks_ptr, dest_to_source_ptr, router_scales_ptr, a_scale_ptr, w_scale_ptr, N,
                                    K, num_tokens, top_k, stride_cm, stride_bias_e, stride_wse, stride_wsn,
                                    gl.constexpr(0), HAS_BIAS, APPLY_ROUTER_SCALE, GROUP_M)),
            (_gemm2_load_partition, (a_desc, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, row_block_table_ptr,
                                     num_row_blocks_ptr, N, K, GROUP_M)),
            (_gemm2_mma_partition, (a_bufs, w_bufs, ready_bars, empty_bars, c_ptr, bias_ptr, row_block_table_ptr,
                                    num_row_blocks_ptr, dest_to_source_ptr, router_scales_ptr, a_scale_ptr, w_scale_ptr, N,
                                    K, num_tokens, top_k, stride_cm, stride_bias_e, stride_wse, stride_wsn,
                                    gl.constexpr(1), HAS_BIAS, APPLY_ROUTER_SCALE, GROUP_M)),
        ], [1, 4], [40, 232])

    # ---- GEMM1: A rows gathered through the routing map (cp.async), the gate and the up box of the same columns.

    @gluon.jit
    def _gemm1_gather_partition(a_ptr, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, row_block_table_ptr,
                                num_row_blocks_ptr, dest_to_source_ptr, num_tokens, stride_am, N, K, fc1_rows, gate_row0,
                                up_row0, EVEN_K: gl.constexpr, GROUP_M: gl.constexpr):
        """Producer warpgroup: per K step, cp.async copies of the tile's 128 gathered A rows (16 bytes a thread a copy,
        then one `noinc` arrival a thread on `ready` for when they land) and TMA copies of the gate and the up box."""
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        BLOCK_M: gl.constexpr = a_bufs.type.shape[1]
        BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        # 8 threads cover a 128-byte row in 16-byte pieces; 4 warps x 4 rows a warp = 16 rows a pass, 8 passes a tile.
        gather_layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
        tile_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, gather_layout))
        k_cols = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, gather_layout))
        num_m_tiles, num_pid_n, slot, phase = _tile_loop_start(num_row_blocks_ptr, N, BLOCK_N)
        for tile in range(gl.program_id(0), num_m_tiles * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = grouped_tile(tile, num_m_tiles, num_pid_n, GROUP_M)
            row_start, row_end, expert = _row_block(row_block_table_ptr, pid_m)
            rows = row_start + tile_rows
            # Rows past the expert's end copy its first row again (read, never stored), so the copies need no row mask.
            source_rows = gl.load(dest_to_source_ptr + gl.where(rows < row_end, rows, row_start))
            row_ptrs = (a_ptr + gl.expand_dims((source_rows % num_tokens).to(gl.int64) * stride_am, 1)
                        + gl.expand_dims(k_cols, 0))
            w_row = expert * fc1_rows + pid_n * BLOCK_N
            for k in range(0, K, BLOCK_K):
                mbarrier.wait(empty_bars.index(slot), phase ^ 1)
                ready = ready_bars.index(slot)
                if EVEN_K:
                    async_copy.async_copy_global_to_shared(a_bufs.index(slot), row_ptrs + k)
                else:  # the last K step's columns past K are copied as zeros (TMA zero-fills the weight boxes alike)
                    async_copy.async_copy_global_to_shared(a_bufs.index(slot), row_ptrs + k,
                                                           mask=gl.expand_dims(k_cols < K - k, 0))
                async_copy.mbarrier_arrive(ready, increment_count=False)
                mbarrier.expect(ready, 2 * w_desc.block_type.nbytes)
                _copy_weight_boxes(w_desc, ready, w_bufs.index(slot), w_row + gate_row0, w_row + up_row0, k)
                slot, phase = _next_slot(slot, phase, STAGES)

    @gluon.jit
    def _gemm1_mma_partition(a_bufs, w_bufs, ready_bars, empty_bars, c_ptr, bias_ptr, act_params_ptr, row_block_table_ptr,
                             num_row_blocks_ptr, dest_to_source_ptr, a_scale_ptr, w_scale_ptr, N, K, num_tokens, stride_cm,
                             stride_bias_e, stride_wse, stride_wsn, gate_row0, up_row0, HALF: gl.constexpr,
                             ACTIVATION: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_ACT_PARAMS: gl.constexpr,
                             GROUP_M: gl.constexpr):
        """Consumer warpgroup HALF: the gate and up K loop, then grouped_gemm.py's GEMM1 epilogue (dequantise and bias each
        half, the activation, store)."""
        BLOCK_N: gl.constexpr = w_bufs.type.shape[1] // 2
        num_m_tiles, num_pid_n, slot, phase = _tile_loop_start(num_row_blocks_ptr, N, BLOCK_N)
        for tile in range(gl.program_id(0), num_m_tiles * num_pid_n, gl.num_programs(0)):
            pid_n, row_start, row_end, expert, has_rows, acc_gate, acc_up, slot, phase = _consume_tile(
                tile, num_m_tiles, num_pid_n, row_block_table_ptr, a_bufs, w_bufs, ready_bars, empty_bars, slot, phase, K,
                HALF, GROUP_M, True)
            if has_rows:
                row0, row_safe = _epilogue_rows(acc_gate, row_start, row_end, HALF)
                tokens = (gl.load(dest_to_source_ptr + row_safe) % num_tokens).to(gl.int64)
                col0 = pid_n * BLOCK_N
                cols = _box_columns(acc_gate, col0, N)
                gate = dequantize_add_bias(acc_gate, gate_row0 + cols, tokens, expert, a_scale_ptr, w_scale_ptr, bias_ptr,
                                           stride_wse, stride_wsn, stride_bias_e, 1, True, HAS_BIAS)
                up = dequantize_add_bias(acc_up, up_row0 + cols, tokens, expert, a_scale_ptr, w_scale_ptr, bias_ptr,
                                         stride_wse, stride_wsn, stride_bias_e, 1, True, HAS_BIAS)
                p0, p1, p2 = load_activation_params(act_params_ptr, expert, HAS_ACT_PARAMS)
                _store_box(apply_activation(gate, up, p0, p1, p2, ACTIVATION), c_ptr, row0, row_end, col0, N, stride_cm)

    @gluon.jit
    def _grouped_gemm1_w8a8_kernel(c_ptr, a_ptr, bias_ptr, act_params_ptr, row_block_table_ptr, num_row_blocks_ptr,
                                   dest_to_source_ptr, a_scale_ptr, w_scale_ptr, w_desc, N, K, num_tokens, stride_am,
                                   stride_cm, fc1_rows, stride_bias_e, stride_wse, stride_wsn, gate_row0, up_row0,
                                   ACTIVATION: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_ACT_PARAMS: gl.constexpr,
                                   EVEN_K: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                                   GROUP_M: gl.constexpr):
        GATHER_WARPS: gl.constexpr = 4
        # `ready`: each producer thread's cp.async arrival, plus the expect of the weight boxes' bytes.
        a_bufs, w_bufs, ready_bars, empty_bars = _allocate_ring(w_desc, BLOCK_M, STAGES, GATHER_WARPS * 32 + 1)
        gl.warp_specialize([
            (_gemm1_mma_partition, (a_bufs, w_bufs, ready_bars, empty_bars, c_ptr, bias_ptr, act_params_ptr,
                                    row_block_table_ptr, num_row_blocks_ptr, dest_to_source_ptr, a_scale_ptr, w_scale_ptr,
                                    N, K, num_tokens, stride_cm, stride_bias_e, stride_wse, stride_wsn, gate_row0, up_row0,
                                    gl.constexpr(0), ACTIVATION, HAS_BIAS, HAS_ACT_PARAMS, GROUP_M)),
            (_gemm1_gather_partition, (a_ptr, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, row_block_table_ptr,
                                       num_row_blocks_ptr, dest_to_source_ptr, num_tokens, stride_am, N, K, fc1_rows,
                                       gate_row0, up_row0, EVEN_K, GROUP_M)),
            (_gemm1_mma_partition, (a_bufs, w_bufs, ready_bars, empty_bars, c_ptr, bias_ptr, act_params_ptr,
                                    row_block_table_ptr, num_row_blocks_ptr, dest_to_source_ptr, a_scale_ptr, w_scale_ptr,
                                    N, K, num_tokens, stride_cm, stride_bias_e, stride_wse, stride_wsn, gate_row0, up_row0,
                                    gl.constexpr(1), ACTIVATION, HAS_BIAS, HAS_ACT_PARAMS, GROUP_M)),
        ], [GATHER_WARPS, 4], [56, 224])


# Rows an expert (on average) from which these kernels run the W8A8 GEMMs: the fewest measured, where both won. H100, each
# GEMM alone in CUDA graphs, table launch included, against the Triton kernel of the same tile, bitwise equal
# (gluon_gemms_h100.json), T=1024 (64 / 96 / 128 rows an expert) and T=4096 (256 / 384 / 512):
#   GEMM1 Qwen3-30B 174 vs 179 and 284 vs 311 us, DeepSeek-V2-Lite 174 vs 190 and 347 vs 396, OLMoE 139 vs 148 and 308 vs 363;
#   GEMM2 109 vs 116 and 172 vs 200, 103 vs 103 and 170 vs 199, 88 vs 90 and 170 vs 204.
# (Before the consumers skipped a tile's empty half, both lost at T=1024 and the rule was 256: gluon_gemm2_graph_h100.json,
# gluon_gemm1_h100.json.) From 32 rows an expert down the rules pick smaller tiles; 32-63 was not measured.
MIN_ROWS_PER_EXPERT = 64

# GEMM1 activations that stay on Triton: GeGLU's erf spills 180 bytes in the 224-register consumers (ptxas, sm_90) and the
# kernel lost there: Qwen3-30B T=4096 329 vs 320 us (the run of gluon_gemms_h100.json, `--activation geglu`).
_SPILLING_ACTIVATIONS = (int(ActivationType.Geglu),)


def _runs_here(device: torch.device) -> bool:
    """Gluon installed and `device` an SM90 GPU (the hardware half of `takes_gluon`; tests replace it to check the rest)."""
    from .grouped_gemm import device_arch

    return gluon is not None and device.type == "cuda" and device_arch(device) == 90


def takes_gluon(cfg, a: torch.Tensor, weights: torch.Tensor, rows: int, *, gather_a: bool, gate_layout=None,
                activation=None) -> bool:
    """Whether a W8A8 GEMM (int8 A) runs here, on an SM90 GPU (wgmma and setmaxnreg are Hopper's; Blackwell's tensor cores
    are others) with Gluon installed, at MIN_ROWS_PER_EXPERT rows an expert or more, with the rules' W8A8 prefill tile:
    - GEMM2 (`gather_a` False): one that `grouped_gemm_tma.takes_tma` sent to the TMA kernel (so its operands are boxes
      TMA copies), tile 128 x 256 x 128;
    - GEMM1: tile 128 x 128 x 128 with gate and up in one program (`fused_gate_up`), the gate half of fc1 before or after
      the up half (GPT-OSS's interleaved rows stay on Triton), fc1 rows TMA can copy, input rows 16-byte aligned, and not
      GeGLU (`_SPILLING_ACTIVATIONS`)."""
    if not _runs_here(a.device) or a.dtype != torch.int8 or rows < MIN_ROWS_PER_EXPERT * weights.shape[0]:
        return False
    tile = (cfg.block_m, cfg.block_n, cfg.block_k)
    if not gather_a:
        return tile == (BLOCK_M, GEMM2_BLOCK_N, BLOCK_K)
    from .grouped_gemm_tma import _box_ready, weights_box_ready
    return (tile == (BLOCK_M, GEMM1_BLOCK_N, BLOCK_K) and cfg.fused_gate_up and gate_layout in ("gate_first", "up_first")
            and activation is not None and int(activation.kind) not in _SPILLING_ACTIVATIONS and _box_ready(a)
            and weights_box_ready(weights))


@functools.lru_cache(maxsize=None)
def _smem_layout(rows: int, cols: int):
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.int8)


def _descriptor(t: torch.Tensor, rows: int, cols: int):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    return TensorDescriptor.from_tensor(t, [rows, cols], _smem_layout(rows, cols))


def shared_row_block_table(maps, rows: int, tables: dict | None):
    """`row_block_table` of these maps' 128-row blocks, made once per `tables` (a dict the caller keeps for one set of maps,
    so that a layer's GEMM1 and GEMM2 share one launch) or, without it, now."""
    if tables is None:
        return row_block_table(maps.expert_first_token_offset, rows)
    if "row_blocks" not in tables:
        tables["row_blocks"] = row_block_table(maps.expert_first_token_offset, rows)
    return tables["row_blocks"]


def _grid(table: torch.Tensor, n_out: int, block_n: int, device) -> tuple:
    """Persistent: one program an SM, or one a tile of the host-known bound if that is fewer."""
    return (min(table.shape[0] * cdiv(n_out, block_n), sm_count(device)),)


def grouped_gemm2_w8a8_gluon(a, weights, out, maps, *, bias, router_scales, w_scale, a_scale, tables=None):
    """Launches W8A8 GEMM2 on the Gluon kernel (the caller checked `takes_gluon`); arguments as `grouped_gemm.grouped_gemm`'s
    (`a` int8 `[rows, K]` dest-row order, `weights` int8 `[E, N, K]`, per-channel `w_scale` `[E, N]`, `a_scale` `[rows]`),
    `tables` as `shared_row_block_table`'s."""
    rows, n_out = out.shape
    k = weights.shape[2]
    table, num_row_blocks = shared_row_block_table(maps, rows, tables)
    unused = maps.expert_first_token_offset
    launch(_grouped_gemm2_w8a8_kernel, _grid(table, n_out, GEMM2_BLOCK_N, a.device),
           (out, bias if bias is not None else unused, table, num_row_blocks, maps.expanded_dest_row_to_expanded_source_row,
            router_scales if router_scales is not None else unused, a_scale, w_scale,
            _descriptor(a, BLOCK_M, BLOCK_K), _descriptor(weights.view(-1, k), WEIGHT_BOX, BLOCK_K),
            n_out, k, maps.num_tokens, maps.top_k, out.stride(0), bias.stride(0) if bias is not None else 0,
            w_scale.stride(0), w_scale.stride(1)),
           num_warps=4, maxnreg=KERNEL_MAXNREG, HAS_BIAS=bias is not None, APPLY_ROUTER_SCALE=router_scales is not None,
           STAGES=STAGES, GROUP_M=GROUP_M)
    return out


def grouped_gemm1_w8a8_gluon(a, weights, out, maps, *, activation, gate_layout, bias, act_params, w_scale, a_scale,
                             tables=None):
    """Launches W8A8 GEMM1 on the Gluon kernel (the caller checked `takes_gluon`): `a` the int8 input `[T, K]` (gathered
    through the maps), `weights` int8 fc1 `[E, 2I, K]`, `out` `[rows, I]`, `a_scale` `[T]`, `w_scale` `[E, 2I]`; the rest as
    `grouped_gemm.grouped_gemm`'s, `tables` as `shared_row_block_table`'s."""
    rows, inter = out.shape
    _, fc1_rows, k = weights.shape
    table, num_row_blocks = shared_row_block_table(maps, rows, tables)
    gate_row0, up_row0, _ = gate_rows(gate_layout, inter)
    unused = maps.expert_first_token_offset
    launch(_grouped_gemm1_w8a8_kernel, _grid(table, inter, GEMM1_BLOCK_N, a.device),
           (out, a, bias if bias is not None else unused, act_params if act_params is not None else unused, table,
            num_row_blocks, maps.expanded_dest_row_to_expanded_source_row, a_scale, w_scale,
            _descriptor(weights.view(-1, k), WEIGHT_BOX, BLOCK_K), inter, k, maps.num_tokens, a.stride(0), out.stride(0),
            fc1_rows, bias.stride(0) if bias is not None else 0, w_scale.stride(0), w_scale.stride(1), gate_row0, up_row0),
           num_warps=4, maxnreg=KERNEL_MAXNREG, ACTIVATION=int(activation.kind), HAS_BIAS=bias is not None,
           HAS_ACT_PARAMS=act_params is not None, EVEN_K=k % BLOCK_K == 0, BLOCK_M=BLOCK_M, STAGES=STAGES,
           GROUP_M=GROUP_M)
    return out


# ---------------------------------------------------------------------------------------------------------------------------------
# check-build: the table kernel and the Gluon kernels for sm_90 (fp16 and bf16 output, with and without a bias; GEMM1 with
# every gated activation it takes, and a K that is not a multiple of 128).


def _gluon_variant(kernel: str, variant: str, fn, signature: dict, constexprs: dict) -> KernelVariant:
    return KernelVariant(kernel=kernel, variant=variant, fn=fn, signature=signature, constexprs=constexprs, num_warps=4,
                         num_stages=STAGES, has_matrix_loop=True, archs=(90,), maxnreg=KERNEL_MAXNREG)


def _int8_box_type(rows: int) -> str:
    return f"tensordesc<i8[{rows}, {BLOCK_K}],{_smem_layout(rows, BLOCK_K)!r}>"


def gemm2_variant(c_dtype: torch.dtype, has_bias: bool) -> KernelVariant:
    c = _TL_NAME[c_dtype]
    signature = {"c_ptr": f"*{c}", "bias_ptr": f"*{c}", "row_block_table_ptr": "*i32", "num_row_blocks_ptr": "*i32",
                 "dest_to_source_ptr": "*i32", "router_scales_ptr": "*fp32", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
                 "a_desc": _int8_box_type(BLOCK_M), "w_desc": _int8_box_type(WEIGHT_BOX),
                 "N": "i32:16", "K": "i32:16", "num_tokens": "i32", "top_k": "i32", "stride_cm": "i32:16",
                 "stride_bias_e": "i32:16", "stride_wse": "i32:16", "stride_wsn": "constexpr"}
    constexprs = {"stride_wsn": 1, "HAS_BIAS": has_bias, "APPLY_ROUTER_SCALE": True, "STAGES": STAGES, "GROUP_M": GROUP_M}
    return _gluon_variant("grouped_gemm2_w8a8_gluon", f"{c} out{' bias' if has_bias else ''}", _grouped_gemm2_w8a8_kernel,
                          signature, constexprs)


def gemm1_variant(c_dtype: torch.dtype, activation: int, has_bias: bool, has_act_params: bool,
                  even_k: bool) -> KernelVariant:
    c = _TL_NAME[c_dtype]
    signature = {"c_ptr": f"*{c}", "a_ptr": "*i8", "bias_ptr": f"*{c}", "act_params_ptr": "*fp32",
                 "row_block_table_ptr": "*i32", "num_row_blocks_ptr": "*i32", "dest_to_source_ptr": "*i32",
                 "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "w_desc": _int8_box_type(WEIGHT_BOX),
                 "N": "i32:16", "K": "i32:16", "num_tokens": "i32", "stride_am": "i32:16", "stride_cm": "i32:16",
                 "fc1_rows": "i32:16", "stride_bias_e": "i32:16", "stride_wse": "i32:16", "stride_wsn": "constexpr",
                 "gate_row0": "i32:16", "up_row0": "i32:16"}
    constexprs = {"stride_wsn": 1, "ACTIVATION": activation, "HAS_BIAS": has_bias, "HAS_ACT_PARAMS": has_act_params,
                  "EVEN_K": even_k, "BLOCK_M": BLOCK_M, "STAGES": STAGES, "GROUP_M": GROUP_M}
    variant = (f"{c} out act={activation}{' bias' if has_bias else ''}{' params' if has_act_params else ''}"
               f"{'' if even_k else ' K%128'}")
    return _gluon_variant("grouped_gemm1_w8a8_gluon", variant, _grouped_gemm1_w8a8_kernel, signature, constexprs)


@register_variants
def _gluon_variants():
    from .activations import ACTIVATIONS

    variants = [KernelVariant("row_block_table", f"BLOCK_E={block_e}", _row_block_table_kernel,
                              {"expert_first_token_offset_ptr": "*i64", "table_ptr": "*i32", "num_row_blocks_ptr": "*i32",
                               "num_experts": "i32"}, {"BLOCK_M": BLOCK_M, "BLOCK_E": block_e}, num_warps=1, num_stages=1,
                              archs=(90,))
                for block_e in sorted({_block_experts(e) for e in (8, 64, 128, 256)})]
    if gluon is None:
        return variants
    variants += [gemm2_variant(c, has_bias) for c in (torch.bfloat16, torch.float16) for has_bias in (False, True)]
    gated = [int(kind) for kind, act in ACTIVATIONS.items() if act.gated and int(kind) not in _SPILLING_ACTIVATIONS]
    variants += [gemm1_variant(torch.bfloat16, act, False, act in (5, 7, 10), True) for act in gated]
    variants += [gemm1_variant(torch.float16, 3, True, False, True), gemm1_variant(torch.bfloat16, 3, False, False, False)]
    return variants
