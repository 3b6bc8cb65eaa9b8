"""The whole layer, this tree's package against another revision's, in interleaved rounds, outputs compared bit for bit.

    git archive REV src/simple_moe | tar -x -C /tmp/base       # any earlier revision's package, e.g. REV = HEAD~1
    PYTHONPATH=src python3 benchmarks/ab_revision.py --base /tmp/base/src --quant w8a16 --tokens 1,16 --out results/x.json

For kernel changes that are not a tile choice (which ab_tiles.py compares): the base package is imported a second time under
another name (`simple_moe_base`), so both compile their own kernels in one process and share the GPU, the inputs and the clocks.
Each point runs both once on NaN-poisoned outputs (reported: bitwise equal or the relative L2 difference) and captures each into a
CUDA graph; each round then times every graph once (do_bench median, L2 flushed; the two sides in alternating order), and a
point's figure is each side's median over the rounds. Both sides read one copy of the quantised weights (quantised by this
tree); `--weights own` lets each side quantise its own, for a change to the quantiser. `--launch eager` times the eager calls
instead (launch-level changes, e.g. a programmatic launch of a layer's first kernel, which a graph of the layer alone cannot
show). `--l2 clean` starts each
timed run on a clean L2 instead of the flush's dirty lines (`do_bench_clean_l2`), for changes whose gain may be the
harness's (NOTES v17).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import torch
import triton

import simple_moe
from simple_moe._host import positive_int
from simple_moe.bench import capture_graph, do_bench_clean_l2, make_tokens, make_weights, rel_err, write_results_json
from simple_moe.grouped_gemm import MODEL_SHAPES


def import_base(src_dir: str, name: str = "simple_moe_base"):
    """The package under `src_dir`/simple_moe imported as `name` (its modules import each other relatively)."""
    init = Path(src_dir) / "simple_moe" / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def layer(package, x, selected, scales, w1, w2, scheme, out):
    """() -> writes `out`: `package`'s fused_moe_simple on these inputs (`w1`, `w2` int8 with `scheme`, or float with None).

    `scheme` is rebuilt as `package`'s own W8A16/W8A8 object (the base package's front door checks its own classes).
    """
    if scheme is None:
        return lambda: package.fused_moe_simple(x, selected, scales, w1, w2, output=out)
    if isinstance(scheme, (package.quant.W8A16, package.quant.W8A8)):
        pass  # quantised by `package` itself (--weights own)
    elif isinstance(scheme, simple_moe.quant.W8A16):
        scheme = package.quant.W8A16(scheme.fc1_scales, scheme.fc2_scales, scheme.group_size)
    elif isinstance(scheme, simple_moe.quant.W8A8):
        scheme = package.quant.W8A8(scheme.fc1_scales, scheme.fc2_scales)
    else:
        raise TypeError(f"scheme: expected a W8A16 or W8A8 object, got {type(scheme).__name__}")
    return lambda: package.fused_moe_simple(x, selected, scales, w1, w2, quant=scheme, output=out)


def side_weights(package, w1, w2, quant: str, group_size: int | None):
    """(fc1, fc2, scheme or None): `w1`, `w2` quantised by `package` for `quant`, or as they are for "none"."""
    if quant == "none":
        return w1, w2, None
    return package.quant.quantize_moe_weights(w1, w2, quant, group_size)


def side_calls(sides, x, selected, scales, w1, w2, quant: str, group_size: int | None, weights: str, outs: dict) -> dict:
    """{side: () -> writes outs[side]}: each side's layer on the same inputs. `weights` "shared": one copy quantised by this
    tree for both sides; "own": each side's package quantises its own copy. Each call holds its side's quantised weights (a
    CUDA graph of it does not keep them alive)."""
    shared = side_weights(simple_moe, w1, w2, quant, group_size) if weights == "shared" else None
    return {side: layer(package, x, selected, scales, *(shared or side_weights(package, w1, w2, quant, group_size)), outs[side])
            for side, package in sides}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True, help="directory holding the base revision's simple_moe package")
    p.add_argument("--shapes", default="qwen3-30b-a3b,deepseek-v2-lite,olmoe-1b-7b,mixtral-8x7b")
    p.add_argument("--tokens", default="1,16,64")
    p.add_argument("--quant", choices=("none", "w8a16", "w8a8"), default="w8a16")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--launch", choices=("graph", "eager"), default="graph",
                   help="time each side's CUDA graph replay (default) or its eager call")
    p.add_argument("--l2", choices=("flushed", "clean"), default="flushed",
                   help="start each timed run on the dirty lines of do_bench's flush (as the bench) or on a clean L2")
    p.add_argument("--weights", choices=("shared", "own"), default="shared",
                   help="both sides read one copy of the quantised weights (default), or each side quantises its own "
                        "(for a change to the quantiser; NOTES 'Noticed': the own copies came with a side bias up to 0.35 us)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    base = import_base(args.base)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device("cuda")
    sides = (("base", base), ("this", simple_moe))
    print(f"{'shape':18s} {'T':>5s} {'base us':>9s} {'this us':>9s} {'this/base':>9s}  outputs")
    rows = []
    for name in args.shapes.split(","):
        shape = MODEL_SHAPES[name]
        w1, w2 = make_weights(shape, dtype, device, seed=0)
        for num_tokens in map(int, args.tokens.split(",")):
            x, selected, scales = make_tokens(shape, num_tokens, dtype, device, seed=num_tokens)
            outs = {side: torch.full_like(x, float("nan")) for side, _ in sides}
            calls = side_calls(sides, x, selected, scales, w1, w2, args.quant, args.group_size, args.weights, outs)
            graphs = {}
            for side, _ in sides:
                calls[side]()
                graphs[side] = capture_graph(calls[side], device)
            torch.cuda.synchronize()
            equal = torch.equal(outs["base"], outs["this"])
            outputs = "bitwise equal" if equal else f"differ: rel {rel_err(outs['this'], outs['base'].double()):.1e}"
            timed = {side: graphs[side].replay if args.launch == "graph" else calls[side] for side, _ in sides}
            times = {side: [] for side, _ in sides}
            for round_index in range(args.rounds):
                # The side timed first after the point's setup runs on a cooler board: base first in even rounds, this
                # tree first in odd ones.
                for side, _ in sides[::-1] if round_index % 2 else sides:
                    if args.l2 == "clean":
                        times[side].append(do_bench_clean_l2(timed[side]) * 1e3)
                    else:
                        times[side].append(triton.testing.do_bench(timed[side], warmup=25, rep=100,
                                                                   return_mode="median") * 1e3)
            med = {side: statistics.median(t) for side, t in times.items()}
            row = {"shape": name, "tokens": num_tokens, "quant": args.quant, "group_size": args.group_size,
                   "dtype": args.dtype, "launch": args.launch, "l2": args.l2, "weights": args.weights,
                   "base_us": med["base"], "this_us": med["this"], "rounds": times, "bitwise_equal": equal, "outputs": outputs}
            rows.append(row)
            print(f"{name:18s} {num_tokens:5d} {med['base']:9.1f} {med['this']:9.1f} {med['this'] / med['base']:9.3f}  {outputs}",
                  flush=True)
            del graphs, outs, calls, timed
    if args.out:
        write_results_json(args.out, {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
