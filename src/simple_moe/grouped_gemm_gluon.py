"""W8A8 GEMM2 on SM90 in Gluon: `out[d, n] = scale(d) * (a_scale[d] * w_scale[e, n] * (q_in[d] @ q_fc2[e].T) + b2[e, n])`,
with the warp specialisation written by hand.

The TMA kernel (grouped_gemm_tma.py) feeds its int8 wgmma from a software pipeline that every warp runs, and on an H100 its
tensor pipe was 34-40% busy with ~40% of the warps' stalls at the K loop's CTA barrier (NOTES v19). Triton 3.6's automatic
warp specialisation hung on this kernel (NOTES experiment 19). Gluon, Triton's lower-level language (shipped with it), lets the
partitions be written out:

- a producer warp (40 registers) walks this program's tiles and keeps a ring of `STAGES` shared-memory slots filled with TMA
  copies of the A rows and the weight rows; each slot has a `ready` mbarrier (completed by the copies' bytes) and an `empty`
  one (completed when both consumers have released the slot);
- two consumer warpgroups (232 registers each: a 64 x 256 int32 accumulator is 128 of them) take the top and the bottom 64
  rows of each 128-row tile. Each waits on `ready`, issues an async wgmma, retires the previous one and releases its slot,
  then runs the epilogue of grouped_gemm.py (row and channel scales, bias, router scale) and stores through shared memory in
  16-byte rows, while the producer already fills the ring for the next tile.

Outputs are bitwise equal to the TMA kernel's (int32 accumulation, the same epilogue arithmetic). H100, GEMM2 alone in CUDA
graphs (`gluon_gemm2_graph_h100.json`): T=4096 Qwen3-30B 189 vs 198 us, DeepSeek-V2-Lite 181 vs 198, OLMoE 184 vs 205; at
T=1024 it lost 2-5% (`MIN_ROWS_PER_EXPERT`). The probe it came from (`benchmarks/gluon_gemm2.py` at 5990dde) ran the same
kernel on bf16 operands even with the TMA kernel (245 vs 251, 281 vs 273 us), so 16-bit GEMM2 stays there.

The tile schedule needs each row block's (first row, end row, expert). A small Triton kernel writes that table from
`expert_first_token_offset` (`_row_block_table_kernel`, with grouped_gemm.py's own lookup), and the Gluon kernel reads three
integers a tile. The CPU interpreter does not run Gluon: the table kernel is tested there, the GEMM on the GPU, and
check-build compiles it for sm_90.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._host import cdiv
from ._launch import launch
from ._variants import KernelVariant, register_variants
from .grouped_gemm import (_TL_NAME, _block_experts, expert_row_tiles, grouped_tile, num_m_tiles_bound, row_block_owner,
                           sm_count)

try:  # Gluon ships with Triton >= 3.5; without it W8A8 GEMM2 stays on the TMA kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
except ImportError:  # pragma: no cover - depends on the installed Triton
    gluon = None

# The kernel's fixed tile: the W8A8 GEMM2 tile the rules already pick from ~1K rows (grouped_gemm.gemm_tile_config:
# 128 x 256 x 128, 4 stages; 4 x 48 KB of ring). Consumers 232 registers, the producer 40: 4 + 1 (+3 idle) + 4 warps at 168 a
# thread fill the 64K-register file (CUTLASS's SM90 warp-specialised GEMMs split it the same way).
BLOCK_M, BLOCK_N, BLOCK_K, STAGES, GROUP_M = 128, 256, 128, 4, 8
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


def row_block_table(expert_first_token_offset: torch.Tensor, num_rows: int, block_m: int):
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
    def _load_partition(a_desc, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, row_block_table_ptr, num_row_blocks_ptr,
                        N, K, GROUP_M: gl.constexpr):
        """Producer: TMA copies of each tile's K steps into the ring, in the consumers' order."""
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        num_m_tiles, num_pid_n, slot, phase = _tile_loop_start(num_row_blocks_ptr, N, BLOCK_N)
        for tile in range(gl.program_id(0), num_m_tiles * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = grouped_tile(tile, num_m_tiles, num_pid_n, GROUP_M)
            a_row, _, expert = _row_block(row_block_table_ptr, pid_m)
            w_row = expert * N + pid_n * BLOCK_N
            for k in range(0, K, BLOCK_K):
                # A fresh mbarrier counts as having completed the phase before phase 0: the first STAGES waits pass.
                mbarrier.wait(empty_bars.index(slot), phase ^ 1)
                ready = ready_bars.index(slot)
                mbarrier.expect(ready, a_desc.block_type.nbytes + w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [a_row, k], ready, a_bufs.index(slot))
                tma.async_copy_global_to_shared(w_desc, [w_row, k], ready, w_bufs.index(slot))
                slot, phase = _next_slot(slot, phase, STAGES)

    @gluon.jit
    def _mma_partition(a_bufs, w_bufs, ready_bars, empty_bars, c_ptr, bias_ptr, row_block_table_ptr, num_row_blocks_ptr,
                       dest_to_source_ptr, router_scales_ptr, a_scale_ptr, w_scale_ptr, N, K, num_tokens, top_k, stride_cm,
                       stride_bias_e, stride_wse, stride_wsn, HALF: gl.constexpr, HAS_BIAS: gl.constexpr,
                       APPLY_ROUTER_SCALE: gl.constexpr, GROUP_M: gl.constexpr):
        """Consumer warpgroup HALF (0: rows 0..63 of each tile, 1: rows 64..127): the wgmma K loop, then the epilogue."""
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        SUB_M: gl.constexpr = a_bufs.type.shape[1] // 2
        BLOCK_N: gl.constexpr = w_bufs.type.shape[1]
        BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
        # wgmma's instruction is 16 rows x n x 32 bytes of K; for int8, n stops at 224, so a 256-wide tile takes two of 128.
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32])
        # Stores: 8 consecutive columns a thread (16 bytes), where the wgmma layout gives each thread pairs of columns
        # (4-byte stores): GEMM2 alone at Qwen3-30B T=4096, W8A8, 168 vs 200 us (gluon_gemm2_split1_h100.json).
        store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
        num_m_tiles, num_pid_n, slot, phase = _tile_loop_start(num_row_blocks_ptr, N, BLOCK_N)
        for tile in range(gl.program_id(0), num_m_tiles * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = grouped_tile(tile, num_m_tiles, num_pid_n, GROUP_M)
            acc = gl.zeros([SUB_M, BLOCK_N], gl.int32, acc_layout)
            for k in range(0, K, BLOCK_K):
                mbarrier.wait(ready_bars.index(slot), phase)
                a = a_bufs.index(slot).slice(HALF * SUB_M, SUB_M)
                acc = warpgroup_mma(a, w_bufs.index(slot).permute((1, 0)), acc, is_async=True)
                # At most this step's wgmma in flight: the previous step's slot is read, hand it back to the producer.
                # (That slot is computed, not kept in a variable: Triton 3.6 did not carry `previous = slot` through this
                # loop, so every release went to the slot the loop started with and the producer waited forever.)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                mbarrier.arrive(empty_bars.index(_previous_slot(slot, STAGES)), pred=k > 0)
                slot, phase = _next_slot(slot, phase, STAGES)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty_bars.index(_previous_slot(slot, STAGES)))

            # ---- epilogue (grouped_gemm.dequantize_add_bias and scale_and_store_rows, in this order of operations).
            row_start, row_end, expert = _row_block(row_block_table_ptr, pid_m)
            expert = expert.to(gl.int64)
            rows = row_start + HALF * SUB_M + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, acc_layout))
            cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
            row_mask = rows < row_end
            col_mask = cols < N
            cols_safe = gl.where(col_mask, cols, 0)
            out = acc.to(gl.float32)
            out *= gl.expand_dims(gl.load(a_scale_ptr + rows, mask=row_mask, other=0.0).to(gl.float32), 1)
            out *= gl.expand_dims(gl.load(w_scale_ptr + expert * stride_wse + cols_safe * stride_wsn).to(gl.float32), 0)
            if HAS_BIAS:
                out += gl.expand_dims(gl.load(bias_ptr + expert * stride_bias_e + cols_safe).to(gl.float32), 0)
            if APPLY_ROUTER_SCALE:
                source_rows = gl.load(dest_to_source_ptr + rows, mask=row_mask, other=0)
                token = source_rows % num_tokens
                k_slot = source_rows // num_tokens
                out *= gl.expand_dims(gl.load(router_scales_ptr + token.to(gl.int64) * top_k + k_slot, mask=row_mask,
                                              other=0.0), 1)
            out = gl.convert_layout(out.to(c_ptr.dtype.element_ty), store_layout)
            rows = row_start + HALF * SUB_M + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, store_layout))
            cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, store_layout))
            c_ptrs = c_ptr + gl.expand_dims(rows.to(gl.int64) * stride_cm, 1) + gl.expand_dims(cols, 0)
            gl.store(c_ptrs, out, mask=gl.expand_dims(rows < row_end, 1) & gl.expand_dims(cols < N, 0))

    @gluon.jit
    def _grouped_gemm2_w8a8_kernel(c_ptr, bias_ptr, row_block_table_ptr, num_row_blocks_ptr, dest_to_source_ptr,
                                   router_scales_ptr, a_scale_ptr, w_scale_ptr, a_desc, w_desc, N, K, num_tokens, top_k,
                                   stride_cm, stride_bias_e, stride_wse, stride_wsn, HAS_BIAS: gl.constexpr,
                                   APPLY_ROUTER_SCALE: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        ready_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready_bars.index(i), count=1)  # the producer's expect; the copies' bytes complete it
            mbarrier.init(empty_bars.index(i), count=2)  # one release per consumer warpgroup
        # The default partition (this kernel's 4 warps) is the top consumer; the workers are the producer and the bottom one.
        gl.warp_specialize([
            (_mma_partition, (a_bufs, w_bufs, ready_bars, empty_bars, c_ptr, bias_ptr, row_block_table_ptr,
                              num_row_blocks_ptr, dest_to_source_ptr, router_scales_ptr, a_scale_ptr, w_scale_ptr, N, K,
                              num_tokens, top_k, stride_cm, stride_bias_e, stride_wse, stride_wsn, gl.constexpr(0),
                              HAS_BIAS, APPLY_ROUTER_SCALE, GROUP_M)),
            (_load_partition, (a_desc, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, row_block_table_ptr,
                               num_row_blocks_ptr, N, K, GROUP_M)),
            (_mma_partition, (a_bufs, w_bufs, ready_bars, empty_bars, c_ptr, bias_ptr, row_block_table_ptr,
                              num_row_blocks_ptr, dest_to_source_ptr, router_scales_ptr, a_scale_ptr, w_scale_ptr, N, K,
                              num_tokens, top_k, stride_cm, stride_bias_e, stride_wse, stride_wsn, gl.constexpr(1),
                              HAS_BIAS, APPLY_ROUTER_SCALE, GROUP_M)),
        ], [1, 4], [40, 232])


# Rows an expert (on average) from which this kernel runs W8A8 GEMM2. H100, GEMM2 alone in CUDA graphs
# (gluon_gemm2_graph_h100.json): at 256-512 rows an expert (T=4096) 188 vs 198 us (Qwen3-30B), 181 vs 198 (DeepSeek-V2-Lite),
# 184 vs 205 (OLMoE); at 64-128 (T=1024) it lost, 117 vs 113, 101 vs 99, 93 vs 88: the TMA kernel runs an expert's tail of
# <= 64 rows as a half-height tile, this one always as a 128-row tile.
MIN_ROWS_PER_EXPERT = 2 * BLOCK_M


def takes_gluon(cfg, a: torch.Tensor, num_experts: int) -> bool:
    """Whether a GEMM2 that `grouped_gemm_tma.takes_tma` sent to the TMA kernel runs here instead: W8A8 (int8 A) with the
    tile this kernel fixes, at least MIN_ROWS_PER_EXPERT rows an expert, on an SM90 GPU (its wgmma and setmaxnreg are
    Hopper's; Blackwell's tensor cores are others) with Gluon installed."""
    from .grouped_gemm import device_arch

    return (gluon is not None and a.dtype == torch.int8 and a.shape[0] >= MIN_ROWS_PER_EXPERT * num_experts
            and a.device.type == "cuda" and device_arch(a.device) == 90
            and (cfg.block_m, cfg.block_n, cfg.block_k) == (BLOCK_M, BLOCK_N, BLOCK_K))


@functools.lru_cache(maxsize=None)
def _smem_layout(rows: int, cols: int):
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.int8)


def _descriptor(t: torch.Tensor, rows: int, cols: int):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    return TensorDescriptor.from_tensor(t, [rows, cols], _smem_layout(rows, cols))


def grouped_gemm2_w8a8_gluon(a, weights, out, maps, *, bias, router_scales, w_scale, a_scale, table=None):
    """Launches W8A8 GEMM2 on the Gluon kernel (the caller checked `takes_gluon`); arguments as `grouped_gemm.grouped_gemm`'s
    (`a` int8 `[rows, K]` dest-row order, `weights` int8 `[E, N, K]`, per-channel `w_scale` `[E, N]`, `a_scale` `[rows]`).
    `table`: `row_block_table`'s pair for these maps if the caller has it (benchmarks time the GEMM without it)."""
    rows, n_out = out.shape
    num_experts, _, k = weights.shape
    table, num_row_blocks = table or row_block_table(maps.expert_first_token_offset, rows, BLOCK_M)
    num_tiles = table.shape[0] * cdiv(n_out, BLOCK_N)
    unused = maps.expert_first_token_offset
    launch(_grouped_gemm2_w8a8_kernel, (min(num_tiles, sm_count(a.device)),),
           (out, bias if bias is not None else unused, table, num_row_blocks, maps.expanded_dest_row_to_expanded_source_row,
            router_scales if router_scales is not None else unused, a_scale, w_scale,
            _descriptor(a, BLOCK_M, BLOCK_K), _descriptor(weights.view(-1, k), BLOCK_N, BLOCK_K),
            n_out, k, maps.num_tokens, maps.top_k, out.stride(0), bias.stride(0) if bias is not None else 0,
            w_scale.stride(0), w_scale.stride(1)),
           num_warps=4, maxnreg=KERNEL_MAXNREG, HAS_BIAS=bias is not None, APPLY_ROUTER_SCALE=router_scales is not None,
           STAGES=STAGES, GROUP_M=GROUP_M)
    return out


