"""NOTES experiment 20 (a probe, not the library's path): GEMM2 written in Gluon with hand-made warp specialisation (SM90).

GEMM2 is `out[d, n] = router_scale(d) * (intermediate[d] @ fc2[e].T)` over the dest rows d of each expert e. The library's
TMA kernel (grouped_gemm_tma.py) runs it at 34-54% of the tensor pipe on an H100 (NOTES v19's ncu: ~40% of the W8A8 warps'
stalls sit at the K loop's CTA barrier), and Triton 3.6's automatic warp specialisation hung on it (experiment 19). Here the
partitions are written by hand:

- a producer warp (40 registers) walks this program's tiles and keeps a ring of STAGES shared-memory slots filled with TMA box
  copies of the A rows and the weight rows, each slot guarded by a `ready` and an `empty` mbarrier;
- two consumer warpgroups (232 registers each, for a 64 x 256 fp32 or int32 accumulator apiece) take the top and bottom
  halves of each 128-row tile: they wait on `ready`, issue an async wgmma, retire the previous one and hand its slot back;
  then run the library's epilogue (W8A8 row and channel scales, router scale, a masked store of the expert's rows) while the
  producer already fills the ring for the next tile.

The tile schedule needs (first row, end row, expert) per row block. A reduction inside a warp-specialised region is fine in
Gluon, but a lookup per tile in three partitions is waste: `row_block_table` builds the table once on the device from
`expert_first_token_offset` with a few torch ops of host-known shapes (a library version would make it one small kernel or a
routing output), and the kernel reads three integers per tile.

    PYTHONPATH=src python3 benchmarks/gluon_gemm2.py --out results/gluon_gemm2_h100.json
    PYTHONPATH=src python3 benchmarks/gluon_gemm2.py --compile-only     # CPU: sm_90 PTX/SASS, registers, shared memory
"""
from __future__ import annotations

import argparse
import itertools
import math
import statistics

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

# Register budget of the three partitions: consumers 232 a thread (a 64 x 256 accumulator is 128 of them), the producer the
# minimum that holds its scalars; 4 + 1 (+3 idle) + 4 warps at 168 a thread is the 64K-register file. (CUTLASS's SM90
# warp-specialised GEMMs use the same 232/40 split.)
PRODUCER_REGS, CONSUMER_REGS = gl.constexpr(40), gl.constexpr(232)
KERNEL_MAXNREG = 168


@gluon.jit
def _tile_coordinates(tile, num_m_tiles, num_pid_n, GROUP_M: gl.constexpr):
    """Tile -> (row block, column block): GROUP_M row blocks walk one column block before the next, so tiles running at once
    share a weight tile (one expert's row blocks are consecutive)."""
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_size = gl.minimum(num_m_tiles - first_m, GROUP_M)
    in_group = tile % tiles_per_group
    return first_m + in_group % group_size, in_group // group_size


@gluon.jit
def _next_slot(slot, phase, STAGES: gl.constexpr):
    wrap = slot == STAGES - 1
    return gl.where(wrap, 0, slot + 1), gl.where(wrap, phase ^ 1, phase)


@gluon.jit
def _previous_slot(slot, STAGES: gl.constexpr):
    return gl.where(slot == 0, STAGES - 1, slot - 1)


