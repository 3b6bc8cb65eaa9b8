"""The grouped GEMM launcher on its own: every tile schedule (one program per tile, persistent) gives the same bits."""
import dataclasses
import math
import os

import pytest
import torch
import triton
import triton.language as tl

import simple_moe as sm
from simple_moe.activations import get_activation
from simple_moe.grouped_gemm import (grouped_gemm, int8_exact_to_float32, splits_tail_tiles, tail_roles,
                                     tile_coordinates)
from simple_moe.grouped_gemm_tiles import TileConfig
from problems import DEVICE

# Tile shapes, each run with one program per tile of the bound and persistent (programs_per_sm x 4 "SMs" in the interpreter,
# many tiles each).
TILES = [TileConfig(16, 32, 32, 1, 4, 2), TileConfig(32, 16, 64, 2, 4, 2)]
SCHEDULES = [(tile, dataclasses.replace(tile, programs_per_sm=n, flatten=flat))
             for tile, n, flat in zip(TILES, (1, 3), (False, True))]


def _case(ids, num_experts, hidden=64, inter=48, dtype=torch.float32):
    tokens, top_k = ids.shape
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=dtype)
    w1 = torch.randn(num_experts, 2 * inter, hidden, device=DEVICE, dtype=dtype) / math.sqrt(hidden)
    w2 = torch.randn(num_experts, hidden, inter, device=DEVICE, dtype=dtype) / math.sqrt(inter)
    scales = torch.rand(tokens, top_k, device=DEVICE) + 0.1
    maps = sm.build_routing_maps(ids.to(DEVICE), num_experts)
    return x, w1, w2, scales, maps


def _both_gemms(x, w1, w2, scales, maps, cfg):
    rows, inter, hidden = maps.expanded_num_rows, w2.shape[2], w2.shape[1]
    inter_out = torch.full((rows, inter), float("nan"), device=x.device, dtype=x.dtype)  # poisoned: every row must be written
    grouped_gemm(x, w1, inter_out, maps, gather_a=True, activation=get_activation("swiglu"), config=cfg)
    out2 = torch.full((rows, hidden), float("nan"), device=x.device, dtype=x.dtype)
    grouped_gemm(inter_out, w2, out2, maps, gather_a=False, router_scales=scales, config=cfg)
    return inter_out, out2


