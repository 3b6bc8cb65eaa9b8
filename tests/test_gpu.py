"""Fast-path correctness on a CUDA GPU (`pytest -m gpu`): compiled kernels against the float64 reference. No timing assertions.

- the whole grid of baselines.md: 4 model shapes x T in {1, 16, 64, 256, 1024, 4096} x {bf16, fp16}, plus fp32 at a few points;
- odd sizes (H=2880, I in {1408, 2880}, T=333), empty experts, one expert taking every token, every activation, biases (each
  also at T=1, the decode path);
- bitwise determinism over 20 runs, CUDA-graph replay bitwise equal to eager on fresh inputs, poisoned (NaN) outputs, T=0,
  tokens with no local expert (expert parallelism), a 65536-token shape whose GEMM2 buffer has more than 2^31 elements;
- no host synchronisation: the layer runs under `torch.cuda.set_sync_debug_mode("error")` and inside a CUDA graph capture.

References are computed on at most 64 sampled tokens (always including the first and the last), one expert at a time, so a
reference never holds more than one expert's weights in float64.

Self-check of this file without a GPU: `SIMPLE_MOE_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1 pytest tests/test_gpu.py` runs the same
tests on the CPU through Triton's interpreter at shrunken sizes (steps that need CUDA, such as graphs, skip there). That checks
the tests, not the GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from simple_moe import fused_moe_simple, reference_moe, route
from simple_moe.activations import ACTIVATIONS

ON_CPU = os.environ.get("SIMPLE_MOE_GPU_TESTS_ON_CPU") == "1"
pytestmark = [] if ON_CPU else [
    pytest.mark.gpu,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only: unset TRITON_INTERPRET"),
]
DEVICE = "cpu" if ON_CPU else "cuda"
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}  # relative L2 error against float64
NAN = float("nan")
SAMPLE = 64


def size(on_gpu, on_cpu):
    """The size a test uses: the real one on the GPU, a small one for the CPU self-check."""
    return on_cpu if ON_CPU else on_gpu


PRESETS = {  # baselines.md: (E, top_k, H, I)
    "mixtral-8x7b": size((8, 2, 4096, 14336), (8, 2, 64, 48)),
    "qwen3-30b-a3b": size((128, 8, 2048, 768), (128, 8, 32, 16)),
    "deepseek-v2-lite": size((64, 6, 2048, 1408), (64, 6, 48, 32)),
    "olmoe-1b-7b": size((64, 8, 2048, 1024), (64, 8, 32, 32)),
}
TOKENS = size((1, 16, 64, 256, 1024, 4096), (1, 16, 80))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------------------------
# Helpers


def make_weights(num_experts, hidden, inter, dtype, gated=True, generator=None):
    n1 = 2 * inter if gated else inter
    w1 = torch.randn(num_experts, n1, hidden, generator=generator, device=DEVICE, dtype=dtype) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=generator, device=DEVICE, dtype=dtype) / inter**0.5
    return w1, w2


def make_tokens(num_tokens, num_experts, top_k, hidden, dtype):
    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=dtype)
    scales, selected = route(torch.randn(num_tokens, num_experts, device=DEVICE), top_k)
    return x, selected, scales


def sample_tokens(num_tokens):
    """All tokens up to 64, else 62 random ones plus the first and the last, sorted."""
    if num_tokens <= SAMPLE:
        return torch.arange(num_tokens, device=DEVICE)
    middle = torch.randperm(num_tokens - 2)[: SAMPLE - 2] + 1
    return torch.cat([torch.tensor([0, num_tokens - 1]), middle]).sort().values.to(DEVICE)


def reference_rows(x, selected, scales, w1, w2, tokens, activation="swiglu", *, b1=None, b2=None, act_params=None,
                   first_expert=0):
    """float64 `reference_moe` for `tokens` only, one expert at a time: expert e becomes the single expert of a one-expert layer
    and every other slot is dropped (id 1), so the sum over experts is the layer. Ids outside `[first_expert, first_expert + E)`
    belong to other ranks and are skipped, as the layer does."""
    num_experts = w1.shape[0]
    xs = x[tokens]
    local = selected[tokens].long() - first_expert
    sc = None if scales is None else scales[tokens]
    out = torch.zeros(len(tokens), w2.shape[1], dtype=torch.float64, device=x.device)
    for e in torch.unique(local).tolist():
        if not 0 <= e < num_experts:
            continue
        ids = torch.where(local == e, 0, 1).to(torch.int32)
        one = slice(e, e + 1)
        out += reference_moe(xs, ids, sc, w1[one], w2[one], activation,
                             fc1_expert_biases=None if b1 is None else b1[one],
                             fc2_expert_biases=None if b2 is None else b2[one],
                             activation_params=None if act_params is None else act_params[one])
    return out


def rel_err(out_rows, ref_rows):
    return ((out_rows.double() - ref_rows).norm() / ref_rows.norm()).item()


def run_poisoned(x, selected, scales, w1, w2, **kwargs):
    """Runs the fast path into a NaN-filled output: any row the kernels fail to write stays NaN."""
    out = torch.full((x.shape[0], w2.shape[1]), NAN, dtype=x.dtype, device=x.device)
    result = fused_moe_simple(x, selected, scales, w1, w2, output=out, **kwargs)
    assert result.data_ptr() == out.data_ptr(), "output= was not written in place"
    return out


def assert_matches_reference(out, x, selected, scales, w1, w2, activation="swiglu", **kwargs):
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).any(1).sum().item()} rows not written or not finite"
    tokens = sample_tokens(x.shape[0])
    ref = reference_rows(x, selected, scales, w1, w2, tokens, activation, **kwargs)
    err = rel_err(out[tokens], ref)
    assert err < TOLERANCE[x.dtype], f"relative error {err:.2e} >= {TOLERANCE[x.dtype]:.0e} ({x.dtype})"
    return err


def needs_cuda():
    if ON_CPU:
        pytest.skip("needs CUDA (graphs / sync debug mode): not part of the CPU self-check")


_weights_cache: dict = {}


def preset_weights(preset, dtype):
    """The grid's weights, drawn once per (preset, dtype) from a fixed seed; at most two sets kept."""
    key = (preset, dtype)
    if key not in _weights_cache:
        if len(_weights_cache) >= 2:
            _weights_cache.pop(next(iter(_weights_cache)))
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        num_experts, _, hidden, inter = PRESETS[preset]
        gen = torch.Generator(device=DEVICE).manual_seed(1234)
        _weights_cache[key] = make_weights(num_experts, hidden, inter, dtype, generator=gen)
    return _weights_cache[key]


