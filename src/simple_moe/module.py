"""`FusedMoE`: a drop-in `nn.Module` MoE layer (router + experts) running on the fast path through the custom op."""
from __future__ import annotations

import math

import torch
from torch import nn

from ._host import is_int
from .activations import activation_params as build_activation_params
from .activations import get_activation
from .ops import moe_forward_op
from .pipeline import FLOAT_DTYPES, check_expert_bias, resolve_activation_params
from .routing import route


class FusedMoE(nn.Module):
    """Top-k routed Mixture-of-Experts layer: `forward(x [..., H]) -> [..., H]`.

    Parameters (all stored like `nn.Linear.weight`, `[out, in]`):
    - `router.weight` `[E, H]` (no bias): logits -> `simple_moe.route` (softmax or sigmoid scores, top-k, optional renormalisation).
    - `w1` `[E, 2I, H]` for gated activations, **gate first** (rows `[0, I)` are the gate, `[I, 2I)` the up projection), or
      `[E, I, H]` for non-gated ones; `w2` `[E, H, I]`.
    - `b1` `[E, N1]` and `b2` `[E, H]` when `bias=True` (b2 is scaled by the router weight along with its expert's output).
    - `activation_params` float32 `[E, 3]` buffer, only for activations that take parameters ("swiglu_bias", "swiglu_step",
      "situ"), filled with their defaults; overwrite it in place to set per-expert values.

    Inference only: the custom op has no backward.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        activation="swiglu",
        renormalize: bool = True,
        scoring: str = "softmax",
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                            ("num_experts", num_experts), ("top_k", top_k)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if top_k > num_experts:
            raise ValueError(f"top_k: expected at most num_experts={num_experts}, got {top_k}")
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring: expected 'softmax' or 'sigmoid', got {scoring!r}")
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected None or one of {', '.join(map(str, FLOAT_DTYPES))}, got {dtype}")
        self.activation = get_activation(activation)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = bool(renormalize)
        self.scoring = scoring
        factory = {"dtype": dtype, "device": device}
        n1 = 2 * intermediate_size if self.activation.gated else intermediate_size
        self.router = nn.Linear(hidden_size, num_experts, bias=False, **factory)
        self.w1 = nn.Parameter(torch.empty(num_experts, n1, hidden_size, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        if bias:
            self.b1 = nn.Parameter(torch.empty(num_experts, n1, **factory))
            self.b2 = nn.Parameter(torch.empty(num_experts, hidden_size, **factory))
        else:
            self.register_parameter("b1", None)
            self.register_parameter("b2", None)
        params = build_activation_params(self.activation, num_experts, device)
        self.register_buffer("activation_params", params)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised like an `nn.Linear` of its shape: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
        self.router.reset_parameters()
        with torch.no_grad():
            bound1 = 1.0 / math.sqrt(self.hidden_size)
            bound2 = 1.0 / math.sqrt(self.intermediate_size)
            self.w1.uniform_(-bound1, bound1)
            self.w2.uniform_(-bound2, bound2)
            if self.b1 is not None:
                self.b1.uniform_(-bound1, bound1)
                self.b2.uniform_(-bound2, bound2)
            if self.activation_params is not None:  # the defaults again (a module made on "meta", then to_empty, needs them)
                device = self.activation_params.device
                self.activation_params.copy_(build_activation_params(self.activation, self.num_experts, device))

    def _apply(self, fn, *args, **kwargs):
        """`.half()`, `.to(dtype)` and the like cast the parameters but not `activation_params`: the kernels read it as float32,
        and rounding it (alpha 1.702 -> 1.7021484 in fp16) would change the layer. Device moves apply to it as usual."""
        params = self.activation_params
        super()._apply(fn, *args, **kwargs)
        if params is not None and self.activation_params is not None and self.activation_params.dtype != params.dtype:
            self.activation_params = params.to(self.activation_params.device)
        return self

    @classmethod
    def from_weights(
        cls,
        router_weight: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        top_k: int,
        *,
        activation="swiglu",
        renormalize: bool = True,
        scoring: str = "softmax",
        b1: torch.Tensor | None = None,
        b2: torch.Tensor | None = None,
        activation_params: torch.Tensor | None = None,
    ) -> "FusedMoE":
        """Wraps existing tensors (no copy): `router_weight` `[E, H]`, `w1` `[E, N1, H]` gate first, `w2` `[E, H, I]`, optional
        biases `b1` `[E, N1]`/`b2` `[E, H]` (both or neither) and `activation_params` float32 `[E, 3]`.

        The parameters share storage with the given tensors and do not require grad.
        """
        for name, t, dims in (("router_weight", router_weight, 2), ("w1", w1, 3), ("w2", w2, 3)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dim() != dims:
                raise ValueError(f"{name}: expected a {dims}-D tensor, got shape {tuple(t.shape)}")
        if (b1 is None) != (b2 is None):
            raise ValueError("b1: give both b1 and b2, or neither")
        num_experts, hidden_size, intermediate_size = w2.shape
        if tuple(router_weight.shape) != (num_experts, hidden_size):
            raise ValueError(f"router_weight: expected shape ({num_experts}, {hidden_size}) from w2, got "
                             f"{tuple(router_weight.shape)}")
        if router_weight.dtype != w1.dtype or w2.dtype != w1.dtype:
            raise TypeError(f"router_weight: router_weight, w1 and w2 must share one dtype, got "
                            f"{router_weight.dtype}, {w1.dtype}, {w2.dtype}")
        if w1.dtype not in FLOAT_DTYPES:
            raise TypeError(f"w1: expected dtype {' or '.join(map(str, FLOAT_DTYPES))}, got {w1.dtype}")
        # Build on the meta device (no allocation, no init), then point the parameters at the caller's tensors.
        layer = cls(hidden_size, intermediate_size, num_experts, top_k, activation, renormalize, scoring,
                    bias=b1 is not None, dtype=w1.dtype, device="meta")
        expected_w1 = tuple(layer.w1.shape)
        if tuple(w1.shape) != expected_w1:
            raise ValueError(f"w1: expected shape {expected_w1} for activation {layer.activation.name!r}, got {tuple(w1.shape)}")
        # The biases and parameters checked here, where the caller named them, rather than at the first forward.
        check_expert_bias("b1", b1, num_experts, expected_w1[1], w1.dtype, w1.device)
        check_expert_bias("b2", b2, num_experts, hidden_size, w1.dtype, w1.device)
        if activation_params is not None:
            resolve_activation_params(layer.activation, activation_params, num_experts, w1.device)
        layer.router.weight = nn.Parameter(router_weight, requires_grad=False)
        layer.w1 = nn.Parameter(w1, requires_grad=False)
        layer.w2 = nn.Parameter(w2, requires_grad=False)
        if b1 is not None:
            layer.b1 = nn.Parameter(b1, requires_grad=False)
            layer.b2 = nn.Parameter(b2, requires_grad=False)
        if activation_params is None:
            activation_params = build_activation_params(layer.activation, num_experts, w1.device)
        layer.activation_params = activation_params  # registered buffer: None stays None
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected shape [..., {self.hidden_size}], got {tuple(x.shape)}")
        if x.dtype != self.w1.dtype or x.device != self.w1.device:  # the router and the experts would fail further in
            raise TypeError(f"x: expected {self.w1.dtype} on {self.w1.device} (the layer's parameters), got {x.dtype} on "
                            f"{x.device}; move the input or the module (.to)")
        flat = x.reshape(-1, self.hidden_size)
        router_logits = self.router(flat)
        scales, experts = route(router_logits, self.top_k, renormalize=self.renormalize, scoring=self.scoring)
        out = moe_forward_op(flat, experts, scales, self.w1, self.w2, self.activation, fc1_expert_biases=self.b1,
                             fc2_expert_biases=self.b2, activation_params=self.activation_params)
        return out.view(x.shape)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, activation={self.activation.name!r}, scoring={self.scoring!r}, "
                f"renormalize={self.renormalize}, bias={self.b1 is not None}")
