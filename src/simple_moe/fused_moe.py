"""`cutlass_fused_moe`: FlashInfer's `cutlass_fused_moe` contract, served by our Triton fast path.

FlashInfer builds its CUTLASS MoE for SM89 and newer only; on Ampere this function is the one that runs, so code written against
FlashInfer works unchanged. The signature, defaults, keyword-only parameters and the returned list are FlashInfer's (see
docs/flashinfer_api.md); everything is validated here and then handed to `pipeline.moe_forward` with the up-first fc1 layout.

What differs from FlashInfer, on purpose:
- Bad input raises ValueError/TypeError naming the argument (FlashInfer reinterprets bits on an `output_dtype` mismatch).
- FP8/FP4/W4A8 modes raise NotImplementedError naming the flag: SM80 has no FP8/FP4 tensor cores and we ship no such kernels.
- Rows of tokens that have no expert on this rank are always zeros, also with `enable_alltoall=True` (FlashInfer leaves them
  unwritten there, i.e. undefined; zeros are one allowed value of "undefined", and our finalize writes every row in the same pass
  that sums the others, so skipping them would save nothing).
- float32 activations, int64 expert ids and non-float32 router scales are accepted too.
- `use_int8_woq_per_channel=True` (keyword only, TensorRT-LLM's flag, not FlashInfer's) is our INT8 weight-only extension, served by
  `simple_moe.quant.cutlass_int8_woq_forward`.
"""
from __future__ import annotations

import torch

from ._host import is_int
from .activations import Activation, ActivationType, activation_params, get_activation
from .pipeline import (FLOAT_DTYPES, InferenceOnly, _check_shape, _check_tensor, check_expert_bias, check_parallel_rank,
                       moe_forward, tensors_needing_grad, validate_moe_inputs)

# Flags that select FlashInfer quantization modes we do not implement, and why.
_NO_FP8 = "SM80 has no FP8/FP4 tensor cores and simple_moe ships no FP8/FP4 kernels"
_UNSUPPORTED_FLAGS = {
    "use_deepseek_fp8_block_scale": f"DeepSeek FP8 block-scale quantization is not implemented ({_NO_FP8})",
    "use_w4_group_scaling": f"W4A8 (int4 weights, FP8 activations, group scales) is not implemented ({_NO_FP8})",
    "use_mxfp8_act_scaling": f"MXFP8 activation scaling (MXFP4 x MXFP8) is not implemented ({_NO_FP8})",
    "use_packed_weights": f"packed (FP4/int4) weights are not implemented ({_NO_FP8})",
    "use_wfp4afp8_humming": f"FP4-weight x FP8-activation kernels are not implemented ({_NO_FP8})",
    "min_latency_mode": "min_latency_mode is not implemented (FlashInfer raises NotImplementedError for it too)",
}
# Parameters each activation reads from the per-expert tensors, by FlashInfer's argument names.
_PARAM_NAMES = {
    ActivationType.SwigluBias: ("swiglu_alpha", "swiglu_beta", "swiglu_limit"),
    ActivationType.SwigluStep: ("swiglu_limit",),
    ActivationType.Situ: ("situ_beta", "situ_linear_beta"),
}


