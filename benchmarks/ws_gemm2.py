"""NOTES experiment 19 (a probe, not the library's path): GEMM2 with Triton's Hopper warp specialisation, against the library's.

Triton 3.6 partitions a Hopper kernel into a TMA producer and two wgmma consumer warpgroups (`ttg.warp_specialize`,
`setmaxnreg`) only for `tl.range(..., warp_specialize=True)` on the K loop of a one-tile-per-program kernel at num_warps=4
(12 warps in all), and its pass aborts ("TaskIdPropagation: Other parent ops are not supported") on any reduction in the
kernel: the library's tile lookup (`expert_row_tiles`' cumsum, `row_block_owner`'s sums) is made of them. So this probe
reads each row block's (expert, first row, end row) from a table built on the host, which a library version would have a
small kernel or the routing write instead. Everything else is the library's TMA GEMM2: the same boxes, the same epilogue
(W8A8 scales, router scale, masked store of the expert's rows), timed on the same routed problem as `grouped_gemm`.

    PYTHONPATH=src python3 benchmarks/ws_gemm2.py --out results/ws_gemm2_h100.json            # one program a tile, no WS
    PYTHONPATH=src timeout 300 python3 benchmarks/ws_gemm2.py --warp-specialize --shapes qwen3-30b-a3b --tokens 4096
    PYTHONPATH=src timeout 120 python3 benchmarks/ws_gemm2.py --minimal   # a plain matmul, without then with WS

Measured on an H100 (NOTES v19): with Triton 3.6.0 the warp-specialised kernel never finishes (Qwen3-30B T=4096, bf16,
128 x 256 x 64, 3 stages: the first check after its launch still waited after 75 s, while the library's GEMM2 and this
kernel without warp specialisation had passed theirs). Hence the opt-in flag, and a timeout around any run with it.
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

import simple_moe as sm
from simple_moe.grouped_gemm import (MODEL_SHAPES, dequantize_add_bias, grouped_gemm, grouped_tile, scale_and_store_rows,
                                     tile_rows_and_columns)
from simple_moe.quant import quantize_moe_weights


@triton.jit
def _ws_gemm2_kernel(c_ptr, tile_expert_ptr, tile_rows_ptr, dest_to_source_ptr, router_scales_ptr, w_scale_ptr,
                     a_scale_ptr, a_desc, w_desc, num_tokens, N, K, num_m_tiles, stride_cm, top_k, A_INT8: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     WARP_SPECIALIZE: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert = tl.load(tile_expert_ptr + pid_m)
    row_start = tl.load(tile_rows_ptr + 2 * pid_m)
    row_end = tl.load(tile_rows_ptr + 2 * pid_m + 1)
    acc_dtype = tl.int32 if A_INT8 else tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    for k0 in tl.range(0, K, BLOCK_K, warp_specialize=WARP_SPECIALIZE):
        a = a_desc.load([row_start, k0])
        w = w_desc.load([expert * N + pid_n * BLOCK_N, k0])
        acc = tl.dot(a, w.T, acc, out_dtype=acc_dtype)
    rows, row_mask, cols, col_mask, cols_safe = tile_rows_and_columns(row_start, row_end, pid_n, N, BLOCK_M, BLOCK_N)
    out = dequantize_add_bias(acc, cols_safe, rows, expert, a_scale_ptr, w_scale_ptr, c_ptr, N, 1, 0,
                              1 if A_INT8 else 0, A_INT8, False)
    scale_and_store_rows(out, rows, row_mask, cols, col_mask, c_ptr, stride_cm, dest_to_source_ptr, router_scales_ptr,
                         num_tokens, top_k, True)


@triton.jit
def _ws_matmul_kernel(a_desc, b_desc, c_ptr, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      WARP_SPECIALIZE: tl.constexpr):
    """The smallest kernel Triton 3.6 partitions on Hopper: c = a @ b.T, one tile a program, both operands on TMA (a TMA
    store of c stops its warp-specialisation pass: "descriptor block and tensor types must match")."""
    pid_m = tl.program_id(0) // tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % tl.cdiv(N, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, warp_specialize=WARP_SPECIALIZE):
        acc = tl.dot(a_desc.load([pid_m * BLOCK_M, k0]), b_desc.load([pid_n * BLOCK_N, k0]).T, acc)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty))


def minimal(warp_specialize: bool, m: int = 8192, n: int = 8192, k: int = 8192) -> None:
    """`_ws_matmul_kernel` on a square bf16 problem, checked against torch and timed: whether warp specialisation runs (and
    pays) on this GPU and Triton at all, apart from anything the grouped kernel does."""
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    descs = [TensorDescriptor.from_tensor(t, box) for t, box in ((a, [128, 64]), (b, [256, 64]))]
    call = lambda: _ws_matmul_kernel[(triton.cdiv(m, 128) * triton.cdiv(n, 256),)](
        *descs, c, n, k, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, WARP_SPECIALIZE=warp_specialize,
        num_warps=4 if warp_specialize else 8, num_stages=3)
    call()
    ref = a.float() @ b.float().T
    err = ((c.float() - ref).norm() / ref.norm()).item()
    us = triton.testing.do_bench(call, warmup=10, rep=100, return_mode="median") * 1e3
    print(f"minimal {'ws' if warp_specialize else 'no ws'}: rel err {err:.1e}, {us:.1f} us, "
          f"{2 * m * n * k / us / 1e6:.0f} TFLOP/s", flush=True)


def tile_table(maps, block_m: int, device):
    """Per row block of `block_m` rows: its expert, and its first and end rows (host-built from the routing offsets)."""
    offsets = maps.expert_first_token_offset.tolist()
    experts, rows = [], []
    for e in range(maps.num_experts):
        for start in range(offsets[e], offsets[e + 1], block_m):
            experts.append(e)
            rows += [start, offsets[e + 1]]
    return (torch.tensor(experts, dtype=torch.int32, device=device), torch.tensor(rows, dtype=torch.int32, device=device))


def ws_gemm2(a, w, out, maps, router_scales, w_scale, a_scale, block_m, block_n, block_k, stages, warp_specialize):
    """() -> out: GEMM2 through `_ws_gemm2_kernel`, tables and descriptors made once."""
    experts, rows = tile_table(maps, block_m, a.device)
    num_experts, n, k = w.shape
    a_desc = TensorDescriptor.from_tensor(a, [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(w.view(-1, k), [block_n, block_k])
    grid = (experts.numel() * triton.cdiv(n, block_n),)
    int8 = a_scale is not None

    def call():
        _ws_gemm2_kernel[grid](out, experts, rows, maps.expanded_dest_row_to_expanded_source_row, router_scales,
                               w_scale if int8 else router_scales, a_scale if int8 else router_scales, a_desc, w_desc,
                               maps.num_tokens, n, k, experts.numel(), out.stride(0), maps.top_k, A_INT8=int8,
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                               WARP_SPECIALIZE=warp_specialize, num_warps=4 if warp_specialize else 8, num_stages=stages)
        return out

    return call


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="qwen3-30b-a3b,deepseek-v2-lite,olmoe-1b-7b")
    p.add_argument("--tokens", default="1024,4096")
    p.add_argument("--quant", default="none,w8a8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warp-specialize", action="store_true", help="also the warp-specialised kernels (they hung: docstring)")
    p.add_argument("--minimal", action="store_true", help="only `minimal` (8192^3 bf16), without then with warp specialisation")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.minimal:
        minimal(False)
        minimal(True)
        return 0
    from simple_moe.bench import rel_err, write_results_json

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
                ref_out = torch.empty(tokens * top_k, hidden, device=dev, dtype=torch.bfloat16)
                calls = {"library": lambda: grouped_gemm(a2, q2, ref_out, maps, gather_a=False, router_scales=scales,
                                                         **int8_args)}
                block_k = 128 if quant is not None else 64
                candidates = [(256, 4, False), (256, 3, False)]
                if args.warp_specialize:
                    candidates += [(256, 3, True), (256, 4, True), (128, 4, True)]
                for block_n, stages, ws in candidates:
                    out = torch.full_like(ref_out, float("nan"))
                    calls[f"128x{block_n}x{block_k} s{stages}{' ws' if ws else ''}"] = ws_gemm2(
                        a2, q2, out, maps, scales, int8_args.get("w_scale"), int8_args.get("a_scale"), 128, block_n,
                        block_k, stages, ws)
                kept = int(maps.expert_first_token_offset[-1])
                errors, times = {}, {label: [] for label in calls}
                calls["library"]()
                for label, call in list(calls.items()):
                    print(f"{name} {quant_name} T={tokens} {label}: checking", flush=True)  # a hang names its candidate
                    try:
                        got = call()
                    except Exception as e:  # a compile failure of one candidate does not stop the others
                        print(f"{name} {quant_name} T={tokens} {label}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        del calls[label], times[label]
                        continue
                    errors[label] = ("bitwise equal" if torch.equal(got[:kept], ref_out[:kept])
                                     else f"{rel_err(got[:kept], ref_out[:kept].double()):.1e}")
                for _ in range(args.rounds):
                    for label, call in calls.items():
                        times[label].append(bench(call))
                row = {"shape": name, "quant": quant_name, "T": tokens, "us": {k: statistics.median(v) for k, v in times.items()},
                       "vs_library": errors, "rounds": times}
                results.append(row)
                print(f"{name:18s} {quant_name:5s} T={tokens:5d} " + "  ".join(
                    f"{k}: {v:7.1f} us ({errors[k]})" for k, v in row["us"].items()), flush=True)
    if args.out:
        write_results_json(args.out, {"rows": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