@pytest.fixture(scope="module", autouse=True)
def _free_weights():
    yield
    _weights_cache.clear()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------------------
# The grid of baselines.md


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_grid(preset, num_tokens, dtype):
    num_experts, top_k, hidden, _ = PRESETS[preset]
    w1, w2 = preset_weights(preset, dtype)
    x, selected, scales = make_tokens(num_tokens, num_experts, top_k, hidden, dtype)
    out = run_poisoned(x, selected, scales, w1, w2)
    assert_matches_reference(out, x, selected, scales, w1, w2)


@pytest.mark.parametrize("preset,num_tokens", [("qwen3-30b-a3b", 64), ("olmoe-1b-7b", size(1024, 80)),
                                               ("deepseek-v2-lite", 1)])
def test_grid_fp32(preset, num_tokens):
    """fp32 runs full-precision dots (no TF32): 1e-5 against float64."""
    num_experts, top_k, hidden, _ = PRESETS[preset]
    w1, w2 = preset_weights(preset, torch.float32)
    x, selected, scales = make_tokens(num_tokens, num_experts, top_k, hidden, torch.float32)
    out = run_poisoned(x, selected, scales, w1, w2)
    assert_matches_reference(out, x, selected, scales, w1, w2)


# ---------------------------------------------------------------------------------------------------------------------------------
# Odd sizes and unusual routing


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("inter", [size(1408, 40), size(2880, 24)])
def test_odd_sizes(inter, dtype):
    """H=2880 and I=1408/2880 are not multiples of the 64/128 tiles; T=333 is odd."""
    num_experts, top_k, hidden, num_tokens = 32, 4, size(2880, 72), size(333, 33)
    w1, w2 = make_weights(num_experts, hidden, inter, dtype)
    x, selected, scales = make_tokens(num_tokens, num_experts, top_k, hidden, dtype)
    out = run_poisoned(x, selected, scales, w1, w2)
    assert_matches_reference(out, x, selected, scales, w1, w2)


