"""The `simple_moe::moe_forward` custom op: results, validation, fake implementation, torch.compile and CUDA graphs."""
import pytest
import torch

from simple_moe import reference_moe
from simple_moe.activations import get_activation
from simple_moe.ops import moe_forward_op

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_problem(num_tokens=8, hidden=32, inter=16, num_experts=4, top_k=2, dtype=torch.float32, activation="swiglu",
                 bias=False, seed=0, device=DEVICE):
    """Fresh random inputs scaled so every GEMM output is O(1); weights stored [E, out, in] like nn.Linear."""
    gen = torch.Generator().manual_seed(seed)
    gated = get_activation(activation).gated
    n1 = 2 * inter if gated else inter
    x = torch.randn(num_tokens, hidden, generator=gen)
    fc1 = torch.randn(num_experts, n1, hidden, generator=gen) / hidden**0.5
    fc2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    ids = torch.argsort(torch.rand(num_tokens, num_experts, generator=gen), dim=1)[:, :top_k].int()  # distinct per token
    scales = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    b1 = torch.randn(num_experts, n1, generator=gen) * 0.1 if bias else None
    b2 = torch.randn(num_experts, hidden, generator=gen) * 0.1 if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return dict(input=cast(x), token_selected_experts=ids.to(device), token_final_scales=scales.to(device),
                fc1_expert_weights=cast(fc1), fc2_expert_weights=cast(fc2), fc1_expert_biases=cast(b1),
                fc2_expert_biases=cast(b2))


def call_op(p, activation="swiglu", **kw):
    return moe_forward_op(p["input"], p["token_selected_experts"], p["token_final_scales"], p["fc1_expert_weights"],
                          p["fc2_expert_weights"], activation, fc1_expert_biases=p["fc1_expert_biases"],
                          fc2_expert_biases=p["fc2_expert_biases"], **kw)


def call_reference(p, activation="swiglu", **kw):
    return reference_moe(p["input"], p["token_selected_experts"], p["token_final_scales"], p["fc1_expert_weights"],
                         p["fc2_expert_weights"], activation, fc1_expert_biases=p["fc1_expert_biases"],
                         fc2_expert_biases=p["fc2_expert_biases"], **kw)


# ---------------------------------------------------------------------------------------------------------------------------------
# Results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("geglu", True), ("relu2", False)])
def test_matches_reference(dtype, activation, bias):
    p = make_problem(dtype=dtype, activation=activation, bias=bias)
    out = call_op(p, activation)
    assert out.shape == p["input"].shape and out.dtype == dtype
    assert rel_err(out, call_reference(p, activation)) < TOLERANCE[dtype]


@pytest.mark.parametrize("gate_layout", ["gate_first", "up_first", "interleaved"])
def test_gate_layouts_and_transposed_view(gate_layout):
    """Weights stored [E, in, out] (GPT-OSS style) go in as a transposed view, read in place; any gate layout."""
    p = make_problem(bias=True)
    stored_fc1 = p["fc1_expert_weights"].transpose(1, 2).contiguous()  # [E, H, 2I]
    stored_fc2 = p["fc2_expert_weights"].transpose(1, 2).contiguous()  # [E, I, H]
    p["fc1_expert_weights"] = stored_fc1.transpose(1, 2)
    p["fc2_expert_weights"] = stored_fc2.transpose(1, 2)
    assert not p["fc1_expert_weights"].is_contiguous()
    out = call_op(p, gate_layout=gate_layout)
    assert rel_err(out, call_reference(p, gate_layout=gate_layout)) < TOLERANCE[torch.float32]


def test_activation_params_gpt_oss_gate():
    """SwigluBias with GPT-OSS's (alpha, beta, limit) = (1.702, 1, 7), per-expert parameters, interleaved gate/up."""
    p = make_problem(num_experts=4, bias=True)
    p["fc1_expert_weights"] = p["fc1_expert_weights"] * 6  # push gate/up past the clamp limit for some elements
    params = torch.tensor([[1.702, 1.0, 7.0]] * 3 + [[1.0, 0.5, 2.0]], dtype=torch.float32, device=DEVICE)
    out = call_op(p, "swiglu_bias", gate_layout="interleaved", activation_params=params)
    ref = call_reference(p, "swiglu_bias", gate_layout="interleaved", activation_params=params)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_expert_parallel_drops_other_ranks_and_no_scales():
    p = make_problem(num_experts=4, top_k=3)
    p["token_selected_experts"] = torch.randint(0, 8, p["token_selected_experts"].shape, device=DEVICE, dtype=torch.int64)
    p["token_final_scales"] = None
    out = call_op(p, ep_size=2, ep_rank=1)
    ref = call_reference(p, ep_size=2, ep_rank=1)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_zero_tokens():
    p = make_problem(num_tokens=0)
    out = call_op(p)
    assert out.shape == (0, 32)


# ---------------------------------------------------------------------------------------------------------------------------------
# Validation happens before the op, with the argument's name


