"""`reference_moe`: the MoE layer in plain float64 PyTorch, one token-expert pair at a time, for checking any implementation."""
from __future__ import annotations

import torch

from .activations import activation_torch, get_activation


def reference_moe(
    input: torch.Tensor,
    token_selected_experts: torch.Tensor,
    token_final_scales: torch.Tensor | None,
    fc1_expert_weights: torch.Tensor,
    fc2_expert_weights: torch.Tensor,
    activation="swiglu",
    *,
    fc1_expert_biases: torch.Tensor | None = None,
    fc2_expert_biases: torch.Tensor | None = None,
    activation_params: torch.Tensor | None = None,
    gate_layout: str = "gate_first",
    ep_size: int = 1,
    ep_rank: int = 0,
) -> torch.Tensor:
    """`out[t] = sum_k scale[t,k] * (act(x[t] @ fc1[e].T + b1[e]) @ fc2[e].T + b2[e])` in float64, returned as float64 `[T, H]`.

    The tensor arguments of `fused_moe_simple`, with `activation` sixth (no callbacks, `output` or `quant`; gate-first fc1
    unless `gate_layout` says otherwise). Ids outside this rank's experts are skipped. For INT8 weights pass the dequantised
    float weights as `fc1_expert_weights`/`fc2_expert_weights`.
    """
    act = get_activation(activation)
    x = input.double()
    fc1 = fc1_expert_weights.double()
    fc2 = fc2_expert_weights.double()
    num_experts = fc2.shape[0]
    first = ep_rank * num_experts
    out = torch.zeros(x.shape[0], fc2.shape[1], dtype=torch.float64, device=x.device)
    ids = token_selected_experts.long() - first
    for e in range(num_experts):
        tokens, slots = torch.nonzero(ids == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        h = x[tokens] @ fc1[e].T
        if fc1_expert_biases is not None:
            h = h + fc1_expert_biases[e].double()
        params = None if activation_params is None else tuple(activation_params[e].double().tolist())
        h = activation_torch(h, act, params, gate_layout)
        y = h @ fc2[e].T
        if fc2_expert_biases is not None:
            y = y + fc2_expert_biases[e].double()
        if token_final_scales is not None:
            y = y * token_final_scales[tokens, slots].double().unsqueeze(1)
        out.index_add_(0, tokens, y)
    return out
