"""A/B of grouped-GEMM tiles against the rule's pick, in interleaved rounds, each candidate checked against the pick's output.

    PYTHONPATH=src python3 benchmarks/ab_tiles.py --plan operands --quant w8a16 --out results/ab.json [--rounds 3] [--jobs 14] \
        [--shapes olmoe-1b-7b,...] [--tokens 16,...] [--gemm 1] [--programs 120]

Each round times every candidate of a point once (do_bench median, L2 flushed), in a new random order, so a drift of the clocks
during the run hits every candidate alike; the result is each candidate's median over the rounds. Before timing, every
candidate runs once on an output poisoned with NaN and is compared with the pick's output (relative L2; the tiles differ only
in summation order), so a tile that leaves rows unwritten or computes something else is reported, not timed.

Plans (candidates are built around the current rule's pick, so they follow the rules as they change):
- `operands`: the operand arrangements (`weights_left`, `fused_gate_up`) and schedules with them, for the 16-bit and W8A16
  picks at T = 16..4096; W8A8 (`--quant w8a8`) at T >= 256 for the prefill picks. Produced tiles_operands_*_h200.json.
- `int8-depth`: W8A16's 16/32-row tiles at T = 16 and 64 with deeper K tiles, other column widths and warps (int8 weights
  halve the bytes a 16-bit tile's K step brings in), and Mixtral's long-K GEMM2 (K = 14336) at prefill as 256 x 128
  weights-left tiles against the pick.
- `persistent`: the 16/32-row picks at T = 16 and 64 run persistent, 2 or 4 programs an SM, with and without one software
  pipeline across tiles (W8A16's short programs pay the scheduling prologue and a pipeline fill each).
- `tma`: GEMM2's prefill picks (16-bit, `--quant w8a8`) at T = 256..8192 against the same and nearby tiles with both
  operands copied by TMA (`TileConfig.tma`, grouped_gemm_tma.py), persistent, with and without one pipeline across tiles,
  with row-block groups cut per expert; a TMA pick also on the cp.async kernel.
- `neighbours`: both GEMMs' prefill picks at T = 1024 and 4096 against the same tile in another order (GROUP_M), with a
  stage less, at half the columns with two programs an SM, and (16-bit TMA picks) with 32-deep K steps in 6-8 stages.
- `tails`: the flattened persistent picks at T = 256..8192 against the same tile with full-height tails and with half-height
  ones walked by a second group of programs (`TileConfig.flat_tail_cost`, three splits; NOTES experiment 10); TMA picks also
  on cp.async, one-program-per-tile picks also flattened.
- `expert-groups`: the persistent prefill picks at T = 1024..8192 against the same tile with its groups of row blocks cut
  per expert (`TileConfig.expert_groups`), groups of at most 8 or 16, with and without the flattened half-height tails.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import time

import torch
import triton

from tune_tiles import Problem, compile_all, rule_pick
from simple_moe._host import positive_int
from simple_moe.bench import rel_err, write_results_json
from simple_moe.grouped_gemm import TileConfig, device_arch

SHAPES = ("qwen3-30b-a3b", "deepseek-v2-lite", "olmoe-1b-7b", "mixtral-8x7b")
PLANS = ("operands", "int8-depth", "persistent", "tma", "neighbours", "tails", "expert-groups")
R = dataclasses.replace


def _operand_candidates(pick: TileConfig, gemm1: bool, quant: str) -> list[TileConfig]:
    if quant == "w8a8":
        if not gemm1 or pick.block_m < 128:
            return []
        return [R(pick, fused_gate_up=True), R(pick, fused_gate_up=True, block_k=64, num_stages=4),
                R(pick, fused_gate_up=True, programs_per_sm=1, flatten=False),
                R(pick, fused_gate_up=True, programs_per_sm=1, flatten=True)]
    int8 = quant != "none"
    if gemm1 and pick.block_m < 128:  # 16-bit decode GEMM1: no arrangement won in the first sweep
        return [R(pick, weights_left=True), R(pick, fused_gate_up=True),
                R(pick, weights_left=True, fused_gate_up=True)] if int8 else []
    if gemm1:
        out = [R(pick, fused_gate_up=True, programs_per_sm=1, flatten=True), R(pick, fused_gate_up=True, programs_per_sm=1),
               R(pick, fused_gate_up=True, programs_per_sm=1, flatten=True, block_k=128, num_stages=3)]
        if int8:
            out += [R(pick, weights_left=True), R(pick, weights_left=True, fused_gate_up=True),
                    R(pick, weights_left=True, fused_gate_up=True, programs_per_sm=1, flatten=True)]
        return out
    if pick.block_m == 16:
        return [TileConfig(16, 64, 128, 1, 4, 3), TileConfig(16, 64, 128, 1, 4, 3, weights_left=True),
                TileConfig(16, 128, 128, 1, 4, 3, weights_left=True)]
    if pick.block_m < 128:
        return [R(pick, weights_left=True)] if int8 else []
    return [R(pick, weights_left=True), TileConfig(256, 128, 64, 8, 8, 4, weights_left=True),
            R(pick, programs_per_sm=1, flatten=True)] if int8 else []


def _int8_depth_candidates(pick: TileConfig, gemm1: bool) -> list[TileConfig]:
    m = pick.block_m
    if m >= 128:  # the long-K GEMM2 at prefill
        return [] if gemm1 else [TileConfig(256, 128, 64, 8, 8, 4, weights_left=True),
                                 TileConfig(256, 128, 64, 8, 8, 3, weights_left=True)]
    if gemm1:
        return [TileConfig(m, 64, 256, 1, 4, 3), TileConfig(m, 64, 256, 1, 4, 4), TileConfig(m, 32, 256, 1, 2, 3),
                TileConfig(m, 32, 256, 1, 4, 3), TileConfig(m, 128, 128, 1, 4, 4)]
    return [TileConfig(m, 64, 128, 1, 4, 3), TileConfig(m, 64, 128, 1, 4, 4), TileConfig(m, 64, 512, 1, 4, 3),
            TileConfig(m, 128, 256, 1, 4, 3), TileConfig(m, 32, 256, 1, 2, 3)]


def _tma_candidates(pick: TileConfig) -> list[TileConfig]:
    if pick.block_m < 128:
        return []
    tma = R(pick, tma=True, programs_per_sm=1, flatten=True)  # half_tail: the TMA kernel has none, so it names no other kernel
    # a TMA pick against the same tile on the cp.async kernel, with and without its per-expert groups
    out = [R(pick, tma=False), R(pick, tma=False, expert_groups=False)] if pick.tma else []
    out += [tma, R(tma, flatten=False), R(tma, num_stages=pick.num_stages - 1), R(tma, group_m=1)]
    if pick.block_k == 64:  # 16-bit: a taller tile, and one of half the width with two programs an SM
        out += [R(tma, block_m=256, block_n=128), R(tma, block_n=128, programs_per_sm=2, num_stages=3),
                R(tma, block_k=128, num_stages=2)]
        # the 16-bit TMA rule's row-block groups cut per expert (measured after the rule's 384-rows-an-expert bound was set)
        out += [R(tma, expert_groups=True, group_m=g) for g in (8, 16)] + [R(tma, expert_groups=True, group_m=16,
                                                                               flat_tail_cost=0)]
    else:  # int8 (128-deep; the rule sized its stages for 16-bit A, int8 A leaves room for a fourth)
        out += [R(tma, num_stages=4), R(tma, block_k=64, num_stages=pick.num_stages + 1),
                R(tma, block_m=256, block_n=128, num_stages=3)]  # experts of 256+ rows read their weights once
    return out


def _neighbour_candidates(pick: TileConfig) -> list[TileConfig]:
    """The prefill pick with another tile order (GROUP_M row blocks at a time), one stage less (16-bit 128 x 256 x 64 tiles
    take 48 KiB a stage: a fifth does not fit SM90's 227 KiB), half as many columns with two programs an SM (one
    program's epilogue then overlaps the other's main loop), and, for the 16-bit SM90 TMA picks, K steps half as deep in
    6-8 stages: the same shared memory holds more steps, so more of it is in flight while one step feeds the tensor cores
    (7 of 8 stages against 3 of 4; check-build: 206 KiB at 7 stages, no spills; GEMM1 spills 12 bytes at 8). Measured (H100,
    ab_neighbours_bk32_bf16_h100_v34.json): slower at every point, GEMM1 +4 to +63%, GEMM2 +1 to +57%."""
    if pick.block_m < 128:
        return []
    out = [R(pick, group_m=g) for g in (1, 4, 16, 32)] + [R(pick, num_stages=pick.num_stages - 1)]
    if pick.programs_per_sm == 1:
        out.append(R(pick, block_n=pick.block_n // 2, programs_per_sm=2, num_stages=3))
    if pick.tma and pick.block_k == 64:
        out += [R(pick, block_k=32, num_stages=stages) for stages in (6, 7, 8)]
    return out


def _tail_candidates(pick: TileConfig) -> list[TileConfig]:
    """A flattened persistent pick with full-height tails and with its tails of <= 64 rows as half-height tiles walked by a
    second group of programs, split for a half tile costing 55% (tensor-core bound), 80% or 100% (weight-bytes bound) of a
    full one (NOTES experiment 10); a TMA pick also on cp.async; a one-program-per-tile pick against the same tile
    flattened, with and without them."""
    if pick.block_m < 128:
        return []
    if not pick.programs_per_sm:  # one program per tile (W8A8 GEMM1): the same tile flattened, persistent, one an SM
        return [R(pick, programs_per_sm=1, flatten=True, flat_tail_cost=cost) for cost in (0, 80, 100)]
    if not pick.flatten:
        return []
    out = [R(pick, flat_tail_cost=cost) for cost in (0, 55, 80, 100)]
    if pick.tma:  # and on cp.async (the copies the tails were first measured with), GROUP_M 8 as there
        out += [R(pick, tma=False, group_m=8, expert_groups=False, flat_tail_cost=cost) for cost in (0, 80, 100)]
    return out


def _expert_group_candidates(pick: TileConfig) -> list[TileConfig]:
    """A persistent prefill pick with groups of row blocks that never straddle two experts, at most 8 or 16 high, and (when
    flattened) with full-height tails and half-height ones split at 80% and 100%; a pick with such groups also with groups of
    8 across experts (grouped_tile's order)."""
    if pick.block_m < 128 or not pick.programs_per_sm:
        return []
    costs = (0, 80, 100) if pick.flatten else (pick.flat_tail_cost,)
    across = [R(pick, expert_groups=False, group_m=8)] if pick.expert_groups else []
    return across + [R(pick, expert_groups=True, group_m=g, flat_tail_cost=c) for g in (8, 16) for c in costs]


def plan(name: str, quant: str, arch: int):
    """[(shape, T, gemm1, [pick, candidates...])] for one plan, in a fixed order (compile workers and the timer agree)."""
    out = []
    if name == "operands":
        tokens = (256, 1024, 4096) if quant == "w8a8" else (16, 64, 256, 1024, 4096)
        points = [(shape, t, g) for shape in SHAPES for t in tokens for g in (True, False)]
        candidates = lambda pick, gemm1: _operand_candidates(pick, gemm1, quant)
    elif name == "int8-depth":
        points = [(shape, t, g) for shape in SHAPES for t in (16, 64) for g in (True, False)]
        points += [("mixtral-8x7b", t, False) for t in (256, 1024, 4096)] + [("qwen3-30b-a3b", 1024, False)]
        candidates = lambda pick, gemm1: _int8_depth_candidates(pick, gemm1)
    elif name == "persistent":
        points = [(shape, t, g) for shape in SHAPES for t in (16, 64) for g in (True, False)]
        candidates = lambda pick, gemm1: [R(pick, programs_per_sm=n, flatten=f) for n in (2, 4) for f in (False, True)]
    elif name == "tma":
        points = [(shape, t, False) for shape in SHAPES for t in (256, 1024, 2048, 4096, 8192)]
        candidates = lambda pick, gemm1: _tma_candidates(pick)
    elif name == "neighbours":
        points = [(shape, t, g) for shape in SHAPES for t in (1024, 4096) for g in (True, False)]
        candidates = lambda pick, gemm1: _neighbour_candidates(pick)
    elif name == "tails":
        points = [(shape, t, g) for shape in SHAPES for t in (256, 1024, 2048, 4096, 8192) for g in (True, False)]
        candidates = lambda pick, gemm1: _tail_candidates(pick)
    elif name == "expert-groups":
        points = [(shape, t, g) for shape in SHAPES for t in (1024, 2048, 4096, 8192) for g in (True, False)]
        candidates = lambda pick, gemm1: _expert_group_candidates(pick)
    else:
        raise ValueError(f"plan must be one of {PLANS}, got {name!r}")
    for shape, tokens, gemm1 in points:
        pick = rule_pick(shape, tokens, gemm1, quant, arch)
        configs = list(dict.fromkeys([pick] + candidates(pick, gemm1)))
        if len(configs) > 1:
            out.append((shape, tokens, gemm1, configs))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--plan", choices=PLANS, required=True)
    p.add_argument("--quant", choices=("none", "w8a16", "w8a8"), default="none")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--shapes", default=None, help="comma list: only these shapes of the plan (default all)")
    p.add_argument("--tokens", default=None, help="comma list: only these T of the plan (default all)")
    p.add_argument("--gemm", type=int, choices=(1, 2), default=None, help="only this GEMM of the plan (default both)")
    p.add_argument("--jobs", type=int, default=0, help="compile every candidate first in this many processes")
    p.add_argument("--out", required=True)
    p.add_argument("--programs", type=int, default=0,
                   help="persistent tiles launch programs_per_sm x this many programs instead of x the SM count")
    args = p.parse_args()
    arch = device_arch(torch.device("cuda"))
    if args.programs:  # the launchers' grid becomes min(tiles, programs_per_sm x args.programs)
        import simple_moe.grouped_gemm as grouped_gemm
        import simple_moe.grouped_gemm_tma as grouped_gemm_tma
        grouped_gemm.sm_count = grouped_gemm_tma.sm_count = lambda device: args.programs
    task_list = [task for task in plan(args.plan, args.quant, arch)
                 if (args.shapes is None or task[0] in args.shapes.split(","))
                 and (args.tokens is None or str(task[1]) in args.tokens.split(","))
                 and (args.gemm is None or task[2] == (args.gemm == 1))]
    t0 = time.time()
    if args.jobs:
        failed = compile_all(task_list, args.jobs, args.quant)
        print(f"compiled in {time.time() - t0:.0f} s ({failed} did not build)", flush=True)
    bench = lambda fn: triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3
    results, problem, key = [], None, None
    for shape, tokens, gemm1, configs in task_list:
        if key != (shape, tokens):
            problem = None
            torch.cuda.empty_cache()
            problem, key = Problem(shape, tokens, quant=args.quant), (shape, tokens)
        output = problem.inter if gemm1 else problem.out2
        checks, runnable = {}, []
        for cfg in configs:  # the pick first: its output is the one the others are compared with
            output.fill_(float("nan"))
            try:
                problem.run(cfg, gemm1)()
            except Exception as err:  # out of resources: reported, not timed
                checks[str(cfg)] = f"did not run: {type(err).__name__}"
                if cfg is configs[0]:
                    break  # nothing to compare the others with
                continue
            if cfg is configs[0]:
                reference = output.clone()
            unwritten = int(output.isnan().sum())
            err = rel_err(output, reference.double())
            checks[str(cfg)] = err if unwritten == 0 else f"{unwritten} outputs unwritten"
            if unwritten == 0 and err < 1e-2:
                runnable.append(cfg)
        times = {str(cfg): [] for cfg in runnable}
        order = random.Random(f"{shape} {tokens} {gemm1}")
        for _ in range(args.rounds):
            # A new random order each round: the candidate timed first after a point's setup runs on a cooler board (on an
            # H200 often ~10% faster than the rest), and one always timed after the same slow neighbour gains too (v27:
            # two configs with the same tile order 3-14% apart in rounds that only rotated the order).
            for cfg in order.sample(runnable, len(runnable)):
                times[str(cfg)].append(bench(problem.run(cfg, gemm1)))
        median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        row = {"shape": shape, "T": tokens, "gemm": 1 if gemm1 else 2, "quant": args.quant, "pick": str(configs[0]),
               "times": times, "median": median, "check_rel_l2_vs_pick": checks}
        results.append(row)
        ranked = sorted(median.items(), key=lambda kv: kv[1])
        bad = {k: v for k, v in checks.items() if not isinstance(v, float) or v >= 1e-2}
        print(f"{args.quant} {shape:16s} T={tokens:5d} g{row['gemm']} pick {median.get(row['pick'], float('nan')):8.1f} | "
              + " | ".join(f"{k} {v:.1f}" for k, v in ranked[:4]) + (f"  FAILED CHECK: {bad}" if bad else ""), flush=True)
    write_results_json(args.out, {"plan": args.plan, "rounds": args.rounds, "results": results})
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