@gluon.jit
def _load_partition(a_desc, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, row_block_table_ptr, num_row_blocks_ptr, N, K,
                    GROUP_M: gl.constexpr):
    """Producer: TMA copies of each tile's K steps into the ring, in the consumers' order."""
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    num_pid_n = gl.cdiv(N, BLOCK_N)
    num_m_tiles = gl.load(num_row_blocks_ptr)
    slot = gl.to_tensor(0)
    phase = gl.to_tensor(0)
    for tile in range(gl.program_id(0), num_m_tiles * num_pid_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_coordinates(tile, num_m_tiles, num_pid_n, GROUP_M)
        a_row = gl.load(row_block_table_ptr + 3 * pid_m)
        w_row = gl.load(row_block_table_ptr + 3 * pid_m + 2) * N + pid_n * BLOCK_N
        for k in range(0, K, BLOCK_K):
            # A fresh mbarrier counts as having completed the phase before phase 0: the first STAGES waits pass.
            mbarrier.wait(empty_bars.index(slot), phase ^ 1)
            ready = ready_bars.index(slot)
            mbarrier.expect(ready, a_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [a_row, k], ready, a_bufs.index(slot))
            tma.async_copy_global_to_shared(w_desc, [w_row, k], ready, w_bufs.index(slot))
            slot, phase = _next_slot(slot, phase, STAGES)


@gluon.jit
def _mma_partition(a_bufs, w_bufs, ready_bars, empty_bars, c_ptr, row_block_table_ptr, num_row_blocks_ptr, dest_to_source_ptr,
                   router_scales_ptr, a_scale_ptr, w_scale_ptr, N, K, num_tokens, top_k, stride_cm,
                   HALF: gl.constexpr, NUM_HALVES: gl.constexpr, A_INT8: gl.constexpr, GROUP_M: gl.constexpr,
                   STORE_BLOCKED: gl.constexpr):
    """Consumer warpgroup HALF (0: rows 0..63 of each tile, 1: rows 64..127): wgmma K loop, then the epilogue."""
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    SUB_M: gl.constexpr = a_bufs.type.shape[1] // NUM_HALVES
    WARPS: gl.constexpr = SUB_M // 16  # wgmma: 16 rows a warp
    BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
    BLOCK_N: gl.constexpr = w_bufs.type.shape[1]
    # wgmma's instruction is 16 x n x (32 bytes of K); for int8 n stops at 224, so a 256-wide tile takes two of 128.
    INSTR_N: gl.constexpr = 128 if A_INT8 else BLOCK_N
    INSTR_K: gl.constexpr = 32 if A_INT8 else 16
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                         instr_shape=[16, INSTR_N, INSTR_K])
    acc_dtype: gl.constexpr = gl.int32 if A_INT8 else gl.float32
    num_pid_n = gl.cdiv(N, BLOCK_N)
    num_m_tiles = gl.load(num_row_blocks_ptr)
    slot = gl.to_tensor(0)
    phase = gl.to_tensor(0)
    for tile in range(gl.program_id(0), num_m_tiles * num_pid_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_coordinates(tile, num_m_tiles, num_pid_n, GROUP_M)
        acc = gl.zeros([SUB_M, BLOCK_N], acc_dtype, acc_layout)
        for k in range(0, K, BLOCK_K):
            mbarrier.wait(ready_bars.index(slot), phase)
            a = a_bufs.index(slot).slice(HALF * SUB_M, SUB_M)
            w = w_bufs.index(slot).permute((1, 0))
            acc = warpgroup_mma(a, w, acc, is_async=True)
            # At most this step's wgmma in flight: the previous step's slot is read, hand it back to the producer. (That
            # slot is computed, not kept in a variable: Triton 3.6 did not carry `previous = slot` through this loop, so
            # every release went to the slot the loop started with and the producer waited forever on the others.)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty_bars.index(_previous_slot(slot, STAGES)), pred=k > 0)
            slot, phase = _next_slot(slot, phase, STAGES)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty_bars.index(_previous_slot(slot, STAGES)))

        # ---- epilogue: (W8A8) row and channel scales, router scale, one masked store of this expert's rows.
        row_start = gl.load(row_block_table_ptr + 3 * pid_m)
        row_end = gl.load(row_block_table_ptr + 3 * pid_m + 1)
        expert = gl.load(row_block_table_ptr + 3 * pid_m + 2)
        rows = row_start + HALF * SUB_M + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, acc_layout))
        cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
        row_mask = rows < row_end
        col_mask = cols < N
        out = acc.to(gl.float32)
        if A_INT8:
            out = out * gl.expand_dims(gl.load(a_scale_ptr + rows, mask=row_mask, other=0.0), 1)
            out = out * gl.expand_dims(gl.load(w_scale_ptr + expert * N + cols, mask=col_mask, other=0.0), 0)
        source_rows = gl.load(dest_to_source_ptr + rows, mask=row_mask, other=0)
        token = source_rows % num_tokens
        k_slot = source_rows // num_tokens
        out = out * gl.expand_dims(gl.load(router_scales_ptr + token * top_k + k_slot, mask=row_mask, other=0.0), 1)
        out = out.to(c_ptr.dtype.element_ty)
        if STORE_BLOCKED:
            # Through shared memory into rows of 8 consecutive columns a thread: 16-byte stores, where the wgmma layout
            # gives each thread pairs of columns (4-byte stores, half of each 32-byte sector per instruction).
            store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [WARPS, 1], [1, 0])
            out = gl.convert_layout(out, store_layout)
            rows = row_start + HALF * SUB_M + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, store_layout))
            cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, store_layout))
            row_mask = rows < row_end
            col_mask = cols < N
        c_ptrs = c_ptr + gl.expand_dims(rows.to(gl.int64) * stride_cm, 1) + gl.expand_dims(cols, 0)
        gl.store(c_ptrs, out, mask=gl.expand_dims(row_mask, 1) & gl.expand_dims(col_mask, 0))


