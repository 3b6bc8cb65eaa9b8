"""W8A8 GEMM1 and GEMM2 alone, each launch captured in a CUDA graph (no host time): the Triton kernel the rules' tile runs on
without Gluon (GEMM1: cp.async with the gather; GEMM2: TMA) against the warp-specialised Gluon kernel the library runs on SM90
(grouped_gemm_gluon.py), with and without its row-block table launch, and the table alone. Every row of the grid is timed
whatever the library's rows-an-expert rule would pick, since these numbers are what the rule rests on.

    PYTHONPATH=src python3 benchmarks/gluon_gemms.py --out results/gluon_gemms_h100.json

Outputs are compared bit for bit (int32 accumulation is exact). The probes these kernels came from are
`benchmarks/gluon_gemm2.py` at 5990dde (NOTES experiment 20: results `gluon_gemm2_split{0,1}_h100.json`,
`gluon_gemm2_graph_h100.json`) and `benchmarks/gluon_gemm1.py` at b521443 (experiment 21: `gluon_gemm1_h100.json`).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics

import torch
import triton

import simple_moe as sm
from simple_moe import grouped_gemm_gluon
from simple_moe.activations import get_activation
from simple_moe.bench import capture_graph, write_results_json
from simple_moe.grouped_gemm import MODEL_SHAPES, GroupedGemmPlan
from simple_moe.grouped_gemm_gluon import row_block_table, shared_row_block_table
from simple_moe.quant import quantize_moe_weights


def w8a8_problems(shapes: str, tokens: str, device):
    """Yields (shape, T, (E, top_k, H, I), maps, router scales, the W8A8 scheme, int8 fc1, int8 fc2) for each comma-listed
    baselines.md shape and T: random bf16 weights quantised per channel, random router logits."""
    for name in shapes.split(","):
        num_experts, top_k, hidden, inter = MODEL_SHAPES[name]
        torch.manual_seed(0)
        w1 = torch.randn(num_experts, 2 * inter, hidden, device=device, dtype=torch.bfloat16) / math.sqrt(hidden)
        w2 = torch.randn(num_experts, hidden, inter, device=device, dtype=torch.bfloat16) / math.sqrt(inter)
        q1, q2, quant = quantize_moe_weights(w1, w2, "w8a8")
        for num_tokens in map(int, tokens.split(",")):
            scales, ids = sm.route(torch.randn(num_tokens, num_experts, device=device), top_k)
            yield name, num_tokens, MODEL_SHAPES[name], sm.build_routing_maps(ids, num_experts), scales, quant, q1, q2


@contextlib.contextmanager
def min_rows_per_expert(rows: int):
    """Plans made inside take the Gluon kernels from `rows` rows an expert (0: always; huge: never)."""
    saved = grouped_gemm_gluon.MIN_ROWS_PER_EXPERT
    grouped_gemm_gluon.MIN_ROWS_PER_EXPERT = rows
    try:
        yield
    finally:
        grouped_gemm_gluon.MIN_ROWS_PER_EXPERT = saved


def gemm_calls(gemm: int, tokens: int, shape, maps, scales, quant, q1, q2, device, activation="swiglu"):
    """(output buffers, {label: call}) for one GEMM of one routed problem: Triton, Gluon with and without its table launch."""
    _, top_k, hidden, inter = shape
    rows = tokens * top_k
    if gemm == 1:
        a, int8_args = quant.gemm1_operands(torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16))
        weights, out_shape = q1, (rows, inter)
        plan_args = {"gather_a": True, "activation": get_activation(activation)}
        call_args = int8_args
    else:
        a, int8_args = quant.gemm2_operands(torch.randn(rows, inter, device=device, dtype=torch.bfloat16), maps)
        weights, out_shape = q2, (rows, hidden)
        plan_args = {"gather_a": False}
        call_args = {"router_scales": scales, **int8_args}
    outs = {k: torch.full(out_shape, float("nan"), device=device, dtype=torch.bfloat16) for k in ("triton", "gluon", "kernel")}
    with min_rows_per_expert(1 << 30):
        triton_plan = GroupedGemmPlan(a, weights, outs["triton"], maps, **plan_args, **call_args)
    with min_rows_per_expert(0):
        gluon_plan = GroupedGemmPlan(a, weights, outs["gluon"], maps, **plan_args, **call_args)
    assert (triton_plan.gluon, gluon_plan.gluon) == (0, gemm), "the rules' tile no longer matches the Gluon kernel's"
    tables = {}
    shared_row_block_table(maps, rows, tables)
    calls = {
        "triton kernel": lambda: triton_plan(a, weights, outs["triton"], maps, **call_args),
        "library gluon (table + kernel)": lambda: gluon_plan(a, weights, outs["gluon"], maps, **call_args),
        "gluon kernel": lambda: gluon_plan(a, weights, outs["kernel"], maps, tables=tables, **call_args),
        "row-block table": lambda: row_block_table(maps.expert_first_token_offset, rows),
    }
    return outs, calls


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gemms", default="1,2")
    p.add_argument("--shapes", default="qwen3-30b-a3b,deepseek-v2-lite,olmoe-1b-7b")
    p.add_argument("--tokens", default="1024,4096")
    p.add_argument("--activation", default="swiglu", help="GEMM1's (gated)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev, results = torch.device("cuda"), []
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3  # noqa: E731
    for name, tokens, shape, maps, scales, quant, q1, q2 in w8a8_problems(args.shapes, args.tokens, dev):
        for gemm in map(int, args.gemms.split(",")):
            outs, calls = gemm_calls(gemm, tokens, shape, maps, scales, quant, q1, q2, dev, args.activation)
            graphs = {label: capture_graph(call, dev) for label, call in calls.items()}
            kept = int(maps.expert_first_token_offset[-1])
            same = all(torch.equal(outs[k][:kept], outs["triton"][:kept]) for k in ("gluon", "kernel"))
            times = {label: [] for label in graphs}
            for _ in range(args.rounds):
                for label, graph in graphs.items():
                    times[label].append(bench(graph.replay))
            row = {"gemm": gemm, "activation": args.activation if gemm == 1 else None, "shape": name, "T": tokens, "rows_per_expert": tokens * shape[1] / shape[0],
                   "us": {k: statistics.median(v) for k, v in times.items()}, "bitwise_equal_to_triton": same,
                   "rounds": times}
            results.append(row)
            print(f"GEMM{gemm} {name:18s} T={tokens:5d} " + "  ".join(f"{k}: {v:6.1f}" for k, v in row["us"].items())
                  + f"  (us; outputs {'bitwise equal' if same else 'DIFFER'})", flush=True)
    if args.out:
        write_results_json(args.out, {"rows": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
