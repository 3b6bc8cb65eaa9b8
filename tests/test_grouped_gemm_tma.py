"""GEMM2 on the TMA kernel: the same bits as the cp.async kernel for the same tile, every row written, and the fallbacks."""
import dataclasses

import pytest
import torch

import simple_moe as sm
from simple_moe import _launch, grouped_gemm_gluon, grouped_gemm_tma, pipeline
from simple_moe.activations import activation_params, get_activation
from simple_moe.grouped_gemm import TileConfig, gemm_tile_config, grouped_gemm, splits_tail_tiles
from simple_moe.grouped_gemm_tma import _grouped_gemm2_tma_kernel, takes_tma, tma_splits_tails
from simple_moe.quant import quantize_activations_int8, quantize_weights_int8
from problems import DEVICE

# Persistent tiles (4 "SMs" in the interpreter, so programs loop), with and without one pipeline across tiles.
TILES = [TileConfig(32, 32, 32, 1, 4, 2, programs_per_sm=1, flatten=True, tma=True),
         TileConfig(16, 64, 64, 2, 4, 3, programs_per_sm=2, tma=True)]


def _routing(kind: str, tokens: int, num_experts: int, top_k: int) -> torch.Tensor:
    if kind == "random":
        return torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    if kind == "one_hot_expert":  # expert 2 takes every token: many row blocks of one expert, the others one row or none
        return torch.stack([torch.tensor([2, int(torch.randint(3, num_experts, ()))]) for _ in range(tokens)])
    return torch.stack([torch.tensor([1, 4]) if t % 3 else torch.tensor([4, 0]) for t in range(tokens)])  # 2, 3, 5 empty


def _gemm2(inter, w2, maps, scales, cfg, **extra):
    out = torch.full((maps.expanded_num_rows, w2.shape[1]), float("nan"), device=DEVICE, dtype=torch.float16)
    grouped_gemm(inter, w2, out, maps, gather_a=False, router_scales=scales, config=cfg, **extra)
    return out


@pytest.mark.parametrize("routing", ["random", "one_hot_expert", "empty_experts"])
@pytest.mark.parametrize("scheme", ["fp16", "fp16-bias", "w8a8"])
@pytest.mark.parametrize("tile", TILES, ids=str)
def test_tma_gemm2_is_the_cp_async_gemm2(routing, scheme, tile):
    # Odd sizes: K = 80 (a K tail TMA fills with zeros; 80 int8 a row keep rows 16-byte aligned), N = 40 (a partial column
    # block), 2 x 37 rows. The rows a box reads past an expert's end belong to the next expert and must not be stored; NaN
    # poison shows any row left unwritten.
    num_experts, tokens, top_k, hidden, inter_width = 6, 37, 2, 40, 80
    ids = _routing(routing, tokens, num_experts, top_k)
    maps = sm.build_routing_maps(ids.to(DEVICE), num_experts)
    inter = torch.randn(maps.expanded_num_rows, inter_width, device=DEVICE, dtype=torch.float16)
    w2 = torch.randn(num_experts, hidden, inter_width, device=DEVICE, dtype=torch.float16) / inter_width ** 0.5
    scales = torch.rand(tokens, top_k, device=DEVICE) + 0.1
    extra = {}
    if scheme == "fp16-bias":
        extra["bias"] = torch.randn(num_experts, hidden, device=DEVICE, dtype=torch.float16)
    if scheme == "w8a8":
        w2, w_scale = quantize_weights_int8(w2.float())
        inter, a_scale = quantize_activations_int8(inter)
        extra = {"w_scale": w_scale.half(), "a_scale": a_scale}
    assert takes_tma(tile, inter, w2, gather_a=False, gated=False, w_quant=1 if scheme == "w8a8" else 0,
                     a_int8=scheme == "w8a8")
    got = _gemm2(inter, w2, maps, scales, tile, **extra)
    expected = _gemm2(inter, w2, maps, scales, dataclasses.replace(tile, tma=False), **extra)
    assert not got.isnan().any()
    assert torch.equal(got, expected)


