"""The decode path (decode.py): a few tokens (T <= DECODE_MAX_TOKENS) run two kernels and no routing, against the float64
reference.

Every activation, both gate orders (and GPT-OSS's interleaved fc1), biases, activation parameters, W8A16 per channel and
group-wise, W8A8, dropped experts (expert parallelism), no router scales, odd sizes; outputs NaN-poisoned; bitwise repeatable.
The kernel has no tl.dot, so bf16 is exact in the interpreter too.
"""
from __future__ import annotations

import os

import pytest
import torch

import problems
from problems import DEVICE
import simple_moe.pipeline as pipeline
from simple_moe import fused_moe_simple, reference_moe
from simple_moe.activations import ACTIVATIONS
from simple_moe.decode import (DECODE_MAX_TOKENS, DECODE_MAX_TOKENS_W8A8, DECODE_MAX_TOKENS_W8A16,
                               DECODE_MAX_TOKENS_W8A16_GROUPWISE, DecodePlan, DecodeTile, decode_forward, decode_tile,
                               streams_weights_evict_first, uses_decode_path)
from simple_moe.activations import get_activation
from simple_moe.quant import quantize_moe_weights

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
pytestmark = pytest.mark.filterwarnings("ignore:simple_moe. tensors on cpu")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def no_routing(monkeypatch):
    """Fails the test if the grouped path's routing runs (the decode path must not build maps)."""
    def refuse(*args, **kwargs):
        raise AssertionError("routing ran: the call did not take the decode path")
    monkeypatch.setattr(pipeline, "build_routing_maps", refuse)


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "unwritten (NaN) or overflowed output"
    return ((out.double() - ref).norm() / ref.norm()).item()


def run(problem, **kwargs):
    output = torch.full(problem["input"].shape, float("nan"), dtype=problem["input"].dtype, device=DEVICE)
    out = fused_moe_simple(**problem, output=output, **kwargs)
    assert out.data_ptr() == output.data_ptr()
    return out


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", [a.name for a in ACTIVATIONS.values()])
@pytest.mark.parametrize("biases", [False, True], ids=["no_bias", "bias"])
def test_decode_matches_reference(no_routing, activation, dtype, biases):
    problem = problems.make_problem(1, 72, 40, 6, 3, dtype, activation, bias1=biases, bias2=biases, seed=3)
    out = run(problem)
    assert rel_err(out, reference_moe(**problem)) < TOLERANCE[dtype]


@needs_kernels
@pytest.mark.parametrize("num_tokens", [1, 2])
@pytest.mark.parametrize("layout", ["ids_strided", "scales_strided", "scales_expanded"])
def test_strided_ids_and_scales(num_tokens, layout):
    """Ids or router scales that are not contiguous along top_k (the decode kernel reads them at `row + k`) give the
    reference's result: such calls take the grouped path, which copies them."""
    problem = problems.make_problem(num_tokens, 48, 32, 5, 2, torch.float32, "swiglu", seed=13)
    ids, scales = problem["token_selected_experts"], problem["token_final_scales"]

    def every_other_column(t, filler):  # [T, 2] values at stride 2 in a [T, 4] tensor
        return torch.stack([t, torch.full_like(t, filler)], 2).reshape(num_tokens, 4)[:, ::2]

    if layout == "ids_strided":
        problem["token_selected_experts"] = every_other_column(ids, 4)
    elif layout == "scales_strided":
        problem["token_final_scales"] = every_other_column(scales, 100.0)
    else:  # one scale for every pair: strides (0, 0)
        problem["token_final_scales"] = scales[:1, :1].expand(num_tokens, 2)
    assert not problem["token_selected_experts"].is_contiguous() or not problem["token_final_scales"].is_contiguous()
    assert rel_err(run(problem), reference_moe(**problem)) < 1e-5


