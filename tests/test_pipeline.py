"""`fused_moe_simple` end to end against the float64 `reference_moe`: the fast path, the GEMM callbacks, EP, edge cases, random
shapes (hypothesis), and the CPU fallback without Triton's interpreter.

Error measure: relative L2 error ||out - ref|| / ||ref||, below 1e-5 (fp32), 2e-3 (fp16), 1e-2 (bf16). Outputs are passed in
filled with NaN, so a row the layer forgets to write fails the check.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _triton_interpreter  # noqa: F401  (exact bf16 dot and casts in the interpreter)
from problems import DEVICE, make_problem
import simple_moe
from simple_moe import cublas_gemm, fused_moe_simple, pipeline, reference_moe, torch_loop_gemm
from simple_moe.activations import ACTIVATIONS, activation_torch, get_activation

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
pytestmark = pytest.mark.filterwarnings("ignore:simple_moe. tensors on cpu")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTIVATION_NAMES = [a.name for a in ACTIVATIONS.values()]
PARAMETRIZED = ["swiglu_bias", "situ", "swiglu_step"]




def poisoned_output(problem):
    return torch.full(problem["input"].shape, float("nan"), dtype=problem["input"].dtype, device=DEVICE)


def run_and_check(problem, *, reference_kwargs=None, **kwargs):
    """Runs fused_moe_simple into a NaN-filled output and checks it against reference_moe. Returns (out, relative error)."""
    output = poisoned_output(problem)
    out = fused_moe_simple(**problem, output=output, **kwargs)
    assert out.data_ptr() == output.data_ptr() and out.dtype == problem["input"].dtype
    reference_arguments = {k: v for k, v in problem.items()}
    reference_arguments.update(reference_kwargs or {})
    for name in ("activation_params", "ep_size", "ep_rank"):
        if name in kwargs:
            reference_arguments[name] = kwargs[name]
    ref = reference_moe(**reference_arguments)
    return out, check_close(out, ref)


def check_close(out, ref):
    dtype = out.dtype
    assert tuple(out.shape) == tuple(ref.shape)
    assert torch.isfinite(out).all(), "unwritten (NaN) or overflowed output"
    if ref.norm() == 0:
        assert (out == 0).all()
        return 0.0
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < TOLERANCE[dtype], f"relative error {err:.3g} >= {TOLERANCE[dtype]:g} ({dtype})"
    return err


# ---------------------------------------------------------------------------------------------------------------------------------
# The fast path (Triton grouped GEMMs)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("biases", [False, True], ids=["no_bias", "bias"])
def test_fast_path(activation, dtype, biases):
    problem = make_problem(9, 40, 24, 5, 2, dtype, activation, bias1=biases, bias2=biases, seed=1)
    run_and_check(problem)


@needs_kernels
@pytest.mark.parametrize("bias1, bias2", [(True, False), (False, True)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fast_path_one_bias(activation, bias1, bias2):
    run_and_check(make_problem(7, 32, 16, 4, 2, torch.float32, activation, bias1=bias1, bias2=bias2, seed=2))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", PARAMETRIZED)
def test_activation_params(activation, dtype):
    num_experts = 4
    generator = torch.Generator().manual_seed(3)
    params = torch.empty(num_experts, 3)
    if activation == "swiglu_bias":  # alpha, beta, limit: limits below the typical |h| so the clamps bite
        params[:, 0] = 0.5 + 1.5 * torch.rand(num_experts, generator=generator)
        params[:, 1] = torch.randn(num_experts, generator=generator)
        params[:, 2] = 0.3 + torch.rand(num_experts, generator=generator)
    elif activation == "situ":  # situ_beta, situ_linear_beta
        params[:, 0] = 0.5 + 4 * torch.rand(num_experts, generator=generator)
        params[:, 1] = 0.5 + 30 * torch.rand(num_experts, generator=generator)
        params[:, 2] = 0.0
    else:  # swiglu_step: limit only
        params[:, :2] = 0.0
        params[:, 2] = 0.1 + 0.5 * torch.rand(num_experts, generator=generator)
    problem = make_problem(11, 32, 24, num_experts, 2, dtype, activation, bias1=True, seed=4)
    run_and_check(problem, activation_params=params.to(DEVICE))
    # The parameters matter: with the defaults the result is different.
    default = reference_moe(**problem)
    with_params = reference_moe(**problem, activation_params=params.to(DEVICE))
    assert (default - with_params).norm() > 1e-2 * with_params.norm()


@needs_kernels
def test_activation_by_enum_and_int():
    problem = make_problem(5, 32, 16, 3, 2, torch.float32, "geglu_tanh", seed=5)
    by_name = fused_moe_simple(**problem)
    for spelling in (simple_moe.ActivationType.GegluTanh, int(simple_moe.ActivationType.GegluTanh), "GegluTanh"):
        problem["activation"] = spelling
        assert torch.equal(fused_moe_simple(**problem), by_name)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_token_final_scales(dtype):
    problem = make_problem(6, 32, 16, 4, 3, dtype, "swiglu", bias2=True, seed=6)
    problem["token_final_scales"] = None
    run_and_check(problem)


@needs_kernels
def test_output_allocated_when_not_given():
    problem = make_problem(6, 32, 16, 4, 2, torch.float16, "relu", seed=7)
    out = fused_moe_simple(**problem)
    assert out.dtype == torch.float16 and tuple(out.shape) == (6, 32)
    check_close(out, reference_moe(**problem))


@needs_kernels
@pytest.mark.parametrize("case", ["empty_experts", "one_expert_top1", "one_expert_duplicates", "single_expert_layer"])
def test_routing_extremes(case):
    num_tokens, num_experts, top_k = 10, 8, 2
    if case == "empty_experts":  # only experts 1 and 6 receive rows
        ids = torch.tensor([[1, 6], [6, 1]] * 5)
    elif case == "one_expert_top1":
        ids, top_k = torch.full((num_tokens, 1), 3), 1
    elif case == "one_expert_duplicates":  # not a router's output, but well defined: the expert counts twice
        ids = torch.full((num_tokens, 2), 5)
    else:
        ids, num_experts, top_k = torch.zeros(num_tokens, 1, dtype=torch.int64), 1, 1
    problem = make_problem(num_tokens, 48, 32, num_experts, top_k, torch.bfloat16, "swiglu", bias1=True, bias2=True, seed=8,
                           ids=ids)
    run_and_check(problem)


@needs_kernels
def test_dropped_ids_give_zero_rows():
    ids = torch.tensor([[0, 2], [-1, 9], [3, -5], [4, 4]])  # token 1 and 3: no valid expert (E=4)
    problem = make_problem(4, 32, 16, 4, 2, torch.float32, "swiglu", bias2=True, seed=9, ids=ids)
    out, _ = run_and_check(problem)
    assert (out[1] == 0).all() and (out[3] == 0).all()
    assert (out[0] != 0).any() and (out[2] != 0).any()


@needs_kernels
@pytest.mark.parametrize("num_tokens", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tiny_token_counts(num_tokens, dtype):
    problem = make_problem(num_tokens, 32, 16, 4, 2, dtype, "swiglu", bias1=True, bias2=True, seed=10)
    out = fused_moe_simple(**problem, output=poisoned_output(problem))
    assert tuple(out.shape) == (num_tokens, 32)
    if num_tokens:
        check_close(out, reference_moe(**problem))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_odd_sizes(activation, dtype):
    run_and_check(make_problem(5, 33, 17, 3, 2, dtype, activation, bias1=True, bias2=True, seed=11))


@needs_kernels
def test_large_odd_sizes():
    # GPT-OSS's H=2880 and an I of 1408 (not a multiple of any K tile): masked K tails in both GEMMs. One case, to stay cheap on CPU.
    run_and_check(make_problem(7, 2880, 1408, 2, 2, torch.bfloat16, "swiglu", seed=12))


@needs_kernels
def test_int64_ids_and_strided_weights():
    problem = make_problem(8, 32, 16, 4, 2, torch.float32, "swiglu", bias1=True, seed=13)
    problem["token_selected_experts"] = problem["token_selected_experts"].long()
    # fc1 stored transposed in memory ([E, H, N1] contiguous, viewed as [E, N1, H]): the K dimension is strided.
    problem["fc1_expert_weights"] = problem["fc1_expert_weights"].transpose(1, 2).contiguous().transpose(1, 2)
    run_and_check(problem)


@needs_kernels
def test_deterministic():
    problem = make_problem(16, 64, 32, 4, 2, torch.bfloat16, "swiglu", bias2=True, seed=14)
    first = fused_moe_simple(**problem)
    second = fused_moe_simple(**problem)
    assert torch.equal(first.view(torch.int16), second.view(torch.int16))


# ---------------------------------------------------------------------------------------------------------------------------------
# The pluggable path (GEMM callbacks with the seed's signature)


class Float64Gemm:
    """A user-written callback: one float64 matmul per expert; records its arguments to check the seed's contract."""

    def __init__(self):
        self.calls = []

    def __call__(self, output, input, weights, bias, expert_offsets, M, N, K, num_experts, is_gemm1, activation):
        self.calls.append(dict(M=M, N=N, K=K, num_experts=num_experts, is_gemm1=is_gemm1, activation=activation))
        assert expert_offsets.dtype == torch.int64 and tuple(expert_offsets.shape) == (num_experts + 1,)
        assert tuple(output.shape) == (M, N) and tuple(input.shape) == (M, K)
        assert weights.shape[0] == num_experts and weights.shape[2] == K
        offsets = expert_offsets.tolist()
        assert offsets[0] == 0 and offsets[-1] <= M and offsets == sorted(offsets)
        act = get_activation(activation) if is_gemm1 else None
        for e in range(num_experts):
            rows = slice(offsets[e], offsets[e + 1])
            h = input[rows].double() @ weights[e].double().T
            if bias is not None:
                h = h + bias[e].double()
            if act is not None:
                h = activation_torch(h, act)  # gate-first, default parameters: the seed's contract
            output[rows] = h.to(output.dtype)