def test_tma_is_only_taken_where_it_applies():
    tile = TILES[0]
    a = torch.randn(8, 64, device=DEVICE, dtype=torch.float16)
    w = torch.randn(3, 32, 64, device=DEVICE, dtype=torch.float16)
    ok = dict(gather_a=False, gated=False, w_quant=0, a_int8=False)
    assert takes_tma(tile, a, w, **ok)
    assert not takes_tma(dataclasses.replace(tile, tma=False), a, w, **ok)
    assert not takes_tma(dataclasses.replace(tile, programs_per_sm=0), a, w, **ok)  # the kernel is persistent only
    assert not takes_tma(tile, a, w, **{**ok, "gather_a": True})  # an ungated GEMM with gathered rows: no kernel
    # Half-height tails only with a split between the two groups of programs: a tile without one (the rules' W8A8 tile for
    # a long K is not flattened) keeps them full height rather than leave every tail to one program.
    long_k = gemm_tile_config(4 * 1024, 8, 4096, 14336, torch.bfloat16, 90, gated=False, w_int8=True, a_int8=True)
    assert long_k.tma and not long_k.flatten and not long_k.flat_tail_cost and splits_tail_tiles(long_k)
    assert not tma_splits_tails(long_k) and tma_splits_tails(dataclasses.replace(long_k, flat_tail_cost=80))
    assert not takes_tma(tile, a, w, **{**ok, "w_quant": 1})  # W8A16 converts weights in registers
    assert not takes_tma(tile, a.float(), w.float(), **ok)  # exact fp32 runs on the FMA units
    assert not takes_tma(tile, a[:, 1:], w, **ok)  # rows not 16-byte aligned
    assert not takes_tma(tile, a, w.transpose(1, 2).contiguous().transpose(1, 2), **ok)  # K not innermost
    # A fallback still computes the product (on the cp.async kernel).
    maps = sm.build_routing_maps(torch.tensor([[0], [1], [2], [1]], device=DEVICE).repeat(2, 1), 3)
    inter = torch.randn(maps.expanded_num_rows, 63, device=DEVICE, dtype=torch.float16)  # 126-byte rows: no TMA
    w2 = torch.randn(3, 32, 63, device=DEVICE, dtype=torch.float16)
    assert not takes_tma(tile, inter, w2, **ok)
    out = _gemm2(inter, w2, maps, None, tile)
    assert torch.equal(out, _gemm2(inter, w2, maps, None, dataclasses.replace(tile, tma=False)))