@pytest.mark.parametrize("change,exc,name", [
    (dict(gate_layout="gate_last"), ValueError, "gate_layout"),
    (dict(activation_params=torch.ones(3, 3), activation="swiglu_bias"), ValueError, "activation_params"),
    (dict(activation_params=torch.ones(4, 3, dtype=torch.float64), activation="swiglu_bias"), TypeError, "activation_params"),
    (dict(activation_params=torch.ones(4, 3)), ValueError, "activation_params: activation 'swiglu' takes no parameters"),
    (dict(ep_rank=2, ep_size=2), ValueError, "ep_rank"),
    (dict(activation="swishy"), ValueError, "activation"),
])
def test_bad_arguments_raise(change, exc, name):
    p = make_problem()
    activation = change.pop("activation", "swiglu")
    if "activation_params" in change:
        change["activation_params"] = change["activation_params"].to(DEVICE)
    with pytest.raises(exc, match=name):
        call_op(p, activation, **change)


def test_bad_tensors_raise():
    p = make_problem()
    p["fc1_expert_weights"] = p["fc1_expert_weights"][:, :20]  # N1 != 2*I
    with pytest.raises(ValueError, match="fc1_expert_weights"):
        call_op(p)
    p = make_problem()
    p["token_selected_experts"] = p["token_selected_experts"].float()
    with pytest.raises(TypeError, match="token_selected_experts"):
        call_op(p)


# ---------------------------------------------------------------------------------------------------------------------------------
# The op itself: schema, fake implementation, torch.compile


def op_args(p, activation="swiglu"):
    act = get_activation(activation)
    return (p["input"], p["token_selected_experts"], p["token_final_scales"], p["fc1_expert_weights"], p["fc2_expert_weights"],
            int(act.kind), "gate_first", p["fc1_expert_biases"], p["fc2_expert_biases"], None, 0)


def test_opcheck():
    """PyTorch's own checks: schema, fake (meta) implementation against the real one, AOT dispatch."""
    p = make_problem(num_tokens=4, bias=True)
    torch.library.opcheck(torch.ops.simple_moe.moe_forward.default, op_args(p),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = make_problem(num_tokens=5, hidden=32, dtype=torch.float16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.simple_moe.moe_forward(*op_args(p))
    assert out.shape == (5, 32) and out.dtype == torch.float16


def layer_fn(x, router_weight, fc1, fc2):
    """Router + MoE layer, the way a model calls it."""
    from simple_moe import route

    scales, ids = route(x @ router_weight.T, 2)
    return moe_forward_op(x, ids, scales, fc1, fc2, "swiglu") + x


def test_torch_compile_fullgraph_no_graph_breaks():
    """aot_eager on CPU (Inductor works too but its C++ build takes ~35 s on this machine; it runs in the GPU test below)."""
    p = make_problem()
    router_weight = torch.randn(4, 32, device=DEVICE)
    args = (p["input"], router_weight, p["fc1_expert_weights"], p["fc2_expert_weights"])
    explanation = torch._dynamo.explain(layer_fn)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(layer_fn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args), layer_fn(*args))


def test_front_doors_compile_fullgraph():
    """fused_moe_simple (with and without output=) and cutlass_fused_moe trace whole: under torch.compile their fast path is the
    custom op, so fullgraph=True holds and the result equals eager bit for bit."""
    from simple_moe import fused_moe_simple
    from simple_moe.fused_moe import cutlass_fused_moe

    p = make_problem()
    w1, w2 = p["fc1_expert_weights"], p["fc2_expert_weights"]
    args = (p["input"], p["token_selected_experts"], p["token_final_scales"])

    def simple(x, ids, scales):
        return fused_moe_simple(x, ids, scales, w1, w2)

    def flashinfer(x, ids, scales):
        return cutlass_fused_moe(x, ids, scales, w1, w2, x.dtype, None)[0]

    def into(x, ids, scales, out):
        return fused_moe_simple(x, ids, scales, w1, w2, output=out)

    for fn in (simple, flashinfer):
        torch._dynamo.reset()
        assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(*args), fn(*args))
    out = torch.full_like(p["input"], float("nan"))
    torch.compile(into, fullgraph=True, backend="aot_eager")(*args, out)
    assert torch.equal(out, simple(*args))


INT8_SCHEMES = [("w8a16", None), ("w8a16", 32), ("w8a8", None)]


def int8_layer(scheme, group_size, num_tokens, dtype=torch.float32, device=DEVICE):
    """(fn, args): fused_moe_simple with weights quantised for `scheme`, and its (input, ids, scales)."""
    from simple_moe import fused_moe_simple
    from simple_moe.quant import quantize_moe_weights

    p = make_problem(num_tokens=num_tokens, hidden=64, inter=32, dtype=dtype, device=device)  # K = 64 / 32: groups of 32
    q1, q2, quant = quantize_moe_weights(p["fc1_expert_weights"].float(), p["fc2_expert_weights"].float(), scheme, group_size)

    def fn(x, ids, scales):
        return fused_moe_simple(x, ids, scales, q1, q2, quant=quant)

    return fn, (p["input"], p["token_selected_experts"], p["token_final_scales"])