CALLBACKS = {"torch_loop_gemm": torch_loop_gemm, "cublas_gemm": cublas_gemm, "user": Float64Gemm}


def callback(name):
    return CALLBACKS[name]() if name == "user" else CALLBACKS[name]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("name", CALLBACKS)
def test_callbacks(name, activation, dtype):
    problem = make_problem(9, 40, 24, 5, 2, dtype, activation, bias1=True, bias2=True, seed=15)
    gemm1, gemm2 = callback(name), callback(name)
    run_and_check(problem, gemm1_fn=gemm1, gemm2_fn=gemm2)
    if name == "user":
        inter = problem["fc2_expert_weights"].shape[2]
        assert gemm1.calls == [dict(M=18, N=inter, K=40, num_experts=5, is_gemm1=True, activation=activation)]
        assert gemm2.calls == [dict(M=18, N=40, K=inter, num_experts=5, is_gemm1=False, activation=activation)]


@needs_kernels
@pytest.mark.parametrize("which", ["gemm1_fn", "gemm2_fn"])
def test_one_callback_uses_the_torch_loop_for_the_other(which):
    problem = make_problem(6, 32, 16, 4, 2, torch.float32, "geglu", bias1=True, bias2=True, seed=16)
    user = Float64Gemm()
    run_and_check(problem, **{which: user})
    assert len(user.calls) == 1 and user.calls[0]["is_gemm1"] == (which == "gemm1_fn")