@needs_kernels
@pytest.mark.parametrize("gate_layout", ["up_first", "interleaved"])
def test_decode_gate_layouts(gate_layout):
    problem = problems.make_problem(1, 64, 48, 4, 2, torch.float32, "swiglu", bias1=True, seed=5)
    ids, scales = problem["token_selected_experts"], problem["token_final_scales"]
    fc1, fc2, bias1 = problem["fc1_expert_weights"], problem["fc2_expert_weights"], problem["fc1_expert_biases"]
    inter = fc2.shape[2]
    gate, up = fc1[:, :inter], fc1[:, inter:]
    if gate_layout == "up_first":
        fc1_laid, bias_laid = torch.cat([up, gate], 1), torch.cat([bias1[:, inter:], bias1[:, :inter]], 1)
    else:
        fc1_laid = torch.stack([gate, up], 2).reshape(fc1.shape)
        bias_laid = torch.stack([bias1[:, :inter], bias1[:, inter:]], 2).reshape(bias1.shape)
    out = torch.full_like(problem["input"], float("nan"))
    decode_forward(problem["input"], ids, scales, fc1_laid, fc2, get_activation("swiglu"), gate_layout, bias_laid, None, None,
                   out, None)
    assert rel_err(out, reference_moe(**problem)) < 1e-5


@needs_kernels
def test_decode_activation_params(no_routing):
    problem = problems.make_problem(1, 48, 32, 5, 2, torch.float32, "swiglu_bias", seed=7)
    params = torch.rand(5, 3, device=DEVICE) + torch.tensor([0.5, -0.5, 1.0], device=DEVICE)
    out = run(problem, activation_params=params)
    assert rel_err(out, reference_moe(**problem, activation_params=params)) < 1e-5


