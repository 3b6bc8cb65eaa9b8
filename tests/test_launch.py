"""The direct launch path (_launch.py): its key separates what Triton specialises on, and on a GPU it runs the same binaries."""
import math

import pytest
import torch

import simple_moe as sm
from simple_moe import _launch, pipeline
from simple_moe.decode import DecodePlan


def test_arg_key_follows_triton_specialisation():
    base = torch.zeros(64, dtype=torch.float16)
    assert _launch.arg_key(base) == (torch.float16, True)
    assert _launch.arg_key(base[1:]) == (torch.float16, False)  # 2 bytes off a 16-byte boundary
    assert _launch.arg_key(base[8:]) == (torch.float16, True)
    assert _launch.arg_key(base.to(torch.bfloat16)) != _launch.arg_key(base)
    assert _launch.arg_key(1) != _launch.arg_key(2) != _launch.arg_key(32)
    assert _launch.arg_key(3) == _launch.arg_key(5)
    assert _launch.arg_key(2**31 + 16) != _launch.arg_key(32)  # 64-bit int
    assert _launch.arg_key(True) != _launch.arg_key(1)


def test_launch_key_is_never_coarser_than_triton():
    """Two argument tuples with the same launch key specialise alike under Triton (arg_key of every argument)."""
    base = torch.zeros(64, dtype=torch.float16)
    cases = [(t, i, j) for t in (base, base[1:], base[8:], base.to(torch.bfloat16)) for i in (1, 3, 5, 32)
             for j in (48, 2**31 + 16, True, None, 0.5, base)]
    seen = {}
    for args in cases:
        key, launch_args = _launch.key_and_launch_args(args, *_launch.leading_tensors(args))
        seen.setdefault(key, set()).add(tuple(map(_launch.arg_key, args)))
        assert launch_args[0] == args[0].data_ptr() and launch_args[1:] == list(args[1:])  # the tensor as its address
    assert all(len(triton_keys) == 1 for triton_keys in seen.values())
    same = [_launch.key_and_launch_args((base, i, 48), 1)[0] for i in (3, 5)]  # equal specialisations share an entry
    assert same[0] == same[1]
    assert _launch.leading_tensors((base, base, 3, base)) == (2, 0)