def cutlass_fused_moe(
    input: torch.Tensor,
    token_selected_experts: torch.Tensor,
    token_final_scales: torch.Tensor | None,
    fc1_expert_weights: torch.Tensor,
    fc2_expert_weights: torch.Tensor,
    output_dtype: torch.dtype,
    quant_scales,
    fc1_expert_biases: torch.Tensor | None = None,
    fc2_expert_biases: torch.Tensor | None = None,
    input_sf: torch.Tensor | None = None,
    swiglu_alpha: torch.Tensor | None = None,
    swiglu_beta: torch.Tensor | None = None,
    swiglu_limit: torch.Tensor | None = None,
    tp_size: int = 1,
    tp_rank: int = 0,
    ep_size: int = 1,
    ep_rank: int = 0,
    cluster_size: int = 1,
    cluster_rank: int = 0,
    output: torch.Tensor | None = None,
    enable_alltoall: bool = False,
    use_deepseek_fp8_block_scale: bool = False,
    use_w4_group_scaling: bool = False,
    use_mxfp8_act_scaling: bool = False,
    min_latency_mode: bool = False,
    use_packed_weights: bool = False,
    use_wfp4afp8_humming: bool = False,
    tune_max_num_tokens: int = 8192,
    enable_pdl: bool | None = None,
    activation_type=ActivationType.Swiglu,
    swizzled_input_sf: bool = True,
    use_fused_finalize: bool = True,
    profile_ids=None,
    workspace_buffer: torch.Tensor | None = None,
    *,
    situ_beta: torch.Tensor | None = None,
    situ_linear_beta: torch.Tensor | None = None,
    use_int8_woq_per_channel: bool = False,
) -> list[torch.Tensor]:
    """Mixture-of-Experts layer with FlashInfer's `cutlass_fused_moe` contract:
    `out[t] = sum_k scale[t,k] * (act(x[t] @ fc1[e].T + b1[e]) @ fc2[e].T + b2[e])` over this rank's experts.

    Args:
        input: `[T, H]` fp16 or bf16 (float32 also accepted).
        token_selected_experts: int32 `[T, top_k]` **global** expert ids; ids outside this rank's range are dropped silently.
        token_final_scales: float32 `[T, top_k]` router weights applied as given, or None for an unweighted sum.
        fc1_expert_weights: `[E_local, 2I, H]` for gated activations with **rows [0, I) the up projection and [I, 2I) the gate**
            (result `act(gate) * up`), `[E_local, I, H]` otherwise.
        fc2_expert_weights: `[E_local, H, I]`.
        output_dtype: must equal the input dtype (ValueError otherwise).
        quant_scales: None or empty for unquantized weights; a non-list raises TypeError, a non-empty list NotImplementedError
            (INT8 extension aside).
        fc1_expert_biases: `[E_local, N1]` (same up-then-gate order, added before the activation); fc2_expert_biases:
            `[E_local, H]`. Both or neither, dtype `output_dtype`. fc2's bias is added only on `tp_rank == 0`, scaled by the
            router weight together with its row.
        swiglu_alpha, swiglu_beta, swiglu_limit: float32 `[E_local]` per-expert parameters. With `activation_type=Swiglu`, giving
            any of them selects SwigluBias (missing ones default to alpha=1, beta=0, limit=+inf). SwigluStep reads only
            `swiglu_limit` (default 7). Giving one to an activation that does not read it is a ValueError.
        tp_size, tp_rank: tensor parallelism; weights arrive sliced along I, the output is this rank's partial sum.
        ep_size, ep_rank: expert parallelism; this rank owns global ids `[ep_rank*E_local, (ep_rank+1)*E_local)`, the output is
            its partial sum and rows with no local expert are zeros (with `enable_alltoall=True` too, see the module docstring).
        cluster_size, cluster_rank: must be 1 and 0 (NotImplementedError otherwise).
        output: optional `[T, H]` tensor of `output_dtype`, written in place and returned first.
        input_sf, use_deepseek_fp8_block_scale, use_w4_group_scaling, use_mxfp8_act_scaling, use_packed_weights,
            use_wfp4afp8_humming, min_latency_mode: FP8/FP4 modes: NotImplementedError when set.
        tune_max_num_tokens, enable_pdl, profile_ids, use_fused_finalize, workspace_buffer, swizzled_input_sf: tuning and launch
            knobs, accepted and ignored (results are deterministic and identical whatever they are).
        activation_type: a FlashInfer `ActivationType` (or our `simple_moe.ActivationType`, same numbering).
        situ_beta, situ_linear_beta: float32 `[E_local]` parameters of Situ (defaults 4 and 25).
        use_int8_woq_per_channel: our extension (keyword only): int8 weights with per-output-channel scales in `quant_scales`,
            computed by `simple_moe.quant.cutlass_int8_woq_forward`.

    Returns:
        A list like FlashInfer's: `[output [T, H], num_active_experts_per_node int32 [1], experts_to_token_score float32
        [E_local, T], active_expert_global_ids int32 [E_local]]`. As in FlashInfer the last three are allocated with
        `torch.empty` and **never written** (they hold garbage); only `output` carries results. Inference only: where grad
        mode is on and an argument requires grad, `output`'s backward raises.
    """
    # Modes and ranks first: they do not depend on the tensors.
    flags = {"use_deepseek_fp8_block_scale": use_deepseek_fp8_block_scale, "use_w4_group_scaling": use_w4_group_scaling,
             "use_mxfp8_act_scaling": use_mxfp8_act_scaling, "use_packed_weights": use_packed_weights,
             "use_wfp4afp8_humming": use_wfp4afp8_humming, "min_latency_mode": min_latency_mode}
    for flag, value in flags.items():
        if value:
            raise NotImplementedError(f"{flag}={value!r}: {_UNSUPPORTED_FLAGS[flag]}")
    if input_sf is not None:
        raise NotImplementedError(f"input_sf: input scale factors belong to the FP8/FP4 activation modes ({_NO_FP8})")
    if cluster_size != 1 or cluster_rank != 0:
        raise NotImplementedError(f"cluster_size={cluster_size!r}, cluster_rank={cluster_rank!r}: thread-block clusters "
                                  "(cluster_size > 1) are not implemented; pass cluster_size=1, cluster_rank=0")
    _check_rank("tp", tp_size, tp_rank)
    _check_rank("ep", ep_size, ep_rank)
    if quant_scales is not None and not isinstance(quant_scales, (list, tuple)):
        raise TypeError(f"quant_scales: expected None or a list of tensors, got {type(quant_scales).__name__}")
    if quant_scales and not use_int8_woq_per_channel:
        raise NotImplementedError(f"quant_scales: quantized weights (FP8, NVFP4, MXFP4, W4A8) are not implemented ({_NO_FP8}); "
                                  "pass quant_scales=None or [] with fp16/bf16 weights (or use_int8_woq_per_channel=True)")

    # Activation and its per-expert parameters.
    act = get_activation(activation_type)
    given = {"swiglu_alpha": swiglu_alpha, "swiglu_beta": swiglu_beta, "swiglu_limit": swiglu_limit, "situ_beta": situ_beta,
             "situ_linear_beta": situ_linear_beta}
    if act.kind == ActivationType.Swiglu and any(given[n] is not None for n in _PARAM_NAMES[ActivationType.SwigluBias]):
        act = get_activation(ActivationType.SwigluBias)
    for name, value in given.items():
        if value is not None and name not in _PARAM_NAMES.get(act.kind, ()):
            raise ValueError(f"{name}: activation {act.kind.name} does not read it; it applies to "
                             f"{[k.name for k, names in _PARAM_NAMES.items() if name in names]}")

    # Dtypes: unquantized input must produce its own dtype.
    _check_tensor("input", input, 2)
    if input.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8):
        raise NotImplementedError(f"input: dtype {input.dtype} means FP8/FP4 activations ({_NO_FP8}); pass fp16 or bf16")
    _check_tensor("input", input, 2, FLOAT_DTYPES)
    if not isinstance(output_dtype, torch.dtype):
        raise TypeError(f"output_dtype: expected a torch.dtype, got {type(output_dtype).__name__}")
    if output_dtype != input.dtype:
        raise ValueError(f"output_dtype: expected the input dtype {input.dtype} for unquantized input, got {output_dtype} "
                         "(FlashInfer would reinterpret the bits)")
    if (fc1_expert_biases is None) != (fc2_expert_biases is None):
        missing = "fc2_expert_biases" if fc2_expert_biases is None else "fc1_expert_biases"
        raise ValueError(f"{missing}: fc1_expert_biases and fc2_expert_biases are given both or neither")
    _check_tensor("fc2_expert_weights", fc2_expert_weights, 3)
    num_local_experts = fc2_expert_weights.shape[0]
    act_params = _activation_params(act, given, num_local_experts, input.device)
    # fc2's bias belongs to the whole output: under TP only rank 0 adds it, so the ranks' sum has it once.
    fc2_bias_here = fc2_expert_biases if tp_rank == 0 else None

    if use_int8_woq_per_channel:
        if fc2_bias_here is None and fc2_expert_biases is not None:  # checked like rank 0's, which the INT8 path validates
            check_expert_bias("fc2_expert_biases", fc2_expert_biases, num_local_experts, input.shape[1], output_dtype,
                              input.device)

        def call():
            return _int8_woq_hook(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights,
                                  quant_scales, fc1_expert_biases, fc2_bias_here, act, act_params, num_local_experts, ep_size,
                                  ep_rank, output)
    else:
        validate_moe_inputs(
            input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights, act, fc1_expert_biases,
            fc2_expert_biases, output, total_experts=num_local_experts * ep_size, bias_dtype=output_dtype,
            output_dtype=output_dtype)

        def call():
            return moe_forward(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights, act,
                               gate_layout="up_first", fc1_expert_biases=fc1_expert_biases, fc2_expert_biases=fc2_bias_here,
                               act_params=act_params, output=output, start_expert=ep_rank * num_local_experts)

    needing_grad = tensors_needing_grad(input, token_final_scales, fc1_expert_weights, fc2_expert_weights, fc1_expert_biases,
                                        fc2_expert_biases, *(quant_scales or ()), *given.values())
    output = InferenceOnly.apply("cutlass_fused_moe", call, output, *needing_grad) if needing_grad else call()
    return _with_flashinfer_extras(output, num_local_experts)


