"""The two built-in GEMM callbacks of the pluggable path, with the seed's signature.

`gemm_fn(output, input, weights, bias, expert_offsets, M, N, K, num_experts, is_gemm1, activation)`:
- `input` `[M, K]` holds the expanded rows in dest order (expert by expert), `expert_offsets` is `expert_first_token_offset`
  (int64 `[E+1]`, on the device); rows past `expert_offsets[E]` are dropped rows and must be left alone.
- `weights` `[E, N_total, K]` (`nn.Linear` layout), `bias` `[E, N_total]` or None.
- GEMM1 (`is_gemm1=True`) applies `activation` (a name from the activation table, gated ones gate-first) and writes `[M, N]`,
  where N = I (the activation halves the `2I` columns of a gated fc1). GEMM2 writes `[M, N]` = `[M, H]`.

Both read the offsets on the host (`.tolist()`): they are references and baselines, not the fast path. Copy them to write your own.

INT8 (`fused_moe_simple(..., quant=W8A16(...) or W8A8(...))`): `weights` are int8 and the callback is also given, by keyword and only
then, `weight_scales` (float, `[E, N_total]` per output channel or `[E, N_total, K/group_size]` group-wise), `group_size` (None for
per channel) and `quantize_input` (True for W8A8: quantise each input row to int8 with its own scale, as
`simple_moe.quant.quantize_activations_int8` does, and multiply int8 by int8). A callback written for float weights only
needs no change; one that takes INT8 must accept these three keywords (`simple_moe.quant` checks before calling).
"""
from __future__ import annotations

import torch

from .activations import ActivationType, activation_torch, get_activation


def torch_loop_gemm(output, input, weights, bias, expert_offsets, M, N, K, num_experts, is_gemm1, activation, *,
                    weight_scales=None, group_size=None, quantize_input=False):
    """The seed's example: per expert, `x @ W.T (+ b)`, computed in fp32, then the activation, cast into `output`.

    With `weight_scales` (int8 weights): `x @ dequant(W).T` in float64 (W8A8: of the per-row quantised `x`), see `int8_linear_torch`.
    """
    offsets = expert_offsets.tolist()
    act = get_activation(activation) if is_gemm1 else None
    for e in range(num_experts):
        start, end = offsets[e], offsets[e + 1]
        if start == end:
            continue
        if weight_scales is not None:
            from .quant import int8_linear_torch

            h = int8_linear_torch(input[start:end], weights[e], weight_scales[e], group_size, quantize_input)
        else:
            h = input[start:end].float() @ weights[e].float().T
        if bias is not None:
            h += bias[e].float()
        if act is not None:
            h = activation_torch(h, act)
        output[start:end] = h.to(output.dtype)


def cublas_gemm(output, input, weights, bias, expert_offsets, M, N, K, num_experts, is_gemm1, activation, *,
                weight_scales=None, group_size=None, quantize_input=False):
    """One cuBLAS matmul per expert in the input dtype (`torch.addmm`/`torch.mm`), then the activation as torch ops.

    With `weight_scales` (int8 weights) each expert's weights are dequantised to float32 (`q * scale`, one rounding), for W8A8
    (`quantize_input`) the input rows are quantised and dequantised the same way, and the matmul runs in float32: a reference
    with the scheme's numerics, not an int8 GEMM. (Operands rounded to fp16 instead moved W8A8's re-quantised intermediate
    across int8 steps: up to 5e-3 relative error against the exact reference at fp16.)
    """
    offsets = expert_offsets.tolist()
    act = get_activation(activation) if is_gemm1 else None
    if weight_scales is not None:
        from .quant import dequantize_weights_int8, quantize_activations_int8_torch
    for e in range(num_experts):
        start, end = offsets[e], offsets[e + 1]
        if start == end:
            continue
        x = input[start:end]
        w = weights[e]
        b = None if bias is None else bias[e]
        if weight_scales is not None:
            w = dequantize_weights_int8(w.unsqueeze(0), weight_scales[e].unsqueeze(0), group_size, torch.float32)[0]
            if quantize_input:
                xq, xs = quantize_activations_int8_torch(x)
                x = xq.float() * xs.unsqueeze(1)
            else:
                x = x.float()
            b = None if b is None else b.float()
        if (act is None or act.kind == ActivationType.Identity) and x.dtype == output.dtype:  # straight into the output rows
            target = output[start:end]
            if b is not None:
                torch.addmm(b, x, w.T, out=target)
            else:
                torch.mm(x, w.T, out=target)
            continue
        h = torch.addmm(b, x, w.T) if b is not None else torch.mm(x, w.T)
        output[start:end] = (h.float() if act is None else activation_torch(h.float(), act)).to(output.dtype)