def test_empty_experts():
    """Only experts 5..12 of 64 get tokens: the first, the last and most experts are empty."""
    num_experts, top_k, hidden, inter, num_tokens = 64, 4, size(1024, 64), size(512, 32), 32
    dtype = torch.bfloat16
    w1, w2 = make_weights(num_experts, hidden, inter, dtype)
    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=dtype)
    selected = torch.stack([torch.randperm(8)[:top_k] + 5 for _ in range(num_tokens)]).to(torch.int32).to(DEVICE)
    scales = torch.softmax(torch.randn(num_tokens, top_k, device=DEVICE), dim=-1)
    out = run_poisoned(x, selected, scales, w1, w2)
    assert_matches_reference(out, x, selected, scales, w1, w2)


@pytest.mark.parametrize("top_k", [1, 2])
def test_one_hot_expert(top_k):
    """Every token goes to expert 3 (with top_k=2 the second slot is another random expert): one expert gets T rows."""
    num_experts, hidden, inter, num_tokens = 16, size(1024, 64), size(512, 32), size(4096, 80)
    dtype = torch.bfloat16
    w1, w2 = make_weights(num_experts, hidden, inter, dtype)
    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=dtype)
    hot = torch.full((num_tokens, 1), 3, dtype=torch.int32, device=DEVICE)
    if top_k == 2:
        other = torch.randint(0, num_experts - 1, (num_tokens, 1), device=DEVICE, dtype=torch.int32)
        other = other + (other >= 3).to(torch.int32)  # any expert but 3
        selected = torch.cat([hot, other], dim=1)
    else:
        selected = hot
    scales = torch.softmax(torch.randn(num_tokens, top_k, device=DEVICE), dim=-1)
    out = run_poisoned(x, selected, scales, w1, w2)
    assert_matches_reference(out, x, selected, scales, w1, w2)


def _activation_params(name, num_experts):
    """Random per-expert parameters for the activations that take them (see activations.py), else None."""
    u = lambda lo, hi: torch.rand(num_experts, device=DEVICE) * (hi - lo) + lo  # noqa: E731
    zero = torch.zeros(num_experts, device=DEVICE)
    if name == "swiglu_bias":  # alpha, beta, limit
        return torch.stack([u(1.0, 2.0), u(0.0, 1.0), u(3.0, 8.0)], dim=1)
    if name == "swiglu_step":  # unused, unused, limit
        return torch.stack([zero, zero, u(3.0, 8.0)], dim=1)
    if name == "situ":  # situ_beta, situ_linear_beta, unused
        return torch.stack([u(2.0, 6.0), u(10.0, 30.0), zero], dim=1)
    return None


# Every activation with its default parameters, and the three that take parameters again with random per-expert ones.
ACTIVATION_CASES = [(a.name, "default-params") for a in ACTIVATIONS.values()] + [
    (a.name, "random-params") for a in ACTIVATIONS.values() if any(p != 0 for p in a.default_params)]


