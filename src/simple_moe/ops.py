"""The fast path as a PyTorch custom operator, so `torch.compile` and CUDA graphs see one opaque node per MoE layer.

`torch.ops.simple_moe.moe_forward` wraps `pipeline.moe_forward` (routing maps -> GEMM1 + activation -> GEMM2 -> finalize) with a
schema of tensors and plain scalars/strings, and a fake (meta) implementation that only says the result is a fresh `[T, H]` tensor
of the input's dtype. Dynamo therefore traces straight through any model that calls it (`fullgraph=True` holds) without looking
inside the Triton launchers, and AOTAutograd/Inductor treat it as an extern kernel. INT8 layers go through the same op: its
four trailing arguments carry the scheme of quant.py (`fused_moe_simple(quant=...)` and `cutlass_fused_moe`'s
`use_int8_woq_per_channel` under torch.compile).

Validation is *not* part of the op: `moe_forward_op` checks every argument in Python first (raising ValueError/TypeError that
names the argument), then calls the op. Under `torch.compile` those checks run once at trace time and become guards.

The op has no autograd formula (it is an inference kernel): a forward with parameters that require grad works, a backward
through it raises PyTorch's "no autograd formula was registered" error.
"""
# No `from __future__ import annotations` here: `torch.library.custom_op` infers the schema from real annotations.
from typing import Optional

import torch

from .activations import GATE_LAYOUTS, get_activation
from .pipeline import check_parallel_rank, moe_forward, resolve_activation_params, validate_moe_inputs

@torch.library.custom_op("simple_moe::moe_forward", mutates_args=())
def _moe_forward_impl(
    input: torch.Tensor,
    token_selected_experts: torch.Tensor,
    token_final_scales: Optional[torch.Tensor],
    fc1_expert_weights: torch.Tensor,
    fc2_expert_weights: torch.Tensor,
    activation: int,
    gate_layout: str,
    fc1_expert_biases: Optional[torch.Tensor],
    fc2_expert_biases: Optional[torch.Tensor],
    act_params: Optional[torch.Tensor],
    start_expert: int,
    fc1_weight_scales: Optional[torch.Tensor] = None,
    fc2_weight_scales: Optional[torch.Tensor] = None,
    quant_scheme: str = "",
    quant_group_size: int = 0,
) -> torch.Tensor:
    """Inputs are assumed validated (see `moe_forward_op`). Returns a new `[T, H]` tensor in the input dtype.

    The last four carry an INT8 scheme of quant.py (`_Int8Scheme.op_arguments`: int8 weights with their scales, "W8A16" or
    "W8A8", group size or 0 for per-channel scales); `quant_scheme` "" is the unquantised layer."""
    from .quant import scheme_from_op_arguments  # quant.py imports pipeline.py, as this module does

    return moe_forward(
        input,
        token_selected_experts,
        token_final_scales,
        fc1_expert_weights,
        fc2_expert_weights,
        get_activation(activation),
        gate_layout=gate_layout,
        fc1_expert_biases=fc1_expert_biases,
        fc2_expert_biases=fc2_expert_biases,
        act_params=act_params,
        start_expert=start_expert,
        quant=scheme_from_op_arguments(fc1_weight_scales, fc2_weight_scales, quant_scheme, quant_group_size),
    )


@_moe_forward_impl.register_fake
def _moe_forward_fake(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights, *flags_and_extras):
    # Shape and dtype only: one row per token, the hidden width of fc2's output.
    return input.new_empty(input.shape[0], fc2_expert_weights.shape[1])


def moe_forward_op(
    input: torch.Tensor,
    token_selected_experts: torch.Tensor,
    token_final_scales: Optional[torch.Tensor],
    fc1_expert_weights: torch.Tensor,
    fc2_expert_weights: torch.Tensor,
    activation="swiglu",
    *,
    gate_layout: str = "gate_first",
    fc1_expert_biases: Optional[torch.Tensor] = None,
    fc2_expert_biases: Optional[torch.Tensor] = None,
    activation_params: Optional[torch.Tensor] = None,
    ep_size: int = 1,
    ep_rank: int = 0,
) -> torch.Tensor:
    """The fast MoE layer through the `simple_moe::moe_forward` custom op: validates, then calls the op.

    Same formula and arguments as `fused_moe_simple` (without GEMM callbacks, INT8 or `output`), plus `gate_layout`: where the gate
    half of a gated fc1 sits ("gate_first" rows `[0, I)`, "up_first" rows `[I, 2I)`, or "interleaved" rows `0::2`, GPT-OSS). The
    weights may have any strides as long as one of their last two dimensions is contiguous, so a transposed view
    (`w.transpose(1, 2)` of an `[E, H, N1]` tensor) is read in place, without a copy.

    Returns a new `[T, H]` tensor in the input dtype.
    """
    check_parallel_rank("ep", ep_size, ep_rank)
    local_experts = fc2_expert_weights.shape[0] if isinstance(fc2_expert_weights, torch.Tensor) and fc2_expert_weights.dim() == 3 else 0
    return checked_moe_forward(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights,
                               activation, gate_layout=gate_layout, fc1_expert_biases=fc1_expert_biases,
                               fc2_expert_biases=fc2_expert_biases, activation_params=activation_params,
                               total_experts=local_experts * ep_size or None, start_expert=ep_rank * local_experts)


def checked_moe_forward(
    input,
    token_selected_experts,
    token_final_scales,
    fc1_expert_weights,
    fc2_expert_weights,
    activation,
    *,
    gate_layout: str,
    fc1_expert_biases=None,
    fc2_expert_biases=None,
    activation_params=None,
    total_experts: Optional[int] = None,
    start_expert: int = 0,
) -> torch.Tensor:
    """Validates, then calls the op. `total_experts` bounds top_k (None: this call's E); `start_expert` is this call's first id."""
    act = get_activation(activation)
    if not isinstance(gate_layout, str) or gate_layout not in GATE_LAYOUTS:
        raise ValueError(f"gate_layout: expected one of {GATE_LAYOUTS}, got {gate_layout!r}")
    num_tokens, hidden, num_experts, inter, top_k = validate_moe_inputs(
        input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights, act, fc1_expert_biases,
        fc2_expert_biases, total_experts=total_experts)
    activation_params = resolve_activation_params(act, activation_params, num_experts, input.device)
    return torch.ops.simple_moe.moe_forward(
        input,
        token_selected_experts,
        token_final_scales,
        fc1_expert_weights,
        fc2_expert_weights,
        int(act.kind),
        gate_layout,
        fc1_expert_biases,
        fc2_expert_biases,
        activation_params,
        start_expert,
    )
