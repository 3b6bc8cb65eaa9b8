"""NOTES experiment 21 (a probe, not the library's path; built without a GPU, not yet run): W8A8 GEMM1 in Gluon with hand-made
warp specialisation, the sequel of grouped_gemm_gluon.py's GEMM2.

GEMM1 is `inter[d, j] = swiglu(gate, up)` with `gate = a_scale[t] * w_scale[e, g(j)] * (x_q[t] @ q_fc1[e, g(j)])` (up likewise)
for the dest rows d of expert e, t = dest_to_source[d] % T: its A rows are gathered from the quantised input, which a
Hopper TMA box cannot do. So the producer is a whole warpgroup: each of its 128 threads issues cp.async copies of 16 bytes
for its share of the tile's 128 gathered rows and a `cp.async.mbarrier.arrive.noinc` on the slot's `ready` barrier, and
one of them the TMA copies of the gate and the up weight boxes into the two halves of the slot's weight buffer. `ready`
therefore expects 128 + 1 arrivals and the weight bytes. The two consumer warpgroups are GEMM2's, with two accumulators
(gate and up, 64 x 128 int32 each: the same 128 registers as GEMM2's one 64 x 256) and the SwiGLU epilogue; a proxy fence
after `ready` orders the cp.async writes (generic proxy) before wgmma's reads (async proxy).

Registers: consumers 224, the producer warpgroup 56 (row bases and addresses; 1 warp at 40 was GEMM2's), 64512 in all.
Scope of the probe: SwiGLU, gate-first or up-first fc1 (contiguous gate and up rows), K a multiple of 128, no biases.

    PYTHONPATH=src python3 benchmarks/gluon_gemm1.py --compile-only      # CPU: sm_90 registers, spills, SASS counts
    PYTHONPATH=src python3 benchmarks/gluon_gemm1.py --selftest all      # GPU: small cases against float64, each under a timeout
    PYTHONPATH=src python3 benchmarks/gluon_gemm1.py --out results/gluon_gemm1_h100.json   # GPU: against the library's GEMM1
"""
from __future__ import annotations

import argparse
import statistics

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from simple_moe.grouped_gemm import grouped_tile
from simple_moe.grouped_gemm_gluon import (_descriptor, _next_slot, _previous_slot, _row_block, _tile_loop_start,
                                           KERNEL_MAXNREG, row_block_table)

BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 128  # BLOCK_N output columns: a gate and an up box of 128 fc1 rows each
PRODUCER_WARPS = gl.constexpr(4)
PRODUCER_REGS, CONSUMER_REGS = gl.constexpr(56), gl.constexpr(224)


