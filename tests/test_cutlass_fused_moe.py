"""`cutlass_fused_moe` against FlashInfer's contract (docs/flashinfer_api.md).

FlashInfer's own recipes are rebuilt here (T=1, H=128, I=128, E=2, top_k=2, fp16, inputs randn/5, softmax -> top-k -> renormalise
routing, rtol=atol=1e-2 against a per-expert torch loop written below with FlashInfer's up-then-gate split), plus float64
relative-L2 checks against `reference_moe` at the library's tolerances. CPU tests run the kernels through Triton's interpreter at
small shapes; `gpu` tests run the real sizes.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import simple_moe
from simple_moe import ActivationType, cutlass_fused_moe, reference_moe
from simple_moe.activations import activation_params, get_activation
from simple_moe.quant import quantize_weights_int8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL_L2 = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GATED = {ActivationType.Swiglu, ActivationType.Geglu, ActivationType.SwigluBias, ActivationType.SwigluStep,
         ActivationType.GegluTanh, ActivationType.Situ}
ALL_ACTIVATIONS = [a for a in ActivationType if a != ActivationType.InvalidType]
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ---------------------------------------------------------------------------------------------------------------------------------
# Inputs and the per-expert torch loop (FlashInfer's test style, written independently of the library's activation table)


def make_moe(T, H, I, E, top_k, dtype, activation=ActivationType.Swiglu, *, biases=False, scale=0.2, device=DEVICE, seed=0):
    """FlashInfer's recipe: randn/5 inputs and weights, softmax -> top-k -> renormalise routing. Returns a dict of arguments."""
    g = torch.Generator().manual_seed(seed)
    n1 = 2 * I if activation in GATED else I

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    probs = torch.softmax(torch.randn(T, E, generator=g), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    args = dict(
        input=rand(T, H),
        token_selected_experts=ids.to(torch.int32).to(device),
        token_final_scales=weights.float().to(device),
        fc1_expert_weights=rand(E, n1, H),
        fc2_expert_weights=rand(E, H, I),
    )
    if biases:
        args["fc1_expert_biases"] = rand(E, n1)
        args["fc2_expert_biases"] = rand(E, H)
    return args


def _act_torch(kind, gate, up, alpha=1.0, beta=0.0, limit=math.inf, situ_b=4.0, situ_lb=25.0):
    if kind == ActivationType.Gelu:
        return F.gelu(gate)
    if kind == ActivationType.Relu:
        return F.relu(gate)
    if kind == ActivationType.Silu:
        return F.silu(gate)
    if kind == ActivationType.Relu2:
        return F.relu(gate) ** 2
    if kind == ActivationType.Identity:
        return gate
    if kind == ActivationType.Swiglu:
        return F.silu(gate) * up
    if kind == ActivationType.Geglu:
        return F.gelu(gate) * up
    if kind == ActivationType.GegluTanh:
        return F.gelu(gate, approximate="tanh") * up
    if kind == ActivationType.SwigluBias:
        g = gate.clamp(max=limit)
        u = up.clamp(min=-limit, max=limit)
        return g * torch.sigmoid(alpha * g) * (u + beta)
    if kind == ActivationType.SwigluStep:
        return F.silu(gate).clamp(max=limit) * up.clamp(min=-limit, max=limit)
    if kind == ActivationType.Situ:
        return situ_b * torch.tanh(gate / situ_b) * torch.sigmoid(gate) * (situ_lb * torch.tanh(up / situ_lb))
    raise AssertionError(kind)


def torch_loop_moe(args, kind, *, ep_size=1, ep_rank=0, per_expert=None):
    """out[t] = sum_k scale * (act(x @ w1[e].T + b1) @ w2[e].T + b2) in fp32, one expert at a time; fc1 rows are up then gate."""
    x = args["input"].float()
    w1, w2 = args["fc1_expert_weights"].float(), args["fc2_expert_weights"].float()
    b1, b2 = args.get("fc1_expert_biases"), args.get("fc2_expert_biases")
    ids, scales = args["token_selected_experts"].long(), args["token_final_scales"]
    E = w2.shape[0]
    out = torch.zeros(x.shape[0], w2.shape[1], device=x.device)
    for e in range(E):
        tokens, slots = torch.nonzero(ids == e + ep_rank * E, as_tuple=True)
        if tokens.numel() == 0:
            continue
        h = x[tokens] @ w1[e].T
        if b1 is not None:
            h = h + b1[e].float()
        if kind in GATED:
            up, gate = h.chunk(2, dim=-1)  # FlashInfer: rows [0, I) up, [I, 2I) gate
        else:
            up, gate = None, h
        params = {} if per_expert is None else {k: v[e].item() for k, v in per_expert.items()}
        y = _act_torch(kind, gate, up, **params) @ w2[e].T
        if b2 is not None:
            y = y + b2[e].float()
        w = 1.0 if scales is None else scales[tokens, slots].float().unsqueeze(1)
        out.index_add_(0, tokens, w * y)
    return out


def call(args, dtype=None, **kwargs):
    a = dict(args)
    dtype = dtype or a["input"].dtype
    return cutlass_fused_moe(a.pop("input"), a.pop("token_selected_experts"), a.pop("token_final_scales"),
                             a.pop("fc1_expert_weights"), a.pop("fc2_expert_weights"), dtype, None, **a, **kwargs)


def rel_l2(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def library_reference(args, act, act_params=None, ep_size=1, ep_rank=0):
    return reference_moe(args["input"], args["token_selected_experts"], args["token_final_scales"], args["fc1_expert_weights"],
                         args["fc2_expert_weights"], act, fc1_expert_biases=args.get("fc1_expert_biases"),
                         fc2_expert_biases=args.get("fc2_expert_biases"), activation_params=act_params,
                         gate_layout="up_first", ep_size=ep_size, ep_rank=ep_rank)


def _bf16_dot_works() -> bool:
    """Triton 3.6's interpreter computes tl.dot on bf16 wrongly unless the test harness patches it; probe it directly."""
    if torch.cuda.is_available():
        return True
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a_ptr, b_ptr, c_ptr):
        r = tl.arange(0, 16)
        a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
        b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
        tl.store(c_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, b))

    a = torch.full((16, 16), 0.5, dtype=torch.bfloat16)
    c = torch.empty(16, 16, dtype=torch.float32)
    _dot[(1,)](a, a, c)
    return bool(torch.allclose(c, torch.full_like(c, 4.0)))