# ---------------------------------------------------------------------------------------------------------------------------------
# check-build: the table kernel and the Gluon kernel for sm_90 (fp16 and bf16 output, with and without a bias).


def gluon_variant(c_dtype: torch.dtype, has_bias: bool) -> KernelVariant:
    c = _TL_NAME[c_dtype]
    signature = {"c_ptr": f"*{c}", "bias_ptr": f"*{c}", "row_block_table_ptr": "*i32", "num_row_blocks_ptr": "*i32",
                 "dest_to_source_ptr": "*i32", "router_scales_ptr": "*fp32", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
                 "a_desc": f"tensordesc<i8[{BLOCK_M}, {BLOCK_K}],{_smem_layout(BLOCK_M, BLOCK_K)!r}>",
                 "w_desc": f"tensordesc<i8[{BLOCK_N}, {BLOCK_K}],{_smem_layout(BLOCK_N, BLOCK_K)!r}>",
                 "N": "i32:16", "K": "i32:16", "num_tokens": "i32", "top_k": "i32", "stride_cm": "i32:16",
                 "stride_bias_e": "i32:16", "stride_wse": "i32:16", "stride_wsn": "constexpr"}
    constexprs = {"stride_wsn": 1, "HAS_BIAS": has_bias, "APPLY_ROUTER_SCALE": True, "STAGES": STAGES, "GROUP_M": GROUP_M}
    return KernelVariant(kernel="grouped_gemm2_w8a8_gluon", variant=f"{c} out{' bias' if has_bias else ''}",
                         fn=_grouped_gemm2_w8a8_kernel, signature=signature, constexprs=constexprs, num_warps=4,
                         num_stages=STAGES, has_matrix_loop=True, archs=(90,), gluon_maxnreg=KERNEL_MAXNREG)


@register_variants
def _gluon_variants():
    variants = [KernelVariant("row_block_table", f"BLOCK_E={block_e}", _row_block_table_kernel,
                              {"expert_first_token_offset_ptr": "*i64", "table_ptr": "*i32", "num_row_blocks_ptr": "*i32",
                               "num_experts": "i32"}, {"BLOCK_M": BLOCK_M, "BLOCK_E": block_e}, num_warps=1, num_stages=1,
                              archs=(90,))
                for block_e in sorted({_block_experts(e) for e in (8, 64, 128, 256)})]
    if gluon is not None:
        variants += [gluon_variant(c, has_bias) for c in (torch.bfloat16, torch.float16) for has_bias in (False, True)]
    return variants