@gluon.jit
def _gluon_gemm2_kernel(c_ptr, row_block_table_ptr, num_row_blocks_ptr, dest_to_source_ptr, router_scales_ptr, a_scale_ptr,
                        w_scale_ptr, a_desc, w_desc, N, K, num_tokens, top_k, stride_cm,
                        A_INT8: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, STORE_BLOCKED: gl.constexpr,
                        SPLIT_CONSUMERS: gl.constexpr):
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    ready_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready_bars.index(i), count=1)  # the producer's expect; the TMA bytes complete it
        mbarrier.init(empty_bars.index(i), count=2 if SPLIT_CONSUMERS else 1)  # one arrival per consumer partition
    if SPLIT_CONSUMERS:  # two 4-warp consumer partitions, one per 64-row half of the tile
        gl.warp_specialize([
            (_mma_partition, (a_bufs, w_bufs, ready_bars, empty_bars, c_ptr, row_block_table_ptr, num_row_blocks_ptr,
                              dest_to_source_ptr, router_scales_ptr, a_scale_ptr, w_scale_ptr, N, K, num_tokens, top_k,
                              stride_cm, gl.constexpr(0), gl.constexpr(2), A_INT8, GROUP_M, STORE_BLOCKED)),
            (_load_partition, (a_desc, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, row_block_table_ptr,
                               num_row_blocks_ptr, N, K, GROUP_M)),
            (_mma_partition, (a_bufs, w_bufs, ready_bars, empty_bars, c_ptr, row_block_table_ptr, num_row_blocks_ptr,
                              dest_to_source_ptr, router_scales_ptr, a_scale_ptr, w_scale_ptr, N, K, num_tokens, top_k,
                              stride_cm, gl.constexpr(1), gl.constexpr(2), A_INT8, GROUP_M, STORE_BLOCKED)),
        ], [1, 4], [PRODUCER_REGS, CONSUMER_REGS])
    else:  # one 8-warp consumer (the default partition, num_warps=8) for the whole tile
        gl.warp_specialize([
            (_mma_partition, (a_bufs, w_bufs, ready_bars, empty_bars, c_ptr, row_block_table_ptr, num_row_blocks_ptr,
                              dest_to_source_ptr, router_scales_ptr, a_scale_ptr, w_scale_ptr, N, K, num_tokens, top_k,
                              stride_cm, gl.constexpr(0), gl.constexpr(1), A_INT8, GROUP_M, STORE_BLOCKED)),
            (_load_partition, (a_desc, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, row_block_table_ptr,
                               num_row_blocks_ptr, N, K, GROUP_M)),
        ], [1], [PRODUCER_REGS])


