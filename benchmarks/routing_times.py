"""Time of the two routing paths (one launch vs three chunked launches) against T*top_k, to place the switch between them:
eager (host launch cost included when it exceeds the GPU time) and replayed from a CUDA graph (GPU time only).

    PYTHONPATH=src python3 benchmarks/routing_times.py [--tokens 1,16,64,256,512,1024,2048,4096]
"""
from __future__ import annotations

import argparse

import torch
import triton

import simple_moe as sm
from simple_moe import routing
from simple_moe.bench import capture_graph
from simple_moe.grouped_gemm import MODEL_SHAPES

COLUMNS = ("one", "one graph", "chunked", "chunked graph")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,16,64,256,512,1024,2048,4096")
    p.add_argument("--shapes", default="mixtral-8x7b,qwen3-30b-a3b,deepseek-v2-lite,olmoe-1b-7b")
    args = p.parse_args()
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3
    default = routing.ONE_LAUNCH_MAX_ROWS
    print(f"{'shape':18s} {'T':>5s} {'rows':>6s} " + " ".join(f"{c:>11s}" for c in COLUMNS) + "  (us)")
    for name in args.shapes.split(","):
        num_experts, top_k, _, _ = MODEL_SHAPES[name]
        for tokens in map(int, args.tokens.split(",")):
            rows = tokens * top_k
            ids = torch.stack([torch.randperm(num_experts, device="cuda")[:top_k] for _ in range(tokens)]).int()
            times = {}
            # The one-launch path takes up to `default` rows; a limit of 16 sends anything larger down the chunked path.
            for label, limit, applies in (("one", default, rows <= default), ("chunked", 16, rows > 16)):
                if not applies:
                    continue
                routing.ONE_LAUNCH_MAX_ROWS = limit
                call = lambda: sm.build_routing_maps(ids, num_experts)
                times[label] = bench(call)
                times[label + " graph"] = bench(capture_graph(call, ids.device).replay)
            routing.ONE_LAUNCH_MAX_ROWS = default
            print(f"{name:18s} {tokens:5d} {rows:6d} " + " ".join(f"{times.get(c, float('nan')):11.1f}" for c in COLUMNS),
                  flush=True)


if __name__ == "__main__":
    main()
