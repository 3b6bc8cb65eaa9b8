"""`simple_moe.FusedMoE`: the nn.Module front door (router + experts through the custom op)."""
import os
import subprocess
import sys

import pytest
import torch

from simple_moe import FusedMoE, reference_moe, route

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def reference_forward(layer: FusedMoE, x: torch.Tensor) -> torch.Tensor:
    """float64 reference of the layer on the same routing decision."""
    flat = x.reshape(-1, layer.hidden_size)
    scales, ids = route(layer.router(flat), layer.top_k, renormalize=layer.renormalize, scoring=layer.scoring)
    ref = reference_moe(flat, ids, scales, layer.w1, layer.w2, layer.activation.name, fc1_expert_biases=layer.b1,
                        fc2_expert_biases=layer.b2, activation_params=layer.activation_params)
    return ref.view(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", [
    dict(activation="swiglu"),
    dict(activation="geglu", bias=True, renormalize=False),
    dict(activation="gelu", scoring="sigmoid"),
    dict(activation="swiglu_bias", bias=True),
])
def test_matches_reference(dtype, config):
    torch.manual_seed(0)
    layer = FusedMoE(32, 16, 6, 2, dtype=dtype, device=DEVICE, **config).eval()
    x = torch.randn(2, 5, 32, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        out = layer(x)
        ref = reference_forward(layer, x)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOLERANCE[dtype]


def test_parameters_and_init():
    layer = FusedMoE(32, 16, 4, 2, bias=True)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"router.weight": (4, 32), "w1": (4, 32, 32), "w2": (4, 32, 16), "b1": (4, 32), "b2": (4, 32)}
    assert layer.activation_params is None  # swiglu takes no parameters
    assert layer.w1.abs().max() <= 32**-0.5 and layer.w2.abs().max() <= 16**-0.5 and layer.w1.std() > 0
    non_gated = FusedMoE(32, 16, 4, 2, activation="relu2")
    assert tuple(non_gated.w1.shape) == (4, 16, 32)
    with_params = FusedMoE(32, 16, 4, 2, activation="swiglu_bias")
    assert with_params.activation_params.shape == (4, 3) and "activation_params" in with_params.state_dict()


@pytest.mark.parametrize("activation", ["swiglu_bias", "situ"])
def test_dtype_cast_keeps_activation_params_float32(activation):
    """`.half()` casts the weights, not the per-expert activation parameters (the kernels read float32; fp16 would round
    alpha 1.702 to 1.7021484): the cast layer runs and matches the reference with the parameters as set."""
    torch.manual_seed(3)
    layer = FusedMoE(32, 16, 4, 2, activation=activation, device=DEVICE).eval()
    layer.activation_params[:, 0] = torch.tensor([1.702, 2.5, 3.3, 4.1])
    params = layer.activation_params.clone()
    layer = layer.half()
    assert layer.w1.dtype == torch.float16 and layer.activation_params.dtype == torch.float32
    assert torch.equal(layer.activation_params, params) and torch.equal(layer.float().half().activation_params, params)
    x = torch.randn(6, 32, dtype=torch.float16, device=DEVICE)
    with torch.no_grad():
        assert rel_err(layer(x), reference_forward(layer, x)) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("activation", ["swiglu_bias", "swiglu_step", "situ"])
def test_deferred_init_fills_activation_params(activation):
    """Made on "meta", materialised with to_empty, initialised by reset_parameters: the activation parameters are the
    defaults again, not whatever to_empty's memory held."""
    torch.manual_seed(4)
    layer = FusedMoE(32, 16, 4, 2, activation=activation, device="meta").to_empty(device=DEVICE)
    layer.activation_params.fill_(float("nan"))  # what uninitialised memory may hold
    layer.reset_parameters()
    assert torch.equal(layer.activation_params, FusedMoE(32, 16, 4, 2, activation=activation).activation_params.to(DEVICE))
    x = torch.randn(6, 32, device=DEVICE)
    with torch.no_grad():
        assert rel_err(layer(x), reference_forward(layer, x)) < TOLERANCE[torch.float32]


