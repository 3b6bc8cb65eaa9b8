"""Routing: the router (`route`) and the four permutation maps (`build_routing_maps`), on the device, with no host sync.

Up to 8192 expanded rows (decode and small batches) one launch builds all four maps: program `e` (of E+1) owns expert `e`, the
last one the dropped rows; each reads every row's key, counts the rows that sort before its expert (its first dest row), and hands
consecutive dest rows to its own rows in source order with a prefix sum. Larger batches take three fully parallel launches:
a histogram per chunk of 64 rows, a prefix sum down each key's column of chunk counts (each chunk's first dest row within the
key, and the key's total), and a per-chunk scatter that adds the key's first dest row (a prefix sum of the totals) and ranks
equal keys by their position. Either way source order within an expert is kept (stable) and only
integer counts are involved (deterministic).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._host import cdiv, is_int, next_power_of_2, triton_runs_on
from ._launch import PlannedLaunch
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
    s = tl.arange(0, BLOCK)  # every expanded source row: the launcher sends at most BLOCK rows here
    in_range = s < num_tokens * TOP_K
    keys = _expert_keys(selected_experts_ptr, s, in_range, num_tokens, start_expert, num_experts, TOP_K)
    # My first dest row: the rows of every expert before mine (for the dropped program: all valid rows).
    first_dest_row = tl.sum((in_range & (keys < expert)).to(tl.int32), axis=0)
    tl.store(expert_first_token_offset_ptr + expert, first_dest_row.to(tl.int64))
    # My rows take consecutive dest rows in source order (stable).
    mine = in_range & (keys == expert)
    dest = first_dest_row + tl.cumsum(mine.to(tl.int32), axis=0) - 1
    tl.store(dest_to_source_ptr + dest, s, mask=mine)
    tl.store(source_to_dest_ptr + s, dest, mask=mine)
    tl.store(expert_for_source_ptr + s, keys, mask=mine)


@triton.jit
def _expert_keys(selected_experts_ptr, s, in_range, num_tokens, start_expert, num_experts, TOP_K: tl.constexpr):
    """Sort key of expanded source rows `s`: the local expert id, or `num_experts` for a dropped row (int32).

    The range check runs in the ids' own dtype, so int64 ids past 2^31 are dropped rather than wrapped onto a real expert.
    """
    token = s % num_tokens
    k = s // num_tokens
    local = tl.load(selected_experts_ptr + token * TOP_K + k, mask=in_range, other=0) - start_expert
    valid = (local >= 0) & (local < num_experts)
    return tl.where(valid, local, num_experts).to(tl.int32)


# ---- Large batches (more rows than one chunk): three kernels, each fully parallel, instead of E programs walking every row.


@triton.jit
def _chunk_histogram_kernel(
    selected_experts_ptr, chunk_counts_ptr, num_tokens, start_expert, num_experts,
    TOP_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_KEYS: tl.constexpr,
):
    """chunk_counts[c, key] = rows of chunk c with that key (keys 0..E, E = dropped)."""
    chunk = tl.program_id(0)
    s = chunk * CHUNK + tl.arange(0, CHUNK)
    in_range = s < num_tokens * TOP_K
    keys = _expert_keys(selected_experts_ptr, s, in_range, num_tokens, start_expert, num_experts, TOP_K)
    keys = tl.where(in_range, keys, num_experts + 1)  # padding lanes go to a bin nobody reads
    counts = tl.histogram(keys, BLOCK_KEYS)
    bins = tl.arange(0, BLOCK_KEYS)
    tl.store(chunk_counts_ptr + chunk * (num_experts + 1) + bins, counts, mask=bins <= num_experts)


@triton.jit
def _chunk_offsets_kernel(
    chunk_counts_ptr, chunk_first_dest_ptr, key_totals_ptr, num_chunks, num_experts, BLOCK_CHUNKS: tl.constexpr,
):
    """Program `key`: each chunk's first dest row for the key, counted from the key's own first dest row (an exclusive prefix
    sum down the key's column of chunk_counts), and the key's total. Programs read one column each, nothing of other keys."""
    key = tl.program_id(0)
    running = tl.full((), 0, tl.int32)
    for c0 in range(0, num_chunks, BLOCK_CHUNKS):  # one step up to BLOCK_CHUNKS chunks (T*top_k = 256 K rows of 64-row chunks)
        chunks = c0 + tl.arange(0, BLOCK_CHUNKS)
        mask = chunks < num_chunks
        mine = tl.load(chunk_counts_ptr + chunks * (num_experts + 1) + key, mask=mask, other=0)
        tl.store(chunk_first_dest_ptr + chunks * (num_experts + 1) + key, running + tl.cumsum(mine, axis=0) - mine, mask=mask)
        running += tl.sum(mine, axis=0)
    tl.store(key_totals_ptr + key, running)


@triton.jit
def _chunk_scatter_kernel(
    selected_experts_ptr, chunk_first_dest_ptr, key_totals_ptr, dest_to_source_ptr, source_to_dest_ptr, expert_for_source_ptr,
    expert_first_token_offset_ptr, num_tokens, start_expert, num_experts,
    TOP_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_KEYS: tl.constexpr,
):
    """dest row = the key's first dest row (the totals of smaller keys) + the chunk's first dest row within the key + the number
    of earlier rows of the chunk with the same key (stable). Program 0 also writes expert_first_token_offset."""
    chunk = tl.program_id(0)
    lanes = tl.arange(0, CHUNK)
    s = chunk * CHUNK + lanes
    in_range = s < num_tokens * TOP_K
    keys = _expert_keys(selected_experts_ptr, s, in_range, num_tokens, start_expert, num_experts, TOP_K)
    keys = tl.where(in_range, keys, num_experts + 1)
    # Every program scans the E+1 totals itself (a few hundred integers): cheaper than a fourth launch.
    bins = tl.arange(0, BLOCK_KEYS)
    totals = tl.load(key_totals_ptr + bins, mask=bins <= num_experts, other=0)
    key_first_dest = tl.cumsum(totals, axis=0) - totals
    if chunk == 0:
        tl.store(expert_first_token_offset_ptr + bins, key_first_dest.to(tl.int64), mask=bins <= num_experts)
    earlier_same = (keys[:, None] == keys[None, :]) & (lanes[None, :] < lanes[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), axis=1)
    dest = (tl.gather(key_first_dest, keys, axis=0) + rank
            + tl.load(chunk_first_dest_ptr + chunk * (num_experts + 1) + keys, mask=in_range, other=0))
    tl.store(dest_to_source_ptr + dest, s, mask=in_range)
    tl.store(source_to_dest_ptr + s, dest, mask=in_range)
    tl.store(expert_for_source_ptr + s, keys, mask=in_range)


# Rows per chunk of the large-batch path: the stable rank is a CHUNK x CHUNK comparison. H200, in a graph
# (routing_times_h200_v11.txt): 64 rows 16.0 us at T*top_k = 32768 (Qwen3-30B T=4096), 12.8 at 16384, vs 19.9 / 14.7 with 128
# (whose comparison holds 255 registers a thread on sm_90); 256 spilled on sm_80 (check-build).
_SCATTER_CHUNK = 64


# The one-launch kernel has every program read all rows: fine for decode, but on the H100 walking T*top_k = 32768 rows
# (E = 64-128) in 2048-lane blocks took 65-101 us. So it takes one block of at most this many lanes and the three-kernel chunked
# path anything larger. On the H200 in a graph the chunked path is ~3 us faster at 8192 rows (Qwen3-30B T=1024: 11.7 vs 14.8
# us, routing_times_h200_v11.txt) and slower at 4096 (11.1 vs 10.4), but it is three launches: eager (prefill at T=1024 is
# usually eager) it costs two more launches of host time, ~15-20 us, so the switch stays at 8192.
ONE_LAUNCH_MAX_ROWS = 8192


def _routing_block(num_rows: int) -> int:
    return max(16, min(ONE_LAUNCH_MAX_ROWS, next_power_of_2(max(num_rows, 1))))


def _routing_warps(block: int) -> int:
    return 8 if block >= 4096 else 4


def _offsets_block_chunks(num_chunks: int) -> int:
    # A key's whole column in one step up to 4096 chunks (16 int32 a thread at 8 warps): no loop-carried latency chain.
    return max(16, min(4096, next_power_of_2(num_chunks)))


def build_routing_maps(token_selected_experts: torch.Tensor, num_experts: int, *, start_expert: int = 0) -> RoutingMaps:
    """Builds the four routing maps (see `RoutingMaps`) for `token_selected_experts` `[T, top_k]` (int32 or int64 ids).

    Ids are global: this call owns experts `[start_expert, start_expert + num_experts)`; any other id is dropped. Runs on the
    tensor's device (the interpreter on CPU; without it, `build_routing_maps_torch`), reads nothing back to the host, and is
    deterministic: one kernel up to 8192 expanded rows, else three (per-chunk histogram, per-expert chunk offsets, per-chunk
    stable scatter).
    """
    if not isinstance(token_selected_experts, torch.Tensor):
        raise TypeError("token_selected_experts: expected a torch.Tensor")
    if token_selected_experts.dim() != 2:
        raise ValueError(f"token_selected_experts: expected shape [T, top_k], got {tuple(token_selected_experts.shape)}")
    if token_selected_experts.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"token_selected_experts: expected int32 or int64, got {token_selected_experts.dtype}")
    if not is_int(num_experts) or num_experts < 1:
        raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")
    if not is_int(start_expert) or start_expert < 0:
        raise ValueError(f"start_expert: expected an int >= 0 (this rank's first global expert id), got {start_expert!r}")
    if not triton_runs_on(token_selected_experts.device):  # a CPU without Triton's interpreter
        return build_routing_maps_torch(token_selected_experts, num_experts, start_expert=start_expert)
    num_tokens, top_k = token_selected_experts.shape
    plan = RoutingPlan(num_tokens, top_k, num_experts, start_expert, token_selected_experts.device)
    return plan(token_selected_experts)


class RoutingPlan:
    """`build_routing_maps` for one (T, top_k, E, start_expert, device): the launch choice and launch arguments fixed once,
    the ids given per call (the dtype and strides of the first call's; validated by the caller)."""

    def __init__(self, num_tokens: int, top_k: int, num_experts: int, start_expert: int, device: torch.device):
        self.num_tokens, self.top_k, self.num_experts, self.device = num_tokens, top_k, num_experts, device
        self.num_rows = num_rows = num_tokens * top_k
        block = _routing_block(num_rows)
        self.one_launch = num_rows <= block
        if self.one_launch:  # decode and small batches: one launch; each program reads the few rows once
            self.maps_launch = PlannedLaunch(_routing_maps_kernel, (num_experts + 1,), (num_tokens, start_expert, num_experts),
                                             num_warps=_routing_warps(block), TOP_K=top_k, BLOCK=block)
            return
        self.num_chunks = num_chunks = cdiv(num_rows, _SCATTER_CHUNK)
        block_keys = next_power_of_2(num_experts + 2)
        self.histogram = PlannedLaunch(_chunk_histogram_kernel, (num_chunks,), (num_tokens, start_expert, num_experts),
                                       num_warps=4, TOP_K=top_k, CHUNK=_SCATTER_CHUNK, BLOCK_KEYS=block_keys)
        self.offsets = PlannedLaunch(_chunk_offsets_kernel, (num_experts + 1,), (num_chunks, num_experts), num_warps=8,
                                     BLOCK_CHUNKS=_offsets_block_chunks(num_chunks))
        self.scatter = PlannedLaunch(_chunk_scatter_kernel, (num_chunks,), (num_tokens, start_expert, num_experts),
                                     num_warps=8, TOP_K=top_k, CHUNK=_SCATTER_CHUNK, BLOCK_KEYS=block_keys)

    def __call__(self, token_selected_experts: torch.Tensor) -> RoutingMaps:
        selected = token_selected_experts.contiguous()
        device, num_rows, num_experts = self.device, self.num_rows, self.num_experts
        dest_to_source = torch.empty(num_rows, dtype=torch.int32, device=device)
        source_to_dest = torch.empty(num_rows, dtype=torch.int32, device=device)
        expert_for_source = torch.empty(num_rows, dtype=torch.int32, device=device)
        expert_first_token_offset = torch.empty(num_experts + 1, dtype=torch.int64, device=device)
        if self.one_launch:
            self.maps_launch(selected, dest_to_source, source_to_dest, expert_for_source, expert_first_token_offset)
        else:
            chunk_counts = torch.empty(self.num_chunks, num_experts + 1, dtype=torch.int32, device=device)
            chunk_first_dest = torch.empty_like(chunk_counts)
            key_totals = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
            self.histogram(selected, chunk_counts)
            self.offsets(chunk_counts, chunk_first_dest, key_totals)
            self.scatter(selected, chunk_first_dest, key_totals, dest_to_source, source_to_dest, expert_for_source,
                         expert_first_token_offset)
        return RoutingMaps(dest_to_source, source_to_dest, expert_for_source, expert_first_token_offset, self.num_tokens,
                           self.top_k, num_experts)


def route(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True, scoring: str = "softmax"):
    """The usual top-k router: returns `(token_final_scales float32 [T, top_k], token_selected_experts int32 [T, top_k])`.

    `scoring="softmax"` takes the top-k of softmax(logits); `"sigmoid"` of sigmoid(logits) (DeepSeek-V3 style). With
    `renormalize=True` the k weights of a token are divided by their sum.
    """
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        raise ValueError("router_logits: expected a [T, E] tensor")
    num_experts = router_logits.shape[1]
    if not is_int(top_k) or not 1 <= top_k <= num_experts:
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
    for ids in ("i32", "i64"):
        for top_k in (2, 4, 6, 8):
            common = {"selected_experts_ptr": f"*{ids}", "num_tokens": "i32", "start_expert": "i32", "num_experts": "i32",
                      "TOP_K": "constexpr"}
            variants.append(KernelVariant(
                "routing_chunk_histogram", f"{ids} ids top_k={top_k}", _chunk_histogram_kernel,
                {**common, "chunk_counts_ptr": "*i32", "CHUNK": "constexpr", "BLOCK_KEYS": "constexpr"},
                {"TOP_K": top_k, "CHUNK": _SCATTER_CHUNK, "BLOCK_KEYS": 256}, num_warps=4, num_stages=1))
            for block_keys in (16, 128, 256, 512):  # E+2 rounded up, for E = 8 .. 256
                variants.append(KernelVariant(
                    "routing_chunk_scatter", f"{ids} ids top_k={top_k} BLOCK_KEYS={block_keys}", _chunk_scatter_kernel,
                    {**common, "chunk_first_dest_ptr": "*i32", "key_totals_ptr": "*i32", "dest_to_source_ptr": "*i32",
                     "source_to_dest_ptr": "*i32", "expert_for_source_ptr": "*i32", "expert_first_token_offset_ptr": "*i64",
                     "CHUNK": "constexpr", "BLOCK_KEYS": "constexpr"},
                    {"TOP_K": top_k, "CHUNK": _SCATTER_CHUNK, "BLOCK_KEYS": block_keys}, num_warps=8, num_stages=1))
    for rows in (ONE_LAUNCH_MAX_ROWS + 1, 32768, 1 << 20):  # just past the one-launch path, T=4096 x top_k 8, the cap
        block_chunks = _offsets_block_chunks(cdiv(rows, _SCATTER_CHUNK))
        variants.append(KernelVariant(
            "routing_chunk_offsets", f"BLOCK_CHUNKS={block_chunks}", _chunk_offsets_kernel,
            {"chunk_counts_ptr": "*i32", "chunk_first_dest_ptr": "*i32", "key_totals_ptr": "*i32", "num_chunks": "i32",
             "num_experts": "i32", "BLOCK_CHUNKS": "constexpr"}, {"BLOCK_CHUNKS": block_chunks}, num_warps=8, num_stages=1))
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
