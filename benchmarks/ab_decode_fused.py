"""The one-kernel decode path (`decode_fused.py`) against the two-kernel one (`decode.py`), whole layer in a CUDA graph.

    PYTHONPATH=src python3 benchmarks/ab_decode_fused.py [--shapes ...] [--schemes bf16,w8a16] [--tokens 1,2] [--out f.json]

1. Sweep: every candidate tile of the fused kernel once (do_bench median, L2 flushed), its output first checked against the
   two-kernel path's (relative L2 difference under the dtype's tolerance; both are checked against float64 by the tests).
2. A/B: the two-kernel path, the rule's fused tile and the sweep's three fastest in `--rounds` interleaved rounds; the
   median of the rounds is reported.
"""
from __future__ import annotations

import argparse
import itertools
import math
import statistics

import torch
import triton

import simple_moe as sm
from simple_moe.activations import get_activation
from simple_moe.bench import capture_graph, write_results_json
from simple_moe.decode import DecodePlan
from simple_moe.decode_fused import FusedDecodePlan, FusedDecodeTile, fused_decode_tile
from simple_moe.grouped_gemm import MODEL_SHAPES
from simple_moe.quant import quantize_moe_weights

SHAPES = ("qwen3-30b-a3b", "deepseek-v2-lite", "olmoe-1b-7b", "mixtral-8x7b")


def candidates(rule: FusedDecodeTile):
    seen = [rule]
    for (block_i, block_k), block_h, warps, reduce in itertools.product(
            ((32, 128), (64, 64), (64, 128)), (64, 128, 256), (4, 8), ((16, 4), (8, 2))):
        seen.append(FusedDecodeTile(block_i, block_k, block_h, warps, *reduce))
    return list(dict.fromkeys(seen))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--schemes", default="bf16,w8a16")
    p.add_argument("--ab-top", type=int, default=3, help="the sweep's fastest tiles that go on to the A/B rounds")
    p.add_argument("--tokens", default="1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    bench = lambda fn: triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3  # noqa: E731
    swiglu = get_activation("swiglu")
    rows = []
    for name in args.shapes.split(","):
        num_experts, top_k, hidden, inter = MODEL_SHAPES[name]
        gen = torch.Generator(device=dev).manual_seed(0)
        w1 = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16, generator=gen) / math.sqrt(hidden)
        w2 = torch.randn(num_experts, hidden, inter, device=dev, dtype=torch.bfloat16, generator=gen) / math.sqrt(inter)
        for scheme in args.schemes.split(","):
            f1, f2, quant = (w1, w2, None) if scheme == "bf16" else quantize_moe_weights(w1, w2, "w8a16")
            for tokens in map(int, args.tokens.split(",")):
                x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
                scales, ids = sm.route(torch.randn(tokens, num_experts, device=dev, generator=gen), top_k)
                out = torch.empty(tokens, hidden, device=dev, dtype=torch.bfloat16)
                call_args = (x, ids, scales, f1, f2, None, None, None, out, quant)

                def graph_of(plan):
                    run = lambda: plan(*call_args)  # noqa: E731
                    out.fill_(float("nan"))
                    run()
                    return capture_graph(run, dev), out.float().clone()

                two_graph, two_out = graph_of(DecodePlan(x, ids, scales, f1, f2, swiglu, "gate_first", None, None, None, out,
                                                         quant))
                rule = fused_decode_tile(inter, hidden, f1.element_size())
                graphs, sweep = {}, {}
                for tile in candidates(rule):
                    graph, result = graph_of(FusedDecodePlan(x, ids, scales, f1, f2, swiglu, "gate_first", None, None, None,
                                                             out, quant, tile=tile))
                    err = ((result - two_out).norm() / two_out.norm()).item()
                    assert math.isfinite(err) and err < 1e-2, (name, scheme, tokens, str(tile), err)
                    graphs[tile], sweep[str(tile)] = graph, bench(graph.replay)
                fastest = sorted(graphs, key=lambda t: sweep[str(t)])[:args.ab_top]
                contenders = {"two-kernel": two_graph, **{f"fused {t}": graphs[t] for t in dict.fromkeys([rule, *fastest])}}
                rounds = {label: [] for label in contenders}
                for _ in range(args.rounds):
                    for label, graph in contenders.items():
                        rounds[label].append(bench(graph.replay))
                median = {label: statistics.median(us) for label, us in rounds.items()}
                rows.append({"shape": name, "scheme": scheme, "T": tokens, "rule": str(rule), "ab_median_us": median,
                             "ab_rounds_us": rounds, "sweep_us": sweep})
                print(f"{name:17s} {scheme:5s} T={tokens}: " + "  ".join(f"{label} {us:.1f}" for label, us in median.items()),
                      flush=True)
                del graphs, two_graph
        del w1, w2
        torch.cuda.empty_cache()
    if args.out:
        write_results_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