@pytest.mark.parametrize("routing", ["random", "one_hot_expert", "empty_experts"])
def test_schedules_agree_and_write_every_row(routing):
    num_experts, tokens, top_k = 6, 21, 2
    if routing == "random":
        ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    elif routing == "one_hot_expert":  # expert 4 takes every token (41+ rows: several row blocks of one expert)
        ids = torch.stack([torch.tensor([4, int(torch.randint(0, 4, ()))]) for _ in range(tokens)])
    else:  # experts 0, 2 and 5 get nothing
        ids = torch.stack([torch.tensor([1, 3]) if t % 2 else torch.tensor([4, 1]) for t in range(tokens)])
    x, w1, w2, scales, maps = _case(ids, num_experts)
    ref = sm.reference_moe(x, ids.to(DEVICE), scales, w1, w2)
    for one_per_tile, persistent in SCHEDULES:
        results = [_both_gemms(x, w1, w2, scales, maps, cfg) for cfg in (one_per_tile, persistent)]
        for inter_out, out2 in results:
            assert not inter_out.isnan().any() and not out2.isnan().any()
            out = sm.finalize(out2, maps, None)
            assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
        # A tile is computed by the same instructions whichever program runs it.
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_half_height_tail_tiles():
    # 128-row tiles: expert 0 has 150 rows (a full tile, then 22 rows in a half-height tile), expert 1 200 (the 72 left need
    # the full height), expert 2 none, expert 3 40 (one half-height tile only), expert 4 64 (exactly a half tile), expert 5
    # 256 (two full tiles, no tail).
    cfg = TileConfig(128, 32, 32, 1, 4, 2)
    assert splits_tail_tiles(cfg) and splits_tail_tiles(dataclasses.replace(cfg, programs_per_sm=1))
    assert not splits_tail_tiles(dataclasses.replace(cfg, programs_per_sm=1, flatten=True))
    assert splits_tail_tiles(dataclasses.replace(cfg, programs_per_sm=1, flatten=True, flat_tail_cost=55))
    assert not splits_tail_tiles(dataclasses.replace(cfg, half_tail=False))
    counts = ((0, 150), (1, 200), (3, 40), (4, 64), (5, 256))
    ids = torch.cat([torch.full((n,), e) for e, n in counts])[torch.randperm(710)].unsqueeze(1)
    x, w1, w2, scales, maps = _case(ids, 6, hidden=32, inter=16)
    ref = sm.reference_moe(x, ids.to(DEVICE), scales, w1, w2)
    # Half-height tails: one program per tile, a persistent loop, and a flattened persistent loop with the tails walked by a
    # second group of programs (two splits of the 12 programs); and a flattened loop without them. Each also with groups of
    # row blocks cut per expert (expert_groups): the same tiles in another order, so the same bits.
    flat = dataclasses.replace(cfg, programs_per_sm=3, flatten=True)
    for config in (cfg, dataclasses.replace(cfg, programs_per_sm=2), dataclasses.replace(flat, flat_tail_cost=55),
                   dataclasses.replace(flat, flat_tail_cost=100), flat):
        inter_out, out2 = _both_gemms(x, w1, w2, scales, maps, config)
        assert not inter_out.isnan().any() and not out2.isnan().any()
        out = sm.finalize(out2, maps, None)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
        if config.programs_per_sm:
            by_expert = _both_gemms(x, w1, w2, scales, maps, dataclasses.replace(config, group_m=2, expert_groups=True))
            assert torch.equal(by_expert[0], inter_out) and torch.equal(by_expert[1], out2)


@triton.jit
def _tail_roles_probe(out_ptr, num_full_tiles, num_half_tiles, COST: tl.constexpr):
    full_first, full_step, runs_full, half_first, half_step, runs_half = tail_roles(num_full_tiles, num_half_tiles, COST)
    base = out_ptr + tl.program_id(0) * 6
    tl.store(base, full_first)
    tl.store(base + 1, full_step)
    tl.store(base + 2, runs_full.to(tl.int32))
    tl.store(base + 3, half_first)
    tl.store(base + 4, half_step)
    tl.store(base + 5, runs_half.to(tl.int32))


def test_tail_roles_cover_every_tile_once():
    # Whatever the program count and the two tile counts, the programs' walks (first, first + step, ...) cover each full
    # and each half tile exactly once; a lone program walks both kinds.
    for programs in (1, 2, 3, 5, 12):
        for num_full in (0, 1, 7, 20):
            for num_half in (0, 1, 5, 9):
                for cost in (55, 100):
                    out = torch.full((programs, 6), -1, dtype=torch.int32, device=DEVICE)
                    _tail_roles_probe[(programs,)](out, num_full, num_half, COST=cost)
                    for kind, total in ((0, num_full), (3, num_half)):
                        seen = []
                        for first, step, runs in out[:, kind:kind + 3].tolist():
                            if runs:
                                assert step >= 1
                                seen += list(range(first, total, step))
                        assert sorted(seen) == list(range(total)), (programs, num_full, num_half, cost, kind, out)
                    if num_full and num_half and programs > 1:  # both kinds of tile have programs of their own
                        assert 0 < int(out[:, 2].sum()) < programs and not (out[:, 2] & out[:, 5]).any()