@pytest.mark.parametrize("num_tokens", [size(128, 10), 1], ids=["grouped", "decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation,params_kind", ACTIVATION_CASES)
def test_activations(activation, params_kind, dtype, num_tokens):
    act = next(a for a in ACTIVATIONS.values() if a.name == activation)
    num_experts, top_k, hidden, inter = 8, 2, size(1024, 64), size(512, 32)
    params = _activation_params(activation, num_experts) if params_kind == "random-params" else None
    w1, w2 = make_weights(num_experts, hidden, inter, dtype, gated=act.gated)
    x, selected, scales = make_tokens(num_tokens, num_experts, top_k, hidden, dtype)
    out = run_poisoned(x, selected, scales, w1, w2, activation=activation, activation_params=params)
    assert_matches_reference(out, x, selected, scales, w1, w2, activation, act_params=params)


@pytest.mark.parametrize("num_tokens", [size(200, 12), 1], ids=["grouped", "decode"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("activation", ["swiglu", "swiglu_bias"])
def test_biases(activation, dtype, num_tokens):
    """GPT-OSS-like: fc1 and fc2 biases (fc2's scaled by the router weight with its row), SwigluBias with its parameters."""
    num_experts, top_k, hidden, inter = 32, 4, size(2880, 72), size(2880, 40)
    w1, w2 = make_weights(num_experts, hidden, inter, dtype)
    b1 = torch.randn(num_experts, 2 * inter, device=DEVICE, dtype=dtype) * 0.5
    b2 = torch.randn(num_experts, hidden, device=DEVICE, dtype=dtype) * 0.5
    params = None
    if activation == "swiglu_bias":
        params = torch.tensor([[1.702, 1.0, 7.0]], device=DEVICE).repeat(num_experts, 1)
    x, selected, scales = make_tokens(num_tokens, num_experts, top_k, hidden, dtype)
    out = run_poisoned(x, selected, scales, w1, w2, activation=activation, fc1_expert_biases=b1, fc2_expert_biases=b2,
                       activation_params=params)
    assert_matches_reference(out, x, selected, scales, w1, w2, activation, b1=b1, b2=b2, act_params=params)


def test_tokens_without_local_expert_get_zeros():
    """Expert parallelism, rank 1 of 2: tokens routed only to rank 0's experts must come back as zeros, not as garbage."""
    num_local, top_k, hidden, inter, num_tokens = 8, 2, size(1024, 64), size(512, 32), size(64, 12)
    dtype = torch.bfloat16
    w1, w2 = make_weights(num_local, hidden, inter, dtype)
    x, selected, scales = make_tokens(num_tokens, 2 * num_local, top_k, hidden, dtype)
    selected[:4] = torch.tensor([[0, 1], [2, 7], [3, 4], [5, 6]], dtype=torch.int32, device=DEVICE)  # all on rank 0
    selected[4] = torch.tensor([0, 9], dtype=torch.int32, device=DEVICE)  # one slot each
    out = run_poisoned(x, selected, scales, w1, w2, ep_size=2, ep_rank=1)
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))
    assert_matches_reference(out, x, selected, scales, w1, w2, first_expert=num_local)


def test_decode_path_drops_other_ranks_experts():
    """T=1 (the decode path) under expert parallelism, rank 1 of 2: a token with one local expert, then one with none."""
    num_local, top_k, hidden, inter = 8, 2, size(1024, 64), size(512, 32)
    w1, w2 = make_weights(num_local, hidden, inter, torch.bfloat16)
    x, _, scales = make_tokens(1, 2 * num_local, top_k, hidden, torch.bfloat16)
    selected = torch.tensor([[3, 12]], dtype=torch.int32, device=DEVICE)
    out = run_poisoned(x, selected, scales, w1, w2, ep_size=2, ep_rank=1)
    assert_matches_reference(out, x, selected, scales, w1, w2, first_expert=num_local)
    selected = torch.tensor([[3, 5]], dtype=torch.int32, device=DEVICE)
    out = run_poisoned(x, selected, scales, w1, w2, ep_size=2, ep_rank=1)
    assert torch.equal(out, torch.zeros_like(out))


def test_zero_tokens():
    num_experts, top_k, hidden, inter = 8, 2, size(1024, 64), size(512, 32)
    w1, w2 = make_weights(num_experts, hidden, inter, torch.bfloat16)
    x = torch.empty(0, hidden, device=DEVICE, dtype=torch.bfloat16)
    selected = torch.empty(0, top_k, device=DEVICE, dtype=torch.int32)
    scales = torch.empty(0, top_k, device=DEVICE)
    out = fused_moe_simple(x, selected, scales, w1, w2)
    assert out.shape == (0, hidden) and out.dtype == torch.bfloat16
    given = torch.empty(0, hidden, device=DEVICE, dtype=torch.bfloat16)
    assert fused_moe_simple(x, selected, scales, w1, w2, output=given).shape == (0, hidden)
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # any launch error surfaces here


# ---------------------------------------------------------------------------------------------------------------------------------
# Determinism, CUDA graphs, no host sync


@pytest.mark.parametrize("path", ["grouped", "decode"])
def test_bitwise_deterministic_over_20_runs(path):
    """Also the decode path (T=1), whose GEMM2 programs race to be the last to arrive: the sum order must not depend on it."""
    num_experts, top_k, hidden, inter = size(64, 8), 8, size(2048, 32), size(1024, 16)
    num_tokens = size(1024, 12) if path == "grouped" else 1
    dtype = torch.bfloat16
    w1, w2 = make_weights(num_experts, hidden, inter, dtype)
    x, selected, scales = make_tokens(num_tokens, num_experts, top_k, hidden, dtype)
    first = fused_moe_simple(x, selected, scales, w1, w2)
    for run in range(19):
        again = fused_moe_simple(x, selected, scales, w1, w2)
        assert torch.equal(again, first), f"run {run + 2} differs from run 1"


def _capture(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compiles and warms up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # fails if anything synchronises with the host while capturing
        fn()
    return graph


@pytest.mark.parametrize("num_tokens", [64, 1])  # the grouped path, and the decode path (programmatic launches on SM90)
def test_cuda_graph_replay_equals_eager(num_tokens):
    """Capture once with static buffers; refill them with fresh inputs three times; each replay equals eager, bit for bit."""
    needs_cuda()
    num_experts, top_k, hidden, inter = 128, 8, 2048, 768
    dtype = torch.bfloat16
    w1, w2 = make_weights(num_experts, hidden, inter, dtype)
    x, selected, scales = make_tokens(num_tokens, num_experts, top_k, hidden, dtype)
    static_out = torch.empty(num_tokens, hidden, device=DEVICE, dtype=dtype)
    graph = _capture(lambda: fused_moe_simple(x, selected, scales, w1, w2, output=static_out))
    for _ in range(3):
        new_x, new_selected, new_scales = make_tokens(num_tokens, num_experts, top_k, hidden, dtype)
        x.copy_(new_x)
        selected.copy_(new_selected)
        scales.copy_(new_scales)
        static_out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        eager = fused_moe_simple(new_x, new_selected, new_scales, w1, w2)
        assert torch.equal(static_out, eager)
    assert_matches_reference(static_out, x, selected, scales, w1, w2)


@pytest.mark.parametrize("num_tokens", [256, 1])  # the grouped path and the decode path
def test_no_host_sync(num_tokens):
    """The layer never waits on the device: no sync under sync debug mode "error", and it captures into a CUDA graph."""
    needs_cuda()
    num_experts, top_k, hidden, inter = 64, 6, 2048, 1408
    dtype = torch.bfloat16
    w1, w2 = make_weights(num_experts, hidden, inter, dtype)
    x, selected, scales = make_tokens(num_tokens, num_experts, top_k, hidden, dtype)
    expected = fused_moe_simple(x, selected, scales, w1, w2)  # compiles outside the checks
    out = torch.empty_like(expected)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_moe_simple(x, selected, scales, w1, w2, output=out)
        fresh = fused_moe_simple(x, selected, scales, w1, w2)  # allocating its own output
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.equal(out, expected) and torch.equal(fresh, expected)
    graph_out = torch.empty_like(expected)
    graph = _capture(lambda: fused_moe_simple(x, selected, scales, w1, w2, output=graph_out))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_out, expected)


# ---------------------------------------------------------------------------------------------------------------------------------
# Large shape: int64 index math


def test_large_shape_int64_indexing():
    """T=65536, H=7168, top_k=8 of E=8: GEMM2's [T*top_k, H] buffer has 3.8e9 elements (> 2^31), so dest-row offsets must be
    computed in int64. I=256 keeps it at about 10 GB."""
    num_experts, top_k, hidden, inter, num_tokens = 8, 8, size(7168, 72), size(256, 16), size(65536, 300)
    if not ON_CPU:
        assert num_tokens * top_k * hidden > 2**31  # the point of the test
    dtype = torch.bfloat16
    w1, w2 = make_weights(num_experts, hidden, inter, dtype)
    x, selected, scales = make_tokens(num_tokens, num_experts, top_k, hidden, dtype)
    out = run_poisoned(x, selected, scales, w1, w2)
    assert_matches_reference(out, x, selected, scales, w1, w2)
    del out, x
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------------------
# Tensors on a GPU other than the current one


@pytest.mark.skipif(ON_CPU or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("num_tokens", [1, 64])  # the decode path and the grouped path
def test_tensors_on_another_gpu_than_the_current_one(num_tokens):
    """cuda:1 tensors while cuda:0 is current: the layer runs on cuda:1 (as a torch op would), not launched on cuda:0."""
    global DEVICE
    num_experts, top_k, hidden, inter = 16, 4, 256, 128
    saved, DEVICE = DEVICE, "cuda:1"
    try:
        with torch.cuda.device(0):
            w1, w2 = make_weights(num_experts, hidden, inter, torch.bfloat16)
            x, selected, scales = make_tokens(num_tokens, num_experts, top_k, hidden, torch.bfloat16)
            out = run_poisoned(x, selected, scales, w1, w2)
            assert out.device == x.device and torch.cuda.current_device() == 0
            assert_matches_reference(out, x, selected, scales, w1, w2)
    finally:
        DEVICE = saved
