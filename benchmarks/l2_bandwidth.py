"""How fast the SMs can read from L2: the ceiling the bf16 prefill GEMMs run into (NOTES v19, v23).

    PYTHONPATH=src python3 benchmarks/l2_bandwidth.py --out results/l2_bandwidth_h100.json

A buffer of S MB is read `passes` times by every SM (the programs split each pass in 16-byte vectors, loads with `.cg`: cached
in L2 only, so every load is an L2 request, as cp.async and TMA copies are). Launches run back to back with no flush between
them, so once the first pass has brought the buffer in, buffers that fit in L2 (50 MB on the H100, in two partitions) are read
from it. Time per launch with CUDA events over many launches; bytes / time is the read rate. The largest size (1 GB) reads
DRAM and is the device-copy reference. Under Nsight Compute (`--ncu-once`: one launch of one size) its "L2 Cache Throughput"
is the percentage the GEMMs' profiles can be compared with.
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from simple_moe.bench import write_results_json


@triton.jit
def _read_kernel(src_ptr, partial_ptr, num_vectors, passes, VECTORS: tl.constexpr):
    """Program p reads vectors p, p + programs, ... of each pass (VECTORS rows of 8 bf16 at a time) and sums them."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    rows = tl.arange(0, VECTORS)[:, None]
    lanes = tl.arange(0, 8)[None, :]
    acc = tl.zeros([VECTORS, 8], tl.float32)
    for _ in range(passes):
        for first in range(pid * VECTORS, num_vectors, programs * VECTORS):
            vector = first + rows
            acc += tl.load(src_ptr + vector * 8 + lanes, mask=vector < num_vectors, other=0.0,
                           cache_modifier=".cg").to(tl.float32)
    tl.store(partial_ptr + pid, tl.sum(acc))


def read_rate(megabytes: float, passes: int, programs_per_sm: int, launches: int, warps: int = 8, vectors: int = 1024):
    """(GB/s, us a launch) reading a buffer of `megabytes` `passes` times a launch."""
    num_vectors = int(megabytes * 2**20) // 16
    src = torch.randn(num_vectors * 8, device="cuda", dtype=torch.bfloat16)
    programs = programs_per_sm * torch.cuda.get_device_properties(0).multi_processor_count
    partial = torch.empty(programs, device="cuda", dtype=torch.float32)
    run = lambda: _read_kernel[(programs,)](src, partial, num_vectors, passes, VECTORS=vectors, num_warps=warps)  # noqa: E731
    for _ in range(3):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(launches):
        run()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / launches
    assert torch.isfinite(partial).all()
    return num_vectors * 16 * passes / seconds / 1e9, seconds * 1e6


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes-mb", default="4,8,16,24,32,40,1024")
    p.add_argument("--programs-per-sm", default="2,4")
    p.add_argument("--bytes-a-launch-mb", type=float, default=1024, help="passes = this / size (at least 1)")
    p.add_argument("--ncu-once", type=float, default=None, help="one launch of this size (MB), for Nsight Compute")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.ncu_once:
        read_rate(args.ncu_once, max(1, int(args.bytes_a_launch_mb // args.ncu_once)), 4, 1)
        return 0
    rows = []
    for programs_per_sm in map(int, args.programs_per_sm.split(",")):
        for size in map(float, args.sizes_mb.split(",")):
            passes = max(1, int(args.bytes_a_launch_mb // size))
            rate, us = read_rate(size, passes, programs_per_sm, launches=20)
            rows.append({"megabytes": size, "passes": passes, "programs_per_sm": programs_per_sm, "gb_per_s": rate,
                         "us_a_launch": us})
            print(f"{size:7.0f} MB x {passes:4d} passes, {programs_per_sm} programs an SM: {rate:8.0f} GB/s ({us:8.1f} us)",
                  flush=True)
    if args.out:
        write_results_json(args.out, {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
