"""The one activation table: every activation the library knows, as a Triton epilogue and as a float64 torch reference.

Numbering follows FlashInfer's `ActivationType` (an IntEnum) so that `cutlass_fused_moe` callers can pass theirs unchanged.
Gated activations read two halves of GEMM1's output, `gate` and `up`; which half of `fc1` is the gate is a property of the
front door (gate-first for `fused_moe_simple`, up-first for `cutlass_fused_moe`), never of the activation.

Three activations take per-expert float32 parameters, passed to the kernels as one `[E, 3]` tensor (`activation_params`):
- SwigluBias: (alpha, beta, limit), defaults (1, 0, +inf)
- SwigluStep: (unused, unused, limit), default limit 7
- Situ:       (situ_beta, situ_linear_beta, unused), defaults (4, 25)
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl


class ActivationType(enum.IntEnum):
    Gelu = 0
    Relu = 1
    Silu = 2
    Swiglu = 3
    Geglu = 4
    SwigluBias = 5
    Relu2 = 6
    SwigluStep = 7
    GegluTanh = 8
    Identity = 9
    Situ = 10
    InvalidType = 11


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _silu(x):
    return x * torch.sigmoid(x)


def _swiglu_bias(gate, up, p):
    alpha, beta, limit = p[0], p[1], p[2]
    g = torch.clamp(gate, max=limit)
    u = torch.clamp(up, min=-limit, max=limit)
    return g * torch.sigmoid(alpha * g) * (u + beta)


def _swiglu_step(gate, up, p):
    limit = p[2]
    return torch.clamp(_silu(gate), max=limit) * torch.clamp(up, min=-limit, max=limit)


def _situ(gate, up, p):
    b, lb = p[0], p[1]
    return (b * torch.tanh(gate / b) * torch.sigmoid(gate)) * (lb * torch.tanh(up / lb))


@dataclass(frozen=True)
class Activation:
    kind: ActivationType
    name: str  # the string users pass to fused_moe_simple
    gated: bool  # reads (gate, up) halves: fc1 has 2*I rows
    default_params: tuple  # per-expert (p0, p1, p2) when the caller gives none
    reference: Callable  # float64 torch: reference(gate, up, params[E-row]) -> tensor; up is None when not gated

    @property
    def takes_params(self) -> bool:
        """Whether the epilogue reads per-expert parameters (swiglu_bias, swiglu_step, situ)."""
        return self.default_params != _NO_PARAMS


_NO_PARAMS = (0.0, 0.0, 0.0)
ACTIVATIONS: dict[ActivationType, Activation] = {
    a.kind: a
    for a in [
        Activation(ActivationType.Gelu, "gelu", False, _NO_PARAMS, lambda g, u, p: _gelu(g)),
        Activation(ActivationType.Relu, "relu", False, _NO_PARAMS, lambda g, u, p: torch.relu(g)),
        Activation(ActivationType.Silu, "silu", False, _NO_PARAMS, lambda g, u, p: _silu(g)),
        Activation(ActivationType.Swiglu, "swiglu", True, _NO_PARAMS, lambda g, u, p: _silu(g) * u),
        Activation(ActivationType.Geglu, "geglu", True, _NO_PARAMS, lambda g, u, p: _gelu(g) * u),
        Activation(ActivationType.SwigluBias, "swiglu_bias", True, (1.0, 0.0, math.inf), _swiglu_bias),
        Activation(ActivationType.Relu2, "relu2", False, _NO_PARAMS, lambda g, u, p: torch.relu(g) ** 2),
        Activation(ActivationType.SwigluStep, "swiglu_step", True, (0.0, 0.0, 7.0), _swiglu_step),
        Activation(ActivationType.GegluTanh, "geglu_tanh", True, _NO_PARAMS, lambda g, u, p: _gelu_tanh(g) * u),
        Activation(ActivationType.Identity, "identity", False, _NO_PARAMS, lambda g, u, p: g),
        Activation(ActivationType.Situ, "situ", True, (4.0, 25.0, 0.0), _situ),
    ]
}
_BY_NAME = {a.name: a for a in ACTIVATIONS.values()}


def get_activation(activation) -> Activation:
    """Accepts an `ActivationType`, its integer value, a name ("swiglu", "Swiglu", "swiglu_bias", ...) or an `Activation`."""
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        key = activation.strip().lower()
        if key in _BY_NAME:
            return _BY_NAME[key]
        for kind in ACTIVATIONS:  # FlashInfer's enum member names, case-insensitive
            if kind.name.lower() == key:
                return ACTIVATIONS[kind]
        raise ValueError(f"activation: unknown activation {activation!r}; expected one of {sorted(_BY_NAME)}")
    if isinstance(activation, (int, ActivationType)) and not isinstance(activation, bool):
        try:
            return ACTIVATIONS[ActivationType(int(activation))]
        except (ValueError, KeyError):
            pass
        raise ValueError(f"activation: unsupported activation type {activation!r}; expected one of {[k.name for k in ACTIVATIONS]}")
    raise TypeError(f"activation: expected a str or ActivationType, got {type(activation).__name__}")


def activation_params(activation: Activation, num_experts: int, device, p0=None, p1=None, p2=None):
    """Builds the `[E, 3]` float32 per-expert parameter tensor, or None when the activation takes no parameters and none are given.

    Each of p0/p1/p2 is None (use the default) or a float32 tensor `[E]`.
    """
    given = [p0, p1, p2]
    if all(p is None for p in given) and not activation.takes_params:
        return None
    params = torch.empty(num_experts, 3, dtype=torch.float32, device=device)
    for j, (p, default) in enumerate(zip(given, activation.default_params)):
        if p is None:
            params[:, j] = default
        else:
            params[:, j] = p.to(device=device, dtype=torch.float32)
    return params


# ---------------------------------------------------------------------------------------------------------------------------------
# Triton side: applied to the fp32 accumulator in GEMM1's epilogue. `p0, p1, p2` are the expert's parameters (scalars).


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 2*sigmoid(2x) - 1, stable for large |x| (exp(-2x) overflows to inf -> sigmoid 0 -> -1), but the subtraction
    # leaves an absolute error of ~6e-8, all of tanh(x) below |x| ~ 1e-7: situ multiplies by tanh(gate/4) and tanh(up/25).
    # Below |x| = 0.3 the odd Taylor series to x^11 instead (truncation 0.0036 x^13: relative 2e-9 at 0.3), whose relative
    # error is a few ulps; above it the formula's is under 2e-7. (libdevice's tanh does not run in Triton's interpreter.)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0
                                                                                      + x2 * (-1382.0 / 155925.0))))))
    return tl.where(tl.abs(x) < 0.3, series, 2.0 * _sigmoid(2.0 * x) - 1.0)


@triton.jit
def _gelu_erf(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_tanh_approx(x):
    return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


@triton.jit
def load_activation_params(act_params_ptr, expert, HAS_ACT_PARAMS: tl.constexpr):
    """The expert's (p0, p1, p2) from the float32 `[E, 3]` table, or zeros when the call passes none."""
    if HAS_ACT_PARAMS:
        p0 = tl.load(act_params_ptr + expert * 3 + 0)
        p1 = tl.load(act_params_ptr + expert * 3 + 1)
        p2 = tl.load(act_params_ptr + expert * 3 + 2)
    else:
        p0 = 0.0
        p1 = 0.0
        p2 = 0.0
    return p0, p1, p2


