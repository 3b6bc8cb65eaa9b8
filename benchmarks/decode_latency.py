"""Decode latency of the whole layer under the launch and prefetch knobs, eager and replayed from a CUDA graph.

    PYTHONPATH=src python3 benchmarks/decode_latency.py [--tokens 1,4] [--out results/decode_latency.json]

Each setting runs in its own process (the knobs are read at import): `SIMPLE_MOE_PDL=0` (plain launches) or 1 (programmatic
dependent launches where grouped_gemm.gemm_launches_early allows them). Every setting's output must be bitwise equal to the
plain one's (the knob changes when work starts, never what it computes).

Two L2-prefetch experiments, since removed, were measured with it: GEMM1 prefetching fc2 (`prefetch.global.L2::evict_last`
for the active experts' fc2 columns, when they fit in 3/4 of L2; decode_latency_h100_v5.json, before the decode path):
slower at every T=1 point (Qwen3-30B bf16 50.0 -> 55.6 us in a graph, DeepSeek-V2-Lite 60.7 -> 69.1, OLMoE 58.7 -> 66.4);
and, on the decode path, GEMM2's early-launched programs prefetching their own weight rows before waiting for GEMM1
(decode_latency_h100_v5b.json, setting "pdl+prefetch"): slower too (46.5 -> 48.9, 56.2 -> 58.9, 54.4 -> 56.6).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

SETTINGS = {"plain": {"SIMPLE_MOE_PDL": "0"}, "pdl": {"SIMPLE_MOE_PDL": "1"}}
SHAPES = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite", "olmoe-1b-7b")
SCHEMES = ("bf16", "w8a16", "w8a8")


def child(tokens_list, outputs_dir, schemes):
    import torch
    import triton

    import simple_moe as sm
    from simple_moe.bench import capture_graph, ceilings_for, moe_floor
    from simple_moe.grouped_gemm import MODEL_SHAPES
    from simple_moe.quant import quantize_moe_weights

    dev = torch.device("cuda")
    ceilings = ceilings_for(dev)  # baselines.md's on its H100, measured here on any other GPU
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3  # noqa: E731
    rows = []
    for name in SHAPES:
        num_experts, top_k, hidden, inter = MODEL_SHAPES[name]
        gen = torch.Generator(device=dev).manual_seed(0)
        w1 = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16, generator=gen) / math.sqrt(hidden)
        w2 = torch.randn(num_experts, hidden, inter, device=dev, dtype=torch.bfloat16, generator=gen) / math.sqrt(inter)
        for scheme in schemes:
            if scheme == "bf16":
                f1, f2, quant = w1, w2, None
            else:
                f1, f2, quant = quantize_moe_weights(w1, w2, scheme)
            for tokens in tokens_list:
                x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
                scales, ids = sm.route(torch.randn(tokens, num_experts, device=dev, generator=gen), top_k)
                out = torch.empty(tokens, hidden, device=dev, dtype=torch.bfloat16)
                call = lambda: sm.fused_moe_simple(x, ids, scales, f1, f2, output=out, quant=quant)  # noqa: E731
                call()
                torch.cuda.synchronize()
                torch.save(out.cpu(), os.path.join(outputs_dir, f"{name}-{scheme}-{tokens}.pt"))
                eager = bench(call)
                graph = capture_graph(call, dev)
                graph_us = bench(graph.replay)
                graph.replay()
                torch.cuda.synchronize()
                replay_equal = bool(torch.equal(out.cpu(), torch.load(os.path.join(outputs_dir, f"{name}-{scheme}-{tokens}.pt"))))
                active = int(torch.unique(ids).numel())
                floor = moe_floor(active, top_k, hidden, inter, tokens, torch.bfloat16, ceilings=ceilings)["floor_us"]
                rows.append({"shape": name, "scheme": scheme, "T": tokens, "eager_us": eager, "graph_us": graph_us,
                             "floor_bf16_us": floor, "replay_equal": replay_equal})
                print(json.dumps(rows[-1]), flush=True)
                del graph
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,4")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    tokens_list = [int(t) for t in args.tokens.split(",")]
    if args.child:
        child(tokens_list, args.child, args.schemes.split(","))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings.split(","):
            outputs = os.path.join(tmp, setting)
            os.makedirs(outputs)
            env = {**os.environ, **SETTINGS[setting]}
            proc = subprocess.run([sys.executable, __file__, "--tokens", args.tokens, "--schemes", args.schemes, "--child",
                                   outputs], env=env,
                                  capture_output=True, text=True)
            rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode:
                print(f"{setting}: exit {proc.returncode}\n{proc.stderr[-3000:]}", flush=True)
            import torch

            for row in rows:
                stem = f"{row['shape']}-{row['scheme']}-{row['T']}.pt"
                plain = os.path.join(tmp, "plain", stem)
                row["bitwise_equal_to_plain"] = (bool(torch.equal(torch.load(plain), torch.load(os.path.join(outputs, stem))))
                                                 if os.path.exists(plain) else None)
            results[setting] = rows
            for row in rows:
                print(f"{setting:13s} {row['shape']:17s} {row['scheme']:6s} T={row['T']:<3d} eager {row['eager_us']:7.1f} "
                      f"graph {row['graph_us']:7.1f} floor(bf16) {row['floor_bf16_us']:6.1f} "
                      f"equal {row['bitwise_equal_to_plain']} replay {row['replay_equal']}", flush=True)
    if args.out:
        from simple_moe.bench import write_results_json

        write_results_json(args.out, {"settings": SETTINGS, "results": results})


if __name__ == "__main__":
    main()
