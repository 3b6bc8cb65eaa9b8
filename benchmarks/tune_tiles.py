"""Sweeps grouped-GEMM tile configs on the GPU, per GEMM, at the baselines.md shapes; the data behind gemm_tile_config's rules.

    PYTHONPATH=src python3 benchmarks/tune_tiles.py --out results/tune.json [--space wide] [--jobs 12] \
        [--points qwen3-30b-a3b:1,olmoe-1b-7b:256] [--quant w8a16]

For each (shape, T, GEMM) it times the heuristic's pick and each candidate with do_bench (median, L2 flushed), and prints the best.
`--space default` is the autotuner's search space; `wide` adds narrow decode tiles, 2-warp programs, deeper K tiles and the
persistent schedules (a few programs per SM looping over tiles, with and without one pipeline across tiles); `mid` varies the
row tile too (16-64 rows), for the mid-size batches; `schedule` runs the pick's tile under each schedule with and without
half-height tail tiles; `operands` the same tiles with the operands arranged otherwise (`TileConfig.weights_left`,
`TileConfig.fused_gate_up`).
`--jobs N` first compiles every candidate in N processes (Triton's on-disk cache then serves the timing process).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import multiprocessing
import time

import torch
import triton

import simple_moe as sm
from simple_moe.bench import write_results_json
from simple_moe.activations import get_activation
from simple_moe.autotune import candidate_configs
from simple_moe.grouped_gemm import MODEL_SHAPES, TileConfig, device_arch, gemm_tile_config, grouped_gemm
from simple_moe.quant import quantize_activations_int8, quantize_weights_int8

DEFAULT_POINTS = ",".join(f"{name}:{t}" for name in ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite", "olmoe-1b-7b")
                          for t in (1, 256, 4096))


def wide_configs(block_m: int, gated: bool):
    if block_m <= 64:
        for block_n, block_k, stages, warps in itertools.product((16, 32, 64), (128, 256, 512), (3, 4, 6), (2, 4)):
            yield TileConfig(block_m, block_n, block_k, 1, warps, stages)
        for block_n, block_k, stages in ((64, 128, 4), (32, 256, 3), (64, 256, 3)):
            for programs in (1, 2, 4):
                yield TileConfig(block_m, block_n, block_k, 1, 4, stages, programs_per_sm=programs)
    else:
        for block_n, block_k, stages, warps in itertools.product((64, 128) if gated else (128, 256), (64, 128), (3, 4),
                                                                 (4, 8)):
            for programs, flatten in ((0, False), (1, False), (1, True)):
                yield TileConfig(128, block_n, block_k, 8, warps, stages, programs_per_sm=programs, flatten=flatten)
        for group_m in (1, 4, 32):
            yield TileConfig(128, 128 if gated else 256, 64, group_m, 8, 4)


def schedule_configs(pick: TileConfig):
    """The pick's tile under each schedule, with and without half-height tail tiles (no tail tiles in a flattened loop)."""
    for programs, flatten in ((0, False), (1, False), (2, False), (1, True)):
        for half_tail in (True, False) if not flatten else (False,):
            yield dataclasses.replace(pick, programs_per_sm=programs, flatten=flatten, half_tail=half_tail)


def mid_configs(block_m: int, gated: bool):
    """Row tiles other than the busiest-expert rule's, for 16-1024 tokens (where an expert's row tiles may share weights in L2)."""
    for bm, block_n, block_k, stages, warps in itertools.product((16, 32, 64), (64, 128), (128, 256), (3, 4), (2, 4)):
        yield TileConfig(bm, block_n, block_k, 1, warps, stages)


