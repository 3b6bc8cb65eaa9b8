"""W8A8 GEMM2 alone, each launch captured in a CUDA graph (no host time): the TMA kernel against the warp-specialised Gluon
kernel the library now runs on SM90 (grouped_gemm_gluon.py), with and without its row-block table launch, and the table alone.

    PYTHONPATH=src python3 benchmarks/gluon_gemm2.py --out results/gluon_gemm2_graph_h100.json

Outputs are compared bit for bit (int32 accumulation is exact). The probe this kernel came from (NOTES experiment 20: one
8-warp consumer against two 4-warp ones, 3 or 4 stages, stores straight from the wgmma layout or through shared memory, bf16
operands too) is `benchmarks/gluon_gemm2.py` at commit 5990dde; its results are `gluon_gemm2_split{0,1}_h100.json`.
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch
import triton

import simple_moe as sm
from simple_moe.bench import capture_graph, write_results_json
from simple_moe.grouped_gemm import MODEL_SHAPES, gemm_tile_config, grouped_gemm
from simple_moe.grouped_gemm_gluon import grouped_gemm2_w8a8_gluon, row_block_table, BLOCK_M
from simple_moe.grouped_gemm_tma import grouped_gemm2_tma
from simple_moe.quant import quantize_moe_weights


def w8a8_problems(shapes: str, tokens: str, device):
    """Yields (shape, T, (E, top_k, H, I), maps, router scales, the W8A8 scheme, int8 fc1, int8 fc2) for each comma-listed
    baselines.md shape and T: random bf16 weights quantised per channel, random router logits (gluon_gemm1.py uses it too)."""
    for name in shapes.split(","):
        num_experts, top_k, hidden, inter = MODEL_SHAPES[name]
        torch.manual_seed(0)
        w1 = torch.randn(num_experts, 2 * inter, hidden, device=device, dtype=torch.bfloat16) / math.sqrt(hidden)
        w2 = torch.randn(num_experts, hidden, inter, device=device, dtype=torch.bfloat16) / math.sqrt(inter)
        q1, q2, quant = quantize_moe_weights(w1, w2, "w8a8")
        for num_tokens in map(int, tokens.split(",")):
            scales, ids = sm.route(torch.randn(num_tokens, num_experts, device=device), top_k)
            yield name, num_tokens, MODEL_SHAPES[name], sm.build_routing_maps(ids, num_experts), scales, quant, q1, q2


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="qwen3-30b-a3b,deepseek-v2-lite,olmoe-1b-7b")
    p.add_argument("--tokens", default="1024,4096")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev, results = torch.device("cuda"), []
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3  # noqa: E731
    for name, tokens, shape, maps, scales, quant, _, q2 in w8a8_problems(args.shapes, args.tokens, dev):
        num_experts, top_k, hidden, inter = shape
        rows = tokens * top_k
        a2, int8_args = quant.gemm2_operands(torch.randn(rows, inter, device=dev, dtype=torch.bfloat16), maps)
        cfg = gemm_tile_config(rows, num_experts, hidden, inter, torch.bfloat16, 90, False, w_int8=True, a_int8=True)
        table = row_block_table(maps.expert_first_token_offset, rows, BLOCK_M)
        outs = {k: torch.full((rows, hidden), float("nan"), device=dev, dtype=torch.bfloat16)
                for k in ("tma", "library", "gluon")}
        calls = {
            "tma kernel": lambda: grouped_gemm2_tma(a2, q2, outs["tma"], maps, bias=None, router_scales=scales,
                                                    cfg=cfg, **int8_args),
            "library (table + gluon)": lambda: grouped_gemm(a2, q2, outs["library"], maps, gather_a=False,
                                                            router_scales=scales, **int8_args),
            "gluon kernel": lambda: grouped_gemm2_w8a8_gluon(a2, q2, outs["gluon"], maps, bias=None,
                                                             router_scales=scales, table=table, **int8_args),
            "row-block table": lambda: row_block_table(maps.expert_first_token_offset, rows, BLOCK_M),
        }
        graphs = {label: capture_graph(call, dev) for label, call in calls.items()}
        kept = int(maps.expert_first_token_offset[-1])
        same = all(torch.equal(outs[k][:kept], outs["tma"][:kept]) for k in ("library", "gluon"))
        times = {label: [] for label in graphs}
        for _ in range(args.rounds):
            for label, graph in graphs.items():
                times[label].append(bench(graph.replay))
        row = {"shape": name, "T": tokens, "us": {k: statistics.median(v) for k, v in times.items()},
               "bitwise_equal_to_tma": same, "rounds": times}
        results.append(row)
        print(f"{name:18s} T={tokens:5d} " + "  ".join(f"{k}: {v:6.1f}" for k, v in row["us"].items())
              + f"  (us; outputs {'bitwise equal' if same else 'DIFFER'})", flush=True)
    if args.out:
        write_results_json(args.out, {"rows": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
