"""Decode-path tiles and the token count up to which the decode path beats the grouped path; the data behind decode.py's rules.

    PYTHONPATH=src python3 benchmarks/tune_decode.py [--out results/decode_tiles.json] [--tokens 1,2,4,8] [--scheme w8a16]
                                                     [--sweep both|gemm1|gemm2] [--register-caps 24,32,40]
                                                     [--stages 1,2,3,4 --rounds 3] [--folds 8,16 --rounds 3]
                                                     [--folds 8 --unrolls 2,3 --rounds 3]

1. Tiles (T=1, bf16 or W8A16 weights): the GEMM1 tile is swept with the rule's GEMM2 tile, then the GEMM2 tile with the best
   GEMM1 tile (`--sweep` keeps one of them at its rule); each candidate is the whole layer replayed from a CUDA graph (do_bench
   median, L2 flushed), beside the grouped path's time.
2. Threshold (skipped with --tokens ''): the whole layer in a CUDA graph through the decode path (the rule's tiles) and through
   the grouped path, for bf16, W8A16 per channel and W8A16 with 128-wide groups at each T of --tokens.
Every timed output is first checked against the grouped path's (relative L2 error below the dtype's tolerance).
With --stages, the tile sweep is the rule's columns a program and twice as many, at three depths and two warp counts, each
with its K loop's loads straight into registers (1) or through a ring of that many shared-memory stages, timed in --rounds
interleaved rounds (median). With --folds, the rule's columns and twice as many at the rule's depth and twice it, 4 or 8
warps, each with its products folded into the accumulator 1 or each of --folds at a time.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math

import torch
import triton
from triton.runtime.errors import OutOfResources

import simple_moe as sm
from simple_moe import decode
from simple_moe.activations import get_activation
from simple_moe.bench import capture_graph, write_results_json
from simple_moe.decode import DecodeTile, decode_forward, decode_tile
from simple_moe.grouped_gemm import MODEL_SHAPES, sm_count
from simple_moe.quant import GROUP_SIZES, quantize_moe_weights

SHAPES = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite", "olmoe-1b-7b")


def set_decode_max_tokens(max_tokens: int) -> None:
    """Route every scheme through the decode path up to `max_tokens` tokens (0: the grouped path always)."""
    decode.DECODE_MAX_TOKENS = decode.DECODE_MAX_TOKENS_W8A16 = max_tokens
    decode.DECODE_MAX_TOKENS_W8A16_GROUPWISE = dict.fromkeys(GROUP_SIZES, max_tokens)


def candidates(default: DecodeTile, int8: bool, slots: int = 1, register_caps: tuple = ()):
    """Tiles of `rows` weight rows a program: GEMM1 (slots 1) one row a column, GEMM2 `slots` rows a column. With
    `register_caps`, the 8-warp tiles of up to 16 rows and 256 deep, uncapped and under each cap."""
    seen = [default]
    depths = (256, 512, 1024) if int8 else (128, 256, 512)
    rows = (8, 16, 32)
    if slots > 1:
        depths = depths[:2] if int8 else (64, 128, 256)
    for tile_rows, block_k, warps, unroll in itertools.product(rows, depths, (4, 8), (1, 2)):
        if (unroll == 1 or block_k < depths[-1]) and tile_rows >= slots:  # two of the deepest tiles: registers spill
            seen.append(DecodeTile(tile_rows // slots, block_k, warps, unroll))
    seen += [DecodeTile(default.block_n, default.block_k, 2)]
    if register_caps:  # a cap on registers a thread lets more programs be resident on an SM
        seen = [dataclasses.replace(t, max_registers=r) for t in seen if t.num_warps == 8 and t.unroll == 1
                and t.block_n * slots <= 16 and t.block_k <= 256 for r in (None, *register_caps)]
    return list(dict.fromkeys(seen))


def staged_candidates(default: DecodeTile, stages: tuple) -> list:
    """The rule's tile first, then the rule's columns a program and twice as many, each at three depths (the rule's, half,
    double) x 4 or 8 warps x `stages`; and a rule's tile of <= 256 deep at each stage count capped at 40 registers.
    (Staged, Qwen3-30B's 8-warp GEMM1 tile takes 47-48 registers on sm_90: 5 programs an SM instead of 6, so its 768 programs
    would need 1.16 waves; at 40 (no spills there), 6 fit again. The 512-deep tiles spill 144-172 bytes at 40.)"""
    depths = sorted({max(32, default.block_k // 2), default.block_k, default.block_k * 2})
    seen = [default] + [DecodeTile(columns, block_k, warps, 1, s) for columns, block_k, warps, s
                        in itertools.product((default.block_n, 2 * default.block_n), depths, (4, 8), stages)]
    seen += [dataclasses.replace(default, stages=s, max_registers=40) for s in stages if s > 1 and default.block_k <= 256]
    return list(dict.fromkeys(seen))


def folded_candidates(default: DecodeTile, folds: tuple, unrolls: tuple = ()) -> list:
    """The rule's tile first, then the rule's columns a program and twice as many, at the rule's depth and twice it, 4 or 8
    warps, each with its products summed 1 or each of `folds` at a time into the accumulator (`DecodeTile.fold`: a fold of 8
    takes Qwen3-30B's W8A16 GEMM2 tile 2x256 w8 from 45 to 31 registers on sm_90, so twice the rule's bytes a K step fit
    in the rule's 32). With `unrolls`, also the rule's tile with its K loop unrolled that many steps (the next steps' loads
    issue before this step's math: fewer dependent DRAM round trips a program), uncapped and capped at 32 registers (the
    8 programs an SM of the rule)."""
    seen = [default] + [DecodeTile(columns, block_k, warps, fold=fold) for columns, block_k, warps, fold
                        in itertools.product((default.block_n, 2 * default.block_n), (default.block_k, 2 * default.block_k),
                                             (4, 8), (1, *folds)) if block_k % fold == 0]
    seen += [dataclasses.replace(default, unroll=unroll, max_registers=cap) for unroll in unrolls for cap in (None, 32)]
    return list(dict.fromkeys(seen))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,2,4,8")
    p.add_argument("--scheme", choices=("bf16", "w8a16"), default="bf16", help="weights of the tile sweep")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--sweep", choices=("both", "gemm1", "gemm2"), default="both",
                   help="which GEMM's tile to sweep (the other stays at its rule; both: GEMM1 first, then GEMM2 with its best)")
    p.add_argument("--register-caps", default="", help="e.g. 24,32,40: sweep the small 8-warp tiles under these caps")
    p.add_argument("--stages", default="", help="e.g. 1,2,3,4: sweep shared-memory stages of the K loop (see the docstring)")
    p.add_argument("--folds", default="", help="e.g. 8,16: sweep products folded into the accumulator (see the docstring)")
    p.add_argument("--unrolls", default="", help="with --folds, e.g. 2,3: also the rule's tile with its K loop unrolled")
    p.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds of each candidate (median)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    stages = tuple(int(s) for s in args.stages.split(",") if s)
    caps = tuple(int(c) for c in args.register_caps.split(",") if c)
    folds = tuple(int(f) for f in args.folds.split(",") if f)
    unrolls = tuple(int(u) for u in args.unrolls.split(",") if u)
    dev = torch.device("cuda")
    bench = lambda fn: triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3  # noqa: E731
    swiglu = get_activation("swiglu")
    tiles_rows, threshold_rows = [], []
    for name in args.shapes.split(","):
        num_experts, top_k, hidden, inter = MODEL_SHAPES[name]
        gen = torch.Generator(device=dev).manual_seed(0)
        w1 = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16, generator=gen) / math.sqrt(hidden)
        w2 = torch.randn(num_experts, hidden, inter, device=dev, dtype=torch.bfloat16, generator=gen) / math.sqrt(inter)

        def inputs(tokens):
            x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
            scales, ids = sm.route(torch.randn(tokens, num_experts, device=dev, generator=gen), top_k)
            return x, ids, scales

        # ---- 1. tiles at T=1
        x, ids, scales = inputs(1)
        out = torch.empty(1, hidden, device=dev, dtype=torch.bfloat16)
        t1_, t2_, tq = (w1, w2, None) if args.scheme == "bf16" else quantize_moe_weights(w1, w2, "w8a16")
        set_decode_max_tokens(0)
        grouped_call = lambda: sm.fused_moe_simple(x, ids, scales, t1_, t2_, output=out, quant=tq)  # noqa: E731
        grouped_call()
        grouped = out.float().clone()
        grouped_us = bench(capture_graph(grouped_call, dev).replay)

        def sweep(pairs):
            """{tile pair: median us} of each (GEMM1 tile, GEMM2 tile), checked first, timed in interleaved rounds."""
            graphs = {}
            for t1, t2 in pairs:
                run = lambda t1=t1, t2=t2: decode_forward(x, ids, scales, t1_, t2_, swiglu, "gate_first", None, None,  # noqa
                                                          None, out, tq, tiles=(t1, t2))
                out.fill_(float("nan"))
                try:
                    run()
                except OutOfResources as err:  # a staged ring deeper than an SM's shared memory: not a candidate here
                    print(f"    skipped {t1} / {t2}: {err}", flush=True)
                    continue
                err = ((out.float() - grouped).norm() / grouped.norm()).item()
                assert err < 1e-2, (name, t1, t2, err)
                graphs[(t1, t2)] = capture_graph(run, dev)
            times = {pair: [] for pair in graphs}
            for _ in range(args.rounds):
                for pair, graph in graphs.items():
                    times[pair].append(bench(graph.replay))
            return {pair: sorted(us)[len(us) // 2] for pair, us in times.items()}

        elem, slots = t1_.element_size(), triton.next_power_of_2(top_k)
        rule1 = decode_tile(True, inter, hidden, elem, 1, top_k, sm_count(dev))  # T=1: top_k pairs
        rule2 = decode_tile(False, hidden, inter, elem, slots)
        sweep_tiles = ((lambda rule, slots_: staged_candidates(rule, stages)) if stages
                       else (lambda rule, slots_: folded_candidates(rule, folds, unrolls)) if folds
                       else (lambda rule, slots_: candidates(rule, elem == 1, slots_, caps)))
        tiles1 = [rule1] if args.sweep == "gemm2" else sweep_tiles(rule1, 1)
        times1 = {t1: us for (t1, _), us in sweep([(t, rule2) for t in tiles1]).items()}
        best1 = min(times1, key=times1.get)
        tiles2 = [rule2] if args.sweep == "gemm1" else sweep_tiles(rule2, slots)
        # The rule pair again beside the GEMM2 candidates, so that the best pair is compared with it in the same rounds.
        times_pairs = sweep(list(dict.fromkeys([(rule1, rule2)] + [(best1, t) for t in tiles2])))
        times2 = {t2: us for (t1, t2), us in times_pairs.items() if t1 == best1}
        best2 = min(times2, key=times2.get)
        row = {"shape": name, "scheme": args.scheme, "grouped_us": grouped_us, "rule": [str(rule1), str(rule2)],
               "rule_us": times_pairs[(rule1, rule2)], "best": [str(best1), str(best2)], "best_us": times2[best2],
               "gemm1_sweep": {str(t): us for t, us in times1.items()}, "gemm2_sweep": {str(t): us for t, us in times2.items()}}
        tiles_rows.append(row)
        print(f"{name:17s} {args.scheme} tiles: rule {rule1} / {rule2} {row['rule_us']:6.1f} us   best {best1} / {best2} "
              f"{row['best_us']:6.1f} us   grouped path {grouped_us:6.1f} us", flush=True)
        for gemm, times in (("GEMM1", times1), ("GEMM2", times2)):
            fastest = sorted(times.items(), key=lambda kv: kv[1])[:6]
            print(f"    {gemm} fastest: " + ", ".join(f"{t} {us:.1f}" for t, us in fastest), flush=True)
        if args.out:  # after every shape, so that a run cut short keeps what it measured
            write_results_json(args.out, {"tiles": tiles_rows, "threshold": threshold_rows})
        if not args.tokens:
            continue

        # ---- 2. decode path vs grouped path
        for scheme in ("bf16", "w8a16", "w8a16-g128"):
            group = 128 if scheme == "w8a16-g128" else None
            f1, f2, quant = (w1, w2, None) if scheme == "bf16" else quantize_moe_weights(w1, w2, "w8a16", group)
            for tokens in map(int, args.tokens.split(",") if args.tokens else ()):
                x, ids, scales = inputs(tokens)
                out = torch.empty(tokens, hidden, device=dev, dtype=torch.bfloat16)
                call = lambda: sm.fused_moe_simple(x, ids, scales, f1, f2, output=out, quant=quant)  # noqa: E731
                result = {}
                for path, max_tokens in (("grouped", 0), ("decode", 1 << 20)):
                    set_decode_max_tokens(max_tokens)
                    call()
                    result[path] = out.float().clone()
                    result[path + "_us"] = bench(capture_graph(call, dev).replay)
                err = ((result["decode"] - result["grouped"]).norm() / result["grouped"].norm()).item()
                assert err < 1e-2, (name, scheme, tokens, err)
                threshold_rows.append({"shape": name, "scheme": scheme, "T": tokens, "grouped_us": result["grouped_us"],
                                       "decode_us": result["decode_us"]})
                print(f"{name:17s} {scheme:6s} T={tokens:<2d} graph: grouped {result['grouped_us']:6.1f} us  decode "
                      f"{result['decode_us']:6.1f} us", flush=True)
        del w1, w2
        torch.cuda.empty_cache()
    if args.out:
        write_results_json(args.out, {"tiles": tiles_rows, "threshold": threshold_rows})


if __name__ == "__main__":
    main()
