"""Bad input to `fused_moe_simple` raises ValueError/TypeError whose message names the offending argument.

Every case starts from one valid call (`valid_arguments`) and breaks one thing. A second device is simulated with 'meta' tensors.
Validation runs before any kernel, so these tests are cheap even in the interpreter.
"""
from __future__ import annotations

import pytest
import torch

import _triton_interpreter  # noqa: F401
from simple_moe import fused_moe_simple, reference_moe

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T, H, I, E, TOP_K = 4, 16, 8, 4, 2


def valid_arguments(activation="swiglu", dtype=torch.float32):
    torch.manual_seed(0)
    gated = activation in ("swiglu", "geglu", "swiglu_bias", "swiglu_step", "geglu_tanh", "situ")
    n1 = 2 * I if gated else I
    return dict(
        input=torch.randn(T, H, dtype=dtype, device=DEVICE),
        token_selected_experts=torch.stack([torch.randperm(E)[:TOP_K] for _ in range(T)]).int().to(DEVICE),
        token_final_scales=torch.rand(T, TOP_K, device=DEVICE),
        fc1_expert_weights=torch.randn(E, n1, H, dtype=dtype, device=DEVICE),
        fc2_expert_weights=torch.randn(E, H, I, dtype=dtype, device=DEVICE),
        activation=activation,
    )


def strided_both(shape, dtype=torch.float32):
    """A tensor of `shape` whose last two dimensions both have stride 2 (neither contiguous)."""
    *lead, rows, cols = shape
    return torch.randn(*lead, 2 * rows, 2 * cols, dtype=dtype, device=DEVICE)[..., ::2, ::2]


meta = dict(device="meta")
f16 = dict(dtype=torch.float16, device=DEVICE)
f32 = dict(dtype=torch.float32, device=DEVICE)