def row_block_table(expert_first_token_offset: torch.Tensor, num_rows: int, block_m: int):
    """`(table int32 [bound, 3], num_row_blocks int32 [1])`: per row block of `block_m` rows (the first row blocks of expert 0,
    then expert 1's, ...) its first dest row, its expert's end row and its expert; entries past `num_row_blocks` are unused.
    Device ops of host-known shapes only (no sync): `bound` is the library's `num_m_tiles_bound`."""
    num_experts = expert_first_token_offset.numel() - 1
    bound = triton.cdiv(num_rows, block_m) + min(num_experts, num_rows)
    offsets = expert_first_token_offset
    row_blocks = (offsets[1:] - offsets[:-1] + block_m - 1) // block_m
    blocks_through = torch.cumsum(row_blocks, 0)  # row blocks of experts <= e
    m = torch.arange(bound, device=offsets.device)
    expert = torch.searchsorted(blocks_through, m, right=True).clamp_(max=num_experts - 1)
    first_row = offsets[expert] + (m - (blocks_through[expert] - row_blocks[expert])) * block_m
    table = torch.stack([first_row, offsets[expert + 1], expert], dim=1).to(torch.int32).contiguous()
    return table, blocks_through[-1:].to(torch.int32)


def _descriptor(t: torch.Tensor, box: list[int]):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.int8: gl.int8}[t.dtype]
    return TensorDescriptor.from_tensor(t, box, gl.NVMMASharedLayout.get_default_for(box, dtype))


def gluon_gemm2(a, w, out, maps, router_scales, w_scale=None, a_scale=None, *, block_n=256, stages=4, group_m=8,
                programs_per_sm=1, store_blocked=False, split_consumers=True):
    """() -> out: GEMM2 through `_gluon_gemm2_kernel` (table and descriptors made once, as a CUDA graph would hold them)."""
    num_experts, n, k = w.shape
    block_m, block_k = 128, (128 if a.dtype == torch.int8 else 64)
    table, num_row_blocks = row_block_table(maps.expert_first_token_offset, a.shape[0], block_m)
    a_desc = _descriptor(a, [block_m, block_k])
    w_desc = _descriptor(w.view(-1, k), [block_n, block_k])
    num_sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    grid = (min(table.shape[0] * triton.cdiv(n, block_n), programs_per_sm * num_sms),)
    int8 = a_scale is not None

    def call():
        _gluon_gemm2_kernel[grid](out, table, num_row_blocks, maps.expanded_dest_row_to_expanded_source_row, router_scales,
                                  a_scale if int8 else router_scales, w_scale if int8 else router_scales, a_desc, w_desc,
                                  n, k, maps.num_tokens, maps.top_k, out.stride(0), A_INT8=int8, STAGES=stages,
                                  GROUP_M=group_m, STORE_BLOCKED=store_blocked,
                                  SPLIT_CONSUMERS=split_consumers, num_warps=4 if split_consumers else 8,
                                  maxnreg=KERNEL_MAXNREG)
        return out

    return call


