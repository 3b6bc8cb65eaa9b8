"""The two built-in GEMM callbacks of the pluggable path, with the seed's signature.

`gemm_fn(output, input, weights, bias, expert_offsets, M, N, K, num_experts, is_gemm1, activation)`:
- `input` `[M, K]` holds the expanded rows in dest order (expert by expert), `expert_offsets` is `expert_first_token_offset`
  (int64 `[E+1]`, on the device); rows past `expert_offsets[E]` are dropped rows and must be left alone.
- `weights` `[E, N_total, K]` (`nn.Linear` layout), `bias` `[E, N_total]` or None.
- GEMM1 (`is_gemm1=True`) applies `activation` (a name from the activation table, gated ones gate-first) and writes `[M, N]`,
  where N = I (the activation halves the `2I` columns of a gated fc1). GEMM2 writes `[M, N]` = `[M, H]`.

Both read the offsets on the host (`.tolist()`): they are references and baselines, not the fast path. Copy them to write your own.
"""
from __future__ import annotations

import torch

from .activations import activation_torch, get_activation


def torch_loop_gemm(output, input, weights, bias, expert_offsets, M, N, K, num_experts, is_gemm1, activation):
    """The seed's example: per expert, `x @ W.T (+ b)`, computed in fp32, then the activation, cast into `output`."""
    offsets = expert_offsets.tolist()
    act = get_activation(activation) if is_gemm1 else None
    for e in range(num_experts):
        start, end = offsets[e], offsets[e + 1]
        if start == end:
            continue
        h = input[start:end].float() @ weights[e].float().T
        if bias is not None:
            h += bias[e].float()
        if act is not None:
            h = activation_torch(h, act)
        output[start:end] = h.to(output.dtype)


def cublas_gemm(output, input, weights, bias, expert_offsets, M, N, K, num_experts, is_gemm1, activation):
    """One cuBLAS matmul per expert in the input dtype (`torch.addmm`/`torch.mm`), then the activation as torch ops."""
    offsets = expert_offsets.tolist()
    act = get_activation(activation) if is_gemm1 else None
    for e in range(num_experts):
        start, end = offsets[e], offsets[e + 1]
        if start == end:
            continue
        x = input[start:end]
        if act is None or not act.gated and act.name == "identity":
            target = output[start:end]
            if bias is not None:
                torch.addmm(bias[e], x, weights[e].T, out=target)
            else:
                torch.mm(x, weights[e].T, out=target)
            continue
        h = torch.addmm(bias[e], x, weights[e].T) if bias is not None else torch.mm(x, weights[e].T)
        output[start:end] = activation_torch(h.float(), act).to(output.dtype)
