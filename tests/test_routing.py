"""Routing: `build_routing_maps` (the Triton kernel), `build_routing_maps_torch` (the CPU fallback) and `route` (the router).

Both map builders are checked against `expected_maps`, an independent construction written here as a plain Python loop over
experts, straight from the definition in design.md: expanded source row s = token + k*T; dest order = the rows of expert 0 in
increasing s, then expert 1, ..., then every dropped row in increasing s.
"""
from __future__ import annotations

import os

import pytest
import torch

import _triton_interpreter  # noqa: F401  (exact bf16 in the interpreter; harmless here, keeps this file standalone)
from simple_moe.routing import RoutingMaps, build_routing_maps, build_routing_maps_torch, route

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                   reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
BUILDERS = {"triton": build_routing_maps, "torch": build_routing_maps_torch}
BUILDER_NAMES = [pytest.param("triton", marks=needs_kernels), "torch"]


def expected_maps(ids: torch.Tensor, num_experts: int, start_expert: int = 0):
    """(dest_to_source, source_to_dest, expert_for_source, first_token_offset) as Python lists, by a loop over experts."""
    num_tokens, top_k = ids.shape
    ids = ids.cpu().tolist()
    local = [ids[s % num_tokens][s // num_tokens] - start_expert for s in range(num_tokens * top_k)]
    dest_to_source, offsets = [], [0]
    for expert in range(num_experts):
        dest_to_source += [s for s, e in enumerate(local) if e == expert]
        offsets.append(len(dest_to_source))
    dest_to_source += [s for s, e in enumerate(local) if not 0 <= e < num_experts]  # dropped rows, last, in source order
    source_to_dest = [0] * len(local)
    for d, s in enumerate(dest_to_source):
        source_to_dest[s] = d
    expert_for_source = [e if 0 <= e < num_experts else num_experts for e in local]
    return dest_to_source, source_to_dest, expert_for_source, offsets


def check_maps(maps: RoutingMaps, ids: torch.Tensor, num_experts: int, start_expert: int = 0):
    num_tokens, top_k = ids.shape
    rows = num_tokens * top_k
    dest_to_source, source_to_dest, expert_for_source, offsets = expected_maps(ids, num_experts, start_expert)
    assert (maps.num_tokens, maps.top_k, maps.num_experts, maps.expanded_num_rows) == (num_tokens, top_k, num_experts, rows)
    for name in ("expanded_dest_row_to_expanded_source_row", "expanded_source_row_to_expanded_dest_row", "expert_for_source_row"):
        t = getattr(maps, name)
        assert t.dtype == torch.int32 and tuple(t.shape) == (rows,), name
        assert t.device == ids.device, name
    assert maps.expert_first_token_offset.dtype == torch.int64
    assert tuple(maps.expert_first_token_offset.shape) == (num_experts + 1,)

    d2s = maps.expanded_dest_row_to_expanded_source_row.cpu()
    s2d = maps.expanded_source_row_to_expanded_dest_row.cpu()
    # dest->source is a permutation of 0..rows-1 and source->dest is its inverse.
    assert sorted(d2s.tolist()) == list(range(rows))
    assert torch.equal(s2d[d2s.long()], torch.arange(rows, dtype=torch.int32))
    assert torch.equal(d2s[s2d.long()], torch.arange(rows, dtype=torch.int32))
    # The exact (stable) order, the per-source expert, and the offsets = cumulative counts.
    assert d2s.tolist() == dest_to_source
    assert s2d.tolist() == source_to_dest
    assert maps.expert_for_source_row.cpu().tolist() == expert_for_source
    assert maps.expert_first_token_offset.cpu().tolist() == offsets


def random_ids(num_tokens, top_k, num_experts, dtype=torch.int32, distinct=True, generator=None):
    if distinct:  # real routers pick top_k distinct experts per token
        rows = [torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_tokens)]
        ids = torch.stack(rows) if rows else torch.empty(0, top_k, dtype=torch.int64)
    else:
        ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=generator)
    return ids.to(dtype).to(DEVICE)


@pytest.mark.parametrize("builder", BUILDER_NAMES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    "num_tokens, top_k, num_experts",
    [(0, 2, 4), (1, 1, 1), (1, 2, 4), (5, 2, 4), (13, 8, 16), (16, 1, 8), (7, 3, 5), (9, 8, 256), (4, 1, 1), (33, 4, 8)],
)
def test_maps_match_independent_construction(builder, id_dtype, num_tokens, top_k, num_experts):
    torch.manual_seed(num_tokens * 1000 + top_k * 10 + num_experts)
    ids = random_ids(num_tokens, top_k, num_experts, id_dtype)
    check_maps(BUILDERS[builder](ids, num_experts), ids, num_experts)


