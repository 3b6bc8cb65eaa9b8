"""Hugging Face transformers (>= 5) integration: run every MoE layer of a model on simple_moe's fast path.

    import simple_moe.integrations.transformers as smt
    smt.register()                                   # adds "simple_moe" to transformers' ExpertsInterface
    model.set_experts_implementation("simple_moe")   # or from_pretrained(..., experts_implementation="simple_moe")

How it plugs in. transformers 5 keeps the routed experts of each MoE layer in one `*Experts` module decorated with
`@use_experts_implementation`, whose `forward(hidden_states [T, H], top_k_index [T, k] int64, top_k_weights [T, k])` dispatches to
the function registered under `config._experts_implementation`. The decorator stores the storage flags on the module:
`has_gate` (fused `gate_up_proj` vs. a plain `up_proj`), `is_transposed` (`[E, in, out]` instead of `[E, out, in]`),
`is_concatenated` (gate/up halves `[gate; up]` vs. interleaved columns), `has_bias`, and (newer versions) `has_post_expert_norm`.
The gated activation is the module's `_apply_gate`; the default one is `act_fn(gate) * up` with `gate, up = chunk(2)`.

What we pass to the kernels, without copying or reordering any weight:
- fc1 = `gate_up_proj` (or `up_proj`), fc2 = `down_proj`; transposed storage is passed as the view `w.transpose(1, 2)`, which the
  grouped GEMM reads through its strides. Biases `*_proj_bias` go in as they are.
- gate layout: `is_concatenated` -> "gate_first", otherwise "interleaved" (GPT-OSS: gate = columns 0::2, up = 1::2).
- activation: with the default `_apply_gate`, `act_fn` is mapped by its exact type (SiLU -> swiglu, erf GELU -> geglu, tanh
  GELU -> geglu_tanh; non-gated: silu, gelu, relu, relu2, identity). A custom `_apply_gate` is recognised by the qualified name of
  the function that implements it (`type(module)._apply_gate.__qualname__`, e.g. "GptOssExperts._apply_gate"), not by flags:
  flags alone are ambiguous (OpenAI's privacy filter model has GPT-OSS's flags minus interleaving, and a different gate would be
  silently wrong), and a subclass that overrides `_apply_gate` gets a new qualified name, so it is never mistaken for its parent.
  An `_apply_gate` set on the module instance (which transformers would call) falls back; the class's gate function is part of
  the plan's key, so a gate patched onto the class after the first call is planned anew (in eager mode; a compiled graph keeps
  the plan it was traced with).
  GPT-OSS's gate is SwigluBias with (alpha, beta, limit) = (module.alpha, 1, module.limit), i.e. (1.702, 1, 7) in its config.
- `top_k_weights` become float32 router scales; ids outside `[0, E)` (expert-parallel sentinels) are dropped by our routing.
- `hidden_states` in another dtype than the weights (autocast) is cast to the weights' dtype, the result back, as `grouped_mm` does.

Anything we cannot run exactly (an unknown `_apply_gate` or `act_fn`, a post-expert norm, non-float (e.g. FP8) weights, biases
in another dtype than the weights) falls back to transformers' own `grouped_mm` implementation, with one warning per module
class saying why.

No weight is prepared or cached, so nothing goes stale when parameters change (in place or replaced). What is cached depends on
module constants only: the plan (activation, gate layout, parameters) per distinct (class, gate function, act_fn type, flags,
alpha/limit, weight and bias dtypes), and, for parameterised gates, the small float32 `[E, 3]` activation-parameter tensor per
module and device.
Under torch.compile the plan is a constant of the graph (`torch.compiler.assume_constant_result`), so `fullgraph=True` holds.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..activations import Activation, get_activation
from ..activations import activation_params as build_activation_params
from ..ops import checked_moe_forward

IMPLEMENTATION_NAME = "simple_moe"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def register(name: str = IMPLEMENTATION_NAME) -> str:
    """Registers `experts_forward` under `name` in transformers' ExpertsInterface (global, idempotent). Returns the name."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as e:  # transformers < 5 or absent
        raise ImportError("simple_moe.integrations.transformers needs transformers >= 5 "
                          "(transformers.integrations.moe.ExpertsInterface)") from e
    ExpertsInterface.register(name, experts_forward)
    return name


# ---------------------------------------------------------------------------------------------------------------------------------
# What a module computes, in our terms


