"""W8A8 GEMM1 and GEMM2 on SM90 in Gluon: the row-block table and the dispatch rules (here and in the interpreter), and on an
H100 the GEMMs themselves, bitwise against the Triton kernels (int32 accumulation is exact and the epilogues are the same
code, so any K order gives the same bits), every kept row written, in a CUDA graph, and in the layer.

The interpreter does not run Gluon: the GEMM tests need an SM90 GPU (`pytest -m gpu`); check-build compiles them for sm_90."""
import dataclasses

import pytest
import torch

import simple_moe as sm
from simple_moe import grouped_gemm_gluon, pipeline
from simple_moe.activations import activation_params, get_activation
from simple_moe.grouped_gemm import GroupedGemmPlan, TileConfig, num_m_tiles_bound
from simple_moe.grouped_gemm_gluon import (BLOCK_K, BLOCK_M, GEMM1_BLOCK_N, GEMM2_BLOCK_N, row_block_table,
                                           shared_row_block_table, takes_gluon)
from simple_moe.quant import quantize_activations_int8, quantize_moe_weights, quantize_weights_int8
from problems import DEVICE

# The tiles the rules pick for W8A8 on SM90 from ~1K rows, which these kernels fix.
GEMM2_TILE = TileConfig(BLOCK_M, GEMM2_BLOCK_N, BLOCK_K, 8, 8, 4, programs_per_sm=1, flatten=True, tma=True)
GEMM1_TILE = TileConfig(BLOCK_M, GEMM1_BLOCK_N, BLOCK_K, 8, 8, 3, fused_gate_up=True)
hopper = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                            reason="the Gluon kernels are SM90's (wgmma, setmaxnreg)")


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.parametrize("sizes", [[0, 5, 0, 300, 128, 1], [256], [0, 0, 0], [129, 127, 128, 0, 1000]])
def test_row_block_table(sizes):
    offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int64, device=DEVICE)
    rows = max(sum(sizes), 1)
    table, num_row_blocks = row_block_table(offsets, rows, 128)
    assert table.shape == (num_m_tiles_bound(rows, len(sizes), 128), 3)
    expected = [[start, int(offsets[e + 1]), e] for e in range(len(sizes))
                for start in range(int(offsets[e]), int(offsets[e + 1]), 128)]
    assert num_row_blocks.item() == len(expected)
    assert table[:len(expected)].tolist() == expected


def test_shared_row_block_table_is_made_once_per_dict(monkeypatch):
    maps = sm.build_routing_maps(torch.tensor([[0, 1], [1, 2], [2, 0]], device=DEVICE), 3)
    made = []
    real = grouped_gemm_gluon.row_block_table
    monkeypatch.setattr(grouped_gemm_gluon, "row_block_table", lambda *a, **kw: made.append(1) or real(*a, **kw))
    tables = {}
    first = shared_row_block_table(maps, 6, tables)
    assert shared_row_block_table(maps, 6, tables) is first and len(made) == 1
    shared_row_block_table(maps, 6, None)
    assert len(made) == 2
    assert first[0][:3].tolist() == [[0, 2, 0], [2, 4, 1], [4, 6, 2]]


def _maps(routing: str, num_experts: int, tokens: int):
    top_k = 2
    if routing == "random":
        ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    elif routing == "one_hot_expert":  # expert 2 takes every token
        ids = torch.stack([torch.tensor([2, int(torch.randint(3, num_experts, ()))]) for _ in range(tokens)])
    elif routing == "tails":  # experts of 64 and 1 rows (the bottom consumer idles), 65 (it has one row), 128, 192, 216
        counts = [64, 65, 1, 128, 192, 2 * tokens - 450]
        picks = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])  # sorted: picks t and t + T differ
        ids = torch.stack([picks[:tokens], picks[tokens:]], 1)
    elif routing == "dropped_rows":  # ids 6 and 7 lie outside the 6 local experts: those rows are dropped
        ids = torch.stack([torch.randperm(num_experts + 2)[:top_k] for _ in range(tokens)])
    else:  # experts 2, 3, 5 empty
        ids = torch.stack([torch.tensor([1, 4]) if t % 3 else torch.tensor([4, 0]) for t in range(tokens)])
    return sm.build_routing_maps(ids.to(DEVICE), num_experts)


