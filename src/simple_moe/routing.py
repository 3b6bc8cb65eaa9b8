"""Routing: the router (`route`) and the four permutation maps (`build_routing_maps`), on the device, with no host sync.

One kernel launch builds all four maps. Program `e` (of E+1) owns expert `e`; the last program owns the dropped rows. Each program
first counts the rows that sort before its expert (that is its first dest row), then walks the expanded source rows in increasing
order and hands out consecutive dest rows to its own rows with a prefix sum. Walking in source order makes the sort stable; the
integer counts make it deterministic. The cost is E passes over `T*top_k` int32 ids, spread over E programs (for Qwen3-30B at
T=4096: 128 programs x 128 KiB from L2), which is far below the GEMMs it feeds.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._variants import KernelVariant, register_variants


@dataclass
class RoutingMaps:
    """The four maps that group the `T*top_k` (token, k) pairs by expert.

    An *expanded source row* is `s = token + k*T` (k-major). Sorting the expanded rows stably by local expert gives the *dest rows*
    `d`, so the rows of expert e occupy `[expert_first_token_offset[e], expert_first_token_offset[e+1])` in increasing `s`.

    - `expanded_dest_row_to_expanded_source_row` int32 `[T*top_k]`: `[d] = s`, the source row placed at dest row d.
    - `expanded_source_row_to_expanded_dest_row` int32 `[T*top_k]`: `[s] = d`, the inverse (finalize reads it).
    - `expert_for_source_row` int32 `[T*top_k]`: indexed by *source* row s (the seed's convention; TensorRT-LLM stores it per
      dest row): the local expert `id - start_expert` of row s, or `num_experts` when the row is dropped.
    - `expert_first_token_offset` int64 `[E+1]`: dest rows of experts before e; `[E]` is the number of valid (kept) rows.

    Rows whose id is outside `[start_expert, start_expert + E)` are dropped: they sort after every valid row (still stably), no
    expert counts them, and no GEMM or finalize reads them.
    """

    expanded_dest_row_to_expanded_source_row: torch.Tensor
    expanded_source_row_to_expanded_dest_row: torch.Tensor
    expert_for_source_row: torch.Tensor
    expert_first_token_offset: torch.Tensor
    num_tokens: int
    top_k: int
    num_experts: int

    @property
    def expanded_num_rows(self) -> int:
        return self.num_tokens * self.top_k


@triton.jit
def _routing_maps_kernel(
    selected_experts_ptr,  # [T, TOP_K] int32/int64, global expert ids
    dest_to_source_ptr,
    source_to_dest_ptr,
    expert_for_source_ptr,
    expert_first_token_offset_ptr,  # int64 [E+1]
    num_tokens,
    start_expert,
    num_experts,
    TOP_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    expert = tl.program_id(0)  # == num_experts: the program that places the dropped rows
    num_rows = num_tokens * TOP_K
    offs = tl.arange(0, BLOCK)

    # Pass 1: how many valid rows belong to experts before mine (for the dropped program: all valid rows).
    before = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, num_rows, BLOCK):
        s = start + offs
        in_range = s < num_rows
        token = s % num_tokens
        k = s // num_tokens
        # Range-check in the ids' own dtype (int64 ids past 2^31 must be dropped, not wrapped), then narrow.
        local = tl.load(selected_experts_ptr + token * TOP_K + k, mask=in_range, other=0) - start_expert
        valid = in_range & (local >= 0) & (local < num_experts)
        before += (valid & (local.to(tl.int32) < expert)).to(tl.int32)
    first_dest_row = tl.sum(before, axis=0)
    tl.store(expert_first_token_offset_ptr + expert, first_dest_row.to(tl.int64))

    # Pass 2: walk source rows in order; my rows take consecutive dest rows (stable).
    next_dest_row = first_dest_row
    for start in range(0, num_rows, BLOCK):
        s = start + offs
        in_range = s < num_rows
        token = s % num_tokens
        k = s // num_tokens
        local = tl.load(selected_experts_ptr + token * TOP_K + k, mask=in_range, other=0) - start_expert
        valid = (local >= 0) & (local < num_experts)
        local = tl.where(valid, local, num_experts).to(tl.int32)
        mine = in_range & ((valid & (local == expert)) | ((~valid) & (expert == num_experts)))
        rank = tl.cumsum(mine.to(tl.int32), axis=0) - 1
        dest = next_dest_row + rank
        tl.store(dest_to_source_ptr + dest, s, mask=mine)
        tl.store(source_to_dest_ptr + s, dest, mask=mine)
        tl.store(expert_for_source_ptr + s, local, mask=mine)
        next_dest_row += tl.sum(mine.to(tl.int32), axis=0)


def _routing_block(num_rows: int) -> int:
    # Each program walks all rows twice, one chunk at a time, and every chunk costs a global-load round trip: fewer, wider chunks
    # are faster. 8192 int32 lanes with 8 warps is 32 values a thread. On the H100, 2048-lane chunks took 79-101 us at
    # T*top_k = 32768 (E = 64-128), a third of a GEMM; decode (<= 8192 rows) is a single chunk.
    return max(16, min(8192, triton.next_power_of_2(max(num_rows, 1))))


def _routing_warps(block: int) -> int:
    return 8 if block >= 4096 else 4


def build_routing_maps(token_selected_experts: torch.Tensor, num_experts: int, *, start_expert: int = 0) -> RoutingMaps:
    """Builds the four routing maps (see `RoutingMaps`) for `token_selected_experts` `[T, top_k]` (int32 or int64 ids).

    Ids are global: this call owns experts `[start_expert, start_expert + num_experts)`; any other id is dropped. Runs one Triton
    kernel on the tensor's device (the interpreter on CPU), reads nothing back to the host, and is deterministic.
    """
    if not isinstance(token_selected_experts, torch.Tensor):
        raise TypeError("token_selected_experts: expected a torch.Tensor")
    if token_selected_experts.dim() != 2:
        raise ValueError(f"token_selected_experts: expected shape [T, top_k], got {tuple(token_selected_experts.shape)}")
    if token_selected_experts.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"token_selected_experts: expected int32 or int64, got {token_selected_experts.dtype}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")
    num_tokens, top_k = token_selected_experts.shape
    device = token_selected_experts.device
    selected = token_selected_experts.contiguous()
    num_rows = num_tokens * top_k
    dest_to_source = torch.empty(num_rows, dtype=torch.int32, device=device)
    source_to_dest = torch.empty(num_rows, dtype=torch.int32, device=device)
    expert_for_source = torch.empty(num_rows, dtype=torch.int32, device=device)
    expert_first_token_offset = torch.empty(num_experts + 1, dtype=torch.int64, device=device)
    block = _routing_block(num_rows)
    _routing_maps_kernel[(num_experts + 1,)](
        selected,
        dest_to_source,
        source_to_dest,
        expert_for_source,
        expert_first_token_offset,
        num_tokens,
        start_expert,
        num_experts,
        TOP_K=top_k,
        BLOCK=block,
        num_warps=_routing_warps(block),
    )
    return RoutingMaps(dest_to_source, source_to_dest, expert_for_source, expert_first_token_offset, num_tokens, top_k, num_experts)


def route(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True, scoring: str = "softmax"):
    """The usual top-k router: returns `(token_final_scales float32 [T, top_k], token_selected_experts int32 [T, top_k])`.

    `scoring="softmax"` takes the top-k of softmax(logits); `"sigmoid"` of sigmoid(logits) (DeepSeek-V3 style). With
    `renormalize=True` the k weights of a token are divided by their sum.
    """
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        raise ValueError("router_logits: expected a [T, E] tensor")
    num_experts = router_logits.shape[1]
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected an int in [1, E={num_experts}], got {top_k!r}")
    logits = router_logits.float()
    if scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"scoring: expected 'softmax' or 'sigmoid', got {scoring!r}")
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights.contiguous(), ids.to(torch.int32).contiguous()


@register_variants
def _routing_variants():
    variants = []
    for top_k, ids in itertools.product((2, 4, 6, 8), ("i32", "i64")):  # baselines.md's top_k, GPT-OSS's 4; int64 from HF
        for block in sorted({_routing_block(n) for n in (1, 256, 4096, 1 << 20)}):
            variants.append(
                KernelVariant(
                    kernel="routing_maps",
                    variant=f"{ids} ids top_k={top_k} BLOCK={block}",
                    fn=_routing_maps_kernel,
                    signature={
                        "selected_experts_ptr": f"*{ids}",
                        "dest_to_source_ptr": "*i32",
                        "source_to_dest_ptr": "*i32",
                        "expert_for_source_ptr": "*i32",
                        "expert_first_token_offset_ptr": "*i64",
                        "num_tokens": "i32",
                        "start_expert": "i32",
                        "num_experts": "i32",
                        "TOP_K": "constexpr",
                        "BLOCK": "constexpr",
                    },
                    constexprs={"TOP_K": top_k, "BLOCK": block},
                    num_warps=_routing_warps(block),
                    num_stages=1,
                )
            )
    return variants


def build_routing_maps_torch(token_selected_experts: torch.Tensor, num_experts: int, *, start_expert: int = 0) -> RoutingMaps:
    """The same maps with torch ops (a stable sort), for CPU use without Triton's interpreter."""
    num_tokens, top_k = token_selected_experts.shape
    device = token_selected_experts.device
    local = token_selected_experts.t().reshape(-1).long() - start_expert  # index s = token + k*T
    valid = (local >= 0) & (local < num_experts)
    key = torch.where(valid, local, torch.full_like(local, num_experts))
    dest_to_source = torch.sort(key, stable=True).indices
    source_to_dest = torch.empty_like(dest_to_source)
    source_to_dest[dest_to_source] = torch.arange(key.numel(), device=device)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    return RoutingMaps(dest_to_source.int(), source_to_dest.int(), key.int(), offsets, num_tokens, top_k, num_experts)