@dataclass(frozen=True)
class ExpertsPlan:
    """How to run one experts module on the fast path: our activation, where the gate sits, its per-expert parameters."""

    activation: Activation
    gate_layout: str
    params: tuple | None  # (p0, p1, p2) for every expert, or None when the activation takes none


class Unsupported(Exception):
    """The module computes something the fast path cannot reproduce exactly; the message says what."""


# What the plan depends on, read from the module as plain constants (classes, bools, floats, dtypes). Under torch.compile these
# are what Dynamo hands to the constant function `_plan_constants` below; older Dynamo versions cannot pass it the module.
_FLOAT_ATTRS = ("alpha", "limit", "swiglu_alpha", "swiglu_limit")


def _module_facts(module) -> tuple:
    act_fn = getattr(module, "act_fn", None)
    fc1 = module.gate_up_proj if module.has_gate else module.up_proj
    # transformers calls `module._apply_gate`: an `_apply_gate` set on the instance comes before the class's method. Only the
    # identity test is taken here; names are read by `_plan` on the class (Dynamo reads a function's __qualname__ wrongly).
    gate = getattr(module, "_apply_gate", None)
    gate_on_instance = getattr(gate, "__func__", gate) is not getattr(type(module), "_apply_gate", None)
    return (type(module), gate_on_instance, type(act_fn), getattr(act_fn, "approximate", None), bool(module.has_gate),
            bool(module.is_concatenated), bool(getattr(module, "has_post_expert_norm", False)), fc1.dtype,
            module.down_proj.dtype, tuple(b.dtype for b in _biases(module) if b is not None),
            tuple(getattr(module, name, None) for name in _FLOAT_ATTRS))


def _biases(module) -> tuple:
    """(fc1's bias, fc2's bias) of the module, or (None, None) without biases."""
    if not getattr(module, "has_bias", False):
        return None, None
    return module.gate_up_proj_bias if module.has_gate else module.up_proj_bias, module.down_proj_bias


@dataclass(frozen=True)
class _Facts:
    cls: type
    gate_on_instance: bool  # module._apply_gate is not the class's (set on the instance)
    act_type: type  # type(module.act_fn); NoneType when the module has none
    act_approximate: str | None  # nn.GELU's `approximate`
    has_gate: bool
    is_concatenated: bool
    has_post_expert_norm: bool
    fc1_dtype: torch.dtype
    fc2_dtype: torch.dtype
    bias_dtypes: tuple  # (fc1's, fc2's) when the module has biases, else ()
    floats: tuple  # the _FLOAT_ATTRS values (None where absent)

    def float_attr(self, name: str) -> float:
        value = self.floats[_FLOAT_ATTRS.index(name)]
        if value is None:
            raise Unsupported(f"{self.cls.__name__} has no attribute {name!r}")
        return float(value)


def _act_family(facts: _Facts) -> str:
    """The elementwise function `act_fn` computes: "silu", "gelu" (erf), "gelu_tanh", "relu", "relu2" or "identity"."""
    from transformers import activations as hf

    by_type = {
        nn.SiLU: "silu", hf.SiLUActivation: "silu",
        hf.GELUActivation: "gelu",  # both its variants compute the erf form
        hf.GELUTanh: "gelu_tanh", hf.NewGELUActivation: "gelu_tanh", hf.FastGELUActivation: "gelu_tanh",
        nn.ReLU: "relu", hf.ReLUSquaredActivation: "relu2",
        nn.Identity: "identity", hf.LinearActivation: "identity",
    }
    if facts.act_type is nn.GELU:
        return "gelu" if facts.act_approximate == "none" else "gelu_tanh"
    if facts.act_type in by_type:  # exact type: a subclass may compute something else
        return by_type[facts.act_type]
    raise Unsupported(f"act_fn {facts.act_type.__name__} has no match in simple_moe's activation table")


_GATED = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}
_NOT_GATED = {"silu": "silu", "gelu": "gelu", "relu": "relu", "relu2": "relu2", "identity": "identity"}


def _default_gate(facts: _Facts) -> tuple[str, tuple | None]:
    family = _act_family(facts)
    if family not in _GATED:
        raise Unsupported(f"gated {family}(gate) * up has no match in simple_moe's activation table")
    return _GATED[family], None


def _clamped_swiglu(limit_attr: str):
    """`silu(gate.clamp(max=L)) * up.clamp(-L, L)` = SwigluBias(alpha=1, beta=0, limit=L)."""

    def recipe(facts: _Facts):
        if facts.act_type is not type(None) and _act_family(facts) != "silu":
            raise Unsupported(f"{facts.cls.__name__} with act_fn {facts.act_type.__name__} (only SiLU is mapped)")
        return "swiglu_bias", (1.0, 0.0, facts.float_attr(limit_attr))

    return recipe