def _run(plan_args: dict, call_args: dict, a, weights, out_shape, maps, out_dtype, cfg, **plan_only):
    """(which Gluon GEMM the plan took, its output from a NaN-poisoned buffer)."""
    out = torch.full(out_shape, float("nan"), device=DEVICE, dtype=out_dtype)
    plan = GroupedGemmPlan(a, weights, out, maps, config=cfg, **plan_args, **call_args, **plan_only)
    plan(a, weights, out, maps, **call_args)
    return plan.gluon, out


def _assert_same_bits_every_kept_row(got, expected, maps):
    kept = int(maps.expert_first_token_offset[-1])
    assert not got[:kept].isnan().any()
    assert torch.equal(got[:kept], expected[:kept])


# ---- GEMM2


def _gemm2_problem(routing, num_experts=6, tokens=333, hidden=2880, inter=1408):
    """A routed W8A8 GEMM2: odd sizes (H = 2880 is a partial 256-column block, 666 rows), empty experts or a hot one."""
    maps = _maps(routing, num_experts, tokens)
    inter_rows, a_scale = quantize_activations_int8(torch.randn(maps.expanded_num_rows, inter, device=DEVICE))
    w2, w_scale = quantize_weights_int8(torch.randn(num_experts, hidden, inter, device=DEVICE) / inter ** 0.5)
    scales = torch.rand(tokens, 2, device=DEVICE) + 0.1
    return maps, inter_rows, a_scale, w2, w_scale, scales


def _gemm2(problem, cfg, out_dtype, bias=None):
    maps, inter_rows, a_scale, w2, w_scale, scales = problem
    return _run({"gather_a": False}, {"router_scales": scales, "w_scale": w_scale, "a_scale": a_scale, "bias": bias},
                inter_rows, w2, (maps.expanded_num_rows, w2.shape[1]), maps, out_dtype, cfg)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("routing", ["random", "one_hot_expert", "empty_experts", "tails"])
@pytest.mark.parametrize("out_dtype,with_bias", [(torch.bfloat16, False), (torch.float16, True)])
def test_gluon_gemm2_is_the_cp_async_gemm2(routing, out_dtype, with_bias, monkeypatch):
    monkeypatch.setattr(grouped_gemm_gluon, "MIN_ROWS_PER_EXPERT", 0)  # this problem's 111 rows an expert take the kernel
    problem = _gemm2_problem(routing)
    w2 = problem[3]
    bias = torch.randn(w2.shape[0], w2.shape[1], device=DEVICE, dtype=out_dtype) if with_bias else None
    gluon, got = _gemm2(problem, GEMM2_TILE, out_dtype, bias)
    cp_async, expected = _gemm2(problem, dataclasses.replace(GEMM2_TILE, tma=False), out_dtype, bias)
    assert (gluon, cp_async) == (2, 0)
    _assert_same_bits_every_kept_row(got, expected, problem[0])


# ---- GEMM1


def _gemm1_problem(routing, num_experts=6, tokens=333, hidden=2880, inter=1408):
    """A routed W8A8 GEMM1: H = 2880 is not a multiple of the 128-deep K step; I = 1000 would end in a partial box."""
    maps = _maps(routing, num_experts, tokens)
    x_q, x_scale = quantize_activations_int8(torch.randn(tokens, hidden, device=DEVICE))
    w1, w1_scale = quantize_weights_int8(torch.randn(num_experts, 2 * inter, hidden, device=DEVICE) / hidden ** 0.5)
    return maps, x_q, x_scale, w1, w1_scale


