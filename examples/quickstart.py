"""The README's quick start, runnable: `python examples/quickstart.py` (GPU), or `TRITON_INTERPRET=1 python ...` on a CPU.

Every front door on one small MoE, each checked against the float64 `reference_moe`.
"""
import torch

import simple_moe
from simple_moe import ActivationType
from simple_moe.fused_moe import cutlass_fused_moe
from simple_moe.quant import W8A16, W8A8, quantize_weights_int8

on_gpu = torch.cuda.is_available()
dev = "cuda" if on_gpu else "cpu"
dt = torch.bfloat16 if on_gpu else torch.float16  # the CPU interpreter is exact for fp16 dots
T, H, I, E, top_k = (16, 1024, 512, 8, 2) if on_gpu else (8, 64, 32, 4, 2)
tolerance = 1e-2 if dt == torch.bfloat16 else 2e-3

torch.manual_seed(0)
x = torch.randn(T, H, device=dev, dtype=dt)
w1 = torch.randn(E, 2 * I, H, device=dev, dtype=dt) / H**0.5  # gate-first: rows [0, I) gate, [I, 2I) up
w2 = torch.randn(E, H, I, device=dev, dtype=dt) / I**0.5
scales, experts = simple_moe.route(torch.randn(T, E, device=dev), top_k)  # softmax -> top-k -> renormalise
ref = simple_moe.reference_moe(x, experts, scales, w1, w2, activation="swiglu")  # float64


def check(name, out, reference=ref, tol=tolerance):
    err = ((out.double() - reference).norm() / reference.norm()).item()
    print(f"{name:28s} rel err {err:.1e}  (tolerance {tol:.0e})  {'PASS' if err < tol else 'FAIL'}")
    assert err < tol, name


# 1. fused_moe_simple: the fused Triton path, then the same layer through the built-in cuBLAS callbacks.
check("fused_moe_simple", simple_moe.fused_moe_simple(x, experts, scales, w1, w2, activation="swiglu"))
check("fused_moe_simple + cuBLAS", simple_moe.fused_moe_simple(x, experts, scales, w1, w2, gemm1_fn=simple_moe.cublas_gemm,
                                                                gemm2_fn=simple_moe.cublas_gemm))

# 2. cutlass_fused_moe: FlashInfer's contract (fc1 up-first, gate-second).
w1_up_gate = torch.cat([w1[:, I:], w1[:, :I]], dim=1)
check("cutlass_fused_moe", cutlass_fused_moe(x, experts, scales, w1_up_gate, w2, dt, quant_scales=None,
                                             activation_type=ActivationType.Swiglu)[0])

# 3. INT8. W8A16 against the float64 layer on the dequantised weights. W8A8 also quantises the activations per row, so its
#    reference is the same scheme through the torch-loop callbacks (float64 GEMMs of the quantised rows and dequantised weights).
q1, s1 = quantize_weights_int8(w1)
q2, s2 = quantize_weights_int8(w2)
deq = simple_moe.reference_moe(x, experts, scales, q1.double() * s1.double()[..., None], q2.double() * s2.double()[..., None])
check("W8A16", simple_moe.fused_moe_simple(x, experts, scales, q1, q2, quant=W8A16(s1, s2)), deq)
w8a8_ref = simple_moe.fused_moe_simple(x, experts, scales, q1, q2, simple_moe.torch_loop_gemm, simple_moe.torch_loop_gemm,
                                       quant=W8A8(s1, s2)).double()
check("W8A8", simple_moe.fused_moe_simple(x, experts, scales, q1, q2, quant=W8A8(s1, s2)), w8a8_ref)

# 4. FusedMoE: router + experts as an nn.Module (the same softmax top-k routing as route's defaults).
moe = simple_moe.FusedMoE(hidden_size=H, intermediate_size=I, num_experts=E, top_k=top_k, dtype=dt, device=dev)
with torch.no_grad():
    moe_scales, moe_experts = simple_moe.route(moe.router(x), top_k)
    check("FusedMoE", moe(x), simple_moe.reference_moe(x, moe_experts, moe_scales, moe.w1, moe.w2))
