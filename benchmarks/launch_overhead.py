"""Host-side cost of one eager `fused_moe_simple` call (decode shape), with Triton's own launch path and with the direct
launches of _launch.py, and a cProfile of where the time goes.

    PYTHONPATH=src python3 benchmarks/launch_overhead.py
"""
import cProfile
import math
import pstats
import time

import torch

import simple_moe as sm
from simple_moe import _launch


def main():
    dev = torch.device("cuda")
    num_experts, top_k, hidden, inter = 128, 8, 2048, 768
    x = torch.randn(1, hidden, device=dev, dtype=torch.bfloat16)
    w1 = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16) / math.sqrt(hidden)
    w2 = torch.randn(num_experts, hidden, inter, device=dev, dtype=torch.bfloat16) / math.sqrt(inter)
    scales, ids = sm.route(torch.randn(1, num_experts, device=dev), top_k)
    call = lambda: sm.fused_moe_simple(x, ids, scales, w1, w2)
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    n = 200
    for direct in (False, True):
        _launch._ENABLED = direct
        call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        t_host = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        print(f"host time per eager call, {'direct launches' if direct else 'kernel[grid](...)'}: {t_host:.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        call()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
