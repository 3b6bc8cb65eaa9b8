"""Probe (NOTES experiment 25): the T=1 decode GEMM2 with its weights in shared memory before GEMM1 ends.

    PYTHONPATH=src python3 benchmarks/decode_preload.py --out results/decode_preload_h100.json

At T=1 the layer is two streaming kernels, and each pays a ramp and a tail (~9 us over the bytes for W8A16 Qwen3-30B on a
clean L2, NOTES v19). GEMM2's weights do not depend on GEMM1, yet GEMM2 starts reading them only after GEMM1 has finished.
Earlier tries started those reads early into L2 (v5, v5b) or into registers (v6) and lost: few GEMM2 programs were resident
while GEMM1 held the SMs, and a register tile big enough to matter crowds GEMM1 out. GEMM1 uses no shared memory, though, and
all of a token's int8 fc2 rows for 16 output columns fit in it (8 experts x 16 x K bytes: 96 KB for Qwen3-30B, 176 KB for
DeepSeek-V2-Lite). So here, in Gluon (explicit shared memory and cp.async):

- one program per 16 columns of H (128 programs for H = 2048: one an SM), 4 warps, launched as a programmatic dependent
  launch, so it may become resident as soon as every GEMM1 program has started (GEMM1 signals that first thing);
- before waiting for GEMM1 (`griddepcontrol.wait`) it reads the token's experts and issues cp.async copies of its whole
  weight slice [slots, 16, K] into shared memory; then it waits, reads the intermediate rows (L2) and computes the slot dots
  from shared memory, with the decode kernel's epilogue (per-channel scale, bias, router scale, each pair's row rounded to
  the activation dtype, the top_k rows summed in one fixed order).

It times, in CUDA graphs and interleaved rounds, the library's W8A16 T=1 layer against the library's GEMM1 followed by this
GEMM2, decomposed (the copies without the compute, neither, each GEMM alone), with GEMM1's rule tile, a 16-column tile
(half the programs) and the rule's tile compiled apart with its SMs set to keep the most shared memory (`carveout`: without
it a dependent program that needs shared memory does not join a running kernel's SMs, `benchmarks/pdl_overlap.py`), after
checking the output against the library's (relative L2) and against float64.

Outcome on the H100 (NOTES v24, `results/decode_preload_*_h100.json`): right, and slower. Qwen3-30B 31.5 us against the
library's 23.5: the copies add their whole 4.4 us (at the copy rate, so they share DRAM with GEMM1's stream whenever they
run) and the compute from shared memory takes 9 us with 4 warps an SM (4.3 with 16). Kept for experiment 25's next steps;
not on the library's path.
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from pdl_overlap import set_shared_memory_carveout
import simple_moe as sm
from simple_moe._launch import launch
from simple_moe.activations import get_activation
from simple_moe.bench import capture_graph, write_results_json
from simple_moe.decode import DecodePlan, DecodeTile, decode_tile
from simple_moe.grouped_gemm import MODEL_SHAPES, sm_count
from simple_moe.quant import dequantize_weights_int8, quantize_moe_weights

COLUMNS, CHUNK = 16, 128  # columns a program, bytes of K a copy chunk (the kernel's COLS and CHUNK_K)


@gluon.jit
def _slot_experts(ids_ptr, slots, start_expert, num_experts, TOP_K: gl.constexpr):
    """The token's local expert of each slot (0 where dropped or padding) and whether the slot is kept (T = 1)."""
    expert = gl.load(ids_ptr + slots, mask=slots < TOP_K, other=0).to(gl.int64) - start_expert
    kept = (slots < TOP_K) & (expert >= 0) & (expert < num_experts)
    return gl.where(kept, expert, 0), kept