@triton.jit
def _tile_coordinates_probe(out_ptr, tiles_ptr, num_experts, num_pid_n, GROUP_M: tl.constexpr, BLOCK_E: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
    tiles = tl.load(tiles_ptr + experts, mask=experts < num_experts, other=0)
    tiles_through = tl.cumsum(tiles, axis=0)
    num_m_tiles = tl.sum(tiles, axis=0)
    for tile in range(0, num_m_tiles * num_pid_n):
        pid_m, pid_n = tile_coordinates(tile, num_m_tiles, num_pid_n, tiles, tiles_through, GROUP_M, True)
        tl.store(out_ptr + 2 * tile, pid_m)
        tl.store(out_ptr + 2 * tile + 1, pid_n)


def _expert_grouped_order(tiles, num_pid_n, group_m):
    """The tile order EXPERT_GROUPS promises, written out: expert by expert; an expert's row blocks cut into the fewest groups
    of at most group_m, all as high as ceil(count / groups) but the last; in a group, column by column, row blocks fastest."""
    order, first = [], 0
    for count in tiles:
        if count:
            height = -(-count // -(-count // group_m))
            for group_first in range(0, count, height):
                rows = min(height, count - group_first)
                order += [(first + group_first + r, n) for n in range(num_pid_n) for r in range(rows)]
        first += count
    return order


def test_expert_groups_order():
    # tile_coordinates with EXPERT_GROUPS gives out every (row block, column block) once, in the order written out above,
    # with empty experts, groups that divide an expert's row blocks and groups that do not.
    gen = torch.Generator().manual_seed(5)
    for group_m in (1, 3, 8):
        for num_pid_n in (1, 4):
            tiles = torch.randint(0, 12, (7,), generator=gen, dtype=torch.int32)
            tiles[2] = 0  # an empty expert
            total = int(tiles.sum()) * num_pid_n
            out = torch.full((total, 2), -1, dtype=torch.int32, device=DEVICE)
            _tile_coordinates_probe[(1,)](out, tiles.to(DEVICE), 7, num_pid_n, GROUP_M=group_m, BLOCK_E=16)
            assert [tuple(c) for c in out.tolist()] == _expert_grouped_order(tiles.tolist(), num_pid_n, group_m)


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [TileConfig(128, 128, 64, 8, 8, 4), TileConfig(16, 64, 128, 1, 4, 4)], ids=str)
def test_persistent_schedule_on_gpu(tile):
    # Compiled tiles at a Qwen3-30B-like shape, ragged routing: the persistent loop gives the one-program-per-tile bits.
    num_experts, tokens, top_k = 32, 333, 8
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    x, w1, w2, scales, maps = _case(ids, num_experts, hidden=2048, inter=768, dtype=torch.bfloat16)
    expected = _both_gemms(x, w1, w2, scales, maps, tile)
    for programs_per_sm, flatten in ((1, False), (2, False), (1, True)):
        got = _both_gemms(x, w1, w2, scales, maps, dataclasses.replace(tile, programs_per_sm=programs_per_sm, flatten=flatten))
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    ref = sm.reference_moe(x, ids.to(DEVICE), scales, w1, w2)
    out = sm.finalize(expected[1], maps, None)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("group_size", [None, 0, 32], ids=lambda g: {None: "no-int8", 0: "w8a16", 32: "w8a16-g32"}[g])
def test_weights_left_and_fused_gate_up_tiles(dtype, group_size):
    """`weights_left` computes each tile transposed (weights as the dot's left operand), `fused_gate_up` runs gate and up as one
    dot over interleaved columns: both match the reference for plain and int8 weights, with full tiles, half-height tails
    and a persistent loop."""
    from simple_moe.quant import dequantize_weights_int8, quantize_weights_int8

    ids = torch.cat([torch.full((n,), e) for e, n in ((0, 150), (1, 70), (3, 40))])[torch.randperm(260)].unsqueeze(1)
    x, w1, w2, scales, maps = _case(ids, 4, hidden=64, inter=32, dtype=dtype)
    rows = maps.expanded_num_rows
    quant = {}
    if group_size is not None:
        (w1, s1), (w2, s2) = (quantize_weights_int8(w.float(), group_size or None) for w in (w1, w2))
        quant = ({"w_scale": s1.to(dtype), "group_size": group_size}, {"w_scale": s2.to(dtype), "group_size": group_size})
        w1_ref, w2_ref = (dequantize_weights_int8(w, s.to(dtype), group_size or None, torch.float64)
                          for w, s in ((w1, s1), (w2, s2)))
    else:
        quant = ({}, {})
        w1_ref, w2_ref = w1, w2
    ref = sm.reference_moe(x, ids.to(DEVICE), scales, w1_ref, w2_ref)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for cfg in (TileConfig(128, 32, 32, 1, 4, 2, weights_left=True), TileConfig(16, 32, 32, 1, 4, 2, weights_left=True),
                TileConfig(256, 32, 32, 1, 4, 2, weights_left=True),  # expert 0 in one tall tile, the others in half tiles
                TileConfig(64, 32, 32, 1, 4, 2, programs_per_sm=2, weights_left=True),
                TileConfig(128, 16, 32, 1, 4, 2, fused_gate_up=True),
                TileConfig(32, 16, 32, 1, 4, 2, programs_per_sm=2, fused_gate_up=True, weights_left=True)):
        inter_out = torch.full((rows, w2.shape[2]), float("nan"), device=DEVICE, dtype=dtype)
        grouped_gemm(x, w1, inter_out, maps, gather_a=True, activation=get_activation("swiglu"), config=cfg, **quant[0])
        out2 = torch.full((rows, w2.shape[1]), float("nan"), device=DEVICE, dtype=dtype)
        grouped_gemm(inter_out, w2, out2, maps, gather_a=False, router_scales=scales, config=cfg, **quant[1])
        assert not inter_out.isnan().any() and not out2.isnan().any(), cfg
        out = sm.finalize(out2, maps, None)
        assert ((out.double() - ref).norm() / ref.norm()).item() < tol, cfg


@pytest.mark.parametrize("gate_layout", ["up_first", "interleaved"])
def test_fused_gate_up_every_gate_layout_with_bias(gate_layout):
    """The interleaved weight tile reads the gate and up rows wherever the layout puts them; fc1 bias follows its rows."""
    ids = torch.stack([torch.randperm(5)[:2] for _ in range(37)])
    x, w1, w2, scales, maps = _case(ids, 5, hidden=64, inter=48)
    b1 = torch.randn(5, 96, device=DEVICE)
    ref = sm.reference_moe(x, ids.to(DEVICE), scales, w1, w2, gate_layout=gate_layout, fc1_expert_biases=b1)
    rows = maps.expanded_num_rows
    for cfg in (TileConfig(16, 32, 32, 1, 4, 2, fused_gate_up=True),
                TileConfig(16, 32, 32, 1, 4, 2, fused_gate_up=True, weights_left=True)):
        inter_out = torch.full((rows, 48), float("nan"), device=DEVICE)
        grouped_gemm(x, w1, inter_out, maps, gather_a=True, activation=get_activation("swiglu"), gate_layout=gate_layout,
                     bias=b1, config=cfg)
        out2 = torch.full((rows, 64), float("nan"), device=DEVICE)
        grouped_gemm(inter_out, w2, out2, maps, gather_a=False, router_scales=scales, config=cfg)
        out = sm.finalize(out2, maps, None)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5, cfg


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [TileConfig(128, 128, 64, 8, 8, 4, fused_gate_up=True),
                                  TileConfig(128, 128, 64, 8, 8, 4, programs_per_sm=1, flatten=True, fused_gate_up=True),
                                  TileConfig(128, 128, 64, 8, 8, 4, weights_left=True),
                                  TileConfig(128, 128, 64, 8, 8, 4, weights_left=True, fused_gate_up=True),
                                  TileConfig(16, 64, 128, 1, 4, 3, weights_left=True),
                                  TileConfig(16, 64, 128, 1, 4, 4, weights_left=True, fused_gate_up=True)], ids=str)