def _gemm1(problem, activation, gate_layout, out_dtype, bias=None, act_params=None):
    maps, x_q, x_scale, w1, w1_scale = problem
    return _run({"gather_a": True, "activation": get_activation(activation), "gate_layout": gate_layout},
                {"w_scale": w1_scale, "a_scale": x_scale, "bias": bias, "act_params": act_params},
                x_q, w1, (maps.expanded_num_rows, w1.shape[1] // 2), maps, out_dtype, GEMM1_TILE)


def _gemm1_gluon_and_triton(problem, activation, gate_layout, out_dtype, monkeypatch, **extra):
    monkeypatch.setattr(grouped_gemm_gluon, "MIN_ROWS_PER_EXPERT", 0)
    gluon, got = _gemm1(problem, activation, gate_layout, out_dtype, **extra)
    monkeypatch.setattr(grouped_gemm_gluon, "MIN_ROWS_PER_EXPERT", 1 << 30)  # the same tile on the Triton kernel
    triton_kernel, expected = _gemm1(problem, activation, gate_layout, out_dtype, **extra)
    assert (gluon, triton_kernel) == (1, 0)
    return got, expected


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("routing", ["random", "one_hot_expert", "empty_experts", "dropped_rows", "tails"])
@pytest.mark.parametrize("gate_layout,out_dtype,hidden,inter", [("gate_first", torch.bfloat16, 2880, 1408),
                                                                ("up_first", torch.float16, 2048, 1000)])
def test_gluon_gemm1_is_the_triton_gemm1(routing, gate_layout, out_dtype, hidden, inter, monkeypatch):
    problem = _gemm1_problem(routing, hidden=hidden, inter=inter)
    got, expected = _gemm1_gluon_and_triton(problem, "swiglu", gate_layout, out_dtype, monkeypatch)
    _assert_same_bits_every_kept_row(got, expected, problem[0])


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("activation", ["swiglu", "swiglu_bias", "swiglu_step", "geglu_tanh", "situ"])  # not GeGLU: below
def test_gluon_gemm1_every_gated_activation_with_biases(activation, monkeypatch):
    problem = _gemm1_problem("random", hidden=1024, inter=640)
    num_experts, fc1_rows = problem[3].shape[:2]
    bias = torch.randn(num_experts, fc1_rows, device=DEVICE, dtype=torch.bfloat16) * 0.5
    params = activation_params(get_activation(activation), num_experts, DEVICE, *(torch.rand(num_experts) + 0.5
                                                                                  for _ in range(3)))
    got, expected = _gemm1_gluon_and_triton(problem, activation, "up_first", torch.bfloat16, monkeypatch, bias=bias,
                                            act_params=params)
    _assert_same_bits_every_kept_row(got, expected, problem[0])


# ---- graphs and the layer


@pytest.mark.gpu
@hopper
def test_gluon_gemms_replay_in_a_cuda_graph(monkeypatch):
    monkeypatch.setattr(grouped_gemm_gluon, "MIN_ROWS_PER_EXPERT", 0)
    gemm1, gemm2 = _gemm1_problem("random"), _gemm2_problem("random")
    eager = (_gemm1(gemm1, "swiglu", "gate_first", torch.bfloat16)[1], _gemm2(gemm2, GEMM2_TILE, torch.bfloat16)[1])
    maps, x_q, x_scale, w1, w1_scale = gemm1
    plan1 = GroupedGemmPlan(x_q, w1, eager[0], maps, gather_a=True, activation=get_activation("swiglu"), w_scale=w1_scale,
                            a_scale=x_scale, config=GEMM1_TILE)
    maps2, inter_rows, a_scale, w2, w_scale, scales = gemm2
    plan2 = GroupedGemmPlan(inter_rows, w2, eager[1], maps2, gather_a=False, router_scales=scales, w_scale=w_scale,
                            a_scale=a_scale, config=GEMM2_TILE)
    assert (plan1.gluon, plan2.gluon) == (1, 2)
    outs = [torch.full_like(e, float("nan")) for e in eager]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan1(x_q, w1, outs[0], maps, w_scale=w1_scale, a_scale=x_scale)
        plan2(inter_rows, w2, outs[1], maps2, router_scales=scales, w_scale=w_scale, a_scale=a_scale)
    graph.replay()
    assert torch.equal(outs[0], eager[0]) and torch.equal(outs[1], eager[1])


@pytest.mark.gpu
@hopper
def test_layer_runs_both_gemms_on_gluon_with_one_table(monkeypatch):
    """fused_moe_simple W8A8 at 256 rows an expert: GEMM1 and GEMM2 on the Gluon kernels, one row-block table launch, the
    bits of the Triton kernels (below the rule's rows), and a CUDA graph replays it."""
    num_experts, tokens, top_k, hidden, inter = 8, 1024, 2, 2048, 768
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
    w1 = torch.randn(num_experts, 2 * inter, hidden, device=DEVICE, dtype=torch.bfloat16) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, device=DEVICE, dtype=torch.bfloat16) / inter ** 0.5
    q1, q2, quant = quantize_moe_weights(w1, w2, "w8a8")
    scales, ids = sm.route(torch.randn(tokens, num_experts, device=DEVICE), top_k)
    calls = []
    for name in ("grouped_gemm1_w8a8_gluon", "grouped_gemm2_w8a8_gluon", "row_block_table"):
        real = getattr(grouped_gemm_gluon, name)
        monkeypatch.setattr(grouped_gemm_gluon, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name)
                            or _real(*a, **kw))
    out = sm.fused_moe_simple(x, ids, scales, q1, q2, quant=quant)
    assert sorted(calls) == ["grouped_gemm1_w8a8_gluon", "grouped_gemm2_w8a8_gluon", "row_block_table"]
    graph_out = torch.full_like(out, float("nan"))
    sm.fused_moe_simple(x, ids, scales, q1, q2, quant=quant, output=graph_out)  # warm the call plan
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sm.fused_moe_simple(x, ids, scales, q1, q2, quant=quant, output=graph_out)
    graph_out.fill_(float("nan"))
    graph.replay()
    assert torch.equal(graph_out, out)
    monkeypatch.setattr(pipeline, "_CALL_PLANS_ENABLED", False)  # choose the kernels anew
    monkeypatch.setattr(grouped_gemm_gluon, "MIN_ROWS_PER_EXPERT", 1 << 30)
    calls.clear()
    assert torch.equal(sm.fused_moe_simple(x, ids, scales, q1, q2, quant=quant), out) and not calls


