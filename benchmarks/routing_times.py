"""Time of the two routing paths (one launch vs three chunked launches) against T*top_k, to place the switch between them:
eager (host launch cost included when it exceeds the GPU time) and replayed from a CUDA graph (GPU time only).

    PYTHONPATH=src python3 benchmarks/routing_times.py [--tokens 1,16,64,256,512,1024,2048,4096] [--chunks 128,64]

`--chunks`: the chunked path once per rows-a-chunk (`routing._SCATTER_CHUNK`), a column each ("chunked/64 graph"; the first
is the library's).
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
    p.add_argument("--chunks", default=str(routing._SCATTER_CHUNK))
    args = p.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    columns = COLUMNS + tuple(f"chunked/{c}{g}" for c in chunks[1:] for g in ("", " graph"))
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3
    default = routing.ONE_LAUNCH_MAX_ROWS
    print(f"{'shape':18s} {'T':>5s} {'rows':>6s} " + " ".join(f"{c:>11s}" for c in columns) + "  (us)")
    for name in args.shapes.split(","):
        num_experts, top_k, _, _ = MODEL_SHAPES[name]
        for tokens in map(int, args.tokens.split(",")):
            rows = tokens * top_k
            ids = torch.stack([torch.randperm(num_experts, device="cuda")[:top_k] for _ in range(tokens)]).int()
            times = {}
            # The one-launch path takes up to `default` rows; a limit of 16 sends anything larger down the chunked path.
            paths = [("one", default, chunks[0], rows <= default)]
            paths += [("chunked" + (f"/{c}" if i else ""), 16, c, rows > 16) for i, c in enumerate(chunks)]
            reference = None
            for label, limit, chunk, applies in paths:
                if not applies:
                    continue
                routing.ONE_LAUNCH_MAX_ROWS, routing._SCATTER_CHUNK = limit, chunk
                call = lambda: sm.build_routing_maps(ids, num_experts)
                maps = call()
                got = (maps.expanded_dest_row_to_expanded_source_row, maps.expert_first_token_offset)
                if reference is None:
                    reference = got
                elif not all(torch.equal(a, b) for a, b in zip(got, reference)):
                    raise SystemExit(f"{name} T={tokens}: the {label} maps differ from the {paths[0][0]} path's")
                times[label] = bench(call)
                times[label + " graph"] = bench(capture_graph(call, ids.device).replay)
            routing.ONE_LAUNCH_MAX_ROWS, routing._SCATTER_CHUNK = default, chunks[0]
            print(f"{name:18s} {tokens:5d} {rows:6d} " + " ".join(f"{times.get(c, float('nan')):11.1f}" for c in columns),
                  flush=True)


if __name__ == "__main__":
    main()