@pytest.mark.parametrize("scheme", ["fp16", "w8a8"])
def test_tma_half_height_tails(scheme):
    # 128-row tiles with half-height tails walked by a second group of programs (as test_grouped_gemm's test of the cp.async
    # kernel; TileConfig.flat_tail_cost): expert 0 has 150 rows (a full tile + 22 in a half one), 1 has 200 (the 72 left
    # take the full height), 3 40 and 4 64 (one half tile each), 5 256 (two full tiles), 2 none. Same bits as the cp.async
    # kernel's, every row written, and the same result as full-height tails.
    counts = ((0, 150), (1, 200), (3, 40), (4, 64), (5, 256))
    ids = torch.cat([torch.full((n,), e) for e, n in counts])[torch.randperm(710)].unsqueeze(1)
    maps = sm.build_routing_maps(ids.to(DEVICE), 6)
    inter = torch.randn(710, 80, device=DEVICE, dtype=torch.float16)
    w2 = torch.randn(6, 40, 80, device=DEVICE, dtype=torch.float16) / 80 ** 0.5
    scales = torch.rand(710, 1, device=DEVICE) + 0.1
    extra = {}
    if scheme == "w8a8":
        w2, w_scale = quantize_weights_int8(w2.float())
        inter, a_scale = quantize_activations_int8(inter)
        extra = {"w_scale": w_scale.half(), "a_scale": a_scale}
    tile = TileConfig(128, 32, 32, 1, 4, 2, programs_per_sm=3, flatten=True, tma=True, flat_tail_cost=55)
    assert tma_splits_tails(tile)
    got = _gemm2(inter, w2, maps, scales, tile, **extra)
    assert not got.isnan().any()
    assert torch.equal(got, _gemm2(inter, w2, maps, scales, dataclasses.replace(tile, tma=False), **extra))
    by_expert = _gemm2(inter, w2, maps, scales, dataclasses.replace(tile, group_m=2, expert_groups=True), **extra)
    assert torch.equal(got, by_expert)  # groups of row blocks cut per expert: the same tiles in another order
    full_height = _gemm2(inter, w2, maps, scales, dataclasses.replace(tile, flat_tail_cost=0), **extra).double()
    assert ((got.double() - full_height).norm() / full_height.norm()).item() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("scheme, tile", [
    ("bf16", TileConfig(128, 256, 64, 8, 8, 4, programs_per_sm=1, flatten=True, tma=True)),
    ("w8a8", TileConfig(128, 256, 64, 8, 8, 4, programs_per_sm=1, flatten=True, tma=True)),
    ("w8a8", TileConfig(128, 256, 128, 8, 8, 4, programs_per_sm=1, flatten=True, tma=True)),  # the rules' W8A8 tile
    ("w8a8", TileConfig(128, 256, 128, 8, 8, 3, programs_per_sm=1, tma=True)),
], ids=lambda v: v if isinstance(v, str) else str(v))
def test_tma_gemm2_on_gpu(scheme, tile):
    # Compiled TMA tiles at a Qwen3-30B-like GEMM2 (K = 768, N = 2048) with ragged routing and T=333: every row written,
    # against the float64 product, and the cp.async kernel's bits for the same tile.
    num_experts, tokens, top_k, hidden, inter_width = 32, 333, 8, 2048, 768
    ids = _routing("random", tokens, num_experts, top_k)
    maps = sm.build_routing_maps(ids.to(DEVICE), num_experts)
    inter = torch.randn(maps.expanded_num_rows, inter_width, device=DEVICE, dtype=torch.bfloat16)
    w2 = torch.randn(num_experts, hidden, inter_width, device=DEVICE, dtype=torch.bfloat16) / inter_width ** 0.5
    scales = torch.rand(tokens, top_k, device=DEVICE) + 0.1
    extra, a_ref, w_ref = {}, inter.double(), w2.double()
    if scheme == "w8a8":
        w2, w_scale = quantize_weights_int8(w2.float())
        inter, a_scale = quantize_activations_int8(inter)
        extra = {"w_scale": w_scale.bfloat16(), "a_scale": a_scale}
        a_ref = inter.double() * a_scale.double()[:, None]
        w_ref = w2.double() * w_scale.bfloat16().double()[:, :, None]
    out = {}
    for use_tma in (True, False):
        out[use_tma] = torch.full((maps.expanded_num_rows, hidden), float("nan"), device=DEVICE, dtype=torch.bfloat16)
        grouped_gemm(inter, w2, out[use_tma], maps, gather_a=False, router_scales=scales,
                     config=dataclasses.replace(tile, tma=use_tma), **extra)
    assert not out[True].isnan().any()
    assert torch.equal(out[True], out[False])
    # After its first call the TMA kernel takes the direct launch path (descriptors keyed and passed on), same bits.
    assert any(key[0] == id(_grouped_gemm2_tma_kernel) for key in _launch._compiled)
    again = torch.full_like(out[True], float("nan"))
    grouped_gemm(inter, w2, again, maps, gather_a=False, router_scales=scales, config=tile, **extra)
    assert torch.equal(again, out[True])
    offsets = maps.expert_first_token_offset.tolist()
    source = maps.expanded_dest_row_to_expanded_source_row.long()
    row_scale = scales.t().reshape(-1)[source].double()  # source row = token + k * T
    ref = torch.cat([a_ref[offsets[e]:offsets[e + 1]] @ w_ref[e].t() for e in range(num_experts)]) * row_scale[:, None]
    assert ((out[True].double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [None, "w8a8"])
def test_layer_takes_tma_gemm2_on_sm90(quant, monkeypatch):
    # The tile rules send prefill GEMM2 (here 8 experts x 128 rows on average) to the TMA kernel on SM90, and the layer gives
    # the bits it gives with GEMM2 on the cp.async kernel (whose numerics the float64 tests of every scheme check).
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA GEMM2 is picked on SM90+")
    from simple_moe.quant import quantize_moe_weights

    num_experts, tokens, top_k, hidden, inter_width = 8, 512, 2, 2048, 768
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
    w1 = torch.randn(num_experts, 2 * inter_width, hidden, device=DEVICE, dtype=torch.bfloat16) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter_width, device=DEVICE, dtype=torch.bfloat16) / inter_width ** 0.5
    scales, ids = sm.route(torch.randn(tokens, num_experts, device=DEVICE), top_k)
    kwargs = {}
    if quant is not None:
        w1, w2, kwargs["quant"] = quantize_moe_weights(w1, w2, "w8a8")
    calls = []
    # W8A8 on SM90 runs the TMA GEMM2's tiles on the warp-specialised Gluon kernel instead (grouped_gemm_gluon.py).
    gluon = quant == "w8a8" and torch.cuda.get_device_capability() == (9, 0)
    monkeypatch.setattr(grouped_gemm_gluon, "MIN_ROWS_PER_EXPERT", 0)  # whatever the rule's rows an expert
    module, name = (grouped_gemm_gluon, "grouped_gemm2_w8a8_gluon") if gluon else (grouped_gemm_tma, "grouped_gemm2_tma")
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = sm.fused_moe_simple(x, ids, scales, w1, w2, **kwargs)
    assert calls, f"GEMM2 did not run on {name}"
    # The second call must choose its kernels anew: a call plan of the first call's signature would replay its TMA launch.
    monkeypatch.setattr(pipeline, "_CALL_PLANS_ENABLED", False)
    monkeypatch.setattr(grouped_gemm_tma, "takes_tma", lambda *a, **kw: False)
    calls.clear()
    assert torch.equal(out, sm.fused_moe_simple(x, ids, scales, w1, w2, **kwargs)) and not calls
    if quant is None:
        ref = sm.reference_moe(x, ids, scales, w1, w2)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