# (case id, what the message must start with (the argument's name), exception type, changes to the valid arguments)
CASES = [
    # input
    ("input-1d", "input", ValueError, dict(input=torch.randn(H, **f32))),
    ("input-3d", "input", ValueError, dict(input=torch.randn(1, T, H, **f32))),
    ("input-int", "input", TypeError, dict(input=torch.ones(T, H, dtype=torch.int32, device=DEVICE))),
    ("input-float64", "input", TypeError, dict(input=torch.randn(T, H, dtype=torch.float64, device=DEVICE))),
    ("input-list", "input", TypeError, dict(input=[[0.0] * H] * T)),
    ("input-none", "input", TypeError, dict(input=None)),
    # token_selected_experts
    ("ids-1d", "token_selected_experts", ValueError, dict(token_selected_experts=torch.zeros(T, dtype=torch.int32, device=DEVICE))),
    ("ids-3d", "token_selected_experts", ValueError,
     dict(token_selected_experts=torch.zeros(T, TOP_K, 1, dtype=torch.int32, device=DEVICE))),
    ("ids-rows", "token_selected_experts", ValueError,
     dict(token_selected_experts=torch.zeros(T + 1, TOP_K, dtype=torch.int32, device=DEVICE))),
    ("ids-no-columns", "token_selected_experts", ValueError,
     dict(token_selected_experts=torch.zeros(T, 0, dtype=torch.int32, device=DEVICE), token_final_scales=None)),
    ("ids-float", "token_selected_experts", TypeError, dict(token_selected_experts=torch.zeros(T, TOP_K, **f32))),
    ("ids-int16", "token_selected_experts", TypeError,
     dict(token_selected_experts=torch.zeros(T, TOP_K, dtype=torch.int16, device=DEVICE))),
    ("ids-meta", "token_selected_experts", ValueError, dict(token_selected_experts=torch.zeros(T, TOP_K, dtype=torch.int32, **meta))),
    ("top_k-exceeds-E", "token_selected_experts: top_k", ValueError,
     dict(token_selected_experts=torch.zeros(T, E + 1, dtype=torch.int32, device=DEVICE), token_final_scales=None)),
    # token_final_scales
    ("scales-shape", "token_final_scales", ValueError, dict(token_final_scales=torch.rand(T, TOP_K + 1, **f32))),
    ("scales-1d", "token_final_scales", ValueError, dict(token_final_scales=torch.rand(T * TOP_K, **f32))),
    ("scales-int", "token_final_scales", TypeError, dict(token_final_scales=torch.ones(T, TOP_K, dtype=torch.int32, device=DEVICE))),
    ("scales-meta", "token_final_scales", ValueError, dict(token_final_scales=torch.rand(T, TOP_K, dtype=torch.float32, **meta))),
    # fc1_expert_weights
    ("fc1-2d", "fc1_expert_weights", ValueError, dict(fc1_expert_weights=torch.randn(2 * I, H, **f32))),
    ("fc1-4d", "fc1_expert_weights", ValueError, dict(fc1_expert_weights=torch.randn(1, E, 2 * I, H, **f32))),
    ("fc1-dtype", "fc1_expert_weights", TypeError, dict(fc1_expert_weights=torch.randn(E, 2 * I, H, **f16))),
    ("fc1-meta", "fc1_expert_weights", ValueError, dict(fc1_expert_weights=torch.randn(E, 2 * I, H, dtype=torch.float32, **meta))),
    ("fc1-hidden", "fc1_expert_weights", ValueError, dict(fc1_expert_weights=torch.randn(E, 2 * I, H + 1, **f32))),
    ("fc1-not-2I-gated", "fc1_expert_weights", ValueError, dict(fc1_expert_weights=torch.randn(E, 2 * I + 2, H, **f32))),
    ("fc1-I-gated", "fc1_expert_weights", ValueError, dict(fc1_expert_weights=torch.randn(E, I, H, **f32))),
    ("fc1-2I-not-gated", "fc1_expert_weights", ValueError, dict(fc1_expert_weights=torch.randn(E, 2 * I, H, **f32), activation="relu")),
    ("fc1-strided", "fc1_expert_weights", ValueError, dict(fc1_expert_weights=strided_both((E, 2 * I, H)))),
    ("fc1-no-experts", "fc1_expert_weights", ValueError,
     dict(fc1_expert_weights=torch.randn(0, 2 * I, H, **f32), fc2_expert_weights=torch.randn(0, H, I, **f32))),
    ("fc1-none", "fc1_expert_weights", TypeError, dict(fc1_expert_weights=None)),
    # fc2_expert_weights
    ("fc2-2d", "fc2_expert_weights", ValueError, dict(fc2_expert_weights=torch.randn(H, I, **f32))),
    ("fc2-dtype", "fc2_expert_weights", TypeError, dict(fc2_expert_weights=torch.randn(E, H, I, **f16))),
    ("fc2-meta", "fc2_expert_weights", ValueError, dict(fc2_expert_weights=torch.randn(E, H, I, dtype=torch.float32, **meta))),
    ("fc2-experts", "fc2_expert_weights", ValueError, dict(fc2_expert_weights=torch.randn(E - 1, H, I, **f32))),
    ("fc2-hidden", "fc2_expert_weights", ValueError, dict(fc2_expert_weights=torch.randn(E, H + 2, I, **f32))),
    ("fc2-strided", "fc2_expert_weights", ValueError, dict(fc2_expert_weights=strided_both((E, H, I)))),
    ("fc2-list", "fc2_expert_weights", TypeError, dict(fc2_expert_weights=[[[0.0]]])),
    ("fc2-no-width", "fc2_expert_weights", ValueError,
     dict(fc1_expert_weights=torch.randn(E, 0, H, **f32), fc2_expert_weights=torch.randn(E, H, 0, **f32))),
    # biases
    ("b1-shape", "fc1_expert_biases", ValueError, dict(fc1_expert_biases=torch.randn(E, I, **f32))),
    ("b1-experts", "fc1_expert_biases", ValueError, dict(fc1_expert_biases=torch.randn(E + 1, 2 * I, **f32))),
    ("b1-1d", "fc1_expert_biases", ValueError, dict(fc1_expert_biases=torch.randn(2 * I, **f32))),
    ("b1-dtype", "fc1_expert_biases", TypeError, dict(fc1_expert_biases=torch.randn(E, 2 * I, **f16))),
    ("b1-meta", "fc1_expert_biases", ValueError, dict(fc1_expert_biases=torch.randn(E, 2 * I, dtype=torch.float32, **meta))),
    ("b2-shape", "fc2_expert_biases", ValueError, dict(fc2_expert_biases=torch.randn(E, I, **f32))),
    ("b2-dtype", "fc2_expert_biases", TypeError, dict(fc2_expert_biases=torch.randn(E, H, dtype=torch.bfloat16, device=DEVICE))),
    ("b2-meta", "fc2_expert_biases", ValueError, dict(fc2_expert_biases=torch.randn(E, H, dtype=torch.float32, **meta))),
    # a transposed view: the GEMM epilogues read a bias row as contiguous, so this must be refused, not misread
    ("b1-transposed", "fc1_expert_biases", ValueError, dict(fc1_expert_biases=torch.randn(2 * I, E, **f32).t())),
    ("b2-transposed", "fc2_expert_biases", ValueError, dict(fc2_expert_biases=torch.randn(H, E, **f32).t())),
    # output
    ("output-shape", "output", ValueError, dict(output=torch.empty(T, H + 1, **f32))),
    ("output-rows", "output", ValueError, dict(output=torch.empty(T + 1, H, **f32))),
    ("output-1d", "output", ValueError, dict(output=torch.empty(T * H, **f32))),
    ("output-dtype", "output", TypeError, dict(output=torch.empty(T, H, **f16))),
    ("output-meta", "output", ValueError, dict(output=torch.empty(T, H, dtype=torch.float32, **meta))),
    ("output-strided", "output", ValueError, dict(output=torch.empty(H, T, **f32).t())),
    ("output-rows-overlap", "output", ValueError, dict(output=torch.empty(1, H, **f32).expand(T, H))),
    # lazily negated views (`z.conj().imag` gives one): the kernels would read the memory without its sign
    ("input-negated", "input", ValueError, dict(input=torch._neg_view(torch.randn(T, H, **f32)))),
    ("scales-negated", "token_final_scales", ValueError, dict(token_final_scales=torch._neg_view(torch.rand(T, TOP_K, **f32)))),
    ("fc1-negated", "fc1_expert_weights", ValueError, dict(fc1_expert_weights=torch._neg_view(torch.randn(E, 2 * I, H, **f32)))),
    ("fc2-negated", "fc2_expert_weights", ValueError, dict(fc2_expert_weights=torch._neg_view(torch.randn(E, H, I, **f32)))),
    ("b2-negated", "fc2_expert_biases", ValueError, dict(fc2_expert_biases=torch._neg_view(torch.randn(E, H, **f32)))),
    ("output-negated", "output", ValueError, dict(output=torch._neg_view(torch.empty(T, H, **f32)))),
    # activation
    ("activation-unknown-name", "activation", ValueError, dict(activation="swish")),
    ("activation-unknown-int", "activation", ValueError, dict(activation=42)),
    ("activation-invalid-type", "activation", ValueError, dict(activation=11)),
    ("activation-none", "activation", TypeError, dict(activation=None)),
    ("activation-float", "activation", TypeError, dict(activation=3.0)),
    # callbacks
    ("gemm1_fn-not-callable", "gemm1_fn", TypeError, dict(gemm1_fn="torch_loop_gemm")),
    ("gemm2_fn-not-callable", "gemm2_fn", TypeError, dict(gemm2_fn=3)),
    # expert parallelism
    ("ep_rank-too-large", "ep_rank", ValueError, dict(ep_size=2, ep_rank=2)),
    ("ep_rank-negative", "ep_rank", ValueError, dict(ep_rank=-1)),
    ("ep_rank-float", "ep_rank", ValueError, dict(ep_rank=0.0)),
    ("ep_size-zero", "ep_size", ValueError, dict(ep_size=0)),
    ("ep_size-float", "ep_size", ValueError, dict(ep_size=2.0)),
    ("ep_size-bool", "ep_size", ValueError, dict(ep_size=True)),
    ("top_k-exceeds-E-times-ep_size", "token_selected_experts: top_k", ValueError,
     dict(token_selected_experts=torch.zeros(T, 2 * E + 1, dtype=torch.int32, device=DEVICE), token_final_scales=None, ep_size=2)),
    # activation_params
    ("params-shape", "activation_params", ValueError, dict(activation="swiglu_bias", activation_params=torch.ones(E, 2, **f32))),
    ("params-experts", "activation_params", ValueError, dict(activation="swiglu_bias", activation_params=torch.ones(E + 1, 3, **f32))),
    ("params-1d", "activation_params", ValueError, dict(activation="situ", activation_params=torch.ones(3, **f32))),
    ("params-dtype", "activation_params", TypeError, dict(activation="situ", activation_params=torch.ones(E, 3, **f16))),
    ("params-meta", "activation_params", ValueError,
     dict(activation="swiglu_step", activation_params=torch.ones(E, 3, dtype=torch.float32, **meta))),
    ("params-not-read", "activation_params", ValueError, dict(activation="swiglu", activation_params=torch.ones(E, 3, **f32))),
    ("params-with-gemm1_fn", "activation_params", ValueError,
     dict(activation="swiglu_bias", activation_params=torch.ones(E, 3, **f32), gemm1_fn=lambda *a: None)),
    ("params-with-gemm2_fn", "activation_params", ValueError,
     dict(activation="swiglu_bias", activation_params=torch.ones(E, 3, **f32), gemm2_fn=lambda *a: None)),
]


