"""What a streaming read pays for the dirty lines `triton.testing.do_bench`'s L2 flush leaves behind.

do_bench zeroes a 256 MB buffer before every timed run, so L2 starts each run full of dirty lines; a kernel that then
reads weights from DRAM evicts them, and each eviction is a write-back. This times one read-only kernel (a sum of bf16
rows, 16-byte loads, one pass) over 12-400 MB three ways:
  flushed       do_bench as the bench uses it (the flush's dirty lines in L2);
  clean         the flush followed by a read of another 256 MB buffer, outside the timed interval (L2 holds clean lines);
  evict_first   flushed, the kernel's loads with the L2 evict-first policy (`tl.load(..., eviction_policy="evict_first")`).
Prints the table and writes JSON (`--out`).

    PYTHONPATH=src python3 benchmarks/l2_dirty.py --out results/l2_dirty_h100.json
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from simple_moe.bench import write_results_json


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
    spare = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    rows_out = []
    print(f"{'MB':>6} {'flushed':>9} {'clean':>9} {'evict_1st':>9}   us (TB/s)")
    for mb in (float(s) for s in args.sizes_mb.split(",")):
        rows = int(mb * 2**20 / (cols * 2))
        x = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(rows, dtype=torch.float32, device="cuda")

        def read(evict):
            return lambda: _row_sums[(rows,)](x, out, cols, BLOCK=block, EVICT_FIRST=evict, num_warps=4)

        def clean_read():
            spare.sum(dtype=torch.int32)  # inside do_bench's interval: subtracted below

        times = {
            "flushed": triton.testing.do_bench(read(False), warmup=50, rep=200, return_mode="median"),
            "evict_first": triton.testing.do_bench(read(True), warmup=50, rep=200, return_mode="median"),
        }
        # clean: the spare buffer's read after the flush, timed with and without the kernel behind it
        both = triton.testing.do_bench(lambda: (clean_read(), read(False)()), warmup=50, rep=200, return_mode="median")
        alone = triton.testing.do_bench(clean_read, warmup=50, rep=200, return_mode="median")
        times["clean"] = both - alone
        nbytes = rows * cols * 2
        row = {"mb": nbytes / 2**20, **{f"{k}_us": v * 1e3 for k, v in times.items()}}
        rows_out.append(row)
        print(f"{row['mb']:6.0f} " + " ".join(f"{row[k + '_us']:6.1f} ({nbytes / (row[k + '_us'] * 1e-6) / 1e12:.2f})"
                                             for k in ("flushed", "clean", "evict_first")))
    if args.out:
        write_results_json(args.out, {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                      "triton": triton.__version__, "rows": rows_out})


if __name__ == "__main__":
    main()