@triton.jit
def apply_activation(gate, up, p0, p1, p2, ACTIVATION: tl.constexpr):
    """act(gate, up) in fp32. For non-gated activations `up` is ignored and `gate` is the GEMM1 output."""
    if ACTIVATION == 0:  # Gelu
        out = _gelu_erf(gate)
    elif ACTIVATION == 1:  # Relu
        out = tl.maximum(gate, 0.0)
    elif ACTIVATION == 2:  # Silu
        out = gate * _sigmoid(gate)
    elif ACTIVATION == 3:  # Swiglu
        out = gate * _sigmoid(gate) * up
    elif ACTIVATION == 4:  # Geglu
        out = _gelu_erf(gate) * up
    elif ACTIVATION == 5:  # SwigluBias: alpha=p0, beta=p1, limit=p2
        g = tl.minimum(gate, p2)
        u = tl.minimum(tl.maximum(up, -p2), p2)
        out = g * _sigmoid(p0 * g) * (u + p1)
    elif ACTIVATION == 6:  # Relu2
        r = tl.maximum(gate, 0.0)
        out = r * r
    elif ACTIVATION == 7:  # SwigluStep: limit=p2
        s = tl.minimum(gate * _sigmoid(gate), p2)
        out = s * tl.minimum(tl.maximum(up, -p2), p2)
    elif ACTIVATION == 8:  # GegluTanh
        out = _gelu_tanh_approx(gate) * up
    elif ACTIVATION == 9:  # Identity
        out = gate
    else:  # 10, Situ: situ_beta=p0, situ_linear_beta=p1
        out = (p0 * _tanh(gate / p0) * _sigmoid(gate)) * (p1 * _tanh(up / p1))
    return out


# ---------------------------------------------------------------------------------------------------------------------------------
# torch side: the same table applied to a whole GEMM1 output, for the reference, the callbacks and the CPU fallback.


# Where the gate half of a gated fc1 sits: rows [0, I) (seed, vLLM, Hugging Face), rows [I, 2I) (FlashInfer, TensorRT-LLM), or
# every other row starting at 0 (GPT-OSS). The kernels take it as a parameter; no weight is reordered.
GATE_LAYOUTS = ("gate_first", "up_first", "interleaved")


def split_gate_up(h: torch.Tensor, gate_layout: str = "gate_first"):
    """Splits a gated GEMM1 output `[..., 2I]` into (gate, up) by the fc1 layout."""
    if gate_layout == "gate_first":
        return h.chunk(2, dim=-1)
    if gate_layout == "up_first":
        up, gate = h.chunk(2, dim=-1)
        return gate, up
    if gate_layout == "interleaved":
        return h[..., 0::2], h[..., 1::2]
    raise ValueError(f"gate_layout: expected one of {GATE_LAYOUTS}, got {gate_layout!r}")


def activation_torch(h: torch.Tensor, activation: Activation, params=None, gate_layout: str = "gate_first") -> torch.Tensor:
    """act(GEMM1 output) in h's dtype. `params` is None or broadcastable per-row parameters `(p0, p1, p2)` (each a tensor or float)."""
    if params is None:
        params = activation.default_params
    if activation.gated:
        gate, up = split_gate_up(h, gate_layout)
        return activation.reference(gate, up, params)
    return activation.reference(h, None, params)
