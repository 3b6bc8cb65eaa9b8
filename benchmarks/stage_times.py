"""Per-stage GPU times of the fast path (routing, GEMM1, GEMM2, finalize) and the whole layer, eager and in a CUDA graph.

    PYTHONPATH=src python3 benchmarks/stage_times.py [--tokens 1,16,64,256,1024,4096] [--dtype bf16]

Prints one row per (shape, T) with the floor of baselines.md, so the gap is visible stage by stage; first checks the output
against the float64 reference on up to 64 sampled tokens.
"""
from __future__ import annotations

import argparse
import math

import torch
import triton

import simple_moe as sm
from simple_moe.activations import get_activation
from simple_moe.bench import capture_graph, moe_floor
from simple_moe.finalize import finalize
from simple_moe.grouped_gemm import MODEL_SHAPES, grouped_gemm


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,16,64,256,1024,4096")
    p.add_argument("--shapes", default="mixtral-8x7b,qwen3-30b-a3b,deepseek-v2-lite,olmoe-1b-7b")
    p.add_argument("--dtype", default="bf16")
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = torch.device("cuda")
    act = get_activation("swiglu")
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3
    print(f"{'shape':18s} {'T':>5s} {'floor':>7s} {'route':>7s} {'gemm1':>8s} {'gemm2':>8s} {'final':>7s} {'eager':>8s} "
          f"{'graph':>8s} {'eff':>5s} {'err':>8s}")
    for name in args.shapes.split(","):
        num_experts, top_k, hidden, inter = MODEL_SHAPES[name]
        torch.manual_seed(0)
        w1 = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=dtype) / math.sqrt(hidden)
        w2 = torch.randn(num_experts, hidden, inter, device=dev, dtype=dtype) / math.sqrt(inter)
        for tokens in map(int, args.tokens.split(",")):
            x = torch.randn(tokens, hidden, device=dev, dtype=dtype)
            scales, ids = sm.route(torch.randn(tokens, num_experts, device=dev), top_k)
            out = sm.fused_moe_simple(x, ids, scales, w1, w2)
            sample = torch.randperm(tokens, device=dev)[:64]
            ref = sm.reference_moe(x[sample], ids[sample], scales[sample], w1, w2)
            err = ((out[sample].double() - ref).norm() / ref.norm()).item()
            maps = sm.build_routing_maps(ids, num_experts)
            rows = tokens * top_k
            inter_buf = torch.empty(rows, inter, device=dev, dtype=dtype)
            out2 = torch.empty(rows, hidden, device=dev, dtype=dtype)
            t_route = bench(lambda: sm.build_routing_maps(ids, num_experts))
            t_g1 = bench(lambda: grouped_gemm(x, w1, inter_buf, maps, gather_a=True, activation=act))
            t_g2 = bench(lambda: grouped_gemm(inter_buf, w2, out2, maps, gather_a=False, router_scales=scales))
            t_fin = bench(lambda: finalize(out2, maps, None, output=out))
            t_eager = bench(lambda: sm.fused_moe_simple(x, ids, scales, w1, w2, output=out))
            graph = capture_graph(lambda: sm.fused_moe_simple(x, ids, scales, w1, w2, output=out), dev)
            t_graph = bench(graph.replay)
            active = int(torch.unique(ids).numel())
            fl = moe_floor(active, top_k, hidden, inter, tokens, dtype)["floor_us"]
            print(f"{name:18s} {tokens:5d} {fl:7.1f} {t_route:7.1f} {t_g1:8.1f} {t_g2:8.1f} {t_fin:7.1f} {t_eager:8.1f} "
                  f"{t_graph:8.1f} {fl / t_eager:5.2f} {err:8.1e}", flush=True)


if __name__ == "__main__":
    main()