def operand_configs(pick: TileConfig, gated: bool):
    """The pick and its neighbours with the operands arranged otherwise: `weights_left` (the tile computed transposed, weights as
    the dot's left operand: the tensor-core instruction's M is BLOCK_N, its N is BLOCK_M) and, for gated GEMM1, `fused_gate_up`
    (one dot over gate and up columns interleaved, twice as wide)."""
    arrangements = [dict(weights_left=True)]
    if gated:
        arrangements += [dict(fused_gate_up=True), dict(fused_gate_up=True, weights_left=True)]
    for arrangement in arrangements:
        yield dataclasses.replace(pick, **arrangement)
    for arrangement in arrangements:
        if pick.block_m <= 64:
            for block_m, block_n, block_k in itertools.product((pick.block_m, 2 * pick.block_m), (64, 128), (128, 256)):
                yield TileConfig(block_m, block_n, block_k, 1, 4, pick.num_stages, **arrangement)
        else:
            # Gated tiles hold two accumulators of 128 x BLOCK_N (or one of 128 x 2 BLOCK_N): 128 x 128 each is the most 8
            # warps keep in registers. 128-deep K tiles take a stage less (shared memory).
            for block_m, block_n, block_k in itertools.product((64, 128) if gated else (128, 256), (128,) if gated else (128, 256),
                                                               (64, 128)):
                for programs, flatten in ((0, False), (1, True)):
                    yield TileConfig(block_m, block_n, block_k, 8, 8, 4 if block_k == 64 else 3, programs_per_sm=programs,
                                     flatten=flatten, **arrangement)


def rule_pick(name: str, tokens: int, gemm1: bool, quant: str, arch: int) -> TileConfig:
    """The tile gemm_tile_config gives one GEMM of a MODEL_SHAPES point (bf16 activations; `quant` as `--quant`)."""
    num_experts, top_k, hidden, inter = MODEL_SHAPES[name]
    n, k = (inter, hidden) if gemm1 else (hidden, inter)
    return gemm_tile_config(tokens * top_k, num_experts, n, k, torch.bfloat16, arch, gated=gemm1, w_int8=quant != "none",
                            a_int8=quant == "w8a8")


def tasks(points: str, space: str, quant: str = "none"):
    """[(shape, T, gemm1, [configs])] in a fixed order (the compile workers and the timing process agree on it)."""
    out = []
    arch = device_arch(torch.device("cuda"))
    for point in points.split(","):
        name, tokens = point.split(":")
        for gemm1 in (True, False):
            pick = rule_pick(name, int(tokens), gemm1, quant, arch)
            space_fn = {"wide": wide_configs, "mid": mid_configs, "default": candidate_configs,
                        "schedule": lambda block_m, gated: schedule_configs(pick),
                        "operands": lambda block_m, gated: operand_configs(pick, gated)}[space]
            configs = [pick] + [c for c in dict.fromkeys(space_fn(pick.block_m, gemm1)) if c != pick]
            out.append((name, int(tokens), gemm1, configs))
    return out


class Problem:
    """The tensors of one (shape, T) point; `run(cfg, gemm1)` returns a no-argument callable for one GEMM."""

    def __init__(self, name: str, tokens: int, fill: bool = True, quant: str = "none", device: str = "cuda"):
        dev, dtype = torch.device(device), torch.bfloat16
        num_experts, top_k, hidden, inter = MODEL_SHAPES[name]
        gen = torch.Generator(device=dev).manual_seed(0)
        new = (lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=gen) / math.sqrt(s[-1])) if fill else (
            lambda *s: torch.empty(*s, device=dev, dtype=dtype))  # compile-only workers: no values, no extra copy
        self.w1 = new(num_experts, 2 * inter, hidden)
        self.w2 = new(num_experts, hidden, inter)
        self.x = torch.randn(tokens, hidden, device=dev, dtype=dtype, generator=gen)
        self.scales, ids = sm.route(torch.randn(tokens, num_experts, device=dev, generator=gen), top_k)
        self.maps = sm.build_routing_maps(ids, num_experts)
        rows = tokens * top_k
        self.inter = torch.randn(rows, inter, device=dev, dtype=dtype, generator=gen)
        self.out2 = torch.empty(rows, hidden, device=dev, dtype=dtype)
        self.act = get_activation("swiglu")
        # INT8 (per-channel weight scales): the operands simple_moe.quant hands the grouped GEMM.
        self.a1, self.a2, self.int8_args1, self.int8_args2 = self.x, self.inter, {}, {}
        if quant != "none":
            (self.w1, s1), (self.w2, s2) = quantize_weights_int8(self.w1), quantize_weights_int8(self.w2)
            self.int8_args1, self.int8_args2 = {"w_scale": s1}, {"w_scale": s2}
            if quant == "w8a8":
                self.a1, self.int8_args1["a_scale"] = quantize_activations_int8(self.x)
                self.a2, self.int8_args2["a_scale"] = quantize_activations_int8(self.inter)

    def run(self, cfg, gemm1: bool):
        if gemm1:
            return lambda: grouped_gemm(self.a1, self.w1, self.inter, self.maps, gather_a=True, activation=self.act, config=cfg,
                                        **self.int8_args1)
        return lambda: grouped_gemm(self.a2, self.w2, self.out2, self.maps, gather_a=False, router_scales=self.scales,
                                    config=cfg, **self.int8_args2)


