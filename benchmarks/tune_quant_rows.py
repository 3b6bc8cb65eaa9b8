"""Warps for W8A8's per-row activation quantiser (quant._quantize_rows_kernel) at the model shapes.

    PYTHONPATH=src python3 benchmarks/tune_quant_rows.py [--out results/quant_rows.json]

Times the rule's pick (quant._row_block) and each candidate with do_bench (median, L2 flushed) on the intermediate of T=4096
and T=1024 (`[T*top_k, I]`, with the valid-row count GEMM2 passes) and on GEMM1's input `[T, H]`; checks each candidate's
output equals the rule's, bit for bit. quant_rows_h100.json was measured with a kernel that could also take several rows a
program ("RxBLOCK wW"); one row a program won at every case, and that option was removed.
"""
from __future__ import annotations

import argparse

import torch
import triton

from simple_moe._launch import launch
from simple_moe.bench import write_results_json
from simple_moe.grouped_gemm import MODEL_SHAPES
from simple_moe.quant import _quantize_rows_kernel, _row_block, quantize_activations_int8


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    bench = lambda fn: triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3  # noqa: E731
    cases = []
    for name in ("qwen3-30b-a3b", "deepseek-v2-lite", "olmoe-1b-7b"):
        _, top_k, hidden, inter = MODEL_SHAPES[name]
        cases += [(f"{name} intermediate T=4096", 4096 * top_k, inter, True), (f"{name} intermediate T=1024", 1024 * top_k,
                                                                                inter, True),
                  (f"{name} input T=4096", 4096, hidden, False)]
    results = []
    for label, rows, cols, has_valid in cases:
        x = torch.randn(rows, cols, device=dev, dtype=torch.bfloat16)
        valid = torch.tensor([rows], dtype=torch.int64, device=dev) if has_valid else None
        ref_q, ref_s = quantize_activations_int8(x, valid_rows=valid)
        block, rule_warps = _row_block(cols)
        q = torch.empty_like(ref_q)
        s = torch.empty_like(ref_s)

        def run(warps):
            launch(_quantize_rows_kernel, (rows,),
                   (x, q, s, valid if valid is not None else s, cols, x.stride(0), x.stride(1), q.stride(0)),
                   num_warps=warps, HAS_VALID_ROWS=valid is not None, SINGLE_PASS=cols <= block, BLOCK=block)

        timed = {}
        for warps in (2, 4, 8, 16):
            run(warps)
            assert torch.equal(q, ref_q) and torch.equal(s, ref_s), (label, warps)
            timed[f"1x{block} w{warps}"] = bench(lambda: run(warps))
        rule = f"1x{block} w{rule_warps}"
        best = min(timed, key=timed.get)
        results.append({"case": label, "rows": rows, "cols": cols, "rule": rule, "rule_us": timed[rule], "best": best,
                        "best_us": timed[best], "timed": timed})
        print(f"{label:36s} rule {rule:14s} {timed[rule]:7.1f} us   best {best:14s} {timed[best]:7.1f} us", flush=True)
    if args.out:
        write_results_json(args.out, {"results": results})


if __name__ == "__main__":
    main()