def compile_only(stages: int) -> None:
    """Compiles the kernel for sm_90 on this machine (no GPU) and prints registers, spills and shared memory."""
    import contextlib
    import io

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from simple_moe import check_build
    for a_int8, store_blocked, split in itertools.product((False, True), (False, True), (True, False)):
        c, a = "bf16", ("i8" if a_int8 else "bf16")
        block_k = 128 if a_int8 else 64
        a_layout = gl.NVMMASharedLayout.get_default_for([128, block_k], gl.int8 if a_int8 else gl.bfloat16)
        w_layout = gl.NVMMASharedLayout.get_default_for([256, block_k], gl.int8 if a_int8 else gl.bfloat16)
        signature = {"c_ptr": f"*{c}", "row_block_table_ptr": "*i32", "num_row_blocks_ptr": "*i32",
                     "dest_to_source_ptr": "*i32", "router_scales_ptr": "*fp32", "a_scale_ptr": "*fp32",
                     "w_scale_ptr": "*fp32", "a_desc": f"tensordesc<{a}[128, {block_k}],{a_layout!r}>",
                     "w_desc": f"tensordesc<{a}[256, {block_k}],{w_layout!r}>", "N": "i32", "K": "i32",
                     "num_tokens": "i32", "top_k": "i32", "stride_cm": "i32", "A_INT8": "constexpr",
                     "STAGES": "constexpr", "GROUP_M": "constexpr", "STORE_BLOCKED": "constexpr",
                     "SPLIT_CONSUMERS": "constexpr"}
        # What a launch specialises: pointers and N, K, stride_cm (multiples of 16 at the model shapes) 16-divisible.
        attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(signature.items())
                 if ty.startswith("*") or name in ("N", "K", "stride_cm")}
        constexprs = {"A_INT8": a_int8, "STAGES": stages, "GROUP_M": 8, "STORE_BLOCKED": store_blocked,
                      "SPLIT_CONSUMERS": split}
        src = GluonASTSource(_gluon_gemm2_kernel, signature, constexprs, attrs)
        log = io.StringIO()
        label = (f"{'w8a8' if a_int8 else 'bf16'} s{stages}{' blocked store' if store_blocked else ''}"
                 f"{' 2x4-warp consumers' if split else ' one 8-warp consumer'}")
        try:
            with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
                knobs.nvidia.dump_ptxas_log = True
                knobs.compilation.always_compile = True
                kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                        options={"num_warps": 4 if split else 8, "maxnreg": KERNEL_MAXNREG})
        except Exception as e:  # noqa: BLE001 - e.g. shared memory over the limit: report and go on
            print(f"{label}: {type(e).__name__}: {str(e)[-300:]}", flush=True)
            continue
        ptxas = check_build.parse_ptxas_log(log.getvalue())
        ops = check_build.count_sass_ops(check_build._cuobjdump(kernel.asm["cubin"]))
        print(f"{label}: {kernel.metadata.num_warps} warps, shared {kernel.metadata.shared} B, ptxas {ptxas}, SASS "
              + ", ".join(f"{op} {ops[op]}" for op in ("HGMMA", "IGMMA", "UTMALDG", "STG", "SYNCS", "BAR") if ops.get(op)),
              flush=True)


# Small problems for a first GPU run, each in its own process under a timeout (a barrier mistake hangs, it does not fail):
# (rows, N, K, experts, split consumers, stages, stores through shared memory, W8A8).
SELFTEST_CASES = [(128, 256, 64, 1, False, 3, False, False), (128, 256, 64, 1, True, 3, False, False),
                  (128, 256, 256, 1, False, 3, False, False), (128, 256, 256, 1, True, 3, False, False),
                  (1000, 512, 768, 4, False, 4, False, False), (1000, 512, 768, 4, True, 4, False, False),
                  (1000, 512, 768, 4, True, 3, True, False), (1000, 512, 768, 4, False, 3, True, False),
                  (1000, 512, 768, 4, True, 4, False, True), (1000, 512, 768, 4, False, 4, False, True),
                  # which of the larger cases' features hangs (first H100 run: cases 0-3 pass, 4-9 hang)
                  (128, 256, 768, 1, False, 3, False, False),  # 12 K steps
                  (100, 256, 256, 1, False, 3, False, False),  # a box past the tensor's last row
                  (1024, 256, 256, 1, False, 3, False, False),  # 8 programs
                  (128, 512, 256, 1, False, 3, False, False),  # 2 column blocks
                  (256, 256, 256, 2, False, 3, False, False),  # a second expert (even split: 128 rows each)
                  (256, 256, 256, 2, True, 3, False, False)]
EVEN_SPLIT_FROM = 14  # cases from here split rows evenly between the experts