def _compile_worker(args):
    worker, jobs, task_list, quant = args
    failed, index = 0, 0
    for name, tokens, gemm1, configs in task_list:
        mine = []
        for cfg in configs:
            if index % jobs == worker:
                mine.append(cfg)
            index += 1
        if not mine:
            continue
        problem = Problem(name, tokens, fill=False, quant=quant)
        for cfg in mine:
            try:
                problem.run(cfg, gemm1)()
            except Exception:  # out of resources: the timing pass skips it too
                failed += 1
        del problem
        torch.cuda.empty_cache()
    torch.cuda.synchronize()
    return failed


def compile_all(task_list, jobs: int, quant: str) -> int:
    """Compile every (point, config) of `task_list` in `jobs` processes; Triton's on-disk cache then serves the timing process.
    Returns how many configs did not build."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(jobs) as pool:
        return sum(pool.map(_compile_worker, [(w, jobs, task_list, quant) for w in range(jobs)]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--points", default=DEFAULT_POINTS, help="shape:T,... (shapes from MODEL_SHAPES)")
    p.add_argument("--space", choices=("default", "wide", "mid", "schedule", "operands"), default="default")
    p.add_argument("--jobs", type=int, default=0, help="compile every candidate first in this many processes")
    p.add_argument("--quant", choices=("none", "w8a16", "w8a8"), default="none",
                   help="INT8 weights with per-channel scales (w8a8: int8 activations too), as simple_moe.quant runs them")
    p.add_argument("--out", default=None)
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--always", type=int, default=0, help="time this many candidates after the pick even past the budget")
    args = p.parse_args()
    t_start = time.time()
    if args.jobs:
        failed = compile_all(tasks(args.points, args.space, args.quant), args.jobs, args.quant)
        print(f"compiled in {time.time() - t_start:.0f} s ({failed} configs did not build)", flush=True)
    bench = lambda fn, rep: triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median") * 1e3
    results = []
    problem, problem_key = None, None
    for name, tokens, gemm1, configs in tasks(args.points, args.space, args.quant):
        if problem_key != (name, tokens):
            problem, problem_key = None, (name, tokens)
            torch.cuda.empty_cache()
            problem = Problem(name, tokens, quant=args.quant)
        pick = configs[0]
        t_pick = bench(problem.run(pick, gemm1), 40)
        timed = {str(pick): t_pick}
        for i, cfg in enumerate(configs[1:]):
            if time.time() - t_start > args.budget_s and i >= args.always:
                break
            try:
                timed[str(cfg)] = bench(problem.run(cfg, gemm1), 20)
            except Exception:  # out of resources etc.
                continue
        best = min(timed, key=timed.get)
        row = {"shape": name, "T": tokens, "gemm": 1 if gemm1 else 2, "pick": str(pick), "pick_us": t_pick,
               "best": best, "best_us": timed[best], "timed": timed}
        results.append(row)
        print(f"{name:18s} T={tokens:5d} gemm{row['gemm']}  pick {row['pick']:30s} {t_pick:8.1f} us   "
              f"best {best:30s} {timed[best]:8.1f} us  ({len(timed)} timed)", flush=True)
    if args.out:
        write_results_json(args.out, {"space": args.space, "quant": args.quant, "results": results})


if __name__ == "__main__":
    main()