@needs_kernels
def test_callbacks_with_dropped_rows_no_scales_and_ep():
    ids = torch.tensor([[0, 5], [7, 2], [4, 6], [1, 3], [6, 7]])  # rank 1 of 2 holds experts 4..7
    problem = make_problem(5, 32, 16, 4, 2, torch.float16, "swiglu", bias2=True, seed=17, ids=ids)
    problem["token_final_scales"] = None
    user = Float64Gemm()
    out, _ = run_and_check(problem, gemm1_fn=user, gemm2_fn=user, ep_size=2, ep_rank=1)
    assert user.calls[0]["M"] == 10  # all expanded rows are handed over; only the first offsets[E] are valid
    assert (out[3] == 0).all()  # token 3 has no expert on this rank


# ---------------------------------------------------------------------------------------------------------------------------------
# Expert parallelism


@needs_kernels
@pytest.mark.parametrize("path", ["fast", "callbacks"])
def test_expert_parallel_ranks_sum_to_the_whole(path):
    ep_size, local_experts, dtype = 3, 2, torch.float32
    whole = make_problem(8, 32, 16, ep_size * local_experts, 2, dtype, "swiglu", bias1=True, bias2=True, seed=18)
    total = torch.zeros(8, 32, dtype=torch.float64, device=DEVICE)
    for rank in range(ep_size):
        local = dict(whole)
        experts = slice(rank * local_experts, (rank + 1) * local_experts)
        for name in ("fc1_expert_weights", "fc2_expert_weights", "fc1_expert_biases", "fc2_expert_biases"):
            local[name] = whole[name][experts].contiguous()
        callbacks = {} if path == "fast" else dict(gemm1_fn=Float64Gemm(), gemm2_fn=torch_loop_gemm)
        out, _ = run_and_check(local, ep_size=ep_size, ep_rank=rank, **callbacks)  # vs reference_moe(ep_rank=rank)
        total += out.double()
    check_close(total.to(dtype), reference_moe(**whole))