@pytest.mark.parametrize("argument, error, changes", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_the_argument(argument, error, changes):
    arguments = valid_arguments(changes.get("activation", "swiglu"))
    arguments.update(changes)
    with pytest.raises(error, match=f"^{argument}"):
        fused_moe_simple(**arguments)


def test_input_on_another_device_is_named():
    # The first tensor compared with input's device names itself and input's device.
    arguments = valid_arguments()
    arguments["input"] = torch.randn(T, H, dtype=torch.float32, device="meta")
    with pytest.raises(ValueError, match="token_selected_experts.*meta"):
        fused_moe_simple(**arguments)


def test_the_valid_arguments_are_valid():
    # Guards the table above: the unbroken call succeeds (so each case fails for the one reason it changes).
    arguments = valid_arguments()
    out = fused_moe_simple(**arguments, fc1_expert_biases=torch.randn(E, 2 * I, **f32),
                           fc2_expert_biases=torch.randn(E, H, **f32), output=torch.empty(T, H, **f32))
    assert tuple(out.shape) == (T, H)


@pytest.mark.parametrize("stride_dim", [-1, -2])
def test_weights_with_one_contiguous_dim_are_accepted(stride_dim):
    # Only the case where neither of the last two dims is contiguous is rejected; a transposed view is fine.
    arguments = valid_arguments(activation="relu")
    fc1 = arguments["fc1_expert_weights"]
    if stride_dim == -2:  # [E, I, H] with the I dimension contiguous
        arguments["fc1_expert_weights"] = fc1.transpose(1, 2).contiguous().transpose(1, 2)
    else:  # columns of a wider buffer: last dim contiguous, rows strided
        arguments["fc1_expert_weights"] = torch.randn(E, I, 2 * H, **f32)[:, :, :H]
    assert not arguments["fc1_expert_weights"].is_contiguous()
    # Accepted and read right: the grouped path (T=4) and the decode path (T=1) against float64, into poisoned outputs.
    for num_tokens in (T, 1):
        call = {name: value[:num_tokens] if name in ("input", "token_selected_experts", "token_final_scales") else value
                for name, value in arguments.items()}
        out = torch.full((num_tokens, H), float("nan"), **f32)
        fused_moe_simple(**call, output=out)
        ref = reference_moe(**call)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_negated_view_from_conj_imag_is_refused():
    # The public way to get one: the imaginary part of a conjugated complex tensor.
    arguments = valid_arguments()
    x = arguments["input"]
    arguments["input"] = torch.complex(torch.zeros_like(x), -x).conj().imag
    assert arguments["input"].is_neg() and torch.equal(arguments["input"], x)
    with pytest.raises(ValueError, match="^input: a negated view"):
        fused_moe_simple(**arguments)
    arguments["input"] = arguments["input"].resolve_neg()  # what the message asks for
    assert torch.allclose(fused_moe_simple(**arguments).double(), reference_moe(**arguments), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_output", [False, True])
def test_arguments_requiring_grad_give_a_backward_that_raises(with_output):
    # Inference only: the result is right and carries a node whose backward names the front door, instead of looking like
    # a constant (which would leave the weights silently without a gradient).
    arguments = valid_arguments()
    arguments["fc1_expert_weights"].requires_grad_()
    output = torch.full((T, H), float("nan"), **f32) if with_output else None
    out = fused_moe_simple(**arguments, output=output)
    assert out.requires_grad and out.grad_fn is not None and (output is None or out is output)
    assert torch.allclose(out.detach().double(), reference_moe(**arguments), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="fused_moe_simple has no backward"):
        out.sum().backward()
    with torch.no_grad():
        assert fused_moe_simple(**arguments).grad_fn is None


@pytest.mark.parametrize("num_tokens", [1, T])  # the decode path's plan, the grouped path's
@pytest.mark.parametrize("name", ["input", "fc2_expert_weights"])
def test_negated_view_after_a_planned_call_is_still_refused(name, num_tokens):
    # A planned call skips validation for a signature seen before: the negative bit must be part of that signature, or the
    # second call below ran the first one's plan on memory holding the negated values (relative error 2.0).
    arguments = valid_arguments()
    for key in ("input", "token_selected_experts", "token_final_scales"):
        arguments[key] = arguments[key][:num_tokens]
    fused_moe_simple(**arguments)
    value = arguments[name]
    arguments[name] = torch._neg_view(value.neg().clone())
    assert torch.equal(arguments[name], value)
    with pytest.raises(ValueError, match=f"^{name}: a negated view"):
        fused_moe_simple(**arguments)
