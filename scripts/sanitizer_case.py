"""Small MoE calls for `compute-sanitizer --tool memcheck` (run by scripts/gpu_suite.sh).

Every kernel of the fast path at sizes that exercise the masks (H, I and T not multiples of the tiles), decode and prefill tile
configs, empty experts, dropped rows (expert parallelism), biases with SwigluBias, a non-gated activation, fp32, T=0, and the INT8
schemes when `simple_moe.quant` is there. Small, so memcheck's slowdown stays in seconds. Run it with
PYTORCH_NO_CUDA_MEMORY_CACHING=1: each tensor is then its own allocation, and an access past its end is caught instead of landing
in the caching allocator's pool. References are computed on the CPU, so memcheck watches only our kernels and torch's small ops.
Exits 1 when an output is wrong; memcheck's own verdict is its ERROR SUMMARY line (and exit code).
"""
from __future__ import annotations

import os
import sys

import torch

from simple_moe import fused_moe_simple, reference_moe, route

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
DEVICE = os.environ.get("SANITIZER_CASE_DEVICE", "cuda")  # "cpu" (with TRITON_INTERPRET=1) only to check this script itself


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def layer(num_experts, top_k, hidden, inter, num_tokens, dtype, gated=True, route_over=None):
    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=dtype)
    n1 = 2 * inter if gated else inter
    w1 = (torch.randn(num_experts, n1, hidden, device=DEVICE) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, device=DEVICE) / inter**0.5).to(dtype)
    scales, selected = route(torch.randn(num_tokens, route_over or num_experts, device=DEVICE), top_k)
    return x, selected, scales, w1, w2


def check(name, out, x, selected, scales, w1, w2, **ref_kwargs) -> bool:
    sync()
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    ref = reference_moe(cpu(x), cpu(selected), cpu(scales), cpu(w1), cpu(w2),
                        **{k: cpu(v) if isinstance(v, torch.Tensor) else v for k, v in ref_kwargs.items()})
    finite = bool(torch.isfinite(out).all())
    err = ((out.cpu().double() - ref).norm() / ref.norm().clamp_min(1e-30)).item() if out.numel() else 0.0
    ok = finite and err < TOLERANCE[x.dtype]
    print(f"{name:<44} rel err {err:.2e}  {'ok' if ok else 'WRONG'}{'' if finite else ' (non-finite rows)'}", flush=True)
    return ok


def poisoned(x, hidden):
    return torch.full((x.shape[0], hidden), float("nan"), device=DEVICE, dtype=x.dtype)