# ---------------------------------------------------------------------------------------------------------------------------------
# Call plans (pipeline.py): a decode call's signature validated once, later calls of that signature launched from its plan


@pytest.fixture
def call_plans(monkeypatch):
    """An empty plan cache for the test (and the one it replaced back afterwards)."""
    plans = {}
    monkeypatch.setattr(pipeline, "_call_plans", plans)
    return plans


def fresh_values(problem, seed):
    """The problem with new random values in every float tensor (same shapes, dtypes, strides): the next decode step."""
    generator = torch.Generator().manual_seed(seed)
    renewed = dict(problem)
    for name, value in problem.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            renewed[name] = (torch.rand(value.shape, generator=generator) + 0.1).to(value.device, value.dtype)
    return renewed


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation, biases", [("swiglu", False), ("swiglu_bias", True), ("relu2", True)])
@pytest.mark.parametrize("num_tokens", [1, 2, 5])  # 5: the grouped path's plan (routing, two GEMMs, finalize)
def test_planned_calls_match_the_reference(call_plans, num_tokens, activation, biases, dtype):
    problem = make_problem(num_tokens, 48, 40, 6, 3, dtype, activation, bias1=biases, bias2=biases, seed=30)
    first, _ = run_and_check(problem)
    assert len(call_plans) == 1
    (plan,) = call_plans.values()
    for step in range(2):  # the same signature with new values takes the plan and stays correct
        renewed = fresh_values(problem, seed=31 + step)
        out, _ = run_and_check(renewed)
        assert len(call_plans) == 1 and next(iter(call_plans.values())) is plan
    # The planned call computes what the unplanned one does, bit for bit.
    call_plans.clear()
    assert torch.equal(fused_moe_simple(**renewed), out)


@needs_kernels
@pytest.mark.parametrize("num_tokens", [1, 5])
def test_plan_keys_tell_calls_apart(call_plans, num_tokens):
    """Each variation of a call's signature gets its own plan, and each result is right: a plan never serves a call whose
    shapes, strides, dtypes, alignment, optional tensors, activation parameters or expert-parallel rank differ."""
    base = make_problem(num_tokens, 48, 40, 6, 3, torch.float32, "swiglu_bias", bias1=True, bias2=True, seed=32)
    wide = torch.randn(num_tokens, 64, device=DEVICE)
    misaligned = torch.randn(num_tokens * 49 + 1, device=DEVICE)[1:].view(num_tokens, 49)[:, :48]  # 4 bytes off 16
    misaligned.copy_(base["input"])
    params = torch.rand(6, 3, device=DEVICE) + 0.5
    variations = [
        {},
        {"input": wide[:, :48]},  # stride(0) 64
        {"input": misaligned},
        {"token_selected_experts": base["token_selected_experts"].long()},
        {"token_final_scales": None},
        {"token_final_scales": base["token_final_scales"].half()},
        {"fc1_expert_biases": None},
        {"fc2_expert_biases": None},
        {"activation": "swiglu"},
    ]
    for number, change in enumerate(variations, start=1):
        run_and_check({**base, **change})
        assert len(call_plans) == number, change
    run_and_check(base, activation_params=params)
    run_and_check({**base, "fc1_expert_weights": base["fc1_expert_weights"][:2].contiguous(),
                   "fc2_expert_weights": base["fc2_expert_weights"][:2].contiguous(),
                   "fc1_expert_biases": base["fc1_expert_biases"][:2].contiguous(),
                   "fc2_expert_biases": base["fc2_expert_biases"][:2].contiguous()}, ep_size=3, ep_rank=1)
    out = fused_moe_simple(**base)  # output allocated: its own plan
    check_close(out, reference_moe(**base))
    assert len(call_plans) == len(variations) + 3
    for change in variations:  # and each comes back to its own plan
        run_and_check({**base, **change})
    assert len(call_plans) == len(variations) + 3


