"""Warps and rows a program for W8A8's per-row activation quantiser (quant._quantize_rows_kernel) at the model shapes.

    PYTHONPATH=src python3 benchmarks/tune_quant_rows.py [--out results/quant_rows.json]

Times the rule's pick (quant._row_block) and each candidate with do_bench (median, L2 flushed) on the intermediate of T=4096
and T=1024 (`[T*top_k, I]`, with the valid-row count GEMM2 passes) and on GEMM1's input `[T, H]`; checks each candidate's
output equals the rule's, bit for bit. Candidates: the library kernel at other warp counts ("1xBLOCK wW"), and an experimental
kernel of this script that quantises ROWS rows a program as one [ROWS, BLOCK] tile ("RxBLOCK wW"). quant_rows_h100.json was
measured with a library kernel that could take several rows a program, when each element still divided with `div_rn` (a
slow-path branch per element); one row a program won at every case then, and that option was removed. With one reciprocal a
row since v9, the rows-a-program question is open again (NOTES, experiment 7a).
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from simple_moe._launch import launch
from simple_moe.bench import write_results_json
from simple_moe.grouped_gemm import MODEL_SHAPES
from simple_moe.quant import _quantize_rows_kernel, _row_block, quantize_activations_int8, round_to_int8_tl, row_scale


@triton.jit
def _quantize_row_blocks_kernel(x_ptr, q_ptr, scale_ptr, valid_rows_ptr, num_rows, num_cols, stride_xm, stride_qm,
                                HAS_VALID_ROWS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The library's single-pass row quantiser for ROWS rows at once (rows of at most BLOCK columns, unit column stride)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    in_rows = rows < num_rows
    mask = in_rows[:, None] & (cols < num_cols)[None, :]
    offsets = rows.to(tl.int64)[:, None] * stride_xm + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    valid = in_rows
    if HAS_VALID_ROWS:
        valid &= rows < tl.load(valid_rows_ptr)
    scale, lift, lifted_scale, reciprocal = row_scale(tl.max(tl.abs(x), axis=1))
    q = round_to_int8_tl(x, lift[:, None], lifted_scale[:, None], reciprocal[:, None])
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :], q, mask=mask & valid[:, None])
    tl.store(scale_ptr + rows, scale, mask=valid)


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
        unused = valid if valid is not None else s

        def library(warps):
            launch(_quantize_rows_kernel, (rows,), (x, q, s, unused, cols, x.stride(0), x.stride(1), q.stride(0)),
                   num_warps=warps, HAS_VALID_ROWS=valid is not None, SINGLE_PASS=cols <= block, BLOCK=block)

        def row_blocks(num_rows, warps):
            launch(_quantize_row_blocks_kernel, (triton.cdiv(rows, num_rows),),
                   (x, q, s, unused, rows, cols, x.stride(0), q.stride(0)),
                   num_warps=warps, HAS_VALID_ROWS=valid is not None, ROWS=num_rows, BLOCK=block)

        candidates = {f"1x{block} w{warps}": (lambda w=warps: library(w)) for warps in (2, 4, 8, 16)}
        if cols <= block:
            candidates.update({f"{r}x{block} w{warps}": (lambda r=r, w=warps: row_blocks(r, w))
                               for r in (2, 4, 8) for warps in (2, 4, 8)})
        timed = {}
        for name, run in candidates.items():
            q.fill_(99)
            s.fill_(float("nan"))
            run()
            assert torch.equal(q, ref_q) and torch.equal(s, ref_s), (label, name)
            timed[name] = bench(run)
        rule = f"1x{block} w{rule_warps}"
        best = min(timed, key=timed.get)
        results.append({"case": label, "rows": rows, "cols": cols, "rule": rule, "rule_us": timed[rule], "best": best,
                        "best_us": timed[best], "timed": timed})
        print(f"{label:36s} rule {rule:14s} {timed[rule]:7.1f} us   best {best:14s} {timed[best]:7.1f} us", flush=True)
    if args.out:
        write_results_json(args.out, {"results": results})


if __name__ == "__main__":
    main()