def selftest_case(index: int) -> None:
    """One SELFTEST_CASES problem (random expert sizes, one empty expert when E > 2) against fp64 torch."""
    from types import SimpleNamespace
    rows, n, k, num_experts, split, stages, store_blocked, a_int8 = SELFTEST_CASES[index]
    dev = torch.device("cuda")
    torch.manual_seed(index)
    cuts = torch.sort(torch.randint(0, rows + 1, (num_experts - 1,))).values.tolist()
    if num_experts > 2:
        cuts[1] = cuts[0]  # an empty expert
    if index >= EVEN_SPLIT_FROM:
        cuts = [rows * (e + 1) // num_experts for e in range(num_experts - 1)]
    offsets = torch.tensor([0] + cuts + [rows], dtype=torch.int64, device=dev)
    maps = SimpleNamespace(expert_first_token_offset=offsets, num_tokens=rows, top_k=1,
                           expanded_dest_row_to_expanded_source_row=torch.randperm(rows, device=dev).to(torch.int32))
    scales = torch.rand(rows, 1, device=dev) + 0.5
    if a_int8:
        a = torch.randint(-127, 128, (rows, k), device=dev, dtype=torch.int8)
        w = torch.randint(-127, 128, (num_experts, n, k), device=dev, dtype=torch.int8)
        a_scale, w_scale = torch.rand(rows, device=dev) / 100, torch.rand(num_experts, n, device=dev) / 100
    else:
        a = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(num_experts, n, k, device=dev, dtype=torch.bfloat16)
        a_scale = w_scale = None
    out = torch.full((rows, n), float("nan"), device=dev, dtype=torch.bfloat16)
    gluon_gemm2(a, w, out, maps, scales, w_scale, a_scale, stages=stages, store_blocked=store_blocked,
                split_consumers=split)()
    torch.cuda.synchronize()
    ref = torch.empty(rows, n, device=dev, dtype=torch.float64)
    for e in range(num_experts):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        w_e = w[e].double() * (w_scale[e].double()[:, None] if a_int8 else 1)
        ref[lo:hi] = (a[lo:hi].double() * (a_scale[lo:hi].double()[:, None] if a_int8 else 1)) @ w_e.T
    src = maps.expanded_dest_row_to_expanded_source_row.long()
    ref *= scales.double().reshape(-1)[src][:, None]
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"case {index} {SELFTEST_CASES[index]}: rel err {err:.1e} {'PASS' if err < 1e-2 else 'FAIL'}", flush=True)