@gluon.jit
def _gather_partition(a_ptr, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, row_block_table_ptr, num_row_blocks_ptr,
                      dest_to_source_ptr, num_tokens, stride_am, N, K, gate_row0, up_row0, stride_we,
                      GROUP_M: gl.constexpr):
    """Producer warpgroup: per K step, cp.async of the 128 gathered A rows (16 bytes a thread a copy) and TMA of the gate
    and up weight boxes, all completing the slot's `ready` barrier."""
    BLOCK_M: gl.constexpr = a_bufs.type.shape[1]
    BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
    BLOCK_N: gl.constexpr = w_bufs.type.shape[1] // 2
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    # 8 threads cover a 128-byte row in 16-byte pieces; 4 warps x 4 rows a warp = 16 rows a pass, 8 passes a tile.
    gather_layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
    tile_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, gather_layout))
    k_cols = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, gather_layout))
    num_m_tiles, num_pid_n, slot, phase = _tile_loop_start(num_row_blocks_ptr, N, BLOCK_N)
    for tile in range(gl.program_id(0), num_m_tiles * num_pid_n, gl.num_programs(0)):
        pid_m, pid_n = grouped_tile(tile, num_m_tiles, num_pid_n, GROUP_M)
        row_start, row_end, expert = _row_block(row_block_table_ptr, pid_m)
        rows = row_start + tile_rows
        # Rows past the expert's end read token 0's row (in bounds; never stored), so the copies need no mask.
        source_rows = gl.load(dest_to_source_ptr + rows, mask=rows < row_end, other=0)
        row_ptrs = a_ptr + gl.expand_dims((source_rows % num_tokens).to(gl.int64) * stride_am, 1) + gl.expand_dims(k_cols, 0)
        w_gate_row = expert * stride_we + gate_row0 + pid_n * BLOCK_N
        w_up_row = expert * stride_we + up_row0 + pid_n * BLOCK_N
        for k in range(0, K, BLOCK_K):
            mbarrier.wait(empty_bars.index(slot), phase ^ 1)
            ready = ready_bars.index(slot)
            async_copy.async_copy_global_to_shared(a_bufs.index(slot), row_ptrs + k)
            async_copy.mbarrier_arrive(ready, increment_count=False)  # one of the 128 + 1 arrivals `ready` expects
            mbarrier.expect(ready, 2 * w_desc.block_type.nbytes)
            w = w_bufs.index(slot)
            tma.async_copy_global_to_shared(w_desc, [w_gate_row, k], ready, w.slice(0, BLOCK_N))
            tma.async_copy_global_to_shared(w_desc, [w_up_row, k], ready, w.slice(BLOCK_N, BLOCK_N))
            slot, phase = _next_slot(slot, phase, STAGES)


@gluon.jit
def _swiglu_partition(a_bufs, w_bufs, ready_bars, empty_bars, c_ptr, row_block_table_ptr, num_row_blocks_ptr,
                      dest_to_source_ptr, a_scale_ptr, w_scale_ptr, N, K, num_tokens, stride_cm, stride_wse, gate_row0,
                      up_row0, HALF: gl.constexpr, GROUP_M: gl.constexpr):
    """Consumer warpgroup HALF: gate and up wgmma K loop on its 64 rows, then dequantisation, SwiGLU, store."""
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    SUB_M: gl.constexpr = a_bufs.type.shape[1] // 2
    BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
    BLOCK_N: gl.constexpr = w_bufs.type.shape[1] // 2
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32])
    store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    num_m_tiles, num_pid_n, slot, phase = _tile_loop_start(num_row_blocks_ptr, N, BLOCK_N)
    for tile in range(gl.program_id(0), num_m_tiles * num_pid_n, gl.num_programs(0)):
        pid_m, pid_n = grouped_tile(tile, num_m_tiles, num_pid_n, GROUP_M)
        acc_gate = gl.zeros([SUB_M, BLOCK_N], gl.int32, acc_layout)
        acc_up = gl.zeros([SUB_M, BLOCK_N], gl.int32, acc_layout)
        for k in range(0, K, BLOCK_K):
            mbarrier.wait(ready_bars.index(slot), phase)
            fence_async_shared()  # the gathered rows came through cp.async (generic proxy); wgmma reads via the async proxy
            a = a_bufs.index(slot).slice(HALF * SUB_M, SUB_M)
            w = w_bufs.index(slot)
            acc_gate = warpgroup_mma(a, w.slice(0, BLOCK_N).permute((1, 0)), acc_gate, is_async=True)
            acc_up = warpgroup_mma(a, w.slice(BLOCK_N, BLOCK_N).permute((1, 0)), acc_up, is_async=True)
            acc_gate, acc_up = warpgroup_mma_wait(num_outstanding=2, deps=(acc_gate, acc_up))
            mbarrier.arrive(empty_bars.index(_previous_slot(slot, STAGES)), pred=k > 0)
            slot, phase = _next_slot(slot, phase, STAGES)
        acc_gate, acc_up = warpgroup_mma_wait(num_outstanding=0, deps=(acc_gate, acc_up))
        mbarrier.arrive(empty_bars.index(_previous_slot(slot, STAGES)))

        row_start, row_end, expert = _row_block(row_block_table_ptr, pid_m)
        expert = expert.to(gl.int64)
        rows = row_start + HALF * SUB_M + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, acc_layout))
        cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
        row_mask = rows < row_end
        cols_safe = gl.where(cols < N, cols, 0)
        tokens = gl.load(dest_to_source_ptr + rows, mask=row_mask, other=0) % num_tokens
        row_scale = gl.expand_dims(gl.load(a_scale_ptr + tokens).to(gl.float32), 1)
        gate = acc_gate.to(gl.float32) * row_scale
        gate *= gl.expand_dims(gl.load(w_scale_ptr + expert * stride_wse + gate_row0 + cols_safe).to(gl.float32), 0)
        up = acc_up.to(gl.float32) * row_scale
        up *= gl.expand_dims(gl.load(w_scale_ptr + expert * stride_wse + up_row0 + cols_safe).to(gl.float32), 0)
        out = gate * (1.0 / (1.0 + gl.exp(-gate))) * up  # activations.apply_activation's SwiGLU, same operation order
        out = gl.convert_layout(out.to(c_ptr.dtype.element_ty), store_layout)
        rows = row_start + HALF * SUB_M + gl.arange(0, SUB_M, layout=gl.SliceLayout(1, store_layout))
        cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, store_layout))
        c_ptrs = c_ptr + gl.expand_dims(rows.to(gl.int64) * stride_cm, 1) + gl.expand_dims(cols, 0)
        gl.store(c_ptrs, out, mask=gl.expand_dims(rows < row_end, 1) & gl.expand_dims(cols < N, 0))