# ---- the rules (here and on any GPU)


@pytest.mark.parametrize("gemm", [1, 2])
def test_plan_hands_a_gluon_gemm_to_its_launcher(gemm, monkeypatch):
    """Where the rule says yes, the plan calls the launcher with the call's tensors and the shared tables (the launchers
    stubbed: the interpreter does not run Gluon). Catches a renamed or re-signed launcher without a GPU."""
    monkeypatch.setattr(grouped_gemm_gluon, "takes_gluon", lambda *a, **kw: True)
    launched = []
    for name in ("grouped_gemm1_w8a8_gluon", "grouped_gemm2_w8a8_gluon"):
        monkeypatch.setattr(grouped_gemm_gluon, name, lambda *a, _name=name, **kw: launched.append((_name, a, kw)) or a[2])
    maps = _maps("random", 6, 300)
    tables = {}
    if gemm == 1:
        x_q, x_scale = quantize_activations_int8(torch.randn(300, 256, device=DEVICE))
        w1, w_scale = quantize_weights_int8(torch.randn(6, 256, 256, device=DEVICE))
        out = torch.empty(600, 128, device=DEVICE, dtype=torch.bfloat16)
        plan = GroupedGemmPlan(x_q, w1, out, maps, gather_a=True, activation=get_activation("swiglu"),
                               gate_layout="up_first", w_scale=w_scale, a_scale=x_scale, config=GEMM1_TILE)
        plan(x_q, w1, out, maps, w_scale=w_scale, a_scale=x_scale, tables=tables)
        expected = {"activation": get_activation("swiglu"), "gate_layout": "up_first", "bias": None, "act_params": None,
                    "w_scale": w_scale, "a_scale": x_scale, "tables": tables}
    else:
        inter_rows, a_scale = quantize_activations_int8(torch.randn(600, 256, device=DEVICE))
        w2, w_scale = quantize_weights_int8(torch.randn(6, 256, 256, device=DEVICE))
        out = torch.empty(600, 256, device=DEVICE, dtype=torch.bfloat16)
        scales = torch.rand(300, 2, device=DEVICE)
        plan = GroupedGemmPlan(inter_rows, w2, out, maps, gather_a=False, router_scales=scales, w_scale=w_scale,
                               a_scale=a_scale, config=GEMM2_TILE)
        plan(inter_rows, w2, out, maps, router_scales=scales, w_scale=w_scale, a_scale=a_scale, tables=tables)
        expected = {"bias": None, "router_scales": scales, "w_scale": w_scale, "a_scale": a_scale, "tables": tables}
    assert plan.gluon == gemm and len(launched) == 1
    name, args, kwargs = launched[0]
    assert name == ("grouped_gemm1_w8a8_gluon" if gemm == 1 else "grouped_gemm2_w8a8_gluon") and args[2] is out
    assert kwargs.keys() == expected.keys() and all(kwargs[k] is v or kwargs[k] == v for k, v in expected.items())