@needs_kernels
@pytest.mark.parametrize("group_size", [None, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decode_w8a16(group_size, dtype, request):
    # W8A16 per channel and with 128-wide groups take the decode path through the front door; other group sizes (kept on the
    # grouped path by the rule) are called directly. K = 256 fills GEMM1's 256-deep int8 tile: two 128-groups or eight
    # 32-groups a tile (the reshape path); GEMM2's K (I = 128) is one 128-group or four 32-groups.
    problem = problems.make_problem(1, 256, 128, 6, 3, dtype, "swiglu", bias1=True, bias2=True, seed=11,
                                    weight_dtype=torch.float32)
    q1, q2, quant = quantize_moe_weights(problem["fc1_expert_weights"], problem["fc2_expert_weights"], "w8a16", group_size)
    on_decode_path = group_size is None or DECODE_MAX_TOKENS_W8A16_GROUPWISE.get(group_size, 0) >= 1
    assert uses_decode_path(1, q1, q2, problem["input"], quant, None, None) == on_decode_path
    if on_decode_path:
        request.getfixturevalue("no_routing")
        out = run(dict(problem, fc1_expert_weights=q1, fc2_expert_weights=q2), quant=quant)
    else:
        out = torch.full_like(problem["input"], float("nan"))
        decode_forward(problem["input"], problem["token_selected_experts"], problem["token_final_scales"], q1, q2,
                       get_activation("swiglu"), "gate_first", problem["fc1_expert_biases"], problem["fc2_expert_biases"],
                       None, out, quant)
    from test_quant import exact_reference
    ref = exact_reference(dict(problem, fc1_expert_weights=q1, fc2_expert_weights=q2), quant)
    assert rel_err(out, ref) < TOLERANCE[dtype]
    # Folded tiles (each K step's products summed 16 or 8 at a time into the accumulator), deeper and shallower than a group.
    folded = torch.full_like(problem["input"], float("nan"))
    decode_forward(problem["input"], problem["token_selected_experts"], problem["token_final_scales"], q1, q2,
                   get_activation("swiglu"), "gate_first", problem["fc1_expert_biases"], problem["fc2_expert_biases"], None,
                   folded, quant, tiles=(DecodeTile(8, 256, 8, fold=16), DecodeTile(2, 64, 4, fold=8)))
    assert rel_err(folded, ref) < TOLERANCE[dtype]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_decode_w8a8(no_routing, dtype, activation):
    # W8A8 at T=1: the input row and each pair's intermediate row quantised per row, int8 x int8 summed exactly, against the
    # float64 reference on exactly those quantised values. Expert parallelism: rank 1 of 2 holds experts 6..11, token 0's
    # second pick (expert 2) is dropped, so its intermediate row is the zeros the row quantiser then reads.
    from test_quant import w8a8_reference
    problem = problems.make_problem(1, 200, 72, 6, 3, dtype, activation, bias1=True, bias2=True, seed=29, num_global_experts=12,
                                    ids=torch.tensor([[7, 2, 11]]), weight_dtype=torch.float32)
    q1, q2, quant = quantize_moe_weights(problem["fc1_expert_weights"], problem["fc2_expert_weights"], "w8a8")
    qproblem = dict(problem, fc1_expert_weights=q1, fc2_expert_weights=q2)
    out = run(qproblem, quant=quant, ep_size=2, ep_rank=1)
    assert rel_err(out, w8a8_reference(qproblem, quant, ep_size=2, ep_rank=1)) < TOLERANCE[dtype]
    assert torch.equal(run(qproblem, quant=quant, ep_size=2, ep_rank=1), out)


@needs_kernels
@pytest.mark.parametrize("scheme,gemm2_tile", [("w8a8", DecodeTile(2, 512, 4, fold=16)),
                                               ("w8a16", DecodeTile(4, 512, 4, fold=8))])
def test_decode_int8_long_intermediate(no_routing, scheme, gemm2_tile):
    # top_k 8 and I = 1100 (more than four 256-deep steps): GEMM2 takes its INT8 rule's tile, W8A8's 512 deep and folded 16
    # at a time, W8A16's 512 deep and folded 8, each with a masked K tail (1100 = 2 x 512 + 76).
    from test_quant import exact_reference
    problem = problems.make_problem(1, 64, 1100, 8, 8, torch.float16, "swiglu", bias2=True, seed=31,
                                    weight_dtype=torch.float32)
    q1, q2, quant = quantize_moe_weights(problem["fc1_expert_weights"], problem["fc2_expert_weights"], scheme)
    qproblem = dict(problem, fc1_expert_weights=q1, fc2_expert_weights=q2)
    assert decode_tile(False, 64, 1100, 1, 8, a_int8=scheme == "w8a8") == gemm2_tile
    assert rel_err(run(qproblem, quant=quant), exact_reference(qproblem, quant)) < TOLERANCE[torch.float16]


@needs_kernels
def test_decode_dropped_experts_and_no_scales(no_routing):
    # Expert parallelism: rank 1 of 2 holds experts 4..7; token 0 picks 1 (dropped), 5 and 7. Then a token with no local expert.
    problem = problems.make_problem(1, 40, 24, 4, 3, torch.float32, "gelu", bias2=True, seed=13, num_global_experts=8,
                                    ids=torch.tensor([[1, 5, 7]]))
    problem["token_final_scales"] = None
    out = run(problem, ep_size=2, ep_rank=1)
    assert rel_err(out, reference_moe(**problem, ep_size=2, ep_rank=1)) < 1e-5
    problem["token_selected_experts"] = torch.tensor([[0, 2, 3]], dtype=torch.int32, device=DEVICE)
    assert (run(problem, ep_size=2, ep_rank=1) == 0).all()


@needs_kernels
def test_decode_odd_sizes_tiles_and_repeatable(no_routing):
    # H = 200 and I = 72 are not multiples of any tile (masked K tails and column blocks); several tiles per program row.
    problem = problems.make_problem(1, 200, 72, 9, 4, torch.float16, "swiglu", bias1=True, seed=17,
                                    ids=torch.tensor([[8, 0, 3, 5]], dtype=torch.int64))
    ref = reference_moe(**problem)
    out = run(problem)
    assert rel_err(out, ref) < 2e-3
    # Unrolled K loops: 200 / 32 = 6.25 steps (an odd remainder of steps and a masked tail), 72 / 16 = 4.5; GEMM2 programs
    # of one column (4 rows: one a pair); a register cap (ptxas's maxnreg on the GPU); K loops through shared-memory stages
    # (cp.async on the GPU; the interpreter runs them as plain loads); products folded 8 and 4 at a time into the accumulator.
    for tiles in ((DecodeTile(8, 32, 2), DecodeTile(16, 64, 4)), (DecodeTile(64, 128, 4), DecodeTile(128, 32, 8)),
                  (DecodeTile(16, 32, 4, unroll=2), DecodeTile(8, 16, 4, unroll=4)),
                  (DecodeTile(8, 256, 8), DecodeTile(1, 16, 2)),
                  (DecodeTile(8, 32, 4, max_registers=32), DecodeTile(2, 32, 4, max_registers=40)),
                  (DecodeTile(8, 32, 4, stages=3), DecodeTile(1, 16, 4, stages=4)),
                  (DecodeTile(8, 64, 4, fold=8), DecodeTile(2, 16, 4, fold=4))):
        other = torch.full_like(out, float("nan"))
        decode_forward(problem["input"], problem["token_selected_experts"], problem["token_final_scales"],
                       problem["fc1_expert_weights"], problem["fc2_expert_weights"], get_activation("swiglu"), "gate_first",
                       problem["fc1_expert_biases"], None, None, other, None, tiles=tiles)
        assert rel_err(other, ref) < 2e-3
    assert torch.equal(run(problem), out)


def test_decode_rules():
    w1, w2 = torch.empty(4, 64, 64), torch.empty(4, 64, 32)

    def decodes(num_tokens, fc1=w1, fc2=w2, quant=None, ids=None, scales=None):
        ids = torch.zeros(num_tokens, 2, dtype=torch.int32) if ids is None else ids
        scales = torch.ones(num_tokens, 2) if scales is None else scales
        return uses_decode_path(num_tokens, fc1, fc2, torch.empty(num_tokens, 64), quant, ids, scales)

    assert decodes(1) and decodes(DECODE_MAX_TOKENS) and not decodes(DECODE_MAX_TOKENS + 1)
    q1, q2, w8a16 = quantize_moe_weights(torch.randn(4, 64, 64), torch.randn(4, 64, 32), "w8a16")
    assert decodes(DECODE_MAX_TOKENS_W8A16, q1, q2, w8a16) and not decodes(DECODE_MAX_TOKENS_W8A16 + 1, q1, q2, w8a16)
    w8a8 = quantize_moe_weights(torch.randn(4, 64, 64), torch.randn(4, 64, 32), "w8a8")[2]
    assert decodes(DECODE_MAX_TOKENS_W8A8, q1, q2, w8a8) and not decodes(DECODE_MAX_TOKENS_W8A8 + 1, q1, q2, w8a8)
    assert not decodes(1, w1.transpose(1, 2))  # K-strided weights: the grouped path
    # The kernel reads a token's k-th id and scale at `row + k`: ids or scales strided along top_k take the grouped path.
    assert not decodes(1, ids=torch.zeros(1, 4, dtype=torch.int32)[:, ::2])
    assert not decodes(1, scales=torch.ones(1, 4)[:, ::2])
    assert decodes(1, ids=torch.zeros(1, 4, dtype=torch.int32)[:, :2], scales=torch.ones(1, 2).expand(1, 2))
    assert decodes(1, ids=torch.zeros(1, 1, dtype=torch.int32), scales=torch.ones(1, 3)[:, :1])  # top_k 1: no stride read
    assert decode_tile(True, 768, 2048, 2) == DecodeTile(8, 256, 8)
    # INT8 weights with per-channel scales: 512 deep, products folded 8 at a time; group-wise scales keep 256, unfolded.
    assert decode_tile(True, 768, 2048, 1) == DecodeTile(8, 512, 8, fold=8) == decode_tile(True, 14336, 4096, 1, 1, 2, 132)
    assert decode_tile(True, 768, 2048, 1, group_size=128) == DecodeTile(8, 256, 8)
    assert decode_tile(True, 768, 2048, 4).block_k == 128  # fp32: the 16-bit tile's bytes a step
    # A 16-bit GEMM1 grid of one to 4/3 waves (6 programs an SM) goes 512 deep: DeepSeek-V2-Lite's and OLMoE's on 132 SMs.
    assert decode_tile(True, 1408, 2048, 2, 1, 6, 132) == DecodeTile(8, 512, 8) == decode_tile(True, 1024, 2048, 2, 1, 8, 132)
    assert decode_tile(True, 768, 2048, 2, 1, 8, 132) == DecodeTile(8, 256, 8)  # Qwen3-30B: 768 programs, one wave
    assert decode_tile(True, 14336, 4096, 2, 1, 2, 132) == DecodeTile(8, 256, 8)  # Mixtral: 4.5 waves
    assert decode_tile(True, 1408, 2048, 1, 1, 6, 132) == DecodeTile(8, 512, 8, fold=8)  # INT8: its own rule above
    # GEMM2 programs read top_k (rounded up to a power of two) weight rows a column: 8 rows whatever top_k; 16-bit weights
    # with 8 rows a column go 128 deep on 4 warps.
    assert decode_tile(False, 2048, 768, 2, 8) == DecodeTile(1, 128, 4)
    assert decode_tile(False, 2048, 768, 1, 8) == DecodeTile(2, 256, 8, fold=8)  # INT8 weights: 16 rows a program
    assert decode_tile(False, 2048, 768, 1, 8, group_size=128) == DecodeTile(2, 128, 8)  # group-wise: one group deep
    # INT8 with more than four 256-deep K steps (DeepSeek-V2-Lite's I = 1408): 512 deep, 4 warps, W8A8 two columns folded 16,
    # W8A16 four columns folded 8; group-wise scales and a shorter K keep the INT8 tiles above.
    assert decode_tile(False, 2048, 1408, 1, 8, a_int8=True) == DecodeTile(2, 512, 4, fold=16)
    assert decode_tile(False, 2048, 1408, 1, 8) == DecodeTile(4, 512, 4, fold=8)
    assert decode_tile(False, 2048, 1408, 1, 8, group_size=128) == DecodeTile(2, 128, 8)
    assert decode_tile(False, 2048, 1024, 1, 8, a_int8=True) == DecodeTile(2, 256, 8, fold=8)
    assert decode_tile(False, 4096, 14336, 1, 2) == DecodeTile(4, 256, 8)
    assert decode_tile(False, 4096, 14336, 2, 2) == DecodeTile(4, 256, 8)
    assert decode_tile(False, 2048, 768, 2, 16).block_n == 1
    assert decode_tile(False, 2048, 768, 4, 8).block_k == 128  # fp32: the 16-bit tile's bytes a step
    assert decode_tile(False, 64, 40, 2).block_k == 64  # never much deeper than K


def test_decode_evict_first_rule():
    """Weight loads go evict-first where a decode GEMM's active experts hold at most EVICT_FIRST_MAX_WEIGHT_BYTES (128 MiB):
    Qwen3-30B's and DeepSeek-V2-Lite's GEMMs at T=1, not Mixtral's 16-bit ones (235-470 MB, measured slower with it)."""
    mib = 2**20
    assert streams_weights_evict_first(8, 128, 2 * 768 * 2048 * 2)  # Qwen3-30B GEMM1, bf16: 8 x 6 MiB
    assert streams_weights_evict_first(6, 64, 2 * 1408 * 2048 * 2)  # DeepSeek-V2-Lite GEMM1: 66 MiB
    assert not streams_weights_evict_first(2, 8, 2 * 14336 * 4096 * 2)  # Mixtral GEMM1, bf16: 448 MiB
    assert not streams_weights_evict_first(2, 8, 4096 * 14336 * 2)  # Mixtral GEMM2, bf16: 224 MiB
    assert streams_weights_evict_first(2, 8, 4096 * 14336)  # Mixtral GEMM2, int8: 112 MiB
    assert streams_weights_evict_first(16, 8, 16 * mib)  # 16 pairs on 8 experts: each expert's bytes counted once
    assert not streams_weights_evict_first(16, 8, 17 * mib)
    # The plan passes the rule to each launch.
    x, ids, scales = torch.randn(1, 64), torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, 2)
    w1, w2 = torch.randn(4, 128, 64), torch.randn(4, 64, 64)
    plan = DecodePlan(x, ids, scales, w1, w2, get_activation("swiglu"), "gate_first", None, None, None, torch.empty(1, 64),
                      None)
    assert plan.gemm1.constexprs["EVICT_WEIGHTS"] and plan.gemm2.constexprs["EVICT_WEIGHTS"]
    # check-build compiles both kinds of weight loads for every arch: the model shapes take both.
    from simple_moe.decode import _decode_variants

    by_policy = {(v.constexprs["EVICT_WEIGHTS"], arch) for v in _decode_variants() for arch in v.archs}
    assert {(evict, arch) for evict in (False, True) for arch in (80, 86, 89, 90)} <= by_policy


@pytest.mark.parametrize("early", [False, True])
def test_decode_plan_launches_both_gemms_programmatically_where_the_rule_says(monkeypatch, early):
    """Where programmatic launches pay (`gemm_launches_early`: SM90+, CUDA, <= 128 MB of weights), both decode GEMMs are
    launched that way, GEMM1 too (it waits for the kernel before it first thing: USE_PDL); elsewhere neither."""
    import simple_moe.decode as decode

    monkeypatch.setattr(decode, "gemm_launches_early", lambda *args: early)
    x, ids, scales = torch.randn(1, 64), torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, 2)
    plan = DecodePlan(x, ids, scales, torch.randn(4, 128, 64), torch.randn(4, 64, 64), get_activation("swiglu"),
                      "gate_first", None, None, None, torch.empty(1, 64), None)
    for gemm in (plan.gemm1, plan.gemm2):
        assert gemm.launch_pdl == early and gemm.constexprs["USE_PDL"] == early


