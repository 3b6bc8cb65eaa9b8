"""Per-stage GPU times of the fast path (routing, GEMM1, GEMM2, finalize) and the whole layer, eager and in a CUDA graph.

    PYTHONPATH=src python3 benchmarks/stage_times.py [--tokens 1,16,64,256,1024,4096] [--dtype bf16] [--quant w8a8]

Prints one row per (shape, T) with the floor of baselines.md, so the gap is visible stage by stage; first checks the output
against the float64 reference on up to 64 sampled tokens (for an INT8 scheme: the reference with the dequantised weights).
`q_in`/`q_mid`: W8A8's per-row quantisation of the input and of the intermediate.
"""
from __future__ import annotations

import argparse
import math

import torch
import triton

import simple_moe as sm
from simple_moe.activations import get_activation
from simple_moe.bench import capture_graph, ceilings_for, moe_floor
from simple_moe.finalize import finalize
from simple_moe.grouped_gemm import MODEL_SHAPES, grouped_gemm
from simple_moe.quant import dequantize_weights_int8, quantize_moe_weights


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,16,64,256,1024,4096")
    p.add_argument("--shapes", default="mixtral-8x7b,qwen3-30b-a3b,deepseek-v2-lite,olmoe-1b-7b")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--quant", choices=("none", "w8a16", "w8a8"), default="none")
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = torch.device("cuda")
    ceilings = ceilings_for(dev)  # baselines.md's on its H100, measured here on any other GPU
    act = get_activation("swiglu")
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3
    print(f"{'shape':18s} {'T':>5s} {'floor':>7s} {'route':>7s} {'q_in':>6s} {'gemm1':>8s} {'q_mid':>6s} {'gemm2':>8s} "
          f"{'final':>7s} {'eager':>8s} {'graph':>8s} {'eff':>5s} {'err':>8s}")
    for name in args.shapes.split(","):
        num_experts, top_k, hidden, inter = MODEL_SHAPES[name]
        torch.manual_seed(0)
        w1 = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=dtype) / math.sqrt(hidden)
        w2 = torch.randn(num_experts, hidden, inter, device=dev, dtype=dtype) / math.sqrt(inter)
        quant = None
        if args.quant != "none":
            w1, w2, quant = quantize_moe_weights(w1, w2, args.quant)
            ref_w1 = dequantize_weights_int8(w1, quant.fc1_scales, None, torch.float32)
            ref_w2 = dequantize_weights_int8(w2, quant.fc2_scales, None, torch.float32)
        else:
            ref_w1, ref_w2 = w1, w2
        for tokens in map(int, args.tokens.split(",")):
            x = torch.randn(tokens, hidden, device=dev, dtype=dtype)
            scales, ids = sm.route(torch.randn(tokens, num_experts, device=dev), top_k)
            out = sm.fused_moe_simple(x, ids, scales, w1, w2, quant=quant)
            sample = torch.randperm(tokens, device=dev)[:64]
            ref = sm.reference_moe(x[sample], ids[sample], scales[sample], ref_w1, ref_w2)
            err = ((out[sample].double() - ref).norm() / ref.norm()).item()
            maps = sm.build_routing_maps(ids, num_experts)
            rows = tokens * top_k
            inter_buf = torch.empty(rows, inter, device=dev, dtype=dtype)
            out2 = torch.empty(rows, hidden, device=dev, dtype=dtype)
            t_route = bench(lambda: sm.build_routing_maps(ids, num_experts))
            a1, int8_args1, t_qin = x, {}, 0.0
            if quant is not None:
                a1, int8_args1 = quant.gemm1_operands(x)
                t_qin = bench(lambda: quant.gemm1_operands(x)) if quant.quantize_input else 0.0
            t_g1 = bench(lambda: grouped_gemm(a1, w1, inter_buf, maps, gather_a=True, activation=act, **int8_args1))
            a2, int8_args2, t_qmid = inter_buf, {}, 0.0
            if quant is not None:
                a2, int8_args2 = quant.gemm2_operands(inter_buf, maps)
                t_qmid = bench(lambda: quant.gemm2_operands(inter_buf, maps)) if quant.quantize_input else 0.0
            t_g2 = bench(lambda: grouped_gemm(a2, w2, out2, maps, gather_a=False, router_scales=scales, **int8_args2))
            t_fin = bench(lambda: finalize(out2, maps, None, output=out))
            t_eager = bench(lambda: sm.fused_moe_simple(x, ids, scales, w1, w2, output=out, quant=quant))
            graph = capture_graph(lambda: sm.fused_moe_simple(x, ids, scales, w1, w2, output=out, quant=quant), dev)
            t_graph = bench(graph.replay)
            active = int(torch.unique(ids).numel())
            fl = moe_floor(active, top_k, hidden, inter, tokens, dtype, ceilings=ceilings)["floor_us"]
            print(f"{name:18s} {tokens:5d} {fl:7.1f} {t_route:7.1f} {t_qin:6.1f} {t_g1:8.1f} {t_qmid:6.1f} {t_g2:8.1f} "
                  f"{t_fin:7.1f} {t_eager:8.1f} {t_graph:8.1f} {fl / t_eager:5.2f} {err:8.1e}", flush=True)


if __name__ == "__main__":
    main()