# ---------------------------------------------------------------------------------------------------------------------------------
# FlashInfer's recipes: every activation, with and without biases


def _per_expert_params(kind, E, device=DEVICE):
    """FlashInfer-style per-expert float32 [E] parameter tensors for the activations that take them (values that bite at randn/5)."""
    g = torch.Generator().manual_seed(1)
    if kind == ActivationType.SwigluBias:
        return {"alpha": 1.0 + torch.rand(E, generator=g), "beta": torch.rand(E, generator=g),
                "limit": 0.2 + 0.2 * torch.rand(E, generator=g)}
    if kind == ActivationType.SwigluStep:
        return {"limit": 0.05 + 0.1 * torch.rand(E, generator=g)}
    if kind == ActivationType.Situ:
        return {"situ_b": 0.3 + torch.rand(E, generator=g), "situ_lb": 0.2 + torch.rand(E, generator=g)}
    return None


_KWARG_OF = {"alpha": "swiglu_alpha", "beta": "swiglu_beta", "limit": "swiglu_limit", "situ_b": "situ_beta",
             "situ_lb": "situ_linear_beta"}


@pytest.mark.parametrize("biases", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("kind", ALL_ACTIVATIONS, ids=lambda k: k.name)
def test_flashinfer_recipe_every_activation(kind, biases):
    T, H, I, E, top_k = 1, 128, 128, 2, 2
    args = make_moe(T, H, I, E, top_k, torch.float16, kind, biases=biases)
    out = call(args, activation_type=kind)[0]
    expected = torch_loop_moe(args, kind)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    assert rel_l2(out, library_reference(args, kind)) < REL_L2[torch.float16]


@pytest.mark.parametrize("biases", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("kind", [ActivationType.Swiglu, ActivationType.SwigluBias, ActivationType.SwigluStep,
                                  ActivationType.Situ], ids=lambda k: k.name)
def test_flashinfer_recipe_activation_params(kind, biases):
    """Per-expert params. `Swiglu` with swiglu_alpha/beta/limit given is SwigluBias."""
    T, H, I, E, top_k = 4, 128, 128, 2, 2
    args = make_moe(T, H, I, E, top_k, torch.float16, kind, biases=biases)
    computed = ActivationType.SwigluBias if kind == ActivationType.Swiglu else kind
    params = _per_expert_params(computed, E)
    kwargs = {_KWARG_OF[k]: v.to(DEVICE) for k, v in params.items()}
    out = call(args, activation_type=kind, **kwargs)[0]
    expected = torch_loop_moe(args, computed, per_expert=params)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    p = {k: params.get(k) for k in ("alpha", "beta", "limit", "situ_b", "situ_lb")}
    if computed == ActivationType.Situ:
        table = activation_params(get_activation(computed), E, DEVICE, p["situ_b"], p["situ_lb"], None)
    else:
        table = activation_params(get_activation(computed), E, DEVICE, p["alpha"], p["beta"], p["limit"])
    assert rel_l2(out, library_reference(args, computed, table)) < REL_L2[torch.float16]
    # The clamps must actually have bitten, or this test would not tell SwigluBias/SwigluStep from Swiglu.
    if computed in (ActivationType.SwigluBias, ActivationType.SwigluStep):
        assert rel_l2(out, torch_loop_moe(args, ActivationType.Swiglu)) > 0.05


def test_swiglu_with_only_some_params_uses_defaults():
    """Missing SwigluBias parameters default to alpha=1, beta=0, limit=+inf; SwigluStep's limit defaults to 7."""
    # Inputs large enough that the limits bite (GEMM1 outputs up to ~60): a wrong default limit changes the result.
    args = make_moe(3, 64, 32, 4, 2, torch.float32, scale=1.6)

    def limit(value):
        return torch.full((4,), value, device=DEVICE)

    beta = torch.full((4,), 0.5, device=DEVICE)
    out = call(args, swiglu_beta=beta)[0]
    table = activation_params(get_activation("swiglu_bias"), 4, DEVICE, None, beta, None)
    assert rel_l2(out, library_reference(args, "swiglu_bias", table)) < REL_L2[torch.float32]
    assert torch.equal(out, call(args, swiglu_beta=beta, swiglu_limit=limit(math.inf))[0])
    assert not torch.allclose(out, call(args, swiglu_beta=beta, swiglu_limit=limit(20.0))[0])  # a finite limit would show
    step = {limit_value: call(args, activation_type=ActivationType.SwigluStep, swiglu_limit=limit(limit_value))[0]
            for limit_value in (6.0, 7.0, 8.0)}
    step_default = call(args, activation_type=ActivationType.SwigluStep)[0]
    assert torch.equal(step_default, step[7.0])
    assert not torch.allclose(step_default, step[6.0]) and not torch.allclose(step_default, step[8.0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_float64_reference_rel_l2(dtype):
    """Several tokens, uneven routing, biases and SwigluBias at the library tolerance against float64 `reference_moe`."""
    T, H, I, E, top_k = 16, 64, 48, 8, 3
    args = make_moe(T, H, I, E, top_k, dtype, ActivationType.SwigluBias, biases=True)
    alpha, beta, limit = torch.full((E,), 1.702), torch.ones(E), torch.full((E,), 0.5)
    out = call(args, swiglu_alpha=alpha.to(DEVICE), swiglu_beta=beta.to(DEVICE), swiglu_limit=limit.to(DEVICE))[0]
    table = activation_params(get_activation("swiglu_bias"), E, DEVICE, alpha, beta, limit)
    assert rel_l2(out, library_reference(args, "swiglu_bias", table)) < REL_L2[dtype]


def test_bf16_geglu_tanh():
    """FlashInfer runs GegluTanh in bf16."""
    if not _bf16_dot_works():
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly here (no harness fix installed)")
    args = make_moe(1, 128, 128, 2, 2, torch.bfloat16, ActivationType.GegluTanh)
    out = call(args, activation_type=ActivationType.GegluTanh)[0]
    torch.testing.assert_close(out.float(), torch_loop_moe(args, ActivationType.GegluTanh), rtol=1e-2, atol=1e-2)
    assert rel_l2(out, library_reference(args, "geglu_tanh")) < REL_L2[torch.bfloat16]


def test_unweighted_sum_when_scales_none():
    args = make_moe(5, 64, 32, 4, 2, torch.float16, biases=True)
    args["token_final_scales"] = None
    out = call(args)[0]
    torch.testing.assert_close(out.float(), torch_loop_moe(args, ActivationType.Swiglu), rtol=1e-2, atol=1e-2)
    assert rel_l2(out, library_reference(args, "swiglu")) < REL_L2[torch.float16]


def test_flashinfer_activation_enum_values_accepted():
    """A foreign IntEnum with FlashInfer's numbering (what callers pass) works, and so does a plain int."""
    import enum

    class FlashInferActivationType(enum.IntEnum):
        Geglu = 4

    args = make_moe(2, 64, 32, 2, 2, torch.float16, ActivationType.Geglu)
    a = call(args, activation_type=FlashInferActivationType.Geglu)[0]
    b = call(args, activation_type=4)[0]
    assert torch.equal(a, b)
    torch.testing.assert_close(a.float(), torch_loop_moe(args, ActivationType.Geglu), rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------------------------------------------
# Expert parallel and tensor parallel


def _ep_slice(args, ep_size, rank):
    E = args["fc2_expert_weights"].shape[0]
    sl = slice(rank * E // ep_size, (rank + 1) * E // ep_size)
    return {k: (v[sl] if k.startswith("fc") else v) for k, v in args.items()}


@pytest.mark.parametrize("biases", [False, True], ids=["no_bias", "bias"])
def test_expert_parallel_ranks_sum_to_whole(biases):
    """FlashInfer's EP recipe (E=8, top_k=2, ep_size=4): each rank holds E/4 experts; the ranks' partial sums add up to the whole."""
    T, H, I, E, top_k, ep_size = 8, 128, 128, 8, 2, 4
    args = make_moe(T, H, I, E, top_k, torch.float16, biases=biases)
    whole = call(args)[0]
    partials = []
    for rank in range(ep_size):
        local = _ep_slice(args, ep_size, rank)
        poisoned = torch.full((T, H), float("nan"), dtype=torch.float16, device=DEVICE)
        out = call(local, ep_size=ep_size, ep_rank=rank, output=poisoned)[0]
        assert out is poisoned
        # Rows with no expert on this rank are zeros (written, not left as NaN).
        ids = args["token_selected_experts"]
        mine = ((ids >= rank * 2) & (ids < rank * 2 + 2)).any(dim=1)
        assert not torch.isnan(out).any()
        assert (out[~mine] == 0).all()
        assert rel_l2(out[mine], library_reference(local, "swiglu", ep_size=ep_size, ep_rank=rank)[mine]) < REL_L2[torch.float16]
        partials.append(out.float())
    total = torch.stack(partials).sum(0)
    torch.testing.assert_close(total, whole.float(), rtol=1e-2, atol=1e-2)  # FlashInfer uses 1e-1 here
    assert rel_l2(total, library_reference(args, "swiglu")) < REL_L2[torch.float16]


def test_expert_parallel_drops_foreign_and_invalid_ids():
    """Negative ids, ids past the last expert and other ranks' ids are dropped silently."""
    T, H, I, E_local, ep_size = 6, 64, 32, 2, 3
    args = make_moe(T, H, I, E_local * ep_size, 2, torch.float16)
    ids = torch.tensor([[2, 3], [-1, 2], [99, 3], [0, 5], [-7, 100], [3, 1]], dtype=torch.int32, device=DEVICE)
    args["token_selected_experts"] = ids
    local = _ep_slice(args, ep_size, 1)  # experts 2 and 3
    out = call(local, ep_size=ep_size, ep_rank=1, output=torch.full((T, H), float("nan"), dtype=torch.float16,
                                                                     device=DEVICE))[0]
    assert not torch.isnan(out).any()
    assert (out[[3, 4]] == 0).all()
    expected = torch_loop_moe(local, ActivationType.Swiglu, ep_size=ep_size, ep_rank=1)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    assert rel_l2(out, library_reference(local, "swiglu", ep_size=ep_size, ep_rank=1)) < REL_L2[torch.float16]


def test_enable_alltoall_rows_without_local_expert_are_zeros():
    """FlashInfer leaves these rows unwritten (undefined) with all-to-all; we always write zeros (a valid 'undefined')."""
    T, H, I, E, ep_size = 6, 64, 32, 8, 4
    args = make_moe(T, H, I, E, 2, torch.float16)
    local = _ep_slice(args, ep_size, 2)
    plain = call(local, ep_size=ep_size, ep_rank=2)[0]
    poisoned = torch.full((T, H), float("nan"), dtype=torch.float16, device=DEVICE)
    out = call(local, ep_size=ep_size, ep_rank=2, enable_alltoall=True, output=poisoned)[0]
    assert torch.equal(out, plain)


def _tp_slice(args, tp_size, rank):
    """FlashInfer's TP slicing: each half of fc1 (up, gate) sliced along I separately and re-concatenated; fc2 along its last dim."""
    I = args["fc2_expert_weights"].shape[2]
    sl = slice(rank * I // tp_size, (rank + 1) * I // tp_size)
    up, gate = args["fc1_expert_weights"].chunk(2, dim=1)
    local = dict(args)
    local["fc1_expert_weights"] = torch.cat([up[:, sl], gate[:, sl]], dim=1).contiguous()
    local["fc2_expert_weights"] = args["fc2_expert_weights"][:, :, sl].contiguous()
    if "fc1_expert_biases" in args:
        b_up, b_gate = args["fc1_expert_biases"].chunk(2, dim=1)
        local["fc1_expert_biases"] = torch.cat([b_up[:, sl], b_gate[:, sl]], dim=1).contiguous()
    return local


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tensor_parallel_ranks_sum_to_whole(tp_size):
    T, H, I, E, top_k = 4, 128, 128, 4, 2
    args = make_moe(T, H, I, E, top_k, torch.float16, biases=True)
    whole = call(args)[0]
    partials = [call(_tp_slice(args, tp_size, r), tp_size=tp_size, tp_rank=r)[0].float() for r in range(tp_size)]
    total = torch.stack(partials).sum(0)
    torch.testing.assert_close(total, whole.float(), rtol=1e-2, atol=1e-2)
    assert rel_l2(total, library_reference(args, "swiglu")) < REL_L2[torch.float16]


def test_tensor_parallel_fc2_bias_only_on_rank0():
    args = make_moe(4, 64, 32, 4, 2, torch.float16, biases=True)
    local = _tp_slice(args, 2, 1)
    with_bias = call(local, tp_size=2, tp_rank=1)[0]
    zero_b2 = dict(local, fc2_expert_biases=torch.zeros_like(local["fc2_expert_biases"]))
    assert torch.equal(with_bias, call(zero_b2, tp_size=2, tp_rank=1)[0])
    rank0 = call(_tp_slice(args, 2, 0), tp_size=2, tp_rank=0)[0]
    rank0_zero_b2 = call(dict(_tp_slice(args, 2, 0), fc2_expert_biases=torch.zeros_like(local["fc2_expert_biases"])),
                         tp_size=2, tp_rank=0)[0]
    assert not torch.equal(rank0, rank0_zero_b2)


# ---------------------------------------------------------------------------------------------------------------------------------
# Determinism and CUDA graphs (FlashInfer's workspace/determinism recipe: bf16, H=256, I=512, E=8, top_k=2)


def test_deterministic_small():
    args = make_moe(6, 256, 512, 8, 2, torch.bfloat16)
    a = call(args)[0]
    b = call(args)[0]
    assert torch.equal(a, b)


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [64, 512])
def test_deterministic_full_size(T):
    args = make_moe(T, 256, 512, 8, 2, torch.bfloat16, device="cuda")
    first = call(args, use_fused_finalize=True)[0]
    for _ in range(3):
        assert torch.equal(call(args, use_fused_finalize=False)[0], first)
    assert rel_l2(first, library_reference(args, "swiglu")) < REL_L2[torch.bfloat16]


@gpu
@needs_cuda
def test_cuda_graph_replay_matches_eager():
    args = make_moe(128, 256, 512, 8, 2, torch.bfloat16, device="cuda", biases=True)
    eager = call(args)[0]
    static_out = torch.empty_like(eager)
    call(args, output=static_out)  # warm-up: compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(args, output=static_out)
    static_out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
    # New values in the captured input tensors flow through the replay.
    args["input"].copy_(torch.randn_like(args["input"]) * 0.2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, call(args)[0])


# ---------------------------------------------------------------------------------------------------------------------------------
# Real model sizes (baselines.md shapes, T=64) against float64 reference_moe


def _model_args(T, E, top_k, H, I, *, biases=False, seed=0):
    """baselines.md's inputs: x = randn, w1 = randn/sqrt(H), w2 = randn/sqrt(I), softmax -> top-k -> renormalise routing."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    probs = torch.softmax(torch.randn(T, E, generator=g, device="cuda"), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    args = dict(
        input=torch.randn(T, H, generator=g, device="cuda").to(torch.bfloat16),
        token_selected_experts=ids.int(),
        token_final_scales=(weights / weights.sum(-1, keepdim=True)).float(),
        fc1_expert_weights=(torch.randn(E, 2 * I, H, generator=g, device="cuda") / math.sqrt(H)).to(**bf16),
        fc2_expert_weights=(torch.randn(E, H, I, generator=g, device="cuda") / math.sqrt(I)).to(**bf16),
    )
    if biases:
        args["fc1_expert_biases"] = (torch.randn(E, 2 * I, generator=g, device="cuda") * 0.1).to(**bf16)
        args["fc2_expert_biases"] = (torch.randn(E, H, generator=g, device="cuda") * 0.1).to(**bf16)
    return args


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(8, 2, 4096, 14336), (128, 8, 2048, 768), (64, 6, 2048, 1408), (64, 8, 2048, 1024)],
                         ids=["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite", "olmoe-1b-7b"])
def test_model_shapes_against_reference(shape):
    E, top_k, H, I = shape
    args = _model_args(64, E, top_k, H, I)
    output = torch.full((64, H), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = call(args, output=output)[0]
    assert out is output
    assert rel_l2(out, library_reference(args, "swiglu")) < REL_L2[torch.bfloat16]


@gpu
@needs_cuda
def test_gpt_oss_20b_shape_swiglu_bias():
    E, top_k, H, I = 32, 4, 2880, 2880
    args = _model_args(64, E, top_k, H, I, biases=True)
    alpha, beta, limit = (torch.full((E,), v, device="cuda") for v in (1.702, 1.0, 7.0))
    out = call(args, swiglu_alpha=alpha, swiglu_beta=beta, swiglu_limit=limit)[0]
    table = activation_params(get_activation("swiglu_bias"), E, "cuda", alpha, beta, limit)
    assert rel_l2(out, library_reference(args, "swiglu_bias", table)) < REL_L2[torch.bfloat16]


# ---------------------------------------------------------------------------------------------------------------------------------
# The returned list, output=, ignored knobs


def test_returned_list_structure():
    T, H, I, E = 3, 64, 32, 4
    args = make_moe(T, H, I, E, 2, torch.float16)
    result = call(args)
    assert isinstance(result, list) and len(result) == 4
    out, num_active, expert_scores, active_ids = result
    assert out.shape == (T, H) and out.dtype == torch.float16
    assert num_active.shape == (1,) and num_active.dtype == torch.int32
    assert expert_scores.shape == (E, T) and expert_scores.dtype == torch.float32
    assert active_ids.shape == (E,) and active_ids.dtype == torch.int32
    assert all(t.device == out.device for t in result)


def test_output_written_in_place_and_returned_first():
    T, H, I, E = 5, 64, 32, 4
    args = make_moe(T, H, I, E, 2, torch.float16, biases=True)
    expected = call(args)[0]
    output = torch.full((T, H), float("nan"), dtype=torch.float16, device=DEVICE)
    result = call(args, output=output)
    assert result[0] is output
    assert torch.equal(output, expected)


def test_zero_tokens():
    args = make_moe(0, 64, 32, 4, 2, torch.float16)
    result = call(args)
    assert result[0].shape == (0, 64) and result[2].shape == (4, 0)


def test_ignored_knobs_change_nothing():
    args = make_moe(4, 64, 32, 4, 2, torch.float16, biases=True)
    plain = call(args)[0]
    knobs = dict(tune_max_num_tokens=16, enable_pdl=True, profile_ids=[3, 7], use_fused_finalize=False,
                 workspace_buffer=torch.empty(1024, dtype=torch.uint8, device=DEVICE), swizzled_input_sf=False,
                 enable_alltoall=True)
    assert torch.equal(call(args, **knobs)[0], plain)
    a = dict(args)
    empty_quant = cutlass_fused_moe(a.pop("input"), a.pop("token_selected_experts"), a.pop("token_final_scales"),
                                    a.pop("fc1_expert_weights"), a.pop("fc2_expert_weights"), torch.float16, [], **a)[0]
    assert torch.equal(empty_quant, plain)


def test_signature_matches_flashinfer():
    import inspect

    params = inspect.signature(cutlass_fused_moe).parameters
    positional = ["input", "token_selected_experts", "token_final_scales", "fc1_expert_weights", "fc2_expert_weights",
                  "output_dtype", "quant_scales", "fc1_expert_biases", "fc2_expert_biases", "input_sf", "swiglu_alpha",
                  "swiglu_beta", "swiglu_limit", "tp_size", "tp_rank", "ep_size", "ep_rank", "cluster_size", "cluster_rank",
                  "output", "enable_alltoall", "use_deepseek_fp8_block_scale", "use_w4_group_scaling", "use_mxfp8_act_scaling",
                  "min_latency_mode", "use_packed_weights", "use_wfp4afp8_humming", "tune_max_num_tokens", "enable_pdl",
                  "activation_type", "swizzled_input_sf", "use_fused_finalize", "profile_ids", "workspace_buffer"]
    kinds = {n: p.kind for n, p in params.items()}
    assert [n for n, k in kinds.items() if k == inspect.Parameter.POSITIONAL_OR_KEYWORD] == positional
    assert {n for n, k in kinds.items() if k == inspect.Parameter.KEYWORD_ONLY} == {
        "situ_beta", "situ_linear_beta", "use_int8_woq_per_channel"}
    defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    assert defaults["tune_max_num_tokens"] == 8192 and defaults["activation_type"] == ActivationType.Swiglu
    assert defaults["swizzled_input_sf"] is True and defaults["use_fused_finalize"] is True
    assert defaults["tp_size"] == 1 and defaults["ep_size"] == 1 and defaults["cluster_size"] == 1
    assert defaults["enable_pdl"] is None and defaults["use_int8_woq_per_channel"] is False
    assert simple_moe.cutlass_fused_moe is cutlass_fused_moe


# ---------------------------------------------------------------------------------------------------------------------------------
# Validation: every malformed input raises ValueError/TypeError naming the argument


def _bad(name):
    """Builds a malformed call: returns (args, kwargs) of a valid fp16 Swiglu problem with one thing broken."""
    T, H, I, E = 3, 64, 32, 4
    args = make_moe(T, H, I, E, 2, torch.float16, biases=True)
    kw = {}
    f16 = dict(dtype=torch.float16, device=DEVICE)
    if name == "input_not_tensor":
        args["input"] = args["input"].tolist()
    elif name == "input_1d":
        args["input"] = args["input"][0]
    elif name == "input_int":
        args["input"] = args["input"].to(torch.int32)
    elif name == "ids_rows":
        args["token_selected_experts"] = args["token_selected_experts"][:2]
    elif name == "ids_float":
        args["token_selected_experts"] = args["token_selected_experts"].float()
    elif name == "ids_device":
        args["token_selected_experts"] = args["token_selected_experts"].to("meta")
    elif name == "top_k_too_large":
        args["token_selected_experts"] = torch.zeros(T, 5, dtype=torch.int32, device=DEVICE)
        args["token_final_scales"] = torch.ones(T, 5, device=DEVICE)
    elif name == "scales_shape":
        args["token_final_scales"] = args["token_final_scales"][:, :1]
    elif name == "fc1_n1":
        args["fc1_expert_weights"] = args["fc1_expert_weights"][:, :I]
        args["fc1_expert_biases"] = args["fc1_expert_biases"][:, :I]
    elif name == "fc1_h":
        args["fc1_expert_weights"] = args["fc1_expert_weights"][:, :, :32]
    elif name == "fc1_dtype":
        args["fc1_expert_weights"] = args["fc1_expert_weights"].to(torch.bfloat16)
    elif name == "fc2_experts":
        args["fc2_expert_weights"] = args["fc2_expert_weights"][:3]
    elif name == "fc2_h":
        args["fc2_expert_weights"] = torch.randn(E, 32, I, **f16)
    elif name == "fc2_not_tensor":
        args["fc2_expert_weights"] = None
    elif name == "output_dtype_mismatch":
        kw["output_dtype"] = torch.bfloat16
    elif name == "output_dtype_not_dtype":
        kw["output_dtype"] = "float16"
    elif name == "fc1_bias_only":
        del args["fc2_expert_biases"]
    elif name == "fc2_bias_only":
        del args["fc1_expert_biases"]
    elif name == "fc1_bias_dtype":
        args["fc1_expert_biases"] = args["fc1_expert_biases"].float()
    elif name == "fc2_bias_shape":
        args["fc2_expert_biases"] = args["fc2_expert_biases"][:, :32]
    elif name == "output_shape":
        kw["output"] = torch.empty(T, 32, **f16)
    elif name == "output_dtype_tensor":
        kw["output"] = torch.empty(T, H, dtype=torch.float32, device=DEVICE)
    elif name == "swiglu_alpha_dtype":
        kw["swiglu_alpha"] = torch.ones(E, dtype=torch.float16, device=DEVICE)
    elif name == "swiglu_limit_shape":
        kw["swiglu_limit"] = torch.ones(E + 1, device=DEVICE)
    elif name == "swiglu_beta_2d":
        kw["swiglu_beta"] = torch.ones(E, 1, device=DEVICE)
    elif name == "swiglu_alpha_list":
        kw["swiglu_alpha"] = [1.0] * E
    elif name == "situ_beta_on_swiglu":
        kw["situ_beta"] = torch.ones(E, device=DEVICE)
    elif name == "swiglu_alpha_on_geglu":
        kw["swiglu_alpha"] = torch.ones(E, device=DEVICE)
        kw["activation_type"] = ActivationType.Geglu
    elif name == "swiglu_alpha_on_swiglu_step":
        kw["swiglu_alpha"] = torch.ones(E, device=DEVICE)
        kw["activation_type"] = ActivationType.SwigluStep
    elif name == "activation_invalid":
        kw["activation_type"] = ActivationType.InvalidType
    elif name == "activation_bad_type":
        kw["activation_type"] = 3.0
    elif name == "tp_rank_too_large":
        kw.update(tp_size=2, tp_rank=2)
    elif name == "tp_size_zero":
        kw.update(tp_size=0, tp_rank=0)
    elif name == "tp_rank_bool":
        kw.update(tp_rank=True, tp_size=2)
    elif name == "ep_rank_negative":
        kw.update(ep_size=2, ep_rank=-1)
    elif name == "ep_rank_too_large":
        kw.update(ep_size=2, ep_rank=2)
    elif name == "ep_size_float":
        kw.update(ep_size=2.0)
    elif name == "quant_scales_tensor":
        kw["quant_scales"] = torch.ones(1)
    else:
        raise AssertionError(name)
    return args, kw


_MALFORMED = [
    ("input_not_tensor", TypeError, "input"), ("input_1d", ValueError, "input"), ("input_int", TypeError, "input"),
    ("ids_rows", ValueError, "token_selected_experts"), ("ids_float", TypeError, "token_selected_experts"),
    ("ids_device", ValueError, "token_selected_experts"), ("top_k_too_large", ValueError, "token_selected_experts"),
    ("scales_shape", ValueError, "token_final_scales"), ("fc1_n1", ValueError, "fc1_expert_weights"),
    ("fc1_h", ValueError, "fc1_expert_weights"), ("fc1_dtype", TypeError, "fc1_expert_weights"),
    ("fc2_experts", ValueError, "fc2_expert_weights"), ("fc2_h", ValueError, "fc2_expert_weights"),
    ("fc2_not_tensor", TypeError, "fc2_expert_weights"), ("output_dtype_mismatch", ValueError, "output_dtype"),
    ("output_dtype_not_dtype", TypeError, "output_dtype"), ("fc1_bias_only", ValueError, "fc2_expert_biases"),
    ("fc2_bias_only", ValueError, "fc1_expert_biases"), ("fc1_bias_dtype", TypeError, "fc1_expert_biases"),
    ("fc2_bias_shape", ValueError, "fc2_expert_biases"), ("output_shape", ValueError, "output"),
    ("output_dtype_tensor", TypeError, "output"), ("swiglu_alpha_dtype", TypeError, "swiglu_alpha"),
    ("swiglu_limit_shape", ValueError, "swiglu_limit"), ("swiglu_beta_2d", ValueError, "swiglu_beta"),
    ("swiglu_alpha_list", TypeError, "swiglu_alpha"), ("situ_beta_on_swiglu", ValueError, "situ_beta"),
    ("swiglu_alpha_on_geglu", ValueError, "swiglu_alpha"), ("swiglu_alpha_on_swiglu_step", ValueError, "swiglu_alpha"),
    ("activation_invalid", ValueError, "activation"), ("activation_bad_type", TypeError, "activation"),
    ("tp_rank_too_large", ValueError, "tp_rank"), ("tp_size_zero", ValueError, "tp_size"), ("tp_rank_bool", TypeError, "tp_rank"),
    ("ep_rank_negative", ValueError, "ep_rank"), ("ep_rank_too_large", ValueError, "ep_rank"),
    ("ep_size_float", TypeError, "ep_size"), ("quant_scales_tensor", TypeError, "quant_scales"),
]


@pytest.mark.parametrize("name,error,argument", _MALFORMED, ids=[m[0] for m in _MALFORMED])
def test_malformed_input_raises_naming_argument(name, error, argument):
    args, kw = _bad(name)
    a = dict(args)
    positional = [a.pop(k) for k in ("input", "token_selected_experts", "token_final_scales", "fc1_expert_weights",
                                     "fc2_expert_weights")]
    dtype = kw.pop("output_dtype", torch.float16)
    quant_scales = kw.pop("quant_scales", None)
    with pytest.raises(error, match=argument):
        cutlass_fused_moe(*positional, dtype, quant_scales, **a, **kw)


_UNSUPPORTED = [
    ("quant_scales", dict(quant_scales=[torch.ones(1)])),
    ("input_sf", dict(input_sf=torch.ones(1))),
    ("use_deepseek_fp8_block_scale", dict(use_deepseek_fp8_block_scale=True)),
    ("use_w4_group_scaling", dict(use_w4_group_scaling=True)),
    ("use_mxfp8_act_scaling", dict(use_mxfp8_act_scaling=True)),
    ("use_packed_weights", dict(use_packed_weights=True)),
    ("use_wfp4afp8_humming", dict(use_wfp4afp8_humming=True)),
    ("min_latency_mode", dict(min_latency_mode=True)),
    ("cluster_size", dict(cluster_size=2)),
    ("cluster_rank", dict(cluster_rank=1)),
]


@pytest.mark.parametrize("flag,kwargs", _UNSUPPORTED, ids=[u[0] for u in _UNSUPPORTED])
def test_unsupported_modes_raise_not_implemented(flag, kwargs):
    args = make_moe(2, 64, 32, 4, 2, torch.float16)
    a = dict(args)
    positional = [a.pop(k) for k in ("input", "token_selected_experts", "token_final_scales", "fc1_expert_weights",
                                     "fc2_expert_weights")]
    quant_scales = kwargs.pop("quant_scales", None)
    with pytest.raises(NotImplementedError, match=flag) as err:
        cutlass_fused_moe(*positional, torch.float16, quant_scales, **a, **kwargs)
    assert "SM80" in str(err.value) or flag in ("min_latency_mode", "cluster_size", "cluster_rank")


def test_fp8_input_raises_not_implemented():
    args = make_moe(2, 64, 32, 4, 2, torch.float16)
    args["input"] = args["input"].to(torch.float8_e4m3fn)
    with pytest.raises(NotImplementedError, match="FP8"):
        call(args, dtype=torch.float16)


def test_int8_woq_hook_wiring(monkeypatch):
    """`use_int8_woq_per_channel=True` goes to simple_moe.quant.cutlass_int8_woq_forward with the resolved TP/EP arguments."""
    import sys
    import types

    args = make_moe(2, 64, 32, 4, 2, torch.float16, biases=True)
    seen = {}

    def fake_forward(*positional, **kwargs):
        seen.update(kwargs, positional=positional)
        return torch.zeros(2, 64, dtype=torch.float16, device=DEVICE)

    fake = types.ModuleType("simple_moe.quant")
    fake.cutlass_int8_woq_forward = fake_forward
    monkeypatch.setitem(sys.modules, "simple_moe.quant", fake)
    monkeypatch.setattr(simple_moe, "quant", fake, raising=False)
    result = call(args, use_int8_woq_per_channel=True, tp_size=2, tp_rank=1, ep_size=2, ep_rank=1)
    assert len(result) == 4 and result[2].shape == (4, 2)
    assert seen["fc2_expert_biases"] is None and seen["fc1_expert_biases"] is args["fc1_expert_biases"]
    assert seen["start_expert"] == 4 and seen["total_experts"] == 8 and seen["activation"].kind == ActivationType.Swiglu
    assert seen["positional"][0] is args["input"] and len(seen["positional"]) == 6


def test_int8_woq_bad_fc2_bias_on_another_tp_rank_is_named():
    """Only rank 0 adds fc2's bias, but every rank checks it: on rank 1 the INT8 path used to drop it unchecked."""
    args = make_moe(3, 64, 32, 4, 2, torch.float16, biases=True)
    q1, s1 = quantize_weights_int8(args["fc1_expert_weights"])
    q2, s2 = quantize_weights_int8(args["fc2_expert_weights"])

    def rank1(fc2_expert_biases):
        return cutlass_fused_moe(args["input"], args["token_selected_experts"], args["token_final_scales"], q1, q2,
                                 torch.float16, [s1.half(), s2.half()], fc1_expert_biases=args["fc1_expert_biases"],
                                 fc2_expert_biases=fc2_expert_biases, tp_size=2, tp_rank=1, use_int8_woq_per_channel=True)

    for bad, error in ((torch.zeros(7, 3, dtype=torch.float16, device=DEVICE), ValueError),
                       (torch.zeros(4, 64, dtype=torch.int32, device=DEVICE), TypeError)):
        with pytest.raises(error, match="^fc2_expert_biases"):
            rank1(bad)
    assert rank1(args["fc2_expert_biases"])[0].shape == (3, 64)  # the valid call runs


def test_arguments_requiring_grad_give_a_backward_that_raises():
    args = make_moe(3, 64, 32, 4, 2, torch.float32)
    args["fc1_expert_weights"].requires_grad_()
    out = call(args)[0]
    assert out.grad_fn is not None
    with pytest.raises(RuntimeError, match="cutlass_fused_moe has no backward"):
        out.sum().backward()


def test_int8_woq_bad_ids_and_top_k_name_the_argument():
    """use_int8_woq_per_channel=True checks the ids as the unquantised path does (TypeError/ValueError naming them), and top_k
    against the global expert count (E_local * ep_size)."""
    args = make_moe(2, 64, 32, 4, 2, torch.float16)
    q1, s1 = quantize_weights_int8(args["fc1_expert_weights"].float())
    q2, s2 = quantize_weights_int8(args["fc2_expert_weights"].float())

    def call_int8(ids, scales=args["token_final_scales"], **kwargs):
        return cutlass_fused_moe(args["input"], ids, scales, q1, q2, torch.float16, [s1.half(), s2.half()],
                                 use_int8_woq_per_channel=True, **kwargs)

    ids = args["token_selected_experts"]
    for bad, error in ((None, TypeError), (ids.tolist(), TypeError), (ids[0, 0], ValueError)):
        with pytest.raises(error, match="^token_selected_experts"):
            call_int8(bad)
    with pytest.raises(ValueError, match="^token_selected_experts: top_k=9 exceeds the number of experts 8"):
        call_int8(torch.zeros(2, 9, dtype=torch.int32, device=DEVICE), None, ep_size=2, ep_rank=0)


@pytest.mark.parametrize("kind", [ActivationType.Swiglu, ActivationType.Relu2], ids=lambda k: k.name)
def test_int8_woq_per_channel_against_dequantized_reference(kind):
    """Our extension end to end: int8 weights (plain [out, in] layout) with per-output-channel scales; the float64 reference runs
    on the dequantised weights."""
    args = make_moe(8, 64, 32, 4, 2, torch.float16, kind, biases=True)
    quantized, scales = {}, []
    for name in ("fc1_expert_weights", "fc2_expert_weights"):
        w = args[name].float()
        scale = w.abs().amax(dim=2).clamp(min=1e-8) / 127.0  # [E, out]
        q = torch.round(w / scale.unsqueeze(2)).clamp(-127, 127).to(torch.int8)
        quantized[name] = q
        scales.append(scale.to(torch.float16))
        args[name] = (q.float() * scales[-1].float().unsqueeze(2)).to(torch.float16)  # what the int8 weights stand for
    a = dict(args, **quantized)
    out = cutlass_fused_moe(a.pop("input"), a.pop("token_selected_experts"), a.pop("token_final_scales"),
                            a.pop("fc1_expert_weights"), a.pop("fc2_expert_weights"), torch.float16, scales, **a,
                            activation_type=kind, use_int8_woq_per_channel=True)[0]
    ref = reference_moe(args["input"], args["token_selected_experts"], args["token_final_scales"],
                        args["fc1_expert_weights"].double(), args["fc2_expert_weights"].double(), kind,
                        fc1_expert_biases=args["fc1_expert_biases"], fc2_expert_biases=args["fc2_expert_biases"],
                        gate_layout="up_first")
    assert rel_l2(out, ref) < REL_L2[torch.float16]