@needs_kernels
def test_bad_input_after_a_planned_call_still_raises(call_plans):
    problem = make_problem(1, 32, 16, 4, 2, torch.float32, "swiglu", seed=33)
    good = dict(problem, fc1_expert_weights=problem["fc1_expert_weights"][:2].contiguous(),
                fc2_expert_weights=problem["fc2_expert_weights"][:2].contiguous())
    run_and_check(good, ep_size=2, ep_rank=1)
    assert len(call_plans) == 1
    with pytest.raises(ValueError, match="ep_rank"):
        fused_moe_simple(**good, ep_size=2, ep_rank=True)  # True == 1, but not a rank
    with pytest.raises(ValueError, match="ep_size"):
        fused_moe_simple(**good, ep_size=2.0, ep_rank=1)
    with pytest.raises(TypeError, match="token_selected_experts"):
        fused_moe_simple(**dict(good, token_selected_experts=good["token_selected_experts"].float()), ep_size=2, ep_rank=1)
    with pytest.raises(TypeError, match="input"):
        fused_moe_simple(**dict(good, input=good["input"].tolist()), ep_size=2, ep_rank=1)
    with pytest.raises(TypeError, match="output"):
        fused_moe_simple(**good, output=torch.empty(1, 32, dtype=torch.float16, device=DEVICE), ep_size=2, ep_rank=1)
    with pytest.raises(ValueError, match="activation"):
        fused_moe_simple(**dict(good, activation="swiglu2"), ep_size=2, ep_rank=1)
    with pytest.raises(TypeError, match="activation"):
        fused_moe_simple(**dict(good, activation=["swiglu"]), ep_size=2, ep_rank=1)  # unhashable: no key, validation says
    assert len(call_plans) == 1


@needs_kernels
def test_no_plan_for_callbacks_or_no_tokens(call_plans, monkeypatch):
    problem = make_problem(1, 32, 16, 4, 2, torch.float32, "swiglu", seed=34)
    run_and_check(problem, gemm1_fn=torch_loop_gemm)
    fused_moe_simple(**make_problem(0, 32, 16, 4, 2, torch.float32, "swiglu", seed=35))
    monkeypatch.setattr(pipeline, "_CALL_PLANS_ENABLED", False)
    run_and_check(problem)
    assert not call_plans


@needs_kernels
def test_plan_cache_is_bounded(call_plans, monkeypatch):
    monkeypatch.setattr(pipeline, "_MAX_CALL_PLANS", 2)
    for hidden in (32, 48, 64):
        run_and_check(make_problem(1, hidden, 16, 4, 2, torch.float32, "swiglu", seed=36))
        assert 1 <= len(call_plans) <= 2


# ---------------------------------------------------------------------------------------------------------------------------------
# Random shapes


@needs_kernels
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_tokens=st.integers(0, 12),
    hidden=st.integers(8, 72),
    inter=st.integers(1, 48),
    num_experts=st.integers(1, 6),
    top_k_fraction=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    activation=st.sampled_from(ACTIVATION_NAMES),
    biases=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(num_tokens, hidden, inter, num_experts, top_k_fraction, dtype, activation, biases, seed):
    top_k = 1 + min(num_experts - 1, int(top_k_fraction * num_experts))
    problem = make_problem(num_tokens, hidden, inter, num_experts, top_k, dtype, activation, bias1=biases, bias2=biases, seed=seed)
    out = fused_moe_simple(**problem, output=poisoned_output(problem))
    check_close(out, reference_moe(**problem))


# ---------------------------------------------------------------------------------------------------------------------------------
# CPU without the interpreter: the torch fallback (no Triton at all)

