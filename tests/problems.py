"""Random MoE problems shared by the test modules (fresh inputs, never zeros; weights scaled so activations stay O(1))."""
from __future__ import annotations

import math

import torch

from simple_moe.activations import get_activation

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_problem(num_tokens, hidden, inter, num_experts, top_k, dtype, activation="swiglu", *, bias1=False, bias2=False,
                 seed=0, num_global_experts=None, ids=None, weight_dtype=None):
    """`fused_moe_simple`'s keyword arguments for one layer. `ids` overrides the routing (distinct experts per token otherwise,
    drawn from `num_global_experts`); weights are cast to `weight_dtype` (default: `dtype`; float32 to quantise them later)."""
    generator = torch.Generator().manual_seed(seed)
    num_global_experts = num_global_experts or num_experts
    n1 = 2 * inter if get_activation(activation).gated else inter
    if ids is None:
        rows = [torch.randperm(num_global_experts, generator=generator)[:top_k] for _ in range(num_tokens)]
        ids = torch.stack(rows) if rows else torch.empty(0, top_k, dtype=torch.int64)
    problem = dict(
        input=torch.randn(num_tokens, hidden, generator=generator),
        token_selected_experts=ids.int(),
        token_final_scales=torch.rand(num_tokens, top_k, generator=generator) + 0.1,
        fc1_expert_weights=torch.randn(num_experts, n1, hidden, generator=generator) / math.sqrt(hidden),
        fc2_expert_weights=torch.randn(num_experts, hidden, inter, generator=generator) / math.sqrt(inter),
        fc1_expert_biases=torch.randn(num_experts, n1, generator=generator) * 0.5 if bias1 else None,
        fc2_expert_biases=torch.randn(num_experts, hidden, generator=generator) * 0.5 if bias2 else None,
    )
    cast = {"input": dtype, "fc1_expert_biases": dtype, "fc2_expert_biases": dtype,
            "fc1_expert_weights": weight_dtype or dtype, "fc2_expert_weights": weight_dtype or dtype}
    for name, value in problem.items():
        if value is not None:
            problem[name] = value.to(DEVICE, cast.get(name, value.dtype))
    problem["activation"] = activation
    return problem