def test_takes_gluon_only_on_sm90_with_gluon():
    """The hardware half of the rule: here True only on an H100/H200 (the tests below replace it to check the rest)."""
    rows = 4 * grouped_gemm_gluon.MIN_ROWS_PER_EXPERT
    w2 = torch.empty(4, 256, 128, dtype=torch.int8, device=DEVICE)
    a8 = torch.empty(rows, 128, dtype=torch.int8, device=DEVICE)
    assert takes_gluon(GEMM2_TILE, a8, w2, rows, gather_a=False) == _hopper()


@pytest.fixture
def on_sm90(monkeypatch):
    """takes_gluon as it decides on an SM90 GPU with Gluon, on whatever device the tests run."""
    monkeypatch.setattr(grouped_gemm_gluon, "_runs_here", lambda device: True)


def test_takes_gluon_gemm2_only_w8a8_with_its_tile_from_two_row_blocks_an_expert(on_sm90):
    rows = 4 * grouped_gemm_gluon.MIN_ROWS_PER_EXPERT
    w2 = torch.empty(4, 256, 128, dtype=torch.int8, device=DEVICE)
    a8 = torch.empty(rows, 128, dtype=torch.int8, device=DEVICE)
    assert takes_gluon(GEMM2_TILE, a8, w2, rows, gather_a=False)
    assert not takes_gluon(GEMM2_TILE, a8.to(torch.bfloat16), w2, rows, gather_a=False)
    w2_five = torch.empty(5, 256, 128, dtype=torch.int8, device=DEVICE)
    assert not takes_gluon(GEMM2_TILE, a8, w2_five, rows, gather_a=False)  # fewer rows an expert than measured
    assert not takes_gluon(dataclasses.replace(GEMM2_TILE, block_n=128), a8, w2, rows, gather_a=False)


def test_takes_gluon_gemm1_needs_its_tile_a_contiguous_gate_half_aligned_rows_and_no_geglu(on_sm90):
    rows, tokens, hidden = 4 * grouped_gemm_gluon.MIN_ROWS_PER_EXPERT, 300, 256
    w1 = torch.empty(4, 512, hidden, dtype=torch.int8, device=DEVICE)
    x_q = torch.empty(tokens, hidden, dtype=torch.int8, device=DEVICE)

    def takes(cfg=GEMM1_TILE, a=x_q, weights=w1, num_rows=rows, gate_layout="gate_first", activation="swiglu"):
        return takes_gluon(cfg, a, weights, num_rows, gather_a=True, gate_layout=gate_layout,
                           activation=get_activation(activation))

    assert takes() and takes(gate_layout="up_first") and takes(activation="situ")
    assert not takes(a=x_q.to(torch.bfloat16))  # 16-bit GEMM1 stays on Triton (see the module docstring)
    assert not takes(gate_layout="interleaved")
    assert not takes(activation="geglu")  # its erf spills in the consumers, and it lost (see _SPILLING_ACTIVATIONS)
    assert not takes(cfg=dataclasses.replace(GEMM1_TILE, fused_gate_up=False))
    assert not takes(num_rows=rows - 1)
    assert not takes(a=torch.empty(tokens, hidden + 8, dtype=torch.int8, device=DEVICE)[:, :hidden])  # 264-byte rows
    assert not takes(weights=torch.empty(4, 512, hidden + 4, dtype=torch.int8, device=DEVICE)[:, :, :hidden])  # 260-byte rows
    # fc1 rows a fixed 16-byte multiple apart (every other row of a bigger tensor) are still one TMA matrix
    assert takes(weights=torch.empty(4, 1024, hidden, dtype=torch.int8, device=DEVICE)[:, ::2])