def test_from_weights_shares_storage():
    torch.manual_seed(1)
    router = torch.randn(4, 32, device=DEVICE)
    w1 = torch.randn(4, 32, 32, device=DEVICE) / 32**0.5
    w2 = torch.randn(4, 32, 16, device=DEVICE) / 16**0.5
    b1, b2 = torch.randn(4, 32, device=DEVICE), torch.randn(4, 32, device=DEVICE)
    layer = FusedMoE.from_weights(router, w1, w2, 2, b1=b1, b2=b2)
    assert layer.w1.data_ptr() == w1.data_ptr() and layer.router.weight.data_ptr() == router.data_ptr()
    assert not layer.w1.requires_grad
    x = torch.randn(7, 32, device=DEVICE)
    with torch.no_grad():
        assert rel_err(layer(x), reference_forward(layer, x)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("call,exc,name", [
    (lambda: FusedMoE(32, 16, 4, 5), ValueError, "top_k"),
    (lambda: FusedMoE(32, 0, 4, 2), ValueError, "intermediate_size"),
    (lambda: FusedMoE(32, 16, 4, 2, scoring="tanh"), ValueError, "scoring"),
    (lambda: FusedMoE(32, 16, 4, 2, activation="swish"), ValueError, "activation"),
    (lambda: FusedMoE(32, 16, 4, 2)(torch.randn(3, 31)), ValueError, "x"),
    (lambda: FusedMoE(32, 16, 4, 2)(torch.randn(3, 32, dtype=torch.float16)), TypeError, "^x: expected torch.float32"),
    (lambda: FusedMoE(32, 16, 4, 2)(torch.randn(3, 32, device="meta")), TypeError, "^x: expected .* got torch.float32 on meta"),
    (lambda: FusedMoE.from_weights(torch.randn(4, 32), torch.randn(4, 30, 32), torch.randn(4, 32, 16), 2), ValueError, "w1"),
    (lambda: FusedMoE.from_weights(torch.randn(5, 32), torch.randn(4, 32, 32), torch.randn(4, 32, 16), 2), ValueError,
     "router_weight"),
    (lambda: FusedMoE.from_weights(torch.randn(4, 32), torch.randn(4, 32, 32), torch.randn(4, 32, 16), 2, b1=torch.randn(4, 32)),
     ValueError, "b1"),
    # biases and parameters checked where they are given, not at the first forward under the op's argument names
    (lambda: FusedMoE.from_weights(torch.randn(4, 32), torch.randn(4, 32, 32), torch.randn(4, 32, 16), 2, b1=[0.0],
                                   b2=torch.randn(4, 32)), TypeError, "^b1: expected a torch.Tensor"),
    (lambda: FusedMoE.from_weights(torch.randn(4, 32), torch.randn(4, 32, 32), torch.randn(4, 32, 16), 2, b1=torch.randn(4, 16),
                                   b2=torch.randn(4, 32)), ValueError, "^b1: expected shape"),
    (lambda: FusedMoE.from_weights(torch.randn(4, 32), torch.randn(4, 32, 32), torch.randn(4, 32, 16), 2, b1=torch.randn(4, 32),
                                   b2=torch.randn(4, 32, dtype=torch.float16)), TypeError, "^b2: expected dtype"),
    (lambda: FusedMoE.from_weights(torch.randn(4, 32), torch.randn(4, 32, 32), torch.randn(4, 32, 16), 2,
                                   activation="swiglu_bias", activation_params=torch.ones(4, 2)), ValueError, "^activation_params"),
    (lambda: FusedMoE.from_weights(torch.randn(4, 32), torch.randn(4, 32, 32), torch.randn(4, 32, 16), 2,
                                   activation_params=torch.ones(4, 3)), ValueError, "^activation_params"),
    (lambda: FusedMoE.from_weights(torch.randn(4, 32).double(), torch.randn(4, 32, 32).double(), torch.randn(4, 32, 16).double(),
                                   2), TypeError, "^w1: expected dtype"),
    (lambda: FusedMoE(32, 16, 4, 2, dtype=torch.int8), TypeError, "^dtype"),
    (lambda: FusedMoE(32, 16, 4, 2, dtype=torch.float64), TypeError, "^dtype"),
])
def test_bad_arguments_raise(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


def test_torch_compile_fullgraph():
    torch.manual_seed(2)
    layer = FusedMoE(32, 16, 4, 2, bias=True, device=DEVICE).eval()
    x = torch.randn(3, 4, 32, device=DEVICE)
    with torch.no_grad():
        explanation = torch._dynamo.explain(layer)(x)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), layer(x))


def test_forward_with_grad_enabled_works_backward_raises():
    layer = FusedMoE(32, 16, 4, 2, device=DEVICE)
    out = layer(torch.randn(3, 32, device=DEVICE))
    with pytest.raises(RuntimeError, match="autograd"):
        out.sum().backward()


def test_importing_simple_moe_does_not_import_transformers():
    code = ("import sys, simple_moe, simple_moe.ops, simple_moe.module, simple_moe.integrations, "
            "simple_moe.integrations.transformers; assert 'transformers' not in sys.modules, 'transformers was imported'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                                        os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
