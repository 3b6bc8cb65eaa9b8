"""W8A8 GEMM2 on SM90 in Gluon: its row-block table (here and in the interpreter), and on an H100 the GEMM itself, bitwise
against the cp.async kernel (int32 accumulation is exact, so any K order gives the same bits), every row written, in a graph.

The interpreter does not run Gluon: the GEMM tests need an SM90 GPU (`pytest -m gpu`); check-build compiles it for sm_90."""
import dataclasses

import pytest
import torch

import simple_moe as sm
from simple_moe import grouped_gemm_gluon
from simple_moe.grouped_gemm import GroupedGemmPlan, TileConfig, grouped_gemm, num_m_tiles_bound
from simple_moe.grouped_gemm_gluon import row_block_table, takes_gluon
from simple_moe.quant import quantize_activations_int8, quantize_weights_int8
from problems import DEVICE

# The tile the rules pick for W8A8 GEMM2 from ~1K rows, which this kernel fixes.
GLUON_TILE = TileConfig(grouped_gemm_gluon.BLOCK_M, grouped_gemm_gluon.BLOCK_N, grouped_gemm_gluon.BLOCK_K, 8, 8, 4,
                        programs_per_sm=1, flatten=True, tma=True)


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


def _problem(routing: str, num_experts=6, tokens=333, top_k=2, hidden=2880, inter=1408):
    """A routed W8A8 GEMM2: odd sizes (H = 2880 is a partial 256-column block, 666 rows), empty experts or a hot one."""
    if routing == "random":
        ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    elif routing == "one_hot_expert":
        ids = torch.stack([torch.tensor([2, int(torch.randint(3, num_experts, ()))]) for _ in range(tokens)])
    else:  # experts 2, 3, 5 empty
        ids = torch.stack([torch.tensor([1, 4]) if t % 3 else torch.tensor([4, 0]) for t in range(tokens)])
    maps = sm.build_routing_maps(ids.to(DEVICE), num_experts)
    inter_rows, a_scale = quantize_activations_int8(torch.randn(maps.expanded_num_rows, inter, device=DEVICE))
    w2, w_scale = quantize_weights_int8(torch.randn(num_experts, hidden, inter, device=DEVICE) / inter ** 0.5)
    scales = torch.rand(tokens, top_k, device=DEVICE) + 0.1
    return maps, inter_rows, a_scale, w2, w_scale, scales


def _gemm2(maps, inter_rows, a_scale, w2, w_scale, scales, cfg, out_dtype, bias=None):
    out = torch.full((maps.expanded_num_rows, w2.shape[1]), float("nan"), device=DEVICE, dtype=out_dtype)
    return grouped_gemm(inter_rows, w2, out, maps, gather_a=False, router_scales=scales, w_scale=w_scale, a_scale=a_scale,
                        bias=bias, config=cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the Gluon kernel is SM90's (wgmma, setmaxnreg)")
@pytest.mark.parametrize("routing", ["random", "one_hot_expert", "empty_experts"])
@pytest.mark.parametrize("out_dtype,with_bias", [(torch.bfloat16, False), (torch.float16, True)])
def test_gluon_gemm2_is_the_cp_async_gemm2(routing, out_dtype, with_bias, monkeypatch):
    monkeypatch.setattr(grouped_gemm_gluon, "MIN_ROWS_PER_EXPERT", 0)  # this problem's 111 rows an expert take the kernel
    maps, inter_rows, a_scale, w2, w_scale, scales = _problem(routing)
    bias = torch.randn(w2.shape[0], w2.shape[1], device=DEVICE, dtype=out_dtype) if with_bias else None
    plan = GroupedGemmPlan(inter_rows, w2, torch.empty(maps.expanded_num_rows, w2.shape[1], device=DEVICE, dtype=out_dtype),
                           maps, gather_a=False, router_scales=scales, w_scale=w_scale, a_scale=a_scale, bias=bias,
                           config=GLUON_TILE)
    assert plan.gluon and takes_gluon(GLUON_TILE, inter_rows, w2.shape[0])
    got = _gemm2(maps, inter_rows, a_scale, w2, w_scale, scales, GLUON_TILE, out_dtype, bias)
    expected = _gemm2(maps, inter_rows, a_scale, w2, w_scale, scales, dataclasses.replace(GLUON_TILE, tma=False), out_dtype,
                      bias)
    kept = int(maps.expert_first_token_offset[-1])
    assert not got[:kept].isnan().any()
    assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the Gluon kernel is SM90's (wgmma, setmaxnreg)")
def test_gluon_gemm2_replays_in_a_cuda_graph(monkeypatch):
    monkeypatch.setattr(grouped_gemm_gluon, "MIN_ROWS_PER_EXPERT", 0)
    maps, inter_rows, a_scale, w2, w_scale, scales = _problem("random")
    eager = _gemm2(maps, inter_rows, a_scale, w2, w_scale, scales, GLUON_TILE, torch.bfloat16)
    out = torch.full_like(eager, float("nan"))
    call = lambda: grouped_gemm(inter_rows, w2, out, maps, gather_a=False, router_scales=scales, w_scale=w_scale,  # noqa: E731
                                a_scale=a_scale, config=GLUON_TILE)
    call()  # compile outside the capture
    out.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    graph.replay()
    assert torch.equal(out, eager)


def test_takes_gluon_only_int8_on_sm90_from_two_row_blocks_an_expert():
    rows = 4 * grouped_gemm_gluon.MIN_ROWS_PER_EXPERT
    a16 = torch.empty(rows, 128, dtype=torch.bfloat16, device=DEVICE)
    assert not takes_gluon(GLUON_TILE, a16, 4)
    a8 = torch.empty(rows, 128, dtype=torch.int8, device=DEVICE)
    assert takes_gluon(GLUON_TILE, a8, 4) == _hopper()
    assert not takes_gluon(GLUON_TILE, a8, 5)  # fewer rows an expert: the TMA kernel's half-height tails pay there
    assert not takes_gluon(dataclasses.replace(GLUON_TILE, block_n=128), a8, 4)