def _gpt_oss_gate(alpha_attr: str, limit_attr: str):
    """`(up.clamp(-L, L) + 1) * g * sigmoid(alpha * g)` with `g = gate.clamp(max=L)` = SwigluBias(alpha, beta=1, limit=L)."""

    def recipe(facts: _Facts):
        return "swiglu_bias", (facts.float_attr(alpha_attr), 1.0, facts.float_attr(limit_attr))

    return recipe


def _fp32_default_gate(facts: _Facts):
    # act_fn(gate.float()) * up.float(), cast back: our epilogue computes the activation in fp32 anyway.
    return _default_gate(facts)


# Custom gates we reproduce exactly, by the qualified name of the `_apply_gate` that defines them. Each recipe returns our
# activation name and its per-expert parameters. Which half is the gate comes from `is_concatenated` for all of them (GPT-OSS is
# the only interleaved one, and it says so with is_concatenated=False).
_CUSTOM_GATES = {
    "GptOssExperts._apply_gate": _gpt_oss_gate("alpha", "limit"),
    "OpenAIPrivacyFilterExperts._apply_gate": _gpt_oss_gate("alpha", "limit"),
    "MiniMaxM3VLExperts._apply_gate": _gpt_oss_gate("swiglu_alpha", "swiglu_limit"),
    "DeepseekV4Experts._apply_gate": _clamped_swiglu("limit"),
    "HYV4Experts._apply_gate": _clamped_swiglu("swiglu_limit"),
    "Glm5NextTextExperts._apply_gate": _clamped_swiglu("swiglu_limit"),
    "BeamExperts._apply_gate": _fp32_default_gate,
}


def _plan(facts: _Facts) -> ExpertsPlan:
    if facts.has_post_expert_norm:
        raise Unsupported("post-expert norm")
    if facts.fc1_dtype not in _FLOAT_DTYPES or facts.fc2_dtype != facts.fc1_dtype:
        raise Unsupported(f"weights of dtype {facts.fc1_dtype}/{facts.fc2_dtype}")  # e.g. FP8 experts
    if any(dtype != facts.fc1_dtype for dtype in facts.bias_dtypes):  # our epilogues read biases in the weights' dtype
        raise Unsupported(f"biases of dtype {'/'.join(map(str, facts.bias_dtypes))} with weights of {facts.fc1_dtype}")
    if not facts.has_gate:
        name = _NOT_GATED.get(_act_family(facts))
        if name is None:
            raise Unsupported(f"non-gated act_fn {facts.act_type.__name__} has no match in simple_moe's activation table")
        return ExpertsPlan(get_activation(name), "gate_first", None)
    if facts.gate_on_instance:
        raise Unsupported("an _apply_gate set on the module instance")
    gate_fn = getattr(facts.cls, "_apply_gate", None)
    qualname = getattr(gate_fn, "__qualname__", "")
    from_transformers = getattr(gate_fn, "__module__", "").startswith("transformers.")
    if from_transformers and qualname == "_default_apply_gate":
        name, params = _default_gate(facts)
    elif from_transformers and qualname in _CUSTOM_GATES:
        name, params = _CUSTOM_GATES[qualname](facts)
    else:
        raise Unsupported(f"custom gate {qualname or gate_fn!r}")
    gate_layout = "gate_first" if facts.is_concatenated else "interleaved"
    return ExpertsPlan(get_activation(name), gate_layout, params)


def plan_for(module) -> ExpertsPlan:
    """Works out how `module` (a transformers `*Experts` module) maps onto the fast path; raises `Unsupported` otherwise."""
    return _plan(_Facts(*_module_facts(module)))


_warned_classes: set = set()
# (facts, the class's gate function) -> result of _plan_constants: the introspection costs ~10 us, a dict lookup far less
_plans: dict = {}


