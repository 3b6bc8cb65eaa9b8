"""A layer called four times, for Nsight Compute: what holds each kernel above its bytes at 3 TB/s or its flops.

    ncu --kernel-name regex:_decode_kernel --launch-skip 4 --launch-count 2 --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats python3 benchmarks/profile_layer.py [shape] [bf16|w8a16|w8a8] [T]

T defaults to 1 (the decode path's two kernels); at T=4096 profile the grouped kernels (`regex:grouped`).
"""
import argparse
import math

import torch

import simple_moe as sm
from simple_moe.grouped_gemm import MODEL_SHAPES
from simple_moe.quant import quantize_moe_weights


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", nargs="?", default="qwen3-30b-a3b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("scheme", nargs="?", default="bf16", choices=["bf16", "w8a16", "w8a8"])
    parser.add_argument("tokens", nargs="?", type=int, default=1)
    args = parser.parse_args()
    name, scheme, tokens = args.shape, args.scheme, args.tokens
    num_experts, top_k, hidden, inter = MODEL_SHAPES[name]
    dev = torch.device("cuda")
    w1 = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16) / math.sqrt(hidden)
    w2 = torch.randn(num_experts, hidden, inter, device=dev, dtype=torch.bfloat16) / math.sqrt(inter)
    quant = None
    if scheme != "bf16":
        w1, w2, quant = quantize_moe_weights(w1, w2, scheme)
    x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
    scales, ids = sm.route(torch.randn(tokens, num_experts, device=dev), top_k)
    for _ in range(4):
        sm.fused_moe_simple(x, ids, scales, w1, w2, quant=quant)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
