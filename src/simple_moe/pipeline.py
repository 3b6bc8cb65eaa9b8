"""`fused_moe_simple`: routing -> GEMM1 + activation -> GEMM2 -> finalize, on the fast path or through user GEMM callbacks.

Validation happens here, once, before any kernel runs; the kernels and launchers below it trust their inputs.
"""
from __future__ import annotations

import warnings

import torch

from ._host import env_flag, is_int, triton_runs_on
from .activations import Activation, activation_params as build_activation_params, activation_torch, get_activation
from .decode import DecodePlan, decode_forward, uses_decode_path
from .finalize import FinalizePlan, finalize, finalize_torch
from .grouped_gemm import GroupedGemmPlan, gemm_launches_early
from .routing import RoutingMaps, RoutingPlan, build_routing_maps

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_warned_cpu = False


def _warn_cpu_once(device: torch.device) -> None:
    global _warned_cpu
    if device.type != "cuda" and not _warned_cpu:
        _warned_cpu = True
        how = ("Triton's interpreter (whose bfloat16 tl.dot is wrong in Triton 3.6 unless patched as in tests/: use fp16 "
               "or fp32)" if triton_runs_on(device) else "plain torch (set TRITON_INTERPRET=1 to run the kernels)")
        warnings.warn(f"simple_moe: tensors on {device}: running through {how}; correct but slow, for testing only.", stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------------------------
# Validation


def is_negated_view(t: torch.Tensor) -> bool:
    """A lazily negated view (e.g. `z.conj().imag`), whose memory the kernels would read without the sign. (Dynamo cannot
    trace `is_neg`; under torch.compile the op is handed materialised tensors.)"""
    return not torch.compiler.is_compiling() and t.is_neg()


def _check_tensor(name, t, dims, dtypes=None, device=None, optional=False):
    if t is None:
        if optional:
            return
        raise TypeError(f"{name}: expected a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where input is), got {t.device}")
    if is_negated_view(t):
        raise ValueError(f"{name}: a negated view (its negative bit is set); pass {name}.resolve_neg()")


def _check_shape(name, t, shape):
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_rows(name, t, width):
    """A `[rows, width]` tensor the kernels read or write row by row: a contiguous last dimension, rows that do not overlap
    (an expanded row would have every row written to the same memory)."""
    if t.stride(1) != 1:
        raise ValueError(f"{name}: expected a contiguous last dimension (strides {t.stride()})")
    if t.shape[0] > 1 and t.stride(0) < width:
        raise ValueError(f"{name}: rows overlap (strides {t.stride()} for [rows, {width}]); pass a tensor with row stride >= "
                         f"{width}")


def _check_strided_weights(name, w):
    # The grouped GEMM walks any strides, but a matrix whose rows and columns are both strided would be read element by element.
    if w.stride(-1) != 1 and w.stride(-2) != 1:
        raise ValueError(f"{name}: expected the last or second-to-last dimension to be contiguous (strides {w.stride()}); "
                         "call .contiguous() first")


def validate_moe_inputs(
    input,
    token_selected_experts,
    token_final_scales,
    fc1_expert_weights,
    fc2_expert_weights,
    activation: Activation,
    fc1_expert_biases=None,
    fc2_expert_biases=None,
    output=None,
    *,
    total_experts: int | None = None,
    input_dtypes=FLOAT_DTYPES,
    weight_dtype=None,
    bias_dtype=None,
    output_dtype=None,
):
    """Raises ValueError/TypeError naming the argument for every malformed input. Returns (T, H, E, I, top_k)."""
    _check_tensor("input", input, 2, input_dtypes)
    device = input.device
    num_tokens, hidden = input.shape
    _check_tensor("token_selected_experts", token_selected_experts, 2, (torch.int32, torch.int64), device)
    if token_selected_experts.shape[0] != num_tokens:
        raise ValueError(f"token_selected_experts: expected {num_tokens} rows (one per input token), got {token_selected_experts.shape[0]}")
    top_k = token_selected_experts.shape[1]
    if top_k < 1:
        raise ValueError("token_selected_experts: expected top_k >= 1 columns")
    _check_tensor("token_final_scales", token_final_scales, 2, FLOAT_DTYPES, device, optional=True)
    _check_shape("token_final_scales", token_final_scales, (num_tokens, top_k))
    weight_dtypes = (weight_dtype or input.dtype,)
    _check_tensor("fc1_expert_weights", fc1_expert_weights, 3, weight_dtypes, device)
    _check_tensor("fc2_expert_weights", fc2_expert_weights, 3, weight_dtypes, device)
    num_experts, n1, k1 = fc1_expert_weights.shape
    e2, h2, inter = fc2_expert_weights.shape
    if e2 != num_experts:
        raise ValueError(f"fc2_expert_weights: expected {num_experts} experts like fc1_expert_weights, got {e2}")
    if num_experts < 1:
        raise ValueError("fc1_expert_weights: expected at least one expert")
    if inter < 1:
        raise ValueError(f"fc2_expert_weights: expected an expert width I >= 1 in [E, H, I], got "
                         f"{tuple(fc2_expert_weights.shape)}")
    if k1 != hidden:
        raise ValueError(f"fc1_expert_weights: expected shape [E, N1, H={hidden}], got {tuple(fc1_expert_weights.shape)}")
    if h2 != hidden:
        raise ValueError(f"fc2_expert_weights: expected shape [E, H={hidden}, I], got {tuple(fc2_expert_weights.shape)}")
    expected_n1 = 2 * inter if activation.gated else inter
    if n1 != expected_n1:
        kind = "gated" if activation.gated else "non-gated"
        raise ValueError(f"fc1_expert_weights: {kind} activation {activation.name!r} needs N1 = {expected_n1} rows "
                         f"({'2*' if activation.gated else ''}I, I={inter} from fc2), got {n1}")
    _check_strided_weights("fc1_expert_weights", fc1_expert_weights)
    _check_strided_weights("fc2_expert_weights", fc2_expert_weights)
    if top_k > (total_experts or num_experts):
        raise ValueError(f"token_selected_experts: top_k={top_k} exceeds the number of experts {total_experts or num_experts}")
    check_expert_bias("fc1_expert_biases", fc1_expert_biases, num_experts, n1, bias_dtype or input.dtype, device)
    check_expert_bias("fc2_expert_biases", fc2_expert_biases, num_experts, hidden, bias_dtype or input.dtype, device)
    if output is not None:
        _check_tensor("output", output, 2, (output_dtype or input.dtype,), device)
        _check_shape("output", output, (num_tokens, hidden))
        _check_rows("output", output, hidden)
    return num_tokens, hidden, num_experts, inter, top_k


def check_expert_bias(name: str, bias, num_experts: int, width: int, dtype: torch.dtype, device) -> None:
    """None, or a `[num_experts, width]` tensor of `dtype` on `device` whose rows the GEMM epilogues can read as contiguous."""
    _check_tensor(name, bias, 2, (dtype,), device, optional=True)
    _check_shape(name, bias, (num_experts, width))
    if bias is not None and bias.stride(1) != 1:
        raise ValueError(f"{name}: expected a contiguous last dimension (strides {bias.stride()}); call .contiguous() first")


def check_parallel_rank(kind: str, size, rank) -> None:
    """`{kind}_size` a positive int and `0 <= {kind}_rank < {kind}_size` (kind "ep" or "tp"); ValueError naming the argument."""
    if not is_int(size) or size < 1:
        raise ValueError(f"{kind}_size: expected a positive int, got {size!r}")
    if not is_int(rank) or not 0 <= rank < size:
        raise ValueError(f"{kind}_rank: expected 0 <= {kind}_rank < {kind}_size={size}, got {rank!r}")


def resolve_activation_params(activation: Activation, activation_params, num_experts: int, device):
    """Checks the caller's float32 `[E, 3]` per-expert activation parameters, or builds the activation's defaults (or None)."""
    if activation_params is None:
        return build_activation_params(activation, num_experts, device)
    if not activation.takes_params:  # refused rather than ignored, as cutlass_fused_moe refuses swiglu_alpha for them
        raise ValueError(f"activation_params: activation {activation.name!r} takes no parameters; pass None (parameters are "
                         "read by swiglu_bias, swiglu_step and situ)")
    _check_tensor("activation_params", activation_params, 2, (torch.float32,), device)
    _check_shape("activation_params", activation_params, (num_experts, 3))
    if not activation_params.is_contiguous():
        raise ValueError("activation_params: expected a contiguous [E, 3] tensor")
    return activation_params


# ---------------------------------------------------------------------------------------------------------------------------------
# The two paths


def moe_forward(input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`_moe_forward` on the device the tensors live on: Triton launches on the current CUDA device, so a call whose tensors
    are on another GPU (cuda:1 while cuda:0 is current) runs under that device, as a torch op would, instead of launching on
    the wrong one.

    Under torch.compile, a call with GEMM callbacks (always keyword arguments) runs eagerly between two graphs: the op of
    ops.py cannot carry the caller's functions, and Dynamo cannot trace the routing and finalize launches around them."""
    if torch.compiler.is_compiling():
        if kwargs.get("gemm1_fn") is not None or kwargs.get("gemm2_fn") is not None:
            return _moe_forward_outside_graph(input, *args, **kwargs)
        return _moe_forward(input, *args, **kwargs)
    device = input.device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            return _moe_forward(input, *args, **kwargs)
    return _moe_forward(input, *args, **kwargs)


_moe_forward_outside_graph = torch.compiler.disable(moe_forward)


def _moe_forward(
    input: torch.Tensor,
    token_selected_experts: torch.Tensor,
    token_final_scales: torch.Tensor | None,
    fc1_expert_weights: torch.Tensor,
    fc2_expert_weights: torch.Tensor,
    activation: Activation,
    *,
    gate_layout: str = "gate_first",
    fc1_expert_biases: torch.Tensor | None = None,
    fc2_expert_biases: torch.Tensor | None = None,
    act_params: torch.Tensor | None = None,
    output: torch.Tensor | None = None,
    start_expert: int = 0,
    gemm1_fn=None,
    gemm2_fn=None,
    quant=None,
) -> torch.Tensor:
    """The validated core every front door calls. `act_params` is the `[E, 3]` tensor of activations.py or None.

    Three ways through, one computation: the fused Triton path (the default), the pluggable path (GEMM callbacks on a permuted
    copy of the input), and, on a CPU without Triton's interpreter, a torch loop over experts. `quant` (an INT8 scheme of
    quant.py) only changes the GEMMs' operands.
    """
    if torch.compiler.is_compiling() and gemm1_fn is None and gemm2_fn is None:
        # Under torch.compile the fast path, INT8 schemes included, is the `simple_moe::moe_forward` custom op (ops.py), which
        # Dynamo keeps whole instead of tracing into the launchers; eager calls skip the op dispatcher's overhead.
        from .ops import _moe_forward_impl

        result = _moe_forward_impl(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights,
                                   int(activation.kind), gate_layout, fc1_expert_biases, fc2_expert_biases, act_params,
                                   start_expert, *(quant.op_arguments() if quant is not None else ()))
        return result if output is None else output.copy_(result)
    num_tokens, hidden = input.shape
    num_experts = fc2_expert_weights.shape[0]
    device = input.device
    if output is None:
        output = torch.empty(num_tokens, hidden, dtype=input.dtype, device=device)
    if num_tokens == 0:
        return output
    _warn_cpu_once(device)
    on_triton = triton_runs_on(device)
    if on_triton and gemm1_fn is None and gemm2_fn is None and uses_decode_path(
            num_tokens, fc1_expert_weights, fc2_expert_weights, input, quant, token_selected_experts, token_final_scales):
        return decode_forward(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights,
                              activation, gate_layout, fc1_expert_biases, fc2_expert_biases, act_params, output, quant,
                              start_expert)
    maps = build_routing_maps(token_selected_experts, num_experts, start_expert=start_expert)  # its torch twin off Triton
    if gemm1_fn is not None or gemm2_fn is not None:
        extra1 = extra2 = None
        if quant is not None:
            quant.check_callbacks(gemm1_fn, gemm2_fn)
            extra1, extra2 = quant.callback_kwargs(1), quant.callback_kwargs(2)
        return _pluggable_forward(input, maps, token_final_scales, fc1_expert_weights, fc2_expert_weights, activation,
                                  gate_layout, fc1_expert_biases, fc2_expert_biases, act_params, output, gemm1_fn, gemm2_fn,
                                  extra1, extra2)
    forward = _fast_forward if on_triton else _torch_experts_forward
    return forward(input, maps, token_final_scales, fc1_expert_weights, fc2_expert_weights, activation, gate_layout,
                   fc1_expert_biases, fc2_expert_biases, act_params, output, quant)


def _fast_forward(input, maps: RoutingMaps, token_final_scales, fc1, fc2, activation, gate_layout, fc1_bias, fc2_bias,
                  act_params, output, quant):
    """The fused Triton path: GEMM1 (gather + activation epilogue), GEMM2 (bias + router-scale epilogue), a plain sum."""
    return GroupedPlan(activation, gate_layout)(input, maps, token_final_scales, fc1, fc2, fc1_bias, fc2_bias, act_params,
                                                output, quant)


class GroupedPlan:
    """The fused Triton path after routing for one call signature: its GEMM and finalize plans, made on the first call from
    that call's tensors and reused by later calls of the signature (see "Call plans" below)."""

    def __init__(self, activation: Activation, gate_layout: str):
        self.activation, self.gate_layout = activation, gate_layout
        self.gemm1 = self.gemm2 = self.finalize = None
        self.quantize1 = self.quantize2 = None  # W8A8's row quantisers (RowQuantizerPlan) of the input and the intermediate

    def __call__(self, input, maps: RoutingMaps, token_final_scales, fc1, fc2, fc1_bias, fc2_bias, act_params, output, quant):
        rows = maps.expanded_num_rows
        _, hidden, inter = fc2.shape
        intermediate = torch.empty(rows, inter, dtype=input.dtype, device=input.device)
        gemm2_out = torch.empty(rows, hidden, dtype=input.dtype, device=input.device)
        if quant is not None and quant.quantize_input and self.quantize1 is None:
            from .quant import RowQuantizerPlan  # (quant.py imports this module)

            self.quantize1 = RowQuantizerPlan.like(input)
            self.quantize2 = RowQuantizerPlan(rows, inter, inter, 1, True, input.device)
        tables = {}  # this call's maps: the Gluon GEMMs (W8A8 on SM90) share one row-block table
        a1, int8_args1 = (input, {}) if quant is None else quant.gemm1_operands(input, self.quantize1)
        group_size = int8_args1.pop("group_size", 0)
        if self.gemm1 is None:
            self.gemm1 = GroupedGemmPlan(a1, fc1, intermediate, maps, gather_a=True, activation=self.activation,
                                         gate_layout=self.gate_layout, bias=fc1_bias, act_params=act_params,
                                         group_size=group_size, **int8_args1)
        self.gemm1(a1, fc1, intermediate, maps, bias=fc1_bias, act_params=act_params, tables=tables, **int8_args1)
        a2, int8_args2 = (intermediate, {}) if quant is None else quant.gemm2_operands(intermediate, maps, self.quantize2)
        group_size = int8_args2.pop("group_size", 0)
        router_scales = None if token_final_scales is None else token_final_scales.float().contiguous()
        if self.gemm2 is None:
            self.gemm2 = GroupedGemmPlan(a2, fc2, gemm2_out, maps, gather_a=False, bias=fc2_bias, router_scales=router_scales,
                                         group_size=group_size, **int8_args2)
            self.finalize = FinalizePlan(gemm2_out, maps, None, None, output,
                                         launch_early=gemm_launches_early(input.device, rows, fc2.shape[0], fc2))
        self.gemm2(a2, fc2, gemm2_out, maps, bias=fc2_bias, router_scales=router_scales, tables=tables, **int8_args2)
        return self.finalize(gemm2_out, maps, None, None, output)


def _pluggable_forward(input, maps: RoutingMaps, token_final_scales, fc1, fc2, activation, gate_layout, fc1_bias, fc2_bias,
                       act_params, output, gemm1_fn, gemm2_fn, extra1=None, extra2=None):
    """Materialises the permuted input, calls the user's GEMMs with the seed's signature, then finalizes."""
    from .callbacks import torch_loop_gemm

    if gate_layout != "gate_first" or act_params is not None:
        raise ValueError("gemm1_fn: GEMM callbacks get the seed's contract (gate-first fc1, activation by name without "
                         "parameters); use the fast path (no callbacks) for other fc1 layouts or activation parameters")
    gemm1_fn = gemm1_fn or torch_loop_gemm
    gemm2_fn = gemm2_fn or torch_loop_gemm
    rows = maps.expanded_num_rows
    num_experts, hidden, inter = fc2.shape
    offsets = maps.expert_first_token_offset
    permuted = input.index_select(0, (maps.expanded_dest_row_to_expanded_source_row % maps.num_tokens).long())
    intermediate = torch.empty(rows, inter, dtype=output.dtype, device=input.device)
    gemm1_fn(intermediate, permuted, fc1, fc1_bias, offsets, rows, inter, input.shape[1], num_experts, True, activation.name,
             **(extra1 or {}))
    gemm2_out = torch.empty(rows, hidden, dtype=output.dtype, device=input.device)
    gemm2_fn(gemm2_out, intermediate, fc2, fc2_bias, offsets, rows, hidden, inter, num_experts, False, activation.name,
             **(extra2 or {}))
    return finalize(gemm2_out, maps, token_final_scales, output=output)


def _float_linear_torch(x, weights, expert, gemm):
    return x.float() @ weights[expert].float().T


def _torch_experts_forward(input, maps, scales, fc1, fc2, activation, gate_layout, fc1_bias, fc2_bias, act_params, output,
                           quant):
    """The fast path's computation as a torch loop over experts (CPU without Triton's interpreter); the rounding points are
    the kernels' (the intermediate and GEMM2's rows in the input dtype)."""
    linear = _float_linear_torch if quant is None else quant.linear_torch
    offsets = maps.expert_first_token_offset.tolist()
    gemm2_out = torch.zeros(maps.expanded_num_rows, fc2.shape[1], dtype=input.dtype, device=input.device)
    tokens = (maps.expanded_dest_row_to_expanded_source_row % maps.num_tokens).long()
    for e in range(fc2.shape[0]):
        start, end = offsets[e], offsets[e + 1]
        if start == end:
            continue
        h = linear(input[tokens[start:end]], fc1, e, 1)
        if fc1_bias is not None:
            h += fc1_bias[e].float()
        params = None if act_params is None else tuple(act_params[e].tolist())
        h = activation_torch(h, activation, params, gate_layout).to(input.dtype)
        y = linear(h, fc2, e, 2)
        if fc2_bias is not None:
            y += fc2_bias[e].float()
        gemm2_out[start:end] = y.to(input.dtype)
    return finalize_torch(gemm2_out, maps, scales, output=output)


# ---------------------------------------------------------------------------------------------------------------------------------
# Call plans: an eager call's host time
#
# An eager call at T=1 spent its time on the host: H100, Qwen3-30B, 117 us a call of which the two kernels' launches were 48
# and validating and preparing them the rest (launch_overhead_h100_v6c.txt), against ~30 us of GPU time; on the H200 host
# 84.5 us, 30.2 with a plan (launch_overhead_h200_v13.txt). The grouped path (4-6 launches) spent 140-320 us a call at
# T=16 (host_int8.txt). So the first call of each signature validates as usual and keeps a plan of its launches; later
# calls of the same signature (the next decode step, the next layer of the same shape: same shapes, dtypes, strides,
# alignments, options) look the plan up and launch, skipping all that depends only on that signature. Everything
# validation checks is a function of the key, so a call that would fail validation never finds a plan.

_call_plans: dict = {}
_MAX_CALL_PLANS = 256  # signatures repeat (a model has a few layer shapes); this only bounds a process that sees endless new ones
_CALL_PLANS_ENABLED = env_flag("SIMPLE_MOE_CALL_PLANS", True)  # 0: every call validates and prepares anew (A/B)


def _signature(t):
    """What validation and a plan's launches read of a tensor argument: its type, shape, strides, dtype, device, address
    modulo 16 and negative bit (None stays None). A non-tensor raises AttributeError or TypeError (no plan: validation
    reports it)."""
    return None if t is None else (type(t), t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16, t.is_neg())


def _find_plan(input, token_selected_experts, token_final_scales, fc1, fc2, gemm1_fn, gemm2_fn, activation, fc1_bias,
               fc2_bias, output, activation_params, ep_size, ep_rank, quant):
    """(the call's plan key, its plan or None); the key is None for a call no plan covers: GEMM callbacks, torch.compile
    tracing (the custom op is the compiled path), a device other than the current one (moe_forward switches devices for
    such a call), or arguments that are not what validation accepts."""
    if gemm1_fn is not None or gemm2_fn is not None or not _CALL_PLANS_ENABLED or torch.compiler.is_compiling():
        return None, None
    try:
        # type() beside each value: True == 1 and ActivationType.Swiglu == its int, but validation tells them apart.
        key = (type(activation), activation, type(ep_size), ep_size, type(ep_rank), ep_rank,
               None if quant is None else (type(quant), quant.group_size, _signature(quant.fc1_scales),
                                           _signature(quant.fc2_scales)),
               _signature(input), _signature(token_selected_experts), _signature(token_final_scales), _signature(fc1),
               _signature(fc2), _signature(fc1_bias), _signature(fc2_bias), _signature(output), _signature(activation_params))
        plan = _call_plans.get(key)  # (hashing raises TypeError on an unhashable activation)
        device = input.device
    except (AttributeError, TypeError, RuntimeError):  # RuntimeError: a tensor without strides or storage
        return None, None
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return None, None
    return key, plan


def _new_plan(input, token_selected_experts, token_final_scales, fc1, fc2, activation, fc1_bias, fc2_bias, act_params,
              output, quant, start_expert):
    """The plan of a validated call (gate-first fc1, no callbacks): the decode path's or the grouped path's launches, or None
    where the fused Triton kernels do not run (the CPU without the interpreter) or there is nothing to launch (T=0)."""
    num_tokens = input.shape[0]
    if not num_tokens or not triton_runs_on(input.device):
        return None
    if len(_call_plans) >= _MAX_CALL_PLANS:
        _call_plans.clear()
    if uses_decode_path(num_tokens, fc1, fc2, input, quant, token_selected_experts, token_final_scales):
        return DecodePlan(input, token_selected_experts, token_final_scales, fc1, fc2, activation, "gate_first", fc1_bias,
                          fc2_bias, act_params, output, quant, start_expert)
    routing = RoutingPlan(num_tokens, token_selected_experts.shape[1], fc2.shape[0], start_expert, input.device)
    return RoutedPlan(routing, GroupedPlan(activation, "gate_first"))


class RoutedPlan:
    """The grouped path from the expert ids: the routing maps' launches, then the GEMMs' and finalize's (`GroupedPlan`)."""

    def __init__(self, routing: RoutingPlan, grouped: GroupedPlan):
        self.routing, self.grouped = routing, grouped

    def __call__(self, input, token_selected_experts, token_final_scales, fc1, fc2, fc1_bias, fc2_bias, act_params, output,
                 quant):
        maps = self.routing(token_selected_experts)
        return self.grouped(input, maps, token_final_scales, fc1, fc2, fc1_bias, fc2_bias, act_params, output, quant)


def _new_output(input):
    return torch.empty(input.shape, dtype=input.dtype, device=input.device)


class CallPlan:
    """A planned `fused_moe_simple` call: the launches of its path (`DecodePlan` or `RoutedPlan`) and, when the caller gave no
    `activation_params`, the activation's default parameters (built once; None for activations without parameters)."""

    def __init__(self, forward, default_act_params):
        self.forward, self.default_act_params = forward, default_act_params

    def __call__(self, input, token_selected_experts, token_final_scales, fc1, fc2, fc1_bias, fc2_bias, act_params, output,
                 quant):
        if output is None:
            output = _new_output(input)
        return self.forward(input, token_selected_experts, token_final_scales, fc1, fc2, fc1_bias, fc2_bias,
                            self.default_act_params if act_params is None else act_params, output, quant)


# ---------------------------------------------------------------------------------------------------------------------------------
# Front door


def tensors_needing_grad(*arguments) -> tuple:
    """The tensor arguments (an INT8 scheme's scales included) that require grad, where grad mode is on outside
    torch.compile (whose custom op has no autograd formula either); a front door then runs through `InferenceOnly`."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return ()
    found = []
    for value in arguments:
        tensors = ((value,) if isinstance(value, torch.Tensor)  # else an INT8 scheme, or nothing
                   else (getattr(value, "fc1_scales", None), getattr(value, "fc2_scales", None)))
        found += [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    return tuple(found)


class InferenceOnly(torch.autograd.Function):
    """`apply(name, call, output, *needing_grad)`: `call()` (the layer) run without autograd, since the kernels have no
    backward. The result carries this node (its inputs `needing_grad`), whose backward raises naming the front door,
    instead of a constant that would silently leave those arguments without a gradient. `output`: the caller's output
    buffer (written in place) or None."""

    @staticmethod
    def forward(ctx, name, call, output, *needing_grad):
        ctx.name = name
        if output is not None:
            ctx.mark_dirty(output)
        return call()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"simple_moe: {ctx.name} has no backward (inference only); call it under torch.no_grad() or "
                           "torch.inference_mode(), or detach the arguments that require grad")


def fused_moe_simple(
    input: torch.Tensor,
    token_selected_experts: torch.Tensor,
    token_final_scales: torch.Tensor | None,
    fc1_expert_weights: torch.Tensor,
    fc2_expert_weights: torch.Tensor,
    gemm1_fn=None,
    gemm2_fn=None,
    activation="swiglu",
    *,
    fc1_expert_biases: torch.Tensor | None = None,
    fc2_expert_biases: torch.Tensor | None = None,
    output: torch.Tensor | None = None,
    activation_params: torch.Tensor | None = None,
    ep_size: int = 1,
    ep_rank: int = 0,
    quant=None,
) -> torch.Tensor:
    """Mixture-of-Experts layer: `out[t] = sum_k scale[t,k] * (act(x[t] @ fc1[e].T + b1[e]) @ fc2[e].T + b2[e])`.

    Args:
        input: `[T, H]` fp16, bf16 or fp32.
        token_selected_experts: `[T, top_k]` int32/int64 expert ids (global when `ep_size > 1`; ids outside this rank are dropped).
        token_final_scales: `[T, top_k]` router weights, applied as given (no softmax here), or None for an unweighted sum.
        fc1_expert_weights: `[E, N1, H]`, N1 = 2*I for gated activations, **gate first** (`gate, up = h.chunk(2, -1)`), else I.
        fc2_expert_weights: `[E, H, I]`.
        gemm1_fn, gemm2_fn: optional GEMM callbacks with the seed's signature (see `simple_moe.callbacks`); with none given the
            fused Triton path runs. Giving one uses the torch loop for the other.
        activation: a name ("swiglu", "geglu", "gelu", "relu", "silu", "identity", "swiglu_bias", "relu2", "swiglu_step",
            "geglu_tanh", "situ") or an `ActivationType`.
        fc1_expert_biases: `[E, N1]` or None. fc2_expert_biases: `[E, H]` or None (scaled by the router weight with its row).
        output: optional `[T, H]` tensor to write into (dtype of input).
        activation_params: optional float32 `[E, 3]` per-expert activation parameters (see `simple_moe.activations`), for
            the activations that read them (swiglu_bias, swiglu_step, situ); a ValueError for the others.
        ep_size, ep_rank: expert parallelism: this call holds experts `[ep_rank*E, (ep_rank+1)*E)` and returns its partial sum.
        quant: an INT8 scheme from `simple_moe.quant` (weights then are int8), or None.

    Returns `[T, H]` in the input dtype. Inference only: where grad mode is on and an argument requires grad, the result's
    backward raises (no gradient is computed for any argument).
    """
    needing_grad = tensors_needing_grad(input, token_final_scales, fc1_expert_weights, fc2_expert_weights, fc1_expert_biases,
                                        fc2_expert_biases, activation_params, quant)
    if needing_grad:
        def call():  # again, now without autograd
            return fused_moe_simple(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights,
                                    gemm1_fn, gemm2_fn, activation, fc1_expert_biases=fc1_expert_biases,
                                    fc2_expert_biases=fc2_expert_biases, output=output, activation_params=activation_params,
                                    ep_size=ep_size, ep_rank=ep_rank, quant=quant)

        return InferenceOnly.apply("fused_moe_simple", call, output, *needing_grad)
    plan_key, plan = _find_plan(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights,
                                gemm1_fn, gemm2_fn, activation, fc1_expert_biases, fc2_expert_biases, output,
                                activation_params, ep_size, ep_rank, quant)
    if plan is not None:
        return plan(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights,
                    fc1_expert_biases, fc2_expert_biases, activation_params, output, quant)
    act = get_activation(activation)
    check_parallel_rank("ep", ep_size, ep_rank)
    for name, fn in (("gemm1_fn", gemm1_fn), ("gemm2_fn", gemm2_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name}: expected a callable with the seed's GEMM signature, got {type(fn).__name__}")
    from .quant import validate_quant  # (quant.py imports this module)

    validate_quant(quant, input, fc1_expert_weights, fc2_expert_weights)
    num_experts = fc2_expert_weights.shape[0] if isinstance(fc2_expert_weights, torch.Tensor) and fc2_expert_weights.dim() == 3 else None
    validate_moe_inputs(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights, act,
                        fc1_expert_biases, fc2_expert_biases, output,
                        total_experts=None if num_experts is None else num_experts * ep_size,
                        weight_dtype=None if quant is None else torch.int8)
    if gemm1_fn is not None or gemm2_fn is not None:
        if activation_params is not None:
            raise ValueError("activation_params: GEMM callbacks get the activation by name only; drop the callbacks to use "
                             "per-expert activation parameters")
    else:
        resolved_params = resolve_activation_params(act, activation_params, num_experts, input.device)
        target = _new_output(input) if output is None else output
        forward = None if plan_key is None else _new_plan(
            input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights, act,
            fc1_expert_biases, fc2_expert_biases, resolved_params, target, quant, ep_rank * num_experts)
        if forward is not None:
            _warn_cpu_once(input.device)
            plan = _call_plans[plan_key] = CallPlan(forward, None if activation_params is not None else resolved_params)
            return plan(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights,
                        fc1_expert_biases, fc2_expert_biases, activation_params, target, quant)
        activation_params, output = resolved_params, target
    return moe_forward(input, token_selected_experts, token_final_scales, fc1_expert_weights, fc2_expert_weights, act,
                       fc1_expert_biases=fc1_expert_biases, fc2_expert_biases=fc2_expert_biases, act_params=activation_params,
                       output=output, start_expert=ep_rank * num_experts, gemm1_fn=gemm1_fn, gemm2_fn=gemm2_fn, quant=quant)