def main() -> int:
    torch.manual_seed(0)
    ok = True

    # Odd sizes (masks on every edge), decode-sized and prefill-sized tiles, three dtypes.
    for dtype, shape in ((torch.bfloat16, (8, 2, 200, 72, 33)), (torch.float16, (16, 4, 136, 40, 1)),
                         (torch.float32, (4, 2, 72, 24, 9)), (torch.bfloat16, (4, 2, 264, 136, 300))):
        x, sel, sc, w1, w2 = layer(*shape, dtype)
        out = fused_moe_simple(x, sel, sc, w1, w2, output=poisoned(x, shape[2]))
        ok &= check(f"swiglu {dtype} E,k,H,I,T={shape}", out, x, sel, sc, w1, w2)

    # Non-gated activation.
    x, sel, sc, w1, w2 = layer(8, 2, 200, 72, 17, torch.float16, gated=False)
    out = fused_moe_simple(x, sel, sc, w1, w2, activation="relu", output=poisoned(x, 200))
    ok &= check("relu (non-gated) fp16", out, x, sel, sc, w1, w2, activation="relu")

    # Biases with SwigluBias and per-expert parameters.
    x, sel, sc, w1, w2 = layer(8, 2, 200, 72, 21, torch.bfloat16)
    b1 = torch.randn(8, 144, device=DEVICE, dtype=torch.bfloat16)
    b2 = torch.randn(8, 200, device=DEVICE, dtype=torch.bfloat16)
    params = torch.tensor([[1.702, 1.0, 7.0]], device=DEVICE).repeat(8, 1)
    out = fused_moe_simple(x, sel, sc, w1, w2, activation="swiglu_bias", fc1_expert_biases=b1, fc2_expert_biases=b2,
                           activation_params=params, output=poisoned(x, 200))
    ok &= check("swiglu_bias + biases bf16", out, x, sel, sc, w1, w2, activation="swiglu_bias", fc1_expert_biases=b1,
                fc2_expert_biases=b2, activation_params=params)

    # Empty experts: only experts 3..5 of 32 get tokens.
    x, _, _, w1, w2 = layer(32, 2, 136, 40, 8, torch.bfloat16)
    sel = torch.stack([torch.randperm(3)[:2] + 3 for _ in range(8)]).to(torch.int32).to(DEVICE)
    sc = torch.softmax(torch.randn(8, 2, device=DEVICE), dim=-1)
    out = fused_moe_simple(x, sel, sc, w1, w2, output=poisoned(x, 136))
    ok &= check("empty experts bf16", out, x, sel, sc, w1, w2)

    # Expert parallelism: rank 0 of 2 keeps experts 0..7 of 16; rows for 8..15 are dropped.
    x, sel, sc, w1, w2 = layer(8, 2, 136, 40, 17, torch.bfloat16, route_over=16)
    out = fused_moe_simple(x, sel, sc, w1, w2, ep_size=2, ep_rank=0, output=poisoned(x, 136))
    ok &= check("expert parallel, dropped rows bf16", out, x, sel, sc, w1, w2, ep_size=2, ep_rank=0)

    # T = 0.
    x, sel, sc, w1, w2 = layer(8, 2, 136, 40, 0, torch.bfloat16)
    out = fused_moe_simple(x, sel, sc, w1, w2)
    sync()
    print(f"{'T=0':<44} shape {tuple(out.shape)}  {'ok' if out.shape == (0, 136) else 'WRONG'}", flush=True)
    ok &= out.shape == (0, 136)

    # INT8, when the quant module is there.
    try:
        from simple_moe.quant import dequantize_weights_int8, quantize_moe_weights
    except ImportError:
        print("INT8: simple_moe.quant not available, skipped")
    else:
        def int8_case(label, scheme_name, x, sel, sc, w1, w2):
            q1, q2, scheme = quantize_moe_weights(w1, w2, scheme_name)
            out = fused_moe_simple(x, sel, sc, q1, q2, quant=scheme, output=poisoned(x, x.shape[1]))
            sync()
            deq1 = dequantize_weights_int8(q1, scheme.fc1_scales, None, torch.float64)
            deq2 = dequantize_weights_int8(q2, scheme.fc2_scales, None, torch.float64)
            finite = bool(torch.isfinite(out).all())
            # W8A8 also quantises activations: judge it by finiteness and a loose sanity bound, memcheck does the rest.
            ref = reference_moe(x.cpu(), sel.cpu(), sc.cpu(), deq1.cpu(), deq2.cpu())
            err = ((out.cpu().double() - ref).norm() / ref.norm()).item()
            good = finite and err < (1e-2 if scheme_name == "w8a16" else 5e-2)
            print(f"{label:<44} rel err {err:.2e}  {'ok' if good else 'WRONG'}", flush=True)
            return good

        problem = layer(8, 2, 192, 96, 19, torch.bfloat16)
        for scheme_name in ("w8a16", "w8a8"):
            ok &= int8_case("INT8 " + scheme_name, scheme_name, *problem)
        # 100 rows an expert: on SM90 both W8A8 GEMMs run on the Gluon kernels (grouped_gemm_gluon.py); H = 272 ends in a
        # partial K step of GEMM1 and a partial column block of GEMM2, I = 208 in a partial one of GEMM1.
        ok &= int8_case("INT8 w8a8, 100 rows an expert (Gluon on SM90)", "w8a8", *layer(4, 2, 272, 208, 200, torch.bfloat16))

    sync()
    print("sanitizer case:", "all outputs ok" if ok else "SOME OUTPUTS WRONG")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