@gluon.jit
def _gluon_gemm1_w8a8_kernel(c_ptr, a_ptr, row_block_table_ptr, num_row_blocks_ptr, dest_to_source_ptr, a_scale_ptr,
                             w_scale_ptr, w_desc, N, K, num_tokens, stride_am, stride_cm, stride_we, stride_wse, gate_row0,
                             up_row0, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.int8)
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, BLOCK_K], a_layout)
    w_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, 2 * BLOCK_N, BLOCK_K], w_desc.layout)
    ready_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready_bars.index(i), count=PRODUCER_WARPS * 32 + 1)  # each producer thread's cp.async + the expect
        mbarrier.init(empty_bars.index(i), count=2)
    gl.warp_specialize([
        (_swiglu_partition, (a_bufs, w_bufs, ready_bars, empty_bars, c_ptr, row_block_table_ptr, num_row_blocks_ptr,
                             dest_to_source_ptr, a_scale_ptr, w_scale_ptr, N, K, num_tokens, stride_cm, stride_wse,
                             gate_row0, up_row0, gl.constexpr(0), GROUP_M)),
        (_gather_partition, (a_ptr, w_desc, a_bufs, w_bufs, ready_bars, empty_bars, row_block_table_ptr,
                             num_row_blocks_ptr, dest_to_source_ptr, num_tokens, stride_am, N, K, gate_row0, up_row0,
                             stride_we, GROUP_M)),
        (_swiglu_partition, (a_bufs, w_bufs, ready_bars, empty_bars, c_ptr, row_block_table_ptr, num_row_blocks_ptr,
                             dest_to_source_ptr, a_scale_ptr, w_scale_ptr, N, K, num_tokens, stride_cm, stride_wse,
                             gate_row0, up_row0, gl.constexpr(1), GROUP_M)),
    ], [PRODUCER_WARPS, 4], [PRODUCER_REGS, CONSUMER_REGS])


