"""Sweeps grouped-GEMM tile configs on the GPU, per GEMM, at the baselines.md shapes; the data behind gemm_tile_config's rules.

    PYTHONPATH=src python3 benchmarks/tune_tiles.py --out results/tune.json [--tokens 1,16,256,4096] [--shapes qwen3-30b-a3b]

For each (shape, T, GEMM) it times the heuristic's pick and each candidate with do_bench (median, L2 flushed), and prints the best.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import triton

import simple_moe as sm
from simple_moe.activations import get_activation
from simple_moe.autotune import candidate_configs
from simple_moe.grouped_gemm import MODEL_SHAPES, device_arch, gemm_tile_config, grouped_gemm


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,256,4096")
    p.add_argument("--shapes", default="mixtral-8x7b,qwen3-30b-a3b,deepseek-v2-lite,olmoe-1b-7b")
    p.add_argument("--out", default=None)
    p.add_argument("--budget-s", type=float, default=300.0)
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    arch = device_arch(dev)
    dtype = torch.bfloat16
    act = get_activation("swiglu")
    results = []
    t_start = time.time()
    for name in args.shapes.split(","):
        num_experts, top_k, hidden, inter = MODEL_SHAPES[name]
        w1 = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=dtype) / math.sqrt(hidden)
        w2 = torch.randn(num_experts, hidden, inter, device=dev, dtype=dtype) / math.sqrt(inter)
        for tokens in map(int, args.tokens.split(",")):
            x = torch.randn(tokens, hidden, device=dev, dtype=dtype)
            scales, ids = sm.route(torch.randn(tokens, num_experts, device=dev), top_k)
            maps = sm.build_routing_maps(ids, num_experts)
            rows = tokens * top_k
            inter_buf = torch.empty(rows, inter, device=dev, dtype=dtype)
            out2 = torch.empty(rows, hidden, device=dev, dtype=dtype)
            for gemm1 in (True, False):
                n, k = (inter, hidden) if gemm1 else (hidden, inter)

                def run(cfg):
                    if gemm1:
                        return lambda: grouped_gemm(x, w1, inter_buf, maps, gather_a=True, activation=act, config=cfg)
                    return lambda: grouped_gemm(inter_buf, w2, out2, maps, gather_a=False, router_scales=scales, config=cfg)

                pick = gemm_tile_config(rows, num_experts, n, k, dtype, arch, gated=gemm1)
                t_pick = triton.testing.do_bench(run(pick), warmup=10, rep=30, return_mode="median")
                best = (t_pick, pick)
                for cfg in candidate_configs(pick.block_m, gemm1):
                    if time.time() - t_start > args.budget_s:
                        break
                    try:
                        t = triton.testing.do_bench(run(cfg), warmup=5, rep=20, return_mode="median")
                    except Exception:  # out of resources etc.
                        continue
                    if t < best[0]:
                        best = (t, cfg)
                row = {"shape": name, "T": tokens, "gemm": 1 if gemm1 else 2, "pick": str(pick), "pick_us": t_pick * 1e3,
                       "best": str(best[1]), "best_us": best[0] * 1e3}
                results.append(row)
                print(f"{name:18s} T={tokens:5d} gemm{row['gemm']}  pick {row['pick']:28s} {row['pick_us']:8.1f} us   "
                      f"best {row['best']:28s} {row['best_us']:8.1f} us", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