@pytest.mark.parametrize("builder", BUILDER_NAMES)
def test_repeated_experts_in_a_token_keep_source_order(builder):
    # Not what a top-k router produces, but the maps are defined for it: duplicates sort by s like any other rows.
    torch.manual_seed(1)
    ids = random_ids(11, 4, 3, distinct=False)
    check_maps(BUILDERS[builder](ids, 3), ids, 3)


@pytest.mark.parametrize("builder", BUILDER_NAMES)
@pytest.mark.parametrize("top_k", [1, 8])
def test_all_rows_on_one_expert(builder, top_k):
    num_experts = 8 if top_k == 1 else 1
    ids = torch.full((10, top_k), num_experts - 1, dtype=torch.int32, device=DEVICE)
    maps = BUILDERS[builder](ids, num_experts)
    check_maps(maps, ids, num_experts)
    # Everything on the last expert: dest order is plain source order.
    assert maps.expanded_dest_row_to_expanded_source_row.cpu().tolist() == list(range(10 * top_k))
    assert maps.expert_first_token_offset.cpu().tolist() == [0] * num_experts + [10 * top_k]


@pytest.mark.parametrize("builder", BUILDER_NAMES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_dropped_ids_sort_last_and_count_nowhere(builder, id_dtype):
    num_experts = 4
    ids = torch.tensor([[0, -1], [4, 3], [-7, 100], [2, 2**31 - 1], [1, 0], [5, -(2**31)]], dtype=id_dtype, device=DEVICE)
    maps = BUILDERS[builder](ids, num_experts)
    check_maps(maps, ids, num_experts)
    valid = int(maps.expert_first_token_offset[-1])
    assert valid == 5
    efs = maps.expert_for_source_row.cpu()
    d2s = maps.expanded_dest_row_to_expanded_source_row.cpu().long()
    assert (efs[d2s[valid:]] == num_experts).all()  # dropped rows occupy the tail, marked with expert E
    assert (efs[d2s[:valid]] < num_experts).all()


@pytest.mark.parametrize("builder", BUILDER_NAMES)
def test_every_row_dropped(builder):
    ids = torch.full((3, 2), 9, dtype=torch.int32, device=DEVICE)
    maps = BUILDERS[builder](ids, 4)
    check_maps(maps, ids, 4)
    assert maps.expert_first_token_offset.cpu().tolist() == [0, 0, 0, 0, 0]


@pytest.mark.parametrize("builder", BUILDER_NAMES)
@pytest.mark.parametrize("ep_rank", [0, 1, 2])
def test_expert_parallel_start_expert(builder, ep_rank):
    # Global ids in [0, 12), three ranks of 4 experts: rank r keeps [4r, 4r+4), everything else is another rank's (dropped).
    torch.manual_seed(7)
    ids = random_ids(9, 3, 12)
    maps = BUILDERS[builder](ids, 4, start_expert=4 * ep_rank)
    check_maps(maps, ids, 4, start_expert=4 * ep_rank)


@pytest.mark.parametrize("builder", BUILDER_NAMES)
def test_expert_parallel_ranks_partition_the_rows(builder):
    torch.manual_seed(8)
    ids = random_ids(12, 2, 8)
    kept = [int(BUILDERS[builder](ids, 2, start_expert=2 * r).expert_first_token_offset[-1]) for r in range(4)]
    assert sum(kept) == ids.numel()


@needs_kernels
def test_int64_ids_beyond_int32_are_dropped():
    ids = torch.tensor([[2**32 + 1, 0], [1, 2**33]], dtype=torch.int64, device=DEVICE)
    check_maps(build_routing_maps(ids, 4), ids, 4)


def test_int64_ids_beyond_int32_are_dropped_by_torch_fallback():
    ids = torch.tensor([[2**32 + 1, 0], [1, 2**33]], dtype=torch.int64, device=DEVICE)
    check_maps(build_routing_maps_torch(ids, 4), ids, 4)


@needs_kernels
def test_non_contiguous_ids():
    torch.manual_seed(3)
    wide = random_ids(6, 4, 8)
    ids = wide[:, ::2]  # [6, 2] with row stride 4
    assert not ids.is_contiguous()
    check_maps(build_routing_maps(ids, 8), ids, 8)


@pytest.mark.parametrize("builder", BUILDER_NAMES)
def test_deterministic(builder):
    torch.manual_seed(4)
    ids = random_ids(37, 4, 6, distinct=False)
    first = BUILDERS[builder](ids, 6, start_expert=1)
    second = BUILDERS[builder](ids, 6, start_expert=1)
    for name in ("expanded_dest_row_to_expanded_source_row", "expanded_source_row_to_expanded_dest_row", "expert_for_source_row",
                 "expert_first_token_offset"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


@needs_kernels
@pytest.mark.parametrize("num_experts, block_chunks", [(16, None), (256, 16)])
def test_more_rows_than_one_kernel_block(monkeypatch, num_experts, block_chunks):
    # Just past the one-launch path's rows: the chunked path, its last chunk partial. With 256 experts the keys take 512 bins;
    # a 16-chunk column step (instead of the whole column at once) makes each offsets program carry its sum across 5 steps.
    from simple_moe import routing

    if block_chunks is not None:
        monkeypatch.setattr(routing, "_offsets_block_chunks", lambda num_chunks: block_chunks)
    top_k = 4
    num_tokens = routing.ONE_LAUNCH_MAX_ROWS // top_k + 37
    torch.manual_seed(5)
    ids = random_ids(num_tokens, top_k, num_experts, distinct=False)
    ids[::7, 1] = 999  # and some dropped rows in every chunk
    ids[:300, 0] = 3  # and one expert far busier than the rest
    check_maps(build_routing_maps(ids, num_experts), ids, num_experts)


def test_build_routing_maps_rejects_bad_ids():
    with pytest.raises(ValueError, match="token_selected_experts"):
        build_routing_maps(torch.zeros(4, dtype=torch.int32), 2)
    with pytest.raises(TypeError, match="token_selected_experts"):
        build_routing_maps(torch.zeros(4, 2), 2)
    with pytest.raises(TypeError, match="token_selected_experts"):
        build_routing_maps([[0, 1]], 2)
    with pytest.raises(ValueError, match="num_experts"):
        build_routing_maps(torch.zeros(4, 2, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="^num_experts"):
        build_routing_maps(torch.zeros(4, 2, dtype=torch.int32), True)
    for start_expert in (-1, 1.5, "1", None, True):
        with pytest.raises(ValueError, match="^start_expert"):
            build_routing_maps(torch.zeros(4, 2, dtype=torch.int32), 2, start_expert=start_expert)


# ---------------------------------------------------------------------------------------------------------------------------------
# route()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.bfloat16])
def test_route(scoring, renormalize, logit_dtype):
    num_tokens, num_experts, top_k = 9, 8, 3
    # Drawn on the CPU so that every device routes the same logits: a CUDA draw rounded to bf16 can tie two of a row's
    # values (it did on the H200, 4 of these 8 cases), and torch.topk orders ties as it likes.
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(6)).to(logit_dtype)
    assert all(len(set(row)) == num_experts for row in logits.tolist())  # the expected order below assumes no ties
    logits = logits.to(DEVICE)
    weights, ids = route(logits, top_k, renormalize=renormalize, scoring=scoring)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert tuple(weights.shape) == tuple(ids.shape) == (num_tokens, top_k)
    assert weights.is_contiguous() and ids.is_contiguous()

    scores = logits.double().softmax(-1) if scoring == "softmax" else logits.double().sigmoid()
    expected_ids = scores.argsort(dim=-1, descending=True)[:, :top_k]
    assert torch.equal(ids.long().cpu(), expected_ids.cpu())
    expected = scores.gather(1, expected_ids)
    if renormalize:
        expected = expected / expected.sum(-1, keepdim=True)
        torch.testing.assert_close(weights.sum(-1).double(), torch.ones(num_tokens, dtype=torch.float64, device=DEVICE))
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=1e-7)


def test_route_top_k_equal_to_num_experts():
    torch.manual_seed(9)
    weights, ids = route(torch.randn(4, 3, device=DEVICE), 3)
    assert sorted(ids[0].tolist()) == [0, 1, 2]
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, device=DEVICE))


def test_route_rejects_bad_arguments():
    logits = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="top_k"):
        route(logits, 4)
    with pytest.raises(ValueError, match="top_k"):
        route(logits, 0)
    with pytest.raises(ValueError, match="^top_k"):
        route(logits, True)
    with pytest.raises(ValueError, match="scoring"):
        route(logits, 2, scoring="tanh")
    with pytest.raises(ValueError, match="router_logits"):
        route(torch.randn(4, device=DEVICE), 1)