@gluon.jit
def _preload_gemm2_kernel(inter_ptr, w_ptr, out_ptr, bias_ptr, ids_ptr, router_scales_ptr, w_scale_ptr, N, K, num_experts,
                          start_expert, stride_we, stride_wn, stride_bias_e, stride_wse, TOP_K: gl.constexpr,
                          SLOTS: gl.constexpr, K_CHUNKS: gl.constexpr, HAS_BIAS: gl.constexpr, LOAD: gl.constexpr = True,
                          COMPUTE: gl.constexpr = True, WARPS: gl.constexpr = 4):
    COLS: gl.constexpr = 16
    CHUNK_K: gl.constexpr = 128
    STEP_K: gl.constexpr = 32
    col0 = gl.program_id(0) * COLS
    if WARPS == 4:
        # Copies: a thread moves 16 bytes of one (slot, column) row a copy; 4 warps cover [1, 16, 128] a pass.
        copy_layout: gl.constexpr = gl.BlockedLayout([1, 1, 16], [1, 4, 8], [1, 4, 1], [2, 1, 0])
        # Compute: a thread holds 2 slots x 16 values of K of one column; [8, 16, 32] a step.
        layout: gl.constexpr = gl.BlockedLayout([2, 1, 16], [4, 4, 2], [1, 4, 1], [2, 1, 0])
    else:  # 16 warps: copies [4, 16, 128] a pass; a thread computes 8 values of K of one (slot, column) a step
        copy_layout: gl.constexpr = gl.BlockedLayout([1, 1, 16], [1, 4, 8], [4, 4, 1], [2, 1, 0])
        layout: gl.constexpr = gl.BlockedLayout([1, 1, 8], [2, 4, 4], [4, 4, 1], [2, 1, 0])
    smem_layout: gl.constexpr = gl.SwizzledSharedLayout(16, 1, 8, [2, 1, 0])
    weights = gl.allocate_shared_memory(gl.int8, [K_CHUNKS, SLOTS, COLS, CHUNK_K], smem_layout)

    # ---- before GEMM1 ends: the token's experts (inputs) and the copies of their rows
    c_slots = gl.arange(0, SLOTS, layout=gl.SliceLayout(1, gl.SliceLayout(2, copy_layout)))
    c_cols = gl.arange(0, COLS, layout=gl.SliceLayout(0, gl.SliceLayout(2, copy_layout)))
    c_ks = gl.arange(0, CHUNK_K, layout=gl.SliceLayout(0, gl.SliceLayout(1, copy_layout)))
    c_expert, c_kept = _slot_experts(ids_ptr, c_slots, start_expert, num_experts, TOP_K)
    rows = (gl.expand_dims(gl.expand_dims(c_expert * stride_we, 1), 2)
            + gl.expand_dims(gl.expand_dims((col0 + c_cols).to(gl.int64) * stride_wn, 0), 2))
    row_mask = gl.expand_dims(gl.expand_dims(c_kept, 1), 2) & gl.expand_dims(gl.expand_dims(col0 + c_cols < N, 0), 2)
    for chunk in range(K_CHUNKS if LOAD else 0):
        ks = chunk * CHUNK_K + c_ks
        async_copy.async_copy_global_to_shared(weights.index(chunk),
                                               w_ptr + rows + gl.expand_dims(gl.expand_dims(ks, 0), 1),
                                               mask=row_mask & gl.expand_dims(gl.expand_dims(ks < K, 0), 1),
                                               eviction_policy="evict_first")
    async_copy.commit_group()

    # ---- after: the intermediate rows are GEMM1's
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    async_copy.wait_group(0)
    gl.thread_barrier()  # the copies landed in other threads' layout

    slots = gl.arange(0, SLOTS, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))
    cols = gl.arange(0, COLS, layout=gl.SliceLayout(0, gl.SliceLayout(2, layout)))
    x_slots = gl.arange(0, SLOTS, layout=gl.SliceLayout(1, gl.SliceLayout(1, layout)))
    x_ks = gl.arange(0, STEP_K, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout)))
    expert, kept = _slot_experts(ids_ptr, slots, start_expert, num_experts, TOP_K)
    x_kept = gl.convert_layout(kept, gl.SliceLayout(1, gl.SliceLayout(1, layout)))
    x_rows = inter_ptr + gl.expand_dims(x_slots.to(gl.int64) * K, 1)  # T = 1: pair k is the intermediate's row k
    acc = gl.zeros([SLOTS, COLS], gl.float32, gl.SliceLayout(2, layout))
    for chunk in range(K_CHUNKS if COMPUTE else 0):
        for sub in gl.static_range(CHUNK_K // STEP_K):
            k0 = chunk * CHUNK_K + sub * STEP_K
            xk = k0 + x_ks
            x = gl.load(x_rows + gl.expand_dims(xk, 0), mask=gl.expand_dims(x_kept, 1) & gl.expand_dims(xk < K, 0),
                        other=0.0).to(gl.float32)
            w = weights.index(chunk).slice(sub * STEP_K, STEP_K, dim=2).load(layout)
            w = (w.to(gl.int32) + 0x4B000080).to(gl.float32, bitcast=True) - 8388736.0  # int8 -> fp32, exact, no I2F
            acc += gl.sum(w * gl.expand_dims(x, 1), axis=2)

    # ---- epilogue: per-channel scale, bias, router scale; each pair's row rounded once, then the slots summed
    col = col0 + cols
    col_safe = gl.where(col < N, col, 0)
    row_offsets = gl.expand_dims(expert, 1) * stride_wse + gl.expand_dims(col_safe, 0)
    y = acc * gl.load(w_scale_ptr + row_offsets).to(gl.float32)
    if HAS_BIAS:
        y += gl.load(bias_ptr + gl.expand_dims(expert, 1) * stride_bias_e + gl.expand_dims(col_safe, 0)).to(gl.float32)
    y *= gl.expand_dims(gl.load(router_scales_ptr + slots, mask=kept, other=0.0).to(gl.float32), 1)
    y = gl.where(gl.expand_dims(kept, 1), y, 0.0).to(out_ptr.dtype.element_ty).to(gl.float32)
    gl.store(out_ptr + col, gl.sum(y, axis=0).to(out_ptr.dtype.element_ty), mask=col < N)


def preload_gemm2(intermediate, fc2, output, ids, scales, fc2_scales, bias=None, start_expert: int = 0, load=True,
                  compute=True, warps=4):
    """GEMM2 of a T=1 W8A16 layer (int8 fc2 `[E, H, I]`, per-channel `fc2_scales` `[E, H]`) into `output` `[1, H]`, as a
    programmatic dependent launch after the GEMM1 that wrote `intermediate` `[top_k, I]`."""
    num_experts, hidden, inter = fc2.shape
    top_k = ids.shape[1]
    unused = fc2_scales
    launch(_preload_gemm2_kernel, (triton.cdiv(hidden, COLUMNS),),
           (intermediate, fc2, output, unused if bias is None else bias, ids, scales, fc2_scales, hidden, inter,
            num_experts, start_expert, fc2.stride(0), fc2.stride(1), 0 if bias is None else bias.stride(0),
            fc2_scales.stride(0)),
           num_warps=warps, launch_pdl=True, TOP_K=top_k, SLOTS=triton.next_power_of_2(top_k),
           K_CHUNKS=triton.cdiv(inter, CHUNK), HAS_BIAS=bias is not None, LOAD=load, COMPUTE=compute, WARPS=warps)
    return output


class Layer:
    """The library's T=1 decode plan (GEMM1 with the rule's tile or `gemm1_tile`), and a call running its GEMM1 then either
    its own GEMM2 or the probe's."""

    def __init__(self, x, ids, scales, q1, q2, quant, gemm1_tile=None, warps=4, carveout=False):
        self.warps, self.carveout = warps, carveout
        self.args = (x, ids, scales, q1, q2, quant)
        self.out = torch.full_like(x, float("nan"))
        inter, hidden = q2.shape[2], q2.shape[1]
        tile2 = decode_tile(False, hidden, inter, 1, triton.next_power_of_2(ids.shape[1]))
        tile1 = gemm1_tile or decode_tile(True, inter, hidden, 1, 1, ids.shape[1], sm_count(x.device))
        self.plan = DecodePlan(x, ids, scales, q1, q2, get_activation("swiglu"), "gate_first", None, None, None, self.out,
                               quant, tiles=(tile1, tile2))
        self.intermediate = torch.empty(ids.shape[1], inter, dtype=x.dtype, device=x.device)
        self.gemm1_only()  # an intermediate for the GEMM2-alone timings
        if carveout:  # GEMM1's SMs keep the most shared memory, so GEMM2's 100-180 KB programs can join them
            set_shared_memory_carveout(self.plan.gemm1._entry[1], 100)  # (run, CUfunction, ...) of its direct launch

    def library(self):
        x, ids, scales, q1, q2, quant = self.args
        return self.plan(x, ids, scales, q1, q2, None, None, None, self.out, quant)

    def gemm1_only(self):
        x, ids, scales, q1, q2, quant = self.args
        unused = ids
        return self.plan.gemm1(x, q1, self.intermediate, unused, unused, ids, unused, quant.fc1_scales, unused)

    def preloaded(self, load=True, compute=True):
        x, ids, scales, q1, q2, quant = self.args
        unused = ids
        self.plan.gemm1(x, q1, self.intermediate, unused, unused, ids, unused, quant.fc1_scales, unused)
        return preload_gemm2(self.intermediate, q2, self.out, ids, scales, quant.fc2_scales, load=load, compute=compute,
                             warps=self.warps)

    def loads_only(self):
        return self.preloaded(compute=False)

    def neither(self):
        return self.preloaded(load=False, compute=False)

    def gemm2_alone(self):
        x, ids, scales, q1, q2, quant = self.args
        return preload_gemm2(self.intermediate, q2, self.out, ids, scales, quant.fc2_scales, warps=self.warps)

    def library_gemm2_alone(self):
        x, ids, scales, q1, q2, quant = self.args
        unused = ids
        return self.plan.gemm2(self.intermediate, q2, self.out, unused, unused, ids, scales, quant.fc2_scales, unused)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="qwen3-30b-a3b,deepseek-v2-lite,olmoe-1b-7b")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev, rows = torch.device("cuda"), []
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3  # noqa: E731
    for name in args.shapes.split(","):
        num_experts, top_k, hidden, inter = MODEL_SHAPES[name]
        torch.manual_seed(0)
        w1 = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16) / math.sqrt(hidden)
        w2 = torch.randn(num_experts, hidden, inter, device=dev, dtype=torch.bfloat16) / math.sqrt(inter)
        q1, q2, quant = quantize_moe_weights(w1, w2, "w8a16")
        x = torch.randn(1, hidden, device=dev, dtype=torch.bfloat16)
        scales, ids = sm.route(torch.randn(1, num_experts, device=dev), top_k)
        ref = sm.reference_moe(x, ids, scales, dequantize_weights_int8(q1, quant.fc1_scales),
                               dequantize_weights_int8(q2, quant.fc2_scales))
        g16 = DecodeTile(16, 512, 8, fold=8)  # GEMM1 with half the programs: room on the SMs for GEMM2's warps
        r32 = DecodeTile(8, 512, 8, fold=8, max_registers=32)
        variants = {"library": (None, "library", {}), "library GEMM1 alone": (None, "gemm1_only", {}),
                    "library GEMM2 alone": (None, "library_gemm2_alone", {}),
                    "w4": (None, "preloaded", {}), "w4 loads only": (None, "loads_only", {}),
                    "w4 neither": (None, "neither", {}), "w16 alone": (None, "gemm2_alone", {"warps": 16}),
                    # GEMM1 with half the programs, its SMs set to keep the most shared memory (a GEMM1 of its own, so
                    # the attribute does not reach the library's)
                    "g16 GEMM1 alone": (g16, "gemm1_only", {"carveout": True}),
                    "w4 g16": (g16, "preloaded", {"carveout": True}),
                    "w4 g16 loads only": (g16, "loads_only", {"carveout": True}),
                    "w16 g16": (g16, "preloaded", {"warps": 16, "carveout": True}),
                    "w16 g16 loads only": (g16, "loads_only", {"warps": 16, "carveout": True}),
                    # the rule's GEMM1 tile compiled apart (a register cap it already meets): 31 registers, ~6 programs
                    # of 8 warps an SM, room for one 4-warp GEMM2 program beside them
                    "r32 GEMM1 alone": (r32, "gemm1_only", {"carveout": True}),
                    "w4 r32": (r32, "preloaded", {"carveout": True}),
                    "w4 r32 loads only": (r32, "loads_only", {"carveout": True}),
                    "w4 r32 neither": (r32, "neither", {"carveout": True})}
        layers, graphs, errors = {}, {}, {}
        for label, (tile1, method, options) in variants.items():
            layer = Layer(x, ids, scales, q1, q2, quant, tile1, **options)
            call = getattr(layer, method)
            call()
            out = layer.out.clone()
            errors[label] = {"vs_library": None, "vs_float64": ((out.double() - ref).norm() / ref.norm()).item(),
                             "nan": bool(out.isnan().any())}
            layers[label], graphs[label] = (layer, out), capture_graph(call, dev)
        library_out = layers["library"][1]
        for label, (_, out) in layers.items():
            errors[label]["vs_library"] = ((out.double() - library_out.double()).norm()
                                           / library_out.double().norm()).item()
        times = {label: [] for label in graphs}
        for _ in range(args.rounds):
            for label, graph in graphs.items():
                times[label].append(bench(graph.replay))
        row = {"shape": name, "T": 1, "scheme": "w8a16", "us": {k: statistics.median(v) for k, v in times.items()},
               "errors": errors, "rounds": times}
        rows.append(row)
        print(f"{name:18s} " + "  ".join(f"{k}: {v:6.2f}" for k, v in row["us"].items()) + " (us)\n    errors "
              + ", ".join(f"{k}: {e['vs_float64']:.1e} / {e['vs_library']:.1e}{' NaN' if e['nan'] else ''}"
                          for k, e in errors.items()), flush=True)
    if args.out:
        write_results_json(args.out, {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