@pytest.mark.parametrize("group_size,gemm1_fold", [(None, 8), (32, 1)])
def test_decode_plan_gives_int8_gemm1_its_rule(group_size, gemm1_fold):
    """The plan passes the scales' group size to GEMM1's rule: per-channel INT8 weights fold their products, group-wise
    ones do not."""
    x, ids, scales = torch.randn(1, 64, dtype=torch.float16), torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, 2)
    q1, q2, quant = quantize_moe_weights(torch.randn(4, 128, 64), torch.randn(4, 64, 64), "w8a16", group_size)
    plan = DecodePlan(x, ids, scales, q1, q2, get_activation("swiglu"), "gate_first", None, None, None,
                      torch.empty(1, 64, dtype=torch.float16), quant)
    assert plan.gemm1.constexprs["K_FOLD"] == gemm1_fold


@pytest.mark.parametrize("scheme,gemm2_depth,gemm2_fold", [("w8a8", 512, 16), ("w8a16", 512, 8)])
def test_decode_plan_gives_int8_gemm2_its_rule(scheme, gemm2_depth, gemm2_fold):
    """The plan tells GEMM2's rule whether the activations are int8: with top_k 8 and K = I = 1040 (more than four 256-deep
    steps) both go 512 deep, W8A8 folding 16 products at a time and W8A16 8."""
    x, ids, scales = torch.randn(1, 64, dtype=torch.float16), torch.arange(8, dtype=torch.int32)[None], torch.ones(1, 8)
    q1, q2, quant = quantize_moe_weights(torch.randn(8, 2 * 1040, 64), torch.randn(8, 64, 1040), scheme)
    plan = DecodePlan(x, ids, scales, q1, q2, get_activation("swiglu"), "gate_first", None, None, None,
                      torch.empty(1, 64, dtype=torch.float16), quant)
    assert (plan.gemm2.constexprs["BLOCK_K"], plan.gemm2.constexprs["K_FOLD"]) == (gemm2_depth, gemm2_fold)