_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    sys.path.insert(0, {tests!r})
    from test_pipeline import Float64Gemm, make_problem
    from simple_moe import fused_moe_simple, reference_moe, torch_loop_gemm

    cases = [  # (make_problem arguments, extra fused_moe_simple arguments)
        (dict(problem=(9, 40, 24, 5, 2, torch.float32, "swiglu"), bias1=True, bias2=True), dict()),
        (dict(problem=(9, 40, 24, 5, 2, torch.float16, "relu2"), bias2=True, no_scales=True), dict()),
        (dict(problem=(9, 40, 24, 5, 2, torch.bfloat16, "geglu")), dict()),
        (dict(problem=(9, 40, 24, 4, 2, torch.float32, "swiglu_bias"), bias1=True),
         dict(activation_params=torch.tensor([[1.702, 1.0, 0.5]] * 4))),
        (dict(problem=(9, 40, 24, 4, 2, torch.float32, "situ")), dict()),
        (dict(problem=(9, 40, 24, 4, 2, torch.float32, "gelu"), bias1=True, bias2=True),
         dict(gemm1_fn=torch_loop_gemm, gemm2_fn=Float64Gemm())),
        (dict(problem=(9, 40, 24, 2, 2, torch.float32, "swiglu"), num_global_experts=6), dict(ep_size=3, ep_rank=1)),
        (dict(problem=(1, 40, 24, 4, 1, torch.float32, "identity"), ids=torch.tensor([[-3]])), dict()),
        (dict(problem=(0, 40, 24, 4, 2, torch.float32, "swiglu")), dict()),
    ]
    errors = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for make, extra in cases:
            no_scales = make.pop("no_scales", False)
            problem = make_problem(*make.pop("problem"), **make)
            if no_scales:
                problem["token_final_scales"] = None
            out = torch.full(problem["input"].shape, float("nan"), dtype=problem["input"].dtype)
            out = fused_moe_simple(**problem, output=out, **extra)
            ref = reference_moe(**problem, **{{k: v for k, v in extra.items() if k not in ("gemm1_fn", "gemm2_fn")}})
            finite = bool(torch.isfinite(out).all())
            err = 0.0 if ref.norm() == 0 else ((out.double() - ref).norm() / ref.norm()).item()
            errors.append((str(out.dtype), finite, err, bool((out == 0).all()) if ref.norm() == 0 else None))
    messages = [str(w.message) for w in caught if "simple_moe" in str(w.message)]
    print(json.dumps(dict(errors=errors, warnings=messages)))
    """
)


def test_cpu_fallback_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(simple_moe.__file__).parents[1]), env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a GPU machine
    script = _FALLBACK_SCRIPT.format(tests=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for dtype, finite, err, zeros in report["errors"]:
        assert finite, report
        assert err < TOLERANCE[getattr(torch, dtype.split(".")[1])], report
        assert zeros in (None, True), report
    assert len(report["errors"]) == 9
    assert len(report["warnings"]) == 1 and "plain torch" in report["warnings"][0], report["warnings"]


def test_public_kernels_fall_back_without_interpreter():
    """build_routing_maps and finalize on a CPU without Triton's interpreter run their torch twins (they used to reach a
    CUDA launch and fail with "Torch not compiled with CUDA enabled")."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(simple_moe.__file__).parents[1]), env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    script = textwrap.dedent("""
        import torch
        from simple_moe import build_routing_maps, finalize
        ids = torch.tensor([[0, 2], [2, 9], [1, 0]], dtype=torch.int32)  # id 9: dropped
        maps = build_routing_maps(ids, 3)
        gemm2_out = torch.randn(6, 4)
        scales = torch.rand(3, 2)
        out = finalize(gemm2_out, maps, scales)
        expected = torch.zeros(3, 4)
        for t in range(3):
            for k in range(2):
                if ids[t, k] < 3:
                    expected[t] += scales[t, k] * gemm2_out[maps.expanded_source_row_to_expanded_dest_row[t + 3 * k]]
        assert maps.expert_first_token_offset.tolist() == [0, 2, 3, 5], maps.expert_first_token_offset
        torch.testing.assert_close(out, expected)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