def _ws_gemm2_probe():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ws_gemm2.py"
    spec = importlib.util.spec_from_file_location("ws_gemm2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("routing", ["random", "empty_experts"])
def test_ws_gemm2_probe_is_the_library_gemm2(routing):
    """benchmarks/ws_gemm2.py (NOTES experiment 19, not the library's path) without warp specialisation, which the
    interpreter ignores anyway: its host-built tile table and kernel give the library's GEMM2, every kept row written."""
    num_experts, tokens, top_k, hidden, inter_width = 6, 37, 2, 40, 64
    torch.manual_seed(3)
    maps = sm.build_routing_maps(_routing(routing, tokens, num_experts, top_k).to(DEVICE), num_experts)
    inter = torch.randn(tokens * top_k, inter_width, device=DEVICE, dtype=torch.float16)
    w2 = (torch.randn(num_experts, hidden, inter_width, device=DEVICE) / 8).to(torch.float16)
    scales = torch.rand(tokens, top_k, device=DEVICE)
    expected = _gemm2(inter, w2, maps, scales, TileConfig(16, 32, 32, 1, 4, 2))  # the probe's tile: the same K steps
    out = torch.full_like(expected, float("nan"))
    _ws_gemm2_probe().ws_gemm2(inter, w2, out, maps, scales, None, None, 16, 32, 32, 2, False)()
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------------------------------------------------------
# GEMM1 with its weight tiles copied by TMA (grouped_gemm1_tma): the cp.async kernel's fused gate/up tile, same bits.

GEMM1_TILES = [TileConfig(32, 16, 32, 1, 4, 2, programs_per_sm=1, flatten=True, fused_gate_up=True, tma=True),
               TileConfig(128, 16, 32, 2, 4, 2, programs_per_sm=3, flatten=True, fused_gate_up=True, tma=True,
                          flat_tail_cost=80, expert_groups=True)]


def _gemm1(x, w1, maps, cfg, activation, gate_layout, **extra):
    out = torch.full((maps.expanded_num_rows, w1.shape[1] // 2), float("nan"), device=DEVICE, dtype=x.dtype)
    grouped_gemm(x, w1, out, maps, gather_a=True, activation=get_activation(activation), gate_layout=gate_layout,
                 config=cfg, **extra)
    return out


def test_tma_gemm1_is_only_taken_where_it_applies():
    # The rules put the 16-bit SM90 prefill GEMM1 (fused gate/up, persistent, flattened) on it, and nothing else: not SM80,
    # not int8 weights (converted in registers), not a decode tile; the kernel itself wants the fused, flattened tile,
    # 16-bit operands and a pair view whose strides TMA can copy (H * 2 bytes a multiple of 16).
    for dtype in (torch.bfloat16, torch.float16):
        assert gemm_tile_config(4096 * 8, 128, 768, 2048, dtype, 90, gated=True).tma
        assert not gemm_tile_config(4096 * 8, 128, 768, 2048, dtype, 80, gated=True).tma
    assert not gemm_tile_config(4096 * 8, 128, 768, 2048, torch.bfloat16, 90, gated=True, w_int8=True).tma
    assert not gemm_tile_config(8, 128, 768, 2048, torch.bfloat16, 90, gated=True).tma
    tile = GEMM1_TILES[1]
    x = torch.randn(37, 72, device=DEVICE, dtype=torch.float16)
    w1 = torch.randn(6, 80, 72, device=DEVICE, dtype=torch.float16)
    ok = dict(gather_a=True, gated=True, w_quant=0, a_int8=False)
    for gate_layout in ("gate_first", "up_first", "interleaved"):
        assert takes_tma(tile, x, w1, **ok, gate_layout=gate_layout)
    assert not takes_tma(dataclasses.replace(tile, fused_gate_up=False), x, w1, **ok)  # two dots: two weight tiles
    assert not takes_tma(dataclasses.replace(tile, flatten=False), x, w1, **ok)
    assert not takes_tma(tile, x, w1, **{**ok, "w_quant": 1})
    assert not takes_tma(tile, x.float(), w1.float(), **ok)
    x_odd, w1_odd = x[:, :63], w1[:, :, :63].contiguous()  # 126-byte weight rows: no box
    assert not takes_tma(tile, x_odd, w1_odd, **ok)
    # The fallback runs the same tile on the cp.async kernel.
    maps = sm.build_routing_maps(_routing("random", 37, 6, 2).to(DEVICE), 6)
    got = _gemm1(x_odd, w1_odd, maps, tile, "swiglu", "gate_first")
    assert not got.isnan().any()
    assert torch.equal(got, _gemm1(x_odd, w1_odd, maps, dataclasses.replace(tile, tma=False), "swiglu", "gate_first"))


@pytest.mark.parametrize("routing", ["random", "one_hot_expert", "empty_experts"])
@pytest.mark.parametrize("gate_layout, activation, bias", [
    ("gate_first", "swiglu", False), ("up_first", "swiglu", True), ("interleaved", "swiglu_bias", True),
    ("gate_first", "geglu", True)])
@pytest.mark.parametrize("tile", GEMM1_TILES, ids=str)
def test_tma_gemm1_is_the_cp_async_gemm1(routing, gate_layout, activation, bias, tile):
    # K = 72 (a K tail: A masked, the weight box zero-filled by TMA), I = 40 (a partial column block), 37 tokens x 2; 150+
    # rows an expert with one hot expert, so the 128-row tile has full, masked and half-height tails.
    num_experts, tokens, top_k, hidden, inter = 6, 37 if routing != "one_hot_expert" else 160, 2, 72, 40
    ids = _routing(routing, tokens, num_experts, top_k)
    maps = sm.build_routing_maps(ids.to(DEVICE), num_experts)
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.float16)
    w1 = torch.randn(num_experts, 2 * inter, hidden, device=DEVICE, dtype=torch.float16) / hidden ** 0.5
    extra = {"bias": torch.randn(num_experts, 2 * inter, device=DEVICE, dtype=torch.float16)} if bias else {}
    if activation == "swiglu_bias":
        extra["act_params"] = activation_params(get_activation(activation), num_experts, DEVICE,
                                                 p0=torch.full((num_experts,), 1.5), p2=torch.rand(num_experts) + 2.0)
    assert takes_tma(tile, x, w1, gather_a=True, gated=True, w_quant=0, a_int8=False, gate_layout=gate_layout)
    got = _gemm1(x, w1, maps, tile, activation, gate_layout, **extra)
    expected = _gemm1(x, w1, maps, dataclasses.replace(tile, tma=False), activation, gate_layout, **extra)
    assert not got.isnan().any()
    assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("gate_layout", ["gate_first", "up_first"])
@pytest.mark.parametrize("tile", [
    TileConfig(128, 128, 64, 16, 8, 4, programs_per_sm=1, flatten=True, fused_gate_up=True, tma=True, flat_tail_cost=80,
               expert_groups=True),  # the rules' prefill tile with half-height tails
    TileConfig(128, 128, 64, 8, 8, 3, programs_per_sm=1, flatten=True, fused_gate_up=True, tma=True),
], ids=str)
def test_tma_gemm1_on_gpu(dtype, gate_layout, tile):
    # Compiled at odd sizes (H = 2880, I = 1408: 11 column blocks; T = 333 x top_k 8 over 24 experts, ~111 rows an expert, so
    # full, masked and half-height row blocks), with a bias: every row written, the cp.async kernel's bits for the same
    # tile, and the float64 SwiGLU of the gathered rows.
    num_experts, tokens, top_k, hidden, inter = 24, 333, 8, 2880, 1408
    ids = _routing("random", tokens, num_experts, top_k)
    maps = sm.build_routing_maps(ids.to(DEVICE), num_experts)
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=dtype)
    w1 = torch.randn(num_experts, 2 * inter, hidden, device=DEVICE, dtype=dtype) / hidden ** 0.5
    bias = torch.randn(num_experts, 2 * inter, device=DEVICE, dtype=dtype)
    out = {use_tma: _gemm1(x, w1, maps, dataclasses.replace(tile, tma=use_tma), "swiglu", gate_layout, bias=bias)
           for use_tma in (True, False)}
    assert not out[True].isnan().any()
    assert torch.equal(out[True], out[False])
    assert any(key[0] == id(grouped_gemm_tma._grouped_gemm1_tma_kernel) for key in _launch._compiled)
    offsets = maps.expert_first_token_offset.tolist()
    tokens_of_row = (maps.expanded_dest_row_to_expanded_source_row.long() % tokens)
    gate_half, up_half = (slice(0, inter), slice(inter, None)) if gate_layout == "gate_first" else (slice(inter, None),
                                                                                                   slice(0, inter))
    ref = []
    for e in range(num_experts):
        h = x[tokens_of_row[offsets[e]:offsets[e + 1]]].double() @ w1[e].double().t() + bias[e].double()
        gate, up = h[:, gate_half], h[:, up_half]
        ref.append(gate * torch.sigmoid(gate) * up)
    ref = torch.cat(ref)
    assert ((out[True].double() - ref).norm() / ref.norm()).item() < (1e-2 if dtype == torch.bfloat16 else 2e-3)