def gluon_gemm1(x_q, a_scale, w1, w1_scale, out, maps, *, gate_first=True, stages=4, group_m=8):
    """() -> out: GEMM1 through `_gluon_gemm1_w8a8_kernel` (table made once, as a CUDA graph would hold it)."""
    num_experts, two_n, k = w1.shape
    n = two_n // 2
    assert k % BLOCK_K == 0 and n % 8 == 0, "probe scope: K a multiple of 128"
    table, num_row_blocks = row_block_table(maps.expert_first_token_offset, out.shape[0], BLOCK_M)
    w_desc = _descriptor(w1.view(-1, k), BLOCK_N, BLOCK_K)
    num_sms = torch.cuda.get_device_properties(out.device).multi_processor_count
    grid = (min(table.shape[0] * triton.cdiv(n, BLOCK_N), num_sms),)
    gate_row0, up_row0 = (0, n) if gate_first else (n, 0)

    def call():
        _gluon_gemm1_w8a8_kernel[grid](out, x_q, table, num_row_blocks, maps.expanded_dest_row_to_expanded_source_row,
                                       a_scale, w1_scale, w_desc, n, k, maps.num_tokens, x_q.stride(0), out.stride(0),
                                       two_n, w1_scale.stride(0), gate_row0, up_row0, BLOCK_M=BLOCK_M, STAGES=stages,
                                       GROUP_M=group_m, num_warps=4, maxnreg=KERNEL_MAXNREG)
        return out

    return call


def compile_only(stages: int) -> None:
    import contextlib
    import io

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from simple_moe import check_build
    from simple_moe.grouped_gemm_gluon import _smem_layout
    signature = {"c_ptr": "*bf16", "a_ptr": "*i8", "row_block_table_ptr": "*i32", "num_row_blocks_ptr": "*i32",
                 "dest_to_source_ptr": "*i32", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
                 "w_desc": f"tensordesc<i8[{BLOCK_N}, {BLOCK_K}],{_smem_layout(BLOCK_N, BLOCK_K)!r}>"}
    signature |= {name: "i32" for name in ("N", "K", "num_tokens", "stride_am", "stride_cm", "stride_we", "stride_wse",
                                           "gate_row0", "up_row0")}
    signature |= {"BLOCK_M": "constexpr", "STAGES": "constexpr", "GROUP_M": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(signature.items())
             if ty.startswith("*") or name in ("N", "K", "stride_am", "stride_cm", "stride_we", "stride_wse")}
    src = GluonASTSource(_gluon_gemm1_w8a8_kernel, signature, {"BLOCK_M": BLOCK_M, "STAGES": stages, "GROUP_M": 8}, attrs)
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": KERNEL_MAXNREG})
    ptx = kernel.asm["ptx"]
    ops = check_build.count_sass_ops(check_build._cuobjdump(kernel.asm["cubin"]))
    print(f"s{stages}: {kernel.metadata.num_warps} warps, shared {kernel.metadata.shared} B, "
          f"ptxas {check_build.parse_ptxas_log(log.getvalue())}, SASS "
          + ", ".join(f"{op} {ops[op]}" for op in ("IGMMA", "UTMALDG", "LDGSTS", "STG", "SYNCS", "BAR") if ops.get(op))
          + f"; PTX cp.async.mbarrier.arrive.noinc {ptx.count('cp.async.mbarrier.arrive.noinc')}, "
          f"fence.proxy.async {ptx.count('fence.proxy.async')}", flush=True)


# (tokens, top_k, E, H, I, gate_first, stages): small problems for a first GPU run, each in its own process under a timeout.
SELFTEST_CASES = [(64, 2, 1, 128, 128, True, 4), (64, 2, 1, 512, 128, True, 4), (300, 2, 4, 512, 256, True, 4),
                  (300, 2, 4, 1024, 384, False, 3), (1000, 4, 8, 2048, 768, True, 4)]