@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "w8a16"])
def test_operand_arrangements_on_gpu(tile, int8):
    # Compiled transposed / fused gate-up tiles (wgmma with a register operand, reshaped accumulators) at a Qwen3-30B-like
    # shape with ragged routing and T=333: against the float64 reference, every row written.
    from simple_moe.quant import dequantize_weights_int8, quantize_weights_int8

    num_experts, tokens, top_k = 32, 333, 8
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    x, w1, w2, scales, maps = _case(ids, num_experts, hidden=2048, inter=768, dtype=torch.bfloat16)
    extra = ({}, {})
    if int8:
        (w1, s1), (w2, s2) = quantize_weights_int8(w1), quantize_weights_int8(w2)
        extra = ({"w_scale": s1}, {"w_scale": s2})
        ref = sm.reference_moe(x, ids.to(DEVICE), scales, dequantize_weights_int8(w1, s1, dtype=torch.float64),
                               dequantize_weights_int8(w2, s2, dtype=torch.float64))
    else:
        ref = sm.reference_moe(x, ids.to(DEVICE), scales, w1, w2)
    rows = maps.expanded_num_rows
    inter_out = torch.full((rows, 768), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    grouped_gemm(x, w1, inter_out, maps, gather_a=True, activation=get_activation("swiglu"), config=tile, **extra[0])
    out2 = torch.full((rows, 2048), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    grouped_gemm(inter_out, w2, out2, maps, gather_a=False, router_scales=scales, config=tile, **extra[1])
    assert not inter_out.isnan().any() and not out2.isnan().any()
    out = sm.finalize(out2, maps, None)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_fused_gate_up_w8a8_is_bitwise_the_two_dot_tile():
    """W8A8 accumulates exactly in int32, and both arrangements dequantise in the same order: identical bits, with and without
    half-height tails and with a weights-left tile."""
    from simple_moe.quant import quantize_activations_int8, quantize_weights_int8

    ids = torch.cat([torch.full((n,), e) for e, n in ((0, 150), (2, 70), (3, 40))])[torch.randperm(260)].unsqueeze(1)
    x, w1, _, _, maps = _case(ids, 4, hidden=64, inter=32, dtype=torch.float16)
    w1_q, w1_scale = quantize_weights_int8(w1.float())
    x_q, x_scale = quantize_activations_int8(x)
    outs = []
    for cfg in (TileConfig(128, 32, 64, 1, 4, 2), TileConfig(128, 32, 64, 1, 4, 2, fused_gate_up=True),
                TileConfig(32, 32, 64, 1, 4, 2, fused_gate_up=True, weights_left=True)):
        out = torch.full((maps.expanded_num_rows, 32), float("nan"), device=DEVICE, dtype=torch.float16)
        grouped_gemm(x_q, w1_q, out, maps, gather_a=True, activation=get_activation("swiglu"), w_scale=w1_scale.half(),
                     a_scale=x_scale, config=cfg)
        assert not out.isnan().any(), cfg
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@triton.jit
def _convert_kernel(src_ptr, dst_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, int8_exact_to_float32(tl.load(src_ptr + offs)))


@pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.int8, torch.float16, torch.bfloat16], ids=str)
def test_int8_exact_to_float32_is_the_plain_conversion(dtype):
    # Every int8 value (the bit trick's whole domain) and, for other dtypes, the plain conversion it falls back to.
    values = torch.arange(-128, 128, dtype=torch.int32).to(dtype)
    if dtype != torch.int8:
        values = values * 0.37 + torch.randn(256).to(dtype)
    src = values.to(DEVICE)
    dst = torch.full((256,), float("nan"), device=DEVICE)
    _convert_kernel[(1,)](src, dst, BLOCK=256)
    assert torch.equal(dst.cpu(), values.float())
