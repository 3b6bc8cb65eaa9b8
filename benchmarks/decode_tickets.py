"""NOTES experiment 18b (a prototype, not the library's path): the decode layer in one launch, work handed out by tickets.

Today's decode path is two launches (GEMM1, then GEMM2 launched early with PDL and waiting for all of GEMM1). Here one
persistent grid takes work items from an atomic ticket counter, every GEMM1 item (pair, block of I) before any GEMM2 item
(token, block of H). A program that takes a GEMM2 item first loads that item's whole fc2 tile (`SLOTS * BLOCK_N2` weight
rows x all of I) into registers, then waits until the GEMM1-done counter reaches the number of GEMM1 items, then reads the
intermediate rows and sums. So GEMM2's weight bytes stream while GEMM1's last items finish, in one ramp.

No co-residency bound is needed: a program waits only once it holds a GEMM2 ticket, and every GEMM1 ticket was handed out
before it, to a program that is running and waits on nothing. For the same reason the interpreter (one program at a time)
runs it: program 0 takes every ticket in order.

Scope of the prototype: gated activations with fc1 gate-first, no biases, 16-bit weights or INT8 weight-only per channel,
all of I held in registers (I up to ~2048). It compares itself with `fused_moe_simple` (the library's decode path) in CUDA
graphs, after checking both against each other:

    PYTHONPATH=src python3 benchmarks/decode_tickets.py --quant none,w8a16 --out results/decode_tickets_h100.json
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/decode_tickets.py --check   # against the float64 reference
"""
from __future__ import annotations

import argparse
import statistics

import torch
import triton
import triton.language as tl

import simple_moe
from simple_moe.activations import ActivationType, apply_activation
from simple_moe.decode import _rows_dot
from simple_moe.grouped_gemm import int8_exact_to_float32


@triton.jit
def _ticket_decode_kernel(x_ptr, w1_ptr, w2_ptr, inter_ptr, out_ptr, ids_ptr, router_scales_ptr, w1_scale_ptr,
                          w2_scale_ptr, counters_ptr, num_tokens, num_experts, I, H, stride_w1e, stride_w2e, stride_ws1e,
                          stride_ws2e, TOP_K: tl.constexpr, SLOTS: tl.constexpr, ACTIVATION: tl.constexpr,
                          W_QUANT: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_K1: tl.constexpr, EVEN_K1: tl.constexpr,
                          K_FOLD1: tl.constexpr, BLOCK_N2: tl.constexpr, I_PAD: tl.constexpr, EVICT: tl.constexpr):
    # counters_ptr: int32 [2], zero at launch: [0] the next ticket, [1] GEMM1 items finished.
    blocks1 = tl.cdiv(I, BLOCK_N1)
    items1 = num_tokens * TOP_K * blocks1
    blocks2 = tl.cdiv(H, BLOCK_N2)
    items = items1 + num_tokens * blocks2
    ticket = tl.atomic_add(counters_ptr, 1)
    while ticket < items:
        if ticket < items1:
            _gemm1_item(ticket // blocks1, ticket % blocks1, x_ptr, w1_ptr, inter_ptr, ids_ptr, w1_scale_ptr, num_tokens,
                        num_experts, I, H, stride_w1e, stride_ws1e, TOP_K, ACTIVATION, W_QUANT, BLOCK_N1, BLOCK_K1, EVEN_K1,
                        K_FOLD1, EVICT)
            # Every thread's stores of the item, then one release: the barrier orders the other threads' stores before
            # the releasing thread's atomic (the pattern of a grid sync).
            tl.debug_barrier()
            tl.atomic_add(counters_ptr + 1, 1, sem="release")
        else:
            item = ticket - items1
            _gemm2_item(item // blocks2, item % blocks2, items1, counters_ptr + 1, w2_ptr, inter_ptr, out_ptr, ids_ptr,
                        router_scales_ptr, w2_scale_ptr, num_tokens, num_experts, I, H, stride_w2e, stride_ws2e, TOP_K,
                        SLOTS, W_QUANT, BLOCK_N2, I_PAD, EVICT)
        ticket = tl.atomic_add(counters_ptr, 1)