@pytest.mark.parametrize("num_tokens", [1, 8])  # the decode path and the grouped one
@pytest.mark.parametrize("scheme,group_size", INT8_SCHEMES)
def test_int8_compile_fullgraph(scheme, group_size, num_tokens):
    """INT8 calls trace whole too: the op carries the scheme (its scales, name and group size), and the result equals eager."""
    fn, args = int8_layer(scheme, group_size, num_tokens)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(*args), fn(*args))


def test_int8_woq_cutlass_compile_fullgraph():
    """cutlass_fused_moe(use_int8_woq_per_channel=True) under torch.compile: one graph, the eager result."""
    from simple_moe.fused_moe import cutlass_fused_moe
    from simple_moe.quant import quantize_weights_int8

    p = make_problem(hidden=64, inter=32)
    (q1, s1), (q2, s2) = quantize_weights_int8(p["fc1_expert_weights"]), quantize_weights_int8(p["fc2_expert_weights"])

    def fn(x, ids, scales):
        return cutlass_fused_moe(x, ids, scales, q1, q2, x.dtype, quant_scales=[s1, s2], use_int8_woq_per_channel=True)[0]

    args = (p["input"], p["token_selected_experts"], p["token_final_scales"])
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(*args), fn(*args))


@pytest.mark.parametrize("callback", ["cublas_gemm", "torch_loop_gemm"])
def test_callbacks_compile_run_eagerly(callback):
    """GEMM callbacks under torch.compile: the layer runs eagerly between the graphs around it (a graph break), with the eager
    result; fullgraph=True refuses it instead of tracing into the launches."""
    import simple_moe

    p = make_problem()
    gemm = getattr(simple_moe, callback)

    def fn(x, ids, scales):
        y = simple_moe.fused_moe_simple(x * 2, ids, scales, p["fc1_expert_weights"], p["fc2_expert_weights"], gemm1_fn=gemm,
                                        gemm2_fn=gemm)
        return y + x

    args = (p["input"], p["token_selected_experts"], p["token_final_scales"])
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, backend="aot_eager")(*args), fn(*args))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="compiler.disable"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)


def test_opcheck_int8():
    """The op's INT8 arguments through PyTorch's checks (W8A16 group-wise: every trailing argument set)."""
    from simple_moe.quant import quantize_moe_weights

    p = make_problem(num_tokens=4, hidden=64, inter=32, bias=True)
    q1, q2, quant = quantize_moe_weights(p["fc1_expert_weights"], p["fc2_expert_weights"], "w8a16", 32)
    p["fc1_expert_weights"], p["fc2_expert_weights"] = q1, q2
    torch.library.opcheck(torch.ops.simple_moe.moe_forward.default, op_args(p) + quant.op_arguments(),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_tokens", [1, 64])
@pytest.mark.parametrize("scheme,group_size", INT8_SCHEMES)
def test_int8_compile_inductor_gpu(scheme, group_size, num_tokens):
    """Inductor keeps the INT8 layer as the one extern op: bit for bit the eager call, on the decode and the grouped path."""
    fn, args = int8_layer(scheme, group_size, num_tokens, dtype=torch.bfloat16, device="cuda")
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="inductor")(*args), fn(*args))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_compile_inductor_gpu(dtype):
    p = make_problem(num_tokens=64, hidden=128, inter=64, num_experts=8, dtype=dtype, device="cuda")
    router_weight = torch.randn(8, 128, device="cuda", dtype=dtype)
    args = (p["input"], router_weight, p["fc1_expert_weights"], p["fc2_expert_weights"])
    torch._dynamo.reset()
    compiled = torch.compile(layer_fn, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(*args), layer_fn(*args), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_whole_model(dtype):
    """Capture a whole tiny model (embedding, two FusedMoE layers, head) in one CUDA graph; replays equal eager, bit for bit."""
    from simple_moe import FusedMoE

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(256, 128),
        FusedMoE(128, 64, 8, 2),
        FusedMoE(128, 64, 16, 4, activation="geglu", bias=True),
        torch.nn.Linear(128, 256),
    ).to(device="cuda", dtype=dtype).eval()
    tokens = torch.randint(0, 256, (4, 32), device="cuda")
    with torch.no_grad():
        eager = model(tokens)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (Triton compiles) outside the capture
            for _ in range(2):
                model(tokens)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(tokens)
        for seed in range(3):  # new inputs in place, replay, compare with eager on the same inputs
            tokens.copy_(torch.randint(0, 256, tokens.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(captured, model(tokens))
    assert torch.equal(eager.isfinite(), torch.ones_like(eager, dtype=torch.bool))