@torch.compiler.assume_constant_result
def _plan_constants(facts: tuple) -> tuple:
    """`plan_for` on `_module_facts(module)`, as plain constants `(activation name, gate layout, params)`, or
    `(None, reason, None)` when unsupported; warns once per unsupported class.

    Under torch.compile it runs at trace time and its result is folded into the graph: Dynamo cannot trace the introspection
    (qualified names of methods, class lookups) itself, and the answer depends only on module constants.
    """
    view = _Facts(*facts)
    key = (facts, getattr(view.cls, "_apply_gate", None))  # the class's gate as it is now: patched later, planned anew
    known = _plans.get(key)
    if known is not None:
        return known
    try:
        plan = _plan(view)
        result = (plan.activation.name, plan.gate_layout, plan.params)
    except Unsupported as e:
        if view.cls not in _warned_classes:
            _warned_classes.add(view.cls)
            warnings.warn(f"simple_moe: {view.cls.__name__} is not supported on the fast path ({e}); using transformers' "
                          "grouped_mm for it", stacklevel=2)
        result = (None, str(e), None)
    _plans[key] = result
    return result


# ---------------------------------------------------------------------------------------------------------------------------------
# The registered function


def _fallback(module, hidden_states, top_k_index, top_k_weights):
    from transformers.integrations.moe import grouped_mm_experts_forward

    return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)


def _activation_params(module, activation: Activation, params: tuple | None, num_experts: int, device) -> torch.Tensor | None:
    """The `[E, 3]` float32 parameter tensor of a parameterised gate, built once per module and device (module constants only)."""
    if params is None:
        return None
    key = (str(device), num_experts, activation.name, params)
    if torch.compiler.is_compiling():  # no attribute writes while tracing; the fill kernels fold into the graph
        cached = None
    else:
        cached = module.__dict__.get("_simple_moe_act_params")
        if cached is not None and cached[0] == key:
            return cached[1]
    columns = [torch.full((num_experts,), p, dtype=torch.float32, device=device) for p in params]
    tensor = build_activation_params(activation, num_experts, device, *columns)
    if not torch.compiler.is_compiling():
        module.__dict__["_simple_moe_act_params"] = (key, tensor)
    return tensor


def _as_out_in(weight: torch.Tensor, is_transposed: bool) -> torch.Tensor:
    # Our kernels take [E, out, in]; transposed storage [E, in, out] becomes a strided view of the same memory.
    return weight.transpose(1, 2) if is_transposed else weight


def _check_routing(num_tokens: int, top_k_index, top_k_weights) -> None:
    """`top_k_index` and `top_k_weights`: tensors of one shape `[..., k]` with a row per token, checked before they are viewed
    as `[T, k]` (a reshape alone would take `[k, T]` weights, pairing each id with another slot's weight)."""
    for name, value in (("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(value).__name__}")
    if top_k_index.dim() < 1 or top_k_weights.shape != top_k_index.shape or top_k_index.shape[:-1].numel() != num_tokens:
        raise ValueError(f"top_k_index, top_k_weights: expected one shape [T, k] with T = {num_tokens} (the tokens of "
                         f"hidden_states), got {tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}")


def experts_forward(module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """`ExpertsInterface` entry: `(module, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`."""
    name, gate_layout, params = _plan_constants(_module_facts(module))
    if name is None:
        return _fallback(module, hidden_states, top_k_index, top_k_weights)
    activation = get_activation(name)
    fc1 = _as_out_in(module.gate_up_proj if module.has_gate else module.up_proj, module.is_transposed)
    fc2 = _as_out_in(module.down_proj, module.is_transposed)
    fc1_bias, fc2_bias = _biases(module)
    num_experts = fc2.shape[0]
    if hidden_states.dim() < 1 or hidden_states.shape[-1] != fc2.shape[1]:
        raise ValueError(f"hidden_states: expected [..., H] with H = {fc2.shape[1]} (the module's down_proj), got "
                         f"{tuple(hidden_states.shape)}")
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    if x.dtype != fc1.dtype:
        x = x.to(fc1.dtype)
    _check_routing(x.shape[0], top_k_index, top_k_weights)
    top_k = top_k_index.shape[-1]
    out = checked_moe_forward(
        x,
        top_k_index.reshape(x.shape[0], top_k),
        top_k_weights.reshape(x.shape[0], top_k).float(),
        fc1,
        fc2,
        activation,
        gate_layout=gate_layout,
        fc1_expert_biases=fc1_bias,
        fc2_expert_biases=fc2_bias,
        activation_params=_activation_params(module, activation, params, num_experts, x.device),
        # Ids are local; expert-parallel sentinels (ids >= E) are dropped by the routing maps. With EP a rank may hold fewer
        # experts than top_k, so the top_k <= experts sanity check must not count only the local ones.
        total_experts=max(num_experts, top_k),
        start_expert=0,
    )
    return out.to(hidden_states.dtype).view(hidden_states.shape)