def test_launch_key_of_tma_descriptors():
    """Descriptors after the leading tensors are keyed by their tensor's dtype and block shape (their signature type) and
    passed on as they are; a descriptor anywhere else is not taken for one."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    base = torch.zeros(64, 32, dtype=torch.float16)
    desc = lambda t, block: TensorDescriptor.from_tensor(t, block)  # noqa: E731
    args = (base, desc(base, [16, 32]), desc(base, [32, 32]), 7)
    assert _launch.leading_tensors(args) == (1, 2)
    key, launch_args = _launch.key_and_launch_args(args, 1, 2)
    assert launch_args[0] == base.data_ptr() and launch_args[1:] == list(args[1:])
    other = (base, desc(base, [16, 32]), desc(base, [16, 32]), 7)
    assert _launch.key_and_launch_args(other, 1, 2)[0] != key  # another block shape: another binary
    again = (base.clone(), desc(base, [16, 32]), desc(base, [32, 32]), 9)
    assert _launch.key_and_launch_args(again, 1, 2)[0] == key
    bf16 = base.to(torch.bfloat16)
    assert _launch.key_and_launch_args((base, desc(bf16, [16, 32]), desc(base, [32, 32]), 7), 1, 2)[0] != key
    assert _launch.leading_tensors((base, 3, desc(base, [16, 32]))) == (1, 0)


def test_planned_launch_calls_the_entry_launch_returned(monkeypatch):
    """PlannedLaunch (no GPU needed: `launch` and the stream query are stand-ins): the first call goes through `launch` with
    the tensors then the fixed ints, later calls hand the entry's launch function what `launch`'s own direct call does (grid
    padded to 3, stream, CUfunction, head, tensor addresses, ints, constexpr values), and it falls back to `launch` when the
    cache is replaced, the fast path is off or a launch hook is installed."""
    calls, runs = [], []
    entry = (lambda *args: runs.append(args), "function", ("head0", "head1"))
    monkeypatch.setattr(_launch, "launch", lambda *args, **kwargs: calls.append((args, kwargs)) or entry)
    monkeypatch.setattr(_launch, "_ENABLED", True)
    monkeypatch.setattr(_launch, "_launch_hooks_installed", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: "stream", raising=False)
    kernel = object()
    planned = _launch.PlannedLaunch(kernel, (5,), (7, 9), num_warps=4, launch_pdl=True, BLOCK=64, EVEN=True)
    a, b = torch.zeros(4), torch.zeros(8)
    planned(a, b)
    assert calls == [((kernel, (5, 1, 1), (a, b, 7, 9), 4, None, True, None), {"BLOCK": 64, "EVEN": True})] and not runs
    assert planned.direct
    planned(b, a)
    assert runs == [(5, 1, 1, "stream", "function", "head0", "head1", b.data_ptr(), a.data_ptr(), 7, 9, 64, True)]
    assert len(calls) == 1
    monkeypatch.setattr(_launch, "_compiled", {})  # a new cache: the entry is stale
    assert not planned.direct
    planned(a, b)
    assert len(calls) == 2 and len(runs) == 1 and planned.direct
    monkeypatch.setattr(_launch, "_launch_hooks_installed", lambda: True)
    planned(a, b)
    monkeypatch.setattr(_launch, "_launch_hooks_installed", lambda: False)
    monkeypatch.setattr(_launch, "_ENABLED", False)
    planned(a, b)
    assert len(calls) == 4 and len(runs) == 1


def _moe_case(device, tokens=5, num_experts=8, top_k=2, hidden=128, inter=96, dtype=torch.bfloat16):
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    w1 = torch.randn(num_experts, 2 * inter, hidden, device=device, dtype=dtype) / math.sqrt(hidden)
    w2 = torch.randn(num_experts, hidden, inter, device=device, dtype=dtype) / math.sqrt(inter)
    scales, ids = sm.route(torch.randn(tokens, num_experts, device=device), top_k)
    return x, ids, scales, w1, w2


@pytest.mark.gpu
def test_direct_launch_matches_triton_launch(monkeypatch):
    x, ids, scales, w1, w2 = _moe_case("cuda")
    monkeypatch.setattr(_launch, "_ENABLED", False)
    expected = sm.fused_moe_simple(x, ids, scales, w1, w2)
    monkeypatch.setattr(_launch, "_ENABLED", True)
    monkeypatch.setattr(_launch, "_compiled", {})  # nothing remembered from earlier tests
    first = sm.fused_moe_simple(x, ids, scales, w1, w2)  # finds Triton's binaries, remembers them
    held = _launch.cached_launches()
    assert held >= 4  # routing, GEMM1, GEMM2, finalize now go through the direct path
    second = sm.fused_moe_simple(x, ids, scales, w1, w2)  # direct calls
    assert _launch.cached_launches() == held
    assert torch.equal(first, expected) and torch.equal(second, expected)


@pytest.mark.gpu
def test_direct_launch_keys_misaligned_views_apart(monkeypatch):
    # A view 2 bytes off a 16-byte boundary must not run the binary compiled for aligned rows (it would issue 16-byte loads).
    monkeypatch.setattr(_launch, "_compiled", {})
    x, ids, scales, w1, w2 = _moe_case("cuda", hidden=136)
    sm.fused_moe_simple(x, ids, scales, w1, w2)  # the aligned specialisation, remembered
    storage = torch.empty(x.numel() + 1, device="cuda", dtype=x.dtype)
    shifted = storage[1:].view_as(x)
    shifted.copy_(x)
    assert shifted.data_ptr() % 16 != 0
    held = _launch.cached_launches()
    out = sm.fused_moe_simple(shifted, ids, scales, w1, w2)
    assert _launch.cached_launches() > held
    ref = sm.reference_moe(x, ids, scales, w1, w2)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2


def _planned_launches(call_plan) -> list:
    """The `PlannedLaunch`es of a call plan (pipeline.py): the decode path's two, or the grouped path's routing, GEMMs and
    finalize."""
    forward = call_plan.forward
    if isinstance(forward, DecodePlan):
        return [forward.gemm1, forward.gemm2]
    routing, grouped = forward.routing, forward.grouped
    launches = [routing.maps_launch] if routing.one_launch else [routing.histogram, routing.offsets, routing.scatter]
    return launches + [grouped.gemm1.launch, grouped.gemm2.launch, grouped.finalize.launch]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tokens", [1, 16])  # the decode path, the grouped path
def test_planned_calls_go_direct_and_match_triton(monkeypatch, tokens, dtype):
    """A call's plan (pipeline.py) hands its launches straight to Triton's launcher from the second call on, and computes
    bit for bit what Triton's own launches do."""
    monkeypatch.setattr(pipeline, "_call_plans", {})
    x, ids, scales, w1, w2 = _moe_case("cuda", tokens=tokens, num_experts=16, top_k=4, dtype=dtype)
    monkeypatch.setattr(_launch, "_ENABLED", False)
    expected = sm.fused_moe_simple(x, ids, scales, w1, w2)  # makes the plan, launches through kernel[grid]
    (plan,) = pipeline._call_plans.values()
    launches = _planned_launches(plan)
    assert len(launches) == (2 if tokens == 1 else 4) and not any(p.direct for p in launches)
    monkeypatch.setattr(_launch, "_ENABLED", True)
    monkeypatch.setattr(_launch, "_compiled", {})
    first = sm.fused_moe_simple(x, ids, scales, w1, w2)  # the plan's launches find Triton's binaries
    assert all(p.direct for p in launches)
    held = _launch.cached_launches()
    x2 = torch.randn_like(x)
    second = sm.fused_moe_simple(x2, ids, scales, w1, w2)  # direct, no key built
    assert _launch.cached_launches() == held and len(pipeline._call_plans) == 1
    monkeypatch.setattr(_launch, "_ENABLED", False)
    expected2 = sm.fused_moe_simple(x2, ids, scales, w1, w2)
    assert torch.equal(first, expected) and torch.equal(second, expected2)
    monkeypatch.setattr(_launch, "_compiled", {})  # a replaced cache drops the plan's entries: Triton's path again
    monkeypatch.setattr(_launch, "_ENABLED", True)
    assert not any(p.direct for p in launches)
    assert torch.equal(sm.fused_moe_simple(x2, ids, scales, w1, w2), expected2)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16])
def test_planned_call_replays_in_a_cuda_graph(monkeypatch, tokens):
    monkeypatch.setattr(pipeline, "_call_plans", {})
    x, ids, scales, w1, w2 = _moe_case("cuda", tokens=tokens, num_experts=16, top_k=4)
    out = torch.empty_like(x)
    for _ in range(2):  # the plan, then its direct launches
        sm.fused_moe_simple(x, ids, scales, w1, w2, output=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sm.fused_moe_simple(x, ids, scales, w1, w2, output=out)
    x.copy_(torch.randn_like(x))
    new_scales, new_ids = sm.route(torch.randn(tokens, 16, device="cuda"), 4)  # new routing: the replay reads it on the GPU
    scales.copy_(new_scales)
    ids.copy_(new_ids)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, sm.fused_moe_simple(x, ids, scales, w1, w2))
    ref = sm.reference_moe(x, ids, scales, w1, w2)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