def selftest_case(index: int) -> None:
    import simple_moe as sm
    from simple_moe.quant import quantize_activations_int8, quantize_weights_int8
    tokens, top_k, num_experts, hidden, inter, gate_first, stages = SELFTEST_CASES[index]
    dev = torch.device("cuda")
    torch.manual_seed(index)
    scales, ids = sm.route(torch.randn(tokens, num_experts, device=dev), top_k)
    maps = sm.build_routing_maps(ids, num_experts)
    x_q, a_scale = quantize_activations_int8(torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16))
    w1, w1_scale = quantize_weights_int8(torch.randn(num_experts, 2 * inter, hidden, device=dev) / hidden ** 0.5)
    out = torch.full((tokens * top_k, inter), float("nan"), device=dev, dtype=torch.bfloat16)
    gluon_gemm1(x_q, a_scale, w1, w1_scale, out, maps, gate_first=gate_first, stages=stages)()
    torch.cuda.synchronize()
    kept = int(maps.expert_first_token_offset[-1])
    offsets = maps.expert_first_token_offset.tolist()
    token_of_row = maps.expanded_dest_row_to_expanded_source_row[:kept].long() % tokens
    a_ref = x_q.double()[token_of_row] * a_scale.double()[token_of_row][:, None]
    ref = torch.empty(kept, inter, device=dev, dtype=torch.float64)
    for e in range(num_experts):
        h = a_ref[offsets[e]:offsets[e + 1]] @ (w1[e].double() * w1_scale[e].double()[:, None]).T
        gate, up = (h[:, :inter], h[:, inter:]) if gate_first else (h[:, inter:], h[:, :inter])
        ref[offsets[e]:offsets[e + 1]] = gate * torch.sigmoid(gate) * up
    err = ((out[:kept].double() - ref).norm() / ref.norm()).item()
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
    p.add_argument("--tokens", default="4096,1024")
    p.add_argument("--stages", default="4,3")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--selftest", default=None, help="indices of SELFTEST_CASES ('all'), each in a process under a timeout")
    p.add_argument("--selftest-case", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.compile_only:
        for stages in map(int, args.stages.split(",")):
            compile_only(stages)
        return 0
    if args.selftest_case is not None:
        selftest_case(args.selftest_case)
        return 0
    if args.selftest:
        selftest(20.0, list(range(len(SELFTEST_CASES)) if args.selftest == "all" else map(int, args.selftest.split(","))))
        return 0

    from simple_moe.activations import get_activation
    from simple_moe.bench import capture_graph, write_results_json
    from simple_moe.grouped_gemm import grouped_gemm
    from gluon_gemm2 import w8a8_problems  # this folder's GEMM2 benchmark: the same routed problems

    dev, results = torch.device("cuda"), []
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3  # noqa: E731
    for name, tokens, shape, maps, scales, quant, q1, _ in w8a8_problems(args.shapes, args.tokens, dev):
        _, top_k, hidden, inter = shape
        x_q, int8_args = quant.gemm1_operands(torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16))
        outs = {"library": torch.full((tokens * top_k, inter), float("nan"), device=dev, dtype=torch.bfloat16)}
        calls = {"library": lambda: grouped_gemm(x_q, q1, outs["library"], maps, gather_a=True,
                                                 activation=get_activation("swiglu"), **int8_args)}
        for stages in map(int, args.stages.split(",")):
            outs[f"gluon s{stages}"] = torch.full_like(outs["library"], float("nan"))
            calls[f"gluon s{stages}"] = gluon_gemm1(x_q, int8_args["a_scale"], q1, int8_args["w_scale"],
                                                    outs[f"gluon s{stages}"], maps, stages=stages)
        kept = int(maps.expert_first_token_offset[-1])
        graphs, same = {}, {}
        for label, call in calls.items():
            print(f"{name} T={tokens} {label}: checking", flush=True)  # a hang names its candidate
            graphs[label] = capture_graph(call, dev)
            same[label] = torch.equal(outs[label][:kept], outs["library"][:kept])
        times = {label: [] for label in graphs}
        for _ in range(args.rounds):
            for label, graph in graphs.items():
                times[label].append(bench(graph.replay))
        row = {"shape": name, "T": tokens, "us": {k: statistics.median(v) for k, v in times.items()},
               "bitwise_equal_to_library": same, "rounds": times}
        results.append(row)
        print(f"{name:18s} T={tokens:5d} " + "  ".join(f"{k}: {v:6.1f} ({'=' if same[k] else 'DIFF'})"
                                                       for k, v in row["us"].items()), flush=True)
    if args.out:
        write_results_json(args.out, {"rows": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
