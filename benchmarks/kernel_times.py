"""Each kernel's GPU time inside a whole layer, the idle time between them, and how both move under sustained load.

    PYTHONPATH=src python3 benchmarks/kernel_times.py [--shapes qwen3-30b-a3b,...] [--tokens 1,4096] [--scheme bf16|w8a16|w8a8]
                                                     [--eager] [--iters 20] [--load-rounds 0] [--out results/kernel_times.json]

The layer (the bench's inputs and seeds) is replayed from a CUDA graph (or called eagerly with --eager) --iters times under
torch.profiler, each time after the L2 flush do_bench does (a 256 MB write). Per kernel: the median duration over the
iterations; per layer: the span from its first kernel's start to its last kernel's end, and the gaps inside it. The layer is
profiled on an idle GPU, then timed by do_bench as the bench times it (25 ms warm-up, 100 ms of repeats), then profiled again
right after: the second profile sees the clocks the bench's own timing runs at. The SM clock, board power and temperature
(NVML, through torch) are read after each step. With --load-rounds N, each point then runs N rounds of: profile after 1 s
idle, do_bench 25/1000 ms (a second of load), profile again.

First, the harness's own floor: do_bench of an empty kernel (one program, and 768 programs of 8 warps), eager and from a graph:
the part of every do_bench figure that no kernel can remove.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time

import torch
import triton
import triton.language as tl
from torch.profiler import ProfilerActivity, profile

import simple_moe as sm
from simple_moe.bench import (DO_BENCH_FLUSH_BYTES, capture_graph, gpu_state, make_tokens, make_weights,
                              write_results_json)
from simple_moe.grouped_gemm import MODEL_SHAPES
from simple_moe.quant import quantize_moe_weights


def bench_us(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


@triton.jit
def _empty_kernel(x_ptr):
    if tl.program_id(0) < 0:  # never: the kernel must keep its argument
        tl.store(x_ptr, 0.0)


def harness_floor(device) -> dict:
    """do_bench of an empty kernel (one 1-warp program; 768 programs of 8 warps, GEMM1's T=1 grid), eager and in a graph."""
    x = torch.empty(1, device=device)
    floors = {}
    for name, programs, warps in (("1 program", 1, 1), ("768 programs x 8 warps", 768, 8)):
        launch = lambda: _empty_kernel[(programs,)](x, num_warps=warps)  # noqa: E731
        launch()
        floors[name] = {"eager_us": bench_us(launch), "graph_us": bench_us(capture_graph(launch, device).replay)}
    return floors


def short_name(kernel: str) -> str:
    """`_grouped_gemm_kernel_0d1d...` -> `_grouped_gemm_kernel`: the Triton kernel's name without its specialisation suffix."""
    return re.sub(r"_\d+d\d+d.*$", "", kernel.split("(")[0])


def layer_kernel_times(layer, iters: int, flush: torch.Tensor) -> dict:
    """Profiles `iters` calls of `layer`, each after an L2 flush; per-kernel medians (keyed by position in the call, since
    a layer may launch one kernel twice), the median span and the median sum of gaps between consecutive kernels."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            flush.zero_()
            layer()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    calls, current = [], None
    for e in kernels:
        if "FillFunctor" in e.name and e.time_range.end - e.time_range.start > 20.0:
            current = []  # the flush (a 256 MB fill, ~90 us) starts a call
            calls.append(current)
        elif current is not None:
            current.append(e)
    calls = [c for c in calls if c]
    per_kernel: dict[str, list[float]] = {}
    for call in calls:
        for i, e in enumerate(call):
            per_kernel.setdefault(f"{i}:{short_name(e.name)}", []).append(e.time_range.end - e.time_range.start)
    return {
        "kernels": {k: statistics.median(v) for k, v in per_kernel.items()},
        "span_us": statistics.median(c[-1].time_range.end - c[0].time_range.start for c in calls),
        "gaps_us": statistics.median(sum(max(0.0, b.time_range.start - a.time_range.end) for a, b in zip(c, c[1:]))
                                     for c in calls),
        "calls": len(calls),
        **gpu_state(),
    }


def show(tag: str, r: dict) -> None:
    kernels = " ".join(f"{v:7.1f}" for v in r["kernels"].values())
    print(f"  {tag:26s} span {r['span_us']:7.1f} gaps {r['gaps_us']:4.1f} | {kernels} | "
          f"{r.get('sm_clock_mhz', '?')} MHz {r.get('power_w', '?')} W", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="qwen3-30b-a3b,deepseek-v2-lite,olmoe-1b-7b")
    p.add_argument("--tokens", default="1,4096")
    p.add_argument("--scheme", choices=("bf16", "w8a16", "w8a8"), default="bf16")
    p.add_argument("--eager", action="store_true", help="time eager calls instead of graph replays")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--load-rounds", type=int, default=0, help="rounds of 1 s idle / 1 s of load per point (see above)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    flush = torch.empty(DO_BENCH_FLUSH_BYTES, dtype=torch.int8, device=dev)
    floor = harness_floor(dev)
    for name, f in floor.items():
        print(f"empty kernel, {name}: do_bench eager {f['eager_us']:.2f} us, graph {f['graph_us']:.2f} us")
    results = []
    for name in args.shapes.split(","):
        shape = MODEL_SHAPES[name]
        w1, w2 = make_weights(shape, torch.bfloat16, dev, seed=0)
        quant = None
        if args.scheme != "bf16":
            w1, w2, quant = quantize_moe_weights(w1, w2, args.scheme)
        for tokens in map(int, args.tokens.split(",")):
            x, ids, scales = make_tokens(shape, tokens, torch.bfloat16, dev, seed=tokens)  # the bench's seeds
            out = torch.empty_like(x)
            call = lambda: sm.fused_moe_simple(x, ids, scales, w1, w2, output=out, quant=quant)  # noqa: E731
            layer = call if args.eager else capture_graph(call, dev).replay
            for _ in range(3):
                layer()
            print(f"{name} T={tokens} {args.scheme} {'eager' if args.eager else 'graph'}: kernel times (us)", flush=True)
            idle = layer_kernel_times(layer, args.iters, flush)
            show("idle GPU", idle)
            do_bench_us, state = bench_us(layer), gpu_state()
            print(f"  do_bench 25/100 ms: {do_bench_us:.1f} us ({state.get('sm_clock_mhz', '?')} MHz at its end)")
            after = layer_kernel_times(layer, args.iters, flush)
            show("after do_bench", after)
            rounds = []
            for _ in range(args.load_rounds):
                time.sleep(1.0)
                rested = layer_kernel_times(layer, args.iters, flush)
                show("after 1 s idle", rested)
                loaded_us = bench_us(layer, 25, 1000)
                loaded = layer_kernel_times(layer, args.iters, flush)
                show(f"after 1 s of load ({loaded_us:.1f})", loaded)
                rounds.append({"rested": rested, "do_bench_1s_us": loaded_us, "loaded": loaded})
            results.append({"shape": name, "tokens": tokens, "scheme": args.scheme, "graph": not args.eager,
                            "idle": idle, "do_bench_us": do_bench_us, "do_bench_state": state,
                            "after_do_bench": after, "load_rounds": rounds})
    if args.out:
        write_results_json(args.out, {"command": " ".join(["kernel_times.py", *sys.argv[1:]]), "harness_floor": floor,
                                      "results": results})


if __name__ == "__main__":
    main()
