"""Host-side cost of one eager `fused_moe_simple` call (decode shape): with Triton's own launch path, with the direct
launches of _launch.py, and with the call plan of pipeline.py on top; where the planned call's time goes piece by piece, and
a cProfile.

    PYTHONPATH=src python3 benchmarks/launch_overhead.py [--int8]

`--int8` instead times the host side of eager calls per scheme (bf16, W8A16, W8A8 per channel) at a few shapes and profiles
the INT8 ones: the bench's eager INT8 columns ran far above their graph replays (W8A8 OLMoE T=1024 443 vs 241 us).

An eager call is host-bound when its host time exceeds its GPU time (Qwen3-30B T=1: ~47 us of GPU work): then its latency is
this host time, whatever the kernels do.
"""
import argparse
import cProfile
import math
import pstats
import time

import torch

import simple_moe as sm
from simple_moe import _launch, pipeline


def host_us(fn, n=2000):
    """Mean host time of `fn` in a loop without synchronising (the GPU work it queues runs behind)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return t


def int8_host_times():
    """Host us per eager call (direct launches) for each scheme at a few shapes, then the INT8 calls' cProfile."""
    from simple_moe import quant
    from simple_moe.grouped_gemm import MODEL_SHAPES
    dev = torch.device("cuda")
    for name, tokens in (("qwen3-30b-a3b", 1), ("qwen3-30b-a3b", 16), ("olmoe-1b-7b", 1024)):
        num_experts, top_k, hidden, inter = MODEL_SHAPES[name]
        x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
        w1 = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16) / math.sqrt(hidden)
        w2 = torch.randn(num_experts, hidden, inter, device=dev, dtype=torch.bfloat16) / math.sqrt(inter)
        scales, ids = sm.route(torch.randn(tokens, num_experts, device=dev), top_k)
        q1, q2, w8a16 = quant.quantize_moe_weights(w1, w2, "w8a16")
        calls = {"bf16": lambda: sm.fused_moe_simple(x, ids, scales, w1, w2),
                 "w8a16": lambda: sm.fused_moe_simple(x, ids, scales, q1, q2, quant=w8a16),
                 "w8a8": lambda: sm.fused_moe_simple(x, ids, scales, q1, q2, quant=quant.W8A8(w8a16.fc1_scales,
                                                                                                w8a16.fc2_scales))}
        for scheme, call in calls.items():
            for _ in range(5):
                call()
            print(f"{name} T={tokens} {scheme}: host {host_us(call, 200):.1f} us per eager call", flush=True)
            if scheme != "bf16":
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(100):
                    call()
                prof.disable()
                torch.cuda.synchronize()
                pstats.Stats(prof).sort_stats("tottime").print_stats(10)


def main():
    dev = torch.device("cuda")
    num_experts, top_k, hidden, inter = 128, 8, 2048, 768
    x = torch.randn(1, hidden, device=dev, dtype=torch.bfloat16)
    w1 = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16) / math.sqrt(hidden)
    w2 = torch.randn(num_experts, hidden, inter, device=dev, dtype=torch.bfloat16) / math.sqrt(inter)
    scales, ids = sm.route(torch.randn(1, num_experts, device=dev), top_k)
    out = torch.empty_like(x)
    call = lambda: sm.fused_moe_simple(x, ids, scales, w1, w2)  # noqa: E731
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    n = 400
    for name, direct, plans in (("kernel[grid](...), no call plan", False, False), ("direct launches, no call plan", True, False),
                                ("direct launches and the call plan", True, True)):
        _launch._ENABLED = direct
        pipeline._CALL_PLANS_ENABLED = plans
        pipeline._call_plans.clear()
        print(f"host time per eager call, {name}: {host_us(call, n):.1f} us", flush=True)

    # Piece by piece (the planned call): what one call is made of.
    call()
    plan = next(iter(pipeline._call_plans.values()))
    gemm1 = plan.forward.gemm1
    run, function, head = gemm1._entry
    intermediate = torch.empty(top_k, inter, device=dev, dtype=torch.bfloat16)
    gemm1_tensors = (x, w1, intermediate, ids, ids, ids, ids, ids, ids)
    addresses = [t.data_ptr() for t in gemm1_tensors]
    stream = torch._C._cuda_getCurrentRawStream(0)
    key_args = (x, ids, scales, w1, w2, None, None, "swiglu", None, None, None, None, 1, 0, None)
    pieces = {
        "fused_moe_simple, output given": lambda: sm.fused_moe_simple(x, ids, scales, w1, w2, output=out),
        "the plan key and its lookup": lambda: pipeline._find_plan(*key_args),
        "the plan's launches (DecodePlan)": lambda: plan.forward(x, ids, scales, w1, w2, None, None, None, out, None),
        "one PlannedLaunch (GEMM1)": lambda: gemm1(*gemm1_tensors),
        "Triton's C launch of GEMM1 alone": lambda: run(*gemm1.grid, stream, function, *head, *addresses, *gemm1._tail),
        "torch.empty [8, 768] bf16": lambda: torch.empty(top_k, inter, device=dev, dtype=torch.bfloat16),
        "torch.cuda.current_device()": torch.cuda.current_device,
        "current raw stream": lambda: torch._C._cuda_getCurrentRawStream(0),
        "x.data_ptr()": x.data_ptr,
    }
    for name, fn in pieces.items():
        print(f"  {name:34s} {host_us(fn):7.2f} us")

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        call()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--int8", action="store_true", help="host time per scheme and the INT8 calls' profile")
    int8_host_times() if parser.parse_args().int8 else main()