def _check_rank(kind: str, size, rank) -> None:
    # FlashInfer's callers pass ints; anything else is a TypeError here, then the library's range check.
    for name, value in ((f"{kind}_size", size), (f"{kind}_rank", rank)):
        if not is_int(value):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    check_parallel_rank(kind, size, rank)


def _activation_params(act: Activation, given: dict, num_experts: int, device) -> torch.Tensor | None:
    """The `[E_local, 3]` float32 tensor of activations.py, from FlashInfer's per-expert `[E_local]` float32 tensors."""
    names = _PARAM_NAMES.get(act.kind, ())
    for name in names:
        value = given[name]
        if value is not None:
            _check_tensor(name, value, 1, (torch.float32,), device)
            _check_shape(name, value, (num_experts,))
    if act.kind == ActivationType.SwigluBias:
        p = (given["swiglu_alpha"], given["swiglu_beta"], given["swiglu_limit"])
    elif act.kind == ActivationType.SwigluStep:
        p = (None, None, given["swiglu_limit"])  # limit defaults to 7 (the table's default)
    elif act.kind == ActivationType.Situ:
        p = (given["situ_beta"], given["situ_linear_beta"], None)
    else:
        p = (None, None, None)
    return activation_params(act, num_experts, device, *p)


def _with_flashinfer_extras(output: torch.Tensor, num_local_experts: int) -> list[torch.Tensor]:
    """FlashInfer's four-element result. The three extras are allocated and left unwritten, exactly as FlashInfer does."""
    device = output.device
    return [
        output,
        torch.empty(1, dtype=torch.int32, device=device),  # num_active_experts_per_node
        torch.empty(num_local_experts, output.shape[0], dtype=torch.float32, device=device),  # experts_to_token_score
        torch.empty(num_local_experts, dtype=torch.int32, device=device),  # active_expert_global_ids
    ]


# ---------------------------------------------------------------------------------------------------------------------------------
# INT8 extension


def _int8_woq_hook(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights, quant_scales,
                   fc1_expert_biases, fc2_bias_here, act, act_params, num_local_experts, ep_size, ep_rank, output):
    """`use_int8_woq_per_channel=True`: W8A16 per channel through `simple_moe.quant.cutlass_int8_woq_forward` (which owns the
    int8 layouts, `quant_scales = [fc1 scales [E, N1], fc2 scales [E, H]]` and their validation), with the up-first fc1, fc2's
    bias already None when tp_rank != 0, this rank's first expert and the global expert count (top_k's bound)."""
    from .quant import cutlass_int8_woq_forward  # quant.py imports pipeline.py; imported where it is used

    return cutlass_int8_woq_forward(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights,
                                    quant_scales, activation=act, act_params=act_params, fc1_expert_biases=fc1_expert_biases,
                                    fc2_expert_biases=fc2_bias_here, output=output, start_expert=ep_rank * num_local_experts,
                                    total_experts=num_local_experts * ep_size)
