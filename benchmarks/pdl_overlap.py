"""Does a programmatic dependent launch start before the previous kernel ends? (NOTES experiment 25.)

    PYTHONPATH=src python3 benchmarks/pdl_overlap.py

A first kernel of one program an SM (one warp, no shared memory) signals `griddepcontrol.launch_dependents` first thing and
then spins for ~20 us; a second kernel, launched with `launch_pdl`, records the global timer when each of its programs starts
(before `griddepcontrol.wait`) and after its wait. If its programs start while the first kernel still spins, the early
launch happens; the second kernel also runs holding 64 and 128 KB of shared memory, to see whether that keeps it off the
busy SMs, with the first kernel's preferred shared-memory carveout left to the driver or set to the most (100%).
In a CUDA graph (`--eager` too: there Triton's launch path brought the second launch after the first kernel's end, NOTES v24).
`--first-programs/--first-warps` give the first kernel the decode GEMM1's shape (e.g. 768 programs of 8 warps).
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@triton.jit
def _globaltimer():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _spin_kernel(times_ptr, spin_ns):
    tl.extra.cuda.gdc_launch_dependents()
    start = _globaltimer()
    now = start
    while now - start < spin_ns:
        now = _globaltimer()
    tl.store(times_ptr + tl.program_id(0) * 2, start)
    tl.store(times_ptr + tl.program_id(0) * 2 + 1, now)


@gluon.jit
def _dependent_kernel(times_ptr, SMEM_VALUES: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    start = _globaltimer()
    if SMEM_VALUES > 0:  # shared memory that the program holds while it waits
        buffer = gl.allocate_shared_memory(gl.float32, [SMEM_VALUES], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        buffer.slice(0, 128).store(gl.zeros([128], gl.float32, layout))
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    waited = _globaltimer()
    gl.store(times_ptr + gl.program_id(0) * 2, start)
    gl.store(times_ptr + gl.program_id(0) * 2 + 1, waited)


def set_shared_memory_carveout(function: int, percent: int) -> None:
    """The preferred shared-memory carveout of a compiled kernel (its CUfunction handle), in % of the most an SM has
    (CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 9): the driver sizes the SMs a kernel runs on for that much."""
    import ctypes

    result = ctypes.CDLL("libcuda.so.1").cuFuncSetAttribute(ctypes.c_void_p(function), ctypes.c_int(9),
                                                           ctypes.c_int(percent))
    assert result == 0, f"cuFuncSetAttribute: CUresult {result}"


def run(programs: int, spin_us: float, smem_values: int, graph: bool, carveout: int | None, first_programs: int,
        first_warps: int):
    dev = torch.device("cuda")
    first = torch.zeros(first_programs, 2, dtype=torch.int64, device=dev)
    second = torch.zeros(programs, 2, dtype=torch.int64, device=dev)

    def layer():
        spin = _spin_kernel[(first_programs,)](first, int(spin_us * 1000), num_warps=first_warps)
        _dependent_kernel[(programs,)](second, SMEM_VALUES=smem_values, num_warps=4, launch_pdl=True)
        return spin

    spin = layer()
    torch.cuda.synchronize()
    if carveout is not None:
        set_shared_memory_carveout(spin.function, carveout)
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            layer()
        g.replay()
    else:
        layer()
    torch.cuda.synchronize()
    first_end = first[:, 1].max().item()
    starts = (second[:, 0] - first_end).float() / 1000
    waits = (second[:, 1] - first_end).float() / 1000
    return (starts < 0).float().mean().item(), starts.min().item(), starts.median().item(), waits.median().item()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--spin-us", type=float, default=20.0)
    p.add_argument("--first-programs", type=int, default=0, help="the spinning kernel's programs (default: one an SM)")
    p.add_argument("--first-warps", type=int, default=1)
    p.add_argument("--eager", action="store_true", help="also launch without a graph")
    args = p.parse_args()
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    first_programs = args.first_programs or programs
    print(f"first kernel: {first_programs} programs of {args.first_warps} warps; dependent: {programs} of 4 warps")
    # The attribute stays on the compiled kernel once set: the runs without it come first.
    modes = (True, False) if args.eager else (True,)
    for carveout, graph, smem_values in ([(None, g, v) for g in modes for v in (0, 16384, 32768)]
                                         + [(100, g, v) for g in modes for v in (16384, 32768)]):
        early, first, median, wait = run(programs, args.spin_us, smem_values, graph, carveout, first_programs,
                                         args.first_warps)
        print(f"{'graph' if graph else 'eager'} smem {smem_values * 4 // 1024:3d} KB, first kernel's carveout "
              f"{carveout if carveout is not None else 'default'}: {early:5.0%} of the dependent "
              f"programs started before the first kernel ended; start - its end: first {first:6.1f} us, median "
              f"{median:6.1f} us; after the wait {wait:6.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