def selftest(timeout_s: float, cases: list[int]) -> None:
    import subprocess
    import sys
    for index in cases:
        try:
            proc = subprocess.run([sys.executable, __file__, "--selftest-case", str(index)], capture_output=True, text=True,
                                  timeout=timeout_s)
            print(proc.stdout.strip() or f"case {index}: rc {proc.returncode} {proc.stderr.strip()[-400:]}", flush=True)
        except subprocess.TimeoutExpired:
            print(f"case {index} {SELFTEST_CASES[index]}: HANG (no result after {timeout_s:.0f} s)", flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="qwen3-30b-a3b,deepseek-v2-lite,olmoe-1b-7b")
    p.add_argument("--tokens", default="1024,4096")
    p.add_argument("--quant", default="none,w8a8")
    p.add_argument("--stages", default="4,3", help="--compile-only: ring depths to compile")
    p.add_argument("--candidates", default="s4,s3,s4b,s3b", help="ring depth, b = stores through shared memory")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--selftest", default=None, help="indices of SELFTEST_CASES ('all'), each in a process under a timeout")
    p.add_argument("--selftest-case", type=int, default=None)
    p.add_argument("--split", default="1", help="1: two 4-warp consumer partitions, 0: one 8-warp consumer")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.selftest_case is not None:
        selftest_case(args.selftest_case)
        return 0
    if args.selftest:
        cases = range(len(SELFTEST_CASES)) if args.selftest == "all" else map(int, args.selftest.split(","))
        selftest(20.0, list(cases))
        return 0
    if args.compile_only:
        for stages in map(int, args.stages.split(",")):
            compile_only(stages)
        return 0

    import simple_moe as sm
    from simple_moe.bench import rel_err, write_results_json
    from simple_moe.grouped_gemm import MODEL_SHAPES, grouped_gemm
    from simple_moe.quant import quantize_moe_weights

    dev, results = torch.device("cuda"), []
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
    for name in args.shapes.split(","):
        num_experts, top_k, hidden, inter = MODEL_SHAPES[name]
        torch.manual_seed(0)
        w1 = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16) / math.sqrt(hidden)
        w2 = torch.randn(num_experts, hidden, inter, device=dev, dtype=torch.bfloat16) / math.sqrt(inter)
        for quant_name in args.quant.split(","):
            q2, quant = (w2, None) if quant_name == "none" else quantize_moe_weights(w1, w2, quant_name)[1:]
            for tokens in map(int, args.tokens.split(",")):
                scales, ids = sm.route(torch.randn(tokens, num_experts, device=dev), top_k)
                maps = sm.build_routing_maps(ids, num_experts)
                inter_rows = torch.randn(tokens * top_k, inter, device=dev, dtype=torch.bfloat16)
                a2, int8_args = (inter_rows, {}) if quant is None else quant.gemm2_operands(inter_rows, maps)
                lib_out = torch.full((tokens * top_k, hidden), float("nan"), device=dev, dtype=torch.bfloat16)
                calls = {"library": lambda: grouped_gemm(a2, q2, lib_out, maps, gather_a=False, router_scales=scales,
                                                         **int8_args)}
                for candidate in args.candidates.split(","):
                    out = torch.full_like(lib_out, float("nan"))
                    calls[f"gluon {candidate}"] = gluon_gemm2(a2, q2, out, maps, scales, int8_args.get("w_scale"),
                                                              int8_args.get("a_scale"), stages=int(candidate[1]),
                                                              store_blocked=candidate.endswith("b"),
                                                              split_consumers=args.split == "1")
                kept = int(maps.expert_first_token_offset[-1])
                # float64 reference of the kept rows: per expert, the (dequantised) operands in double.
                offsets = maps.expert_first_token_offset.tolist()
                ref = torch.empty(kept, hidden, device=dev, dtype=torch.float64)
                a_ref = a2.double() * (int8_args["a_scale"].double()[:, None] if quant is not None else 1)
                for e in range(num_experts):
                    lo, hi = offsets[e], offsets[e + 1]
                    w_e = q2[e].double() * (int8_args["w_scale"][e].double()[:, None] if quant is not None else 1)
                    ref[lo:hi] = a_ref[lo:hi] @ w_e.T
                src = maps.expanded_dest_row_to_expanded_source_row[:kept].long()
                ref *= scales.double().reshape(-1)[(src % tokens) * top_k + src // tokens][:, None]
                errors, times = {}, {label: [] for label in calls}
                for label, call in list(calls.items()):
                    print(f"{name} {quant_name} T={tokens} {label}: checking", flush=True)  # a hang names its candidate
                    try:
                        got = call()
                        torch.cuda.synchronize()
                    except Exception as e:  # a compile failure of one candidate does not stop the others
                        print(f"{name} {quant_name} T={tokens} {label}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                        del calls[label], times[label]
                        continue
                    errors[label] = {"vs_float64": rel_err(got[:kept], ref),
                                     "vs_library": "bitwise equal" if torch.equal(got[:kept], lib_out[:kept])
                                     else rel_err(got[:kept], lib_out[:kept].double())}
                for _ in range(args.rounds):
                    for label, call in calls.items():
                        times[label].append(bench(call))
                table_us = bench(lambda: row_block_table(maps.expert_first_token_offset, tokens * top_k, 128))
                row = {"shape": name, "quant": quant_name, "T": tokens, "us": {k: statistics.median(v) for k, v in times.items()},
                       "errors": errors, "row_block_table_us": table_us, "rounds": times}
                results.append(row)
                print(f"{name:18s} {quant_name:5s} T={tokens:5d} " + "  ".join(
                    f"{k}: {v:7.1f} us ({errors[k]['vs_float64']:.1e})" for k, v in row["us"].items())
                    + f"  table {table_us:.1f} us", flush=True)
    if args.out:
        write_results_json(args.out, {"rows": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
