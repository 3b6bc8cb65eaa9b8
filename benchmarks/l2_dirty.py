"""What a streaming read pays for the dirty lines `triton.testing.do_bench`'s L2 flush leaves behind.

do_bench zeroes a 256 MB buffer before every timed run, so L2 starts each run full of dirty lines; a kernel that then
reads weights from DRAM evicts them, and each eviction is a write-back. This times one read-only kernel (a sum of bf16
rows, 16-byte loads, one pass) over 12-400 MB, with its loads plain or evict-first
(`tl.load(..., eviction_policy="evict_first")`), each two ways:
  flushed   do_bench as the bench uses it (the flush's dirty lines in L2);
  clean     `simple_moe.bench.do_bench_clean_l2`: L2 holds clean lines when the kernel starts.
Prints the table and writes JSON (`--out`).

    PYTHONPATH=src python3 benchmarks/l2_dirty.py --out results/l2_dirty_h100.json
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from simple_moe.bench import do_bench_clean_l2, write_results_json


@triton.jit
def _row_sums(x_ptr, out_ptr, cols, BLOCK: tl.constexpr, EVICT_FIRST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(0, cols, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        if EVICT_FIRST:
            acc += tl.load(x_ptr + row * cols + offs, eviction_policy="evict_first").to(tl.float32)
        else:
            acc += tl.load(x_ptr + row * cols + offs).to(tl.float32)
    tl.store(out_ptr + row, tl.sum(acc))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes-mb", default="12,25,50,75,100,200,400")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cols, block = 8192, 2048
    columns = ("flushed", "clean", "evict_first", "evict_first_clean")
    rows_out = []
    print(f"{'MB':>5} " + " ".join(f"{c:>17}" for c in columns) + "   us (TB/s)")
    for mb in (float(s) for s in args.sizes_mb.split(",")):
        rows = int(mb * 2**20 / (cols * 2))
        x = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(rows, dtype=torch.float32, device="cuda")

        def read(evict):
            return lambda: _row_sums[(rows,)](x, out, cols, BLOCK=block, EVICT_FIRST=evict, num_warps=4)

        times = {}
        for evict in (False, True):
            suffix = "evict_first" if evict else ""
            times[suffix or "flushed"] = triton.testing.do_bench(read(evict), warmup=50, rep=200, return_mode="median")
            times["_".join(filter(None, (suffix, "clean")))] = do_bench_clean_l2(read(evict), warmup_ms=50, rep_ms=200)
        nbytes = rows * cols * 2
        row = {"mb": nbytes / 2**20, **{f"{k}_us": times[k] * 1e3 for k in columns}}
        rows_out.append(row)
        print(f"{row['mb']:5.0f} " + " ".join(f"{row[k + '_us']:9.1f} ({nbytes / (row[k + '_us'] * 1e-6) / 1e12:4.2f})"
                                             for k in columns))
    if args.out:
        write_results_json(args.out, {"rows": rows_out})


if __name__ == "__main__":
    main()