@needs_kernels
def test_decode_kernels_take_several_tokens():
    # The kernels are not limited to T=1 (DECODE_MAX_TOKENS is a speed rule): pair p = t + k*T, GEMM2 programs per token.
    # top_k = 3 pads to 4 row groups; token 1 picks an expert of another rank (dropped).
    ids = torch.tensor([[0, 4, 2], [5, 1, 9], [3, 0, 7]])
    problem = problems.make_problem(3, 56, 40, 8, 3, torch.float32, "swiglu", bias2=True, seed=19, num_global_experts=10,
                                    ids=ids)
    out = torch.full_like(problem["input"], float("nan"))
    decode_forward(problem["input"], problem["token_selected_experts"], problem["token_final_scales"],
                   problem["fc1_expert_weights"], problem["fc2_expert_weights"], get_activation("swiglu"), "gate_first", None,
                   problem["fc2_expert_biases"], None, out, None)
    assert rel_err(out, reference_moe(**problem)) < 1e-5


@needs_kernels
def test_decode_path_takes_two_tokens(no_routing):
    # T = DECODE_MAX_TOKENS = 2 through the public call: no routing maps, two tokens sharing an expert (3), a dropped pair.
    assert DECODE_MAX_TOKENS >= 2
    problem = problems.make_problem(2, 64, 48, 6, 3, torch.float16, "swiglu", bias1=True, bias2=True, seed=23,
                                    ids=torch.tensor([[3, 0, 5], [3, 7, 1]]))
    out = run(problem)
    assert rel_err(out, reference_moe(**problem)) < 2e-3
