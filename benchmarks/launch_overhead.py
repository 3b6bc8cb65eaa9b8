"""Host-side cost of one eager `fused_moe_simple` call (decode shape), with Triton's own launch path and with the direct
launches of _launch.py, where that time goes piece by piece, and a cProfile.

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
from simple_moe import _launch, decode
from simple_moe.activations import get_activation
from simple_moe.pipeline import validate_moe_inputs


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
    for direct in (False, True):
        _launch._ENABLED = direct
        print(f"host time per eager call, {'direct launches' if direct else 'kernel[grid](...)'}: {host_us(call, n):.1f} us")

    # Piece by piece (direct launches): what one call is made of.
    launches = []
    real_launch = decode.launch
    decode.launch = lambda *a, **k: (launches.append((a, k)), real_launch(*a, **k))  # noqa: E731
    call()
    decode.launch = real_launch
    swiglu = get_activation("swiglu")
    (kernel, grid, args, *rest), options = launches[0]
    _, run, function, head = next(v for key, v in _launch._compiled.items() if key[0] == id(kernel))
    stream = torch._C._cuda_getCurrentRawStream(0)
    layout = _launch.leading_tensors(args)
    addresses = _launch.key_and_launch_args(args, *layout)[1]
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    constexpr_values = [v for k, v in options.items() if k not in ("num_warps", "num_stages", "launch_pdl", "maxnreg")]
    pieces = {
        "fused_moe_simple, output given": lambda: sm.fused_moe_simple(x, ids, scales, w1, w2, output=out),
        "decode_forward (no validation)": lambda: decode.decode_forward(x, ids, scales, w1, w2, swiglu, "gate_first", None,
                                                                        None, None, out, None),
        "validate_moe_inputs": lambda: validate_moe_inputs(x, ids, scales, w1, w2, swiglu),
        "torch.empty [8, 768] bf16": lambda: torch.empty(8, inter, device=dev, dtype=torch.bfloat16),
        "_launch.launch of GEMM1": lambda: real_launch(kernel, grid, args, *rest, **options),
        "arg keys and addresses of GEMM1's args": lambda: _launch.key_and_launch_args(args, *layout),
        "Triton's C launch of GEMM1 alone": lambda: run(*grid3, stream, function, *head, *addresses, *constexpr_values),
        "  the same given tensors, not addresses": lambda: run(*grid3, stream, function, *head, *args, *constexpr_values),
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