@triton.jit
def _gemm1_item(pair, block, x_ptr, w1_ptr, inter_ptr, ids_ptr, w1_scale_ptr, num_tokens, num_experts, I, H, stride_w1e,
                stride_ws1e, TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, W_QUANT: tl.constexpr, BLOCK_N1: tl.constexpr,
                BLOCK_K1: tl.constexpr, EVEN_K1: tl.constexpr, K_FOLD1: tl.constexpr, EVICT: tl.constexpr):
    """intermediate[pair, block's columns] = act(x[t] @ gate rows, x[t] @ up rows), pair = t + k*T; zeros when dropped."""
    cols = block * BLOCK_N1 + tl.arange(0, BLOCK_N1)
    col_mask = cols < I
    cols_safe = tl.where(col_mask, cols, 0).to(tl.int64)
    token = pair % num_tokens
    expert = tl.load(ids_ptr + token * TOP_K + pair // num_tokens).to(tl.int64)
    h = tl.zeros([BLOCK_N1], dtype=tl.float32)
    if (expert >= 0) & (expert < num_experts):
        w_expert = w1_ptr + expert * stride_w1e
        ws_expert = w1_scale_ptr + expert * stride_ws1e
        gate, up = _rows_dot(x_ptr + token.to(tl.int64) * H + tl.zeros([BLOCK_N1], dtype=tl.int64), w_expert + cols_safe * H,
                             w_expert + (I + cols_safe) * H, ws_expert + cols_safe, ws_expert + I + cols_safe, ws_expert,
                             col_mask, H, 0, False, True, W_QUANT, 1, False, EVEN_K1, BLOCK_K1, 1, 1, K_FOLD1, EVICT)
        h = apply_activation(gate, up, 0.0, 0.0, 0.0, ACTIVATION)
    tl.store(inter_ptr + pair.to(tl.int64) * I + cols, h.to(inter_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _gemm2_item(token, block, gemm1_items, gemm1_done_ptr, w2_ptr, inter_ptr, out_ptr, ids_ptr, router_scales_ptr,
                w2_scale_ptr, num_tokens, num_experts, I, H, stride_w2e, stride_ws2e, TOP_K: tl.constexpr,
                SLOTS: tl.constexpr, W_QUANT: tl.constexpr, BLOCK_N2: tl.constexpr, I_PAD: tl.constexpr,
                EVICT: tl.constexpr):
    """out[t, block's columns] = sum over k of round(scale[t, k] * intermediate[t + k*T] @ fc2[e_k, cols]), after every
    GEMM1 item is done; the fc2 tile is requested before the wait."""
    token = token.to(tl.int64)
    rows = tl.arange(0, SLOTS * BLOCK_N2)
    k = rows // BLOCK_N2
    col_of_row = block * BLOCK_N2 + rows % BLOCK_N2
    cols_k = tl.where(col_of_row < H, col_of_row, 0).to(tl.int64)
    expert = tl.load(ids_ptr + token * TOP_K + k, mask=k < TOP_K, other=0).to(tl.int64)
    kept = (k < TOP_K) & (expert >= 0) & (expert < num_experts)
    expert = tl.where(kept, expert, 0)
    ks = tl.arange(0, I_PAD)[None, :]
    in_row = kept[:, None] & (ks < I)
    # The whole [rows, I] weight tile is requested before the wait: its bytes arrive while GEMM1 finishes.
    w = tl.load(w2_ptr + expert[:, None] * stride_w2e + cols_k[:, None] * I + ks, mask=in_row, other=0,
                eviction_policy="evict_first" if EVICT else "")
    while tl.atomic_add(gemm1_done_ptr, 0, sem="acquire") < gemm1_items:
        pass
    tl.debug_barrier()  # every thread's reads of the intermediate after the acquire
    pair = tl.where(kept, token + k * num_tokens, 0)
    a = tl.load(inter_ptr + pair[:, None] * I + ks, mask=in_row, other=0.0, cache_modifier=".cg")
    y = tl.sum(int8_exact_to_float32(w) * a.to(tl.float32), axis=1)
    if W_QUANT == 1:
        y *= tl.load(w2_scale_ptr + expert * stride_ws2e + cols_k, mask=kept, other=0.0).to(tl.float32)
    y *= tl.load(router_scales_ptr + token * TOP_K + k, mask=kept, other=0.0).to(tl.float32)
    y = y.to(out_ptr.dtype.element_ty).to(tl.float32)  # each pair's row rounded once, as the library does
    total = tl.sum(tl.reshape(y, [SLOTS, BLOCK_N2]), axis=0)
    cols = block * BLOCK_N2 + tl.arange(0, BLOCK_N2)
    tl.store(out_ptr + token * H + cols, total.to(out_ptr.dtype.element_ty), mask=cols < H)


def ticket_decode(x, selected, scales, w1, w2, quant=None, programs_per_sm: int = 2, num_warps: int = 8,
                  block_k1: int = 256):
    """() -> output: the layer through `_ticket_decode_kernel`, buffers allocated once (so a CUDA graph can replay it)."""
    num_tokens, hidden = x.shape
    num_experts, inter = w2.shape[0], w2.shape[2]
    top_k = selected.shape[1]
    slots = triton.next_power_of_2(top_k)
    block_n2 = max(1, 8 // slots)  # 8 weight rows a GEMM2 item, as the library's 16-bit rule
    inter_rows = torch.empty(num_tokens * top_k, inter, dtype=x.dtype, device=x.device)
    out = torch.empty_like(x)
    counters = torch.zeros(2, dtype=torch.int32, device=x.device)
    int8 = quant is not None
    w1_scale = quant.fc1_scales if int8 else counters
    w2_scale = quant.fc2_scales if int8 else counters
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    block_k1 = min(block_k1, triton.next_power_of_2(hidden))
    if not (x.is_contiguous() and w1.is_contiguous() and w2.is_contiguous() and scales.is_contiguous()):
        raise ValueError("ticket_decode: the prototype takes contiguous input, weights and router scales")
    selected = selected.to(torch.int32).contiguous()

    def call():
        counters.zero_()
        _ticket_decode_kernel[(sms * programs_per_sm,)](
            x, w1, w2, inter_rows, out, selected, scales, w1_scale, w2_scale, counters, num_tokens, num_experts, inter,
            hidden, w1.stride(0), w2.stride(0), w1_scale.stride(0) if int8 else 0, w2_scale.stride(0) if int8 else 0,
            TOP_K=top_k, SLOTS=slots, ACTIVATION=int(ActivationType.Swiglu), W_QUANT=int(int8), BLOCK_N1=8,
            BLOCK_K1=block_k1, EVEN_K1=hidden % block_k1 == 0, K_FOLD1=8 if int8 else 1, BLOCK_N2=block_n2,
            I_PAD=triton.next_power_of_2(inter), EVICT=True, num_warps=num_warps)
        return out

    return call


def check(device: str) -> float:
    """The worst relative error against the float64 reference over tiny problems on `device` (the CPU: through the
    interpreter): fp32 and W8A16 (fp32 activations), with one pair's expert out of range (dropped)."""
    from simple_moe.bench import rel_err
    from simple_moe.quant import dequantize_weights_int8, quantize_moe_weights

    gen = torch.Generator().manual_seed(0)
    E, top_k, H, I, T = 4, 2, 64, 48, 3
    x = torch.randn(T, H, generator=gen)
    w1, w2 = torch.randn(E, 2 * I, H, generator=gen) / H**0.5, torch.randn(E, H, I, generator=gen) / I**0.5
    selected = torch.randint(0, E, (T, top_k), generator=gen, dtype=torch.int32)
    selected[1, 1] = E + 3  # not a local expert: dropped
    scales = torch.rand(T, top_k, generator=gen)
    worst = 0.0
    for quant_name in ("none", "w8a16"):
        if quant_name == "none":
            q1, q2, quant, d1, d2 = w1, w2, None, w1, w2
        else:
            q1, q2, quant = quantize_moe_weights(w1, w2, "w8a16")
            d1 = dequantize_weights_int8(q1, quant.fc1_scales, None, torch.float64)
            d2 = dequantize_weights_int8(q2, quant.fc2_scales, None, torch.float64)
            quant = type(quant)(quant.fc1_scales.to(device), quant.fc2_scales.to(device))
        on = [t.to(device) for t in (x, selected, scales, q1, q2)]
        out = ticket_decode(*on, quant, programs_per_sm=3, block_k1=32)()
        ref = simple_moe.reference_moe(x.double(), selected, scales.double(), d1.double(), d2.double())
        err = rel_err(out.cpu(), ref)  # NaN or inf: inf, so a broken kernel cannot pass
        worst = max(worst, err)
        print(f"check on {device}, {quant_name}: rel err {err:.1e}")
    return worst


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="qwen3-30b-a3b,deepseek-v2-lite,olmoe-1b-7b")
    p.add_argument("--quant", default="none,w8a16")
    p.add_argument("--programs-per-sm", default="1,2,4")
    p.add_argument("--warps", default="8,16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--check", action="store_true", help="tiny problems against the float64 reference, then stop")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.check:
        return 0 if check("cuda" if torch.cuda.is_available() else "cpu") < 1e-5 else 1
    from simple_moe.bench import capture_graph, make_tokens, make_weights, rel_err, write_results_json
    from simple_moe.grouped_gemm import MODEL_SHAPES
    from simple_moe.quant import quantize_moe_weights

    device, rows = torch.device("cuda"), []
    for name in args.shapes.split(","):
        shape = MODEL_SHAPES[name]
        w1, w2 = make_weights(shape, torch.bfloat16, device, seed=0)
        x, selected, scales = make_tokens(shape, 1, torch.bfloat16, device, seed=1)
        for quant_name in args.quant.split(","):
            q1, q2, quant = (w1, w2, None) if quant_name == "none" else quantize_moe_weights(w1, w2, quant_name)
            library_out = torch.empty_like(x)
            calls = {"library": lambda: simple_moe.fused_moe_simple(x, selected, scales, q1, q2, quant=quant,
                                                                    output=library_out)}
            for per_sm in map(int, args.programs_per_sm.split(",")):
                for warps in map(int, args.warps.split(",")):
                    calls[f"tickets p{per_sm} w{warps}"] = ticket_decode(x, selected, scales, q1, q2, quant, per_sm, warps)
            graphs, errors = {}, {}
            for label, call in calls.items():
                result = call()
                errors[label] = 0.0 if label == "library" else rel_err(result, library_out.double())
                graphs[label] = capture_graph(call, device)
            times = {label: [] for label in calls}
            for _ in range(args.rounds):
                for label, graph in graphs.items():
                    times[label].append(triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median") * 1e3)
            row = {"shape": name, "quant": quant_name, "us": {k: statistics.median(v) for k, v in times.items()},
                   "rel_err_vs_library": errors, "rounds": times}
            rows.append(row)
            print(f"{name:18s} {quant_name:6s} " + "  ".join(f"{k} {v:6.1f} us (err {errors[k]:.1e})"
                                                            for k, v in row["us"].items()), flush=True)
    if args.out:
        write_results_json(args.out, {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
