"""Finalize's block (columns a program x warps) at prefill sizes: each candidate timed alone (do_bench median, L2 flushed),
output checked bitwise against the rule's (the sum order does not depend on the block).

    PYTHONPATH=src python3 benchmarks/tune_finalize.py [--tokens 1024,4096] [--out results/finalize_blocks.json]
"""
from __future__ import annotations

import argparse

import torch
import triton

import simple_moe as sm
from simple_moe.bench import write_results_json
from simple_moe.finalize import finalize
from simple_moe.grouped_gemm import MODEL_SHAPES

BLOCKS = ((1024, 4), (2048, 8), (512, 2), (512, 4), (1024, 8), (2048, 4), (256, 1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1024,4096")
    p.add_argument("--shapes", default="mixtral-8x7b,qwen3-30b-a3b,deepseek-v2-lite,olmoe-1b-7b")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    rows_out = []
    for name in args.shapes.split(","):
        num_experts, top_k, hidden, _ = MODEL_SHAPES[name]
        for tokens in map(int, args.tokens.split(",")):
            _, ids = sm.route(torch.randn(tokens, num_experts, device=dev), top_k)
            maps = sm.build_routing_maps(ids, num_experts)
            gemm2_out = torch.randn(tokens * top_k, hidden, device=dev, dtype=torch.bfloat16)
            expected = finalize(gemm2_out, maps, None)
            times = {}
            for block_h, warps in BLOCKS:
                out = finalize(gemm2_out, maps, None, block=(block_h, warps))
                assert torch.equal(out, expected), (name, tokens, block_h, warps)
                times[f"{block_h}x w{warps}"] = triton.testing.do_bench(
                    lambda: finalize(gemm2_out, maps, None, output=out, block=(block_h, warps)), warmup=10, rep=50,
                    return_mode="median") * 1e3
            moved = (gemm2_out.numel() + tokens * hidden) * gemm2_out.element_size()
            best = min(times, key=times.get)
            rows_out.append({"shape": name, "T": tokens, "bytes": moved, "times_us": times})
            print(f"{name:17s} T={tokens:5d} {moved / 1e6:6.1f} MB  " + "  ".join(f"{k} {v:6.1f}" for k, v in times.items())
                  + f"   best {best} ({moved / times[best] / 1e6:.2f} TB/s)", flush=True)
    if args.out:
        write_results_json(args.out, {"results": rows_out})


if __name__ == "__main__":
    main()
