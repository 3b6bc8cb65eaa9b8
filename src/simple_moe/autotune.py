"""Optional tile autotuning for the grouped GEMM, with an on-disk cache. Off by default.

The default tile choice is `grouped_gemm.gemm_tile_config`, a pure function whose rules come from the H100 and H200 sweeps. With
`SIMPLE_MOE_AUTOTUNE=1` the first eager call for a new problem key times the heuristic's pick, the pick with its operands
arranged otherwise (`arrangement_variants`) and the candidates below with
`triton.testing.do_bench` (median), keeps the fastest, and writes it to a JSON file (`SIMPLE_MOE_AUTOTUNE_CACHE`, default
`~/.cache/simple_moe/tiles.json`) that later calls and later processes read. The key is the GPU name, the arch, the rows rounded up
to a power of two, E, N, K, the dtypes and the GEMM's flags, so one tuning covers a range of batch sizes.

Nothing is timed while a CUDA graph is being captured: a capture uses the cached config, or the heuristic's when there is none.
Timing runs the GEMM on the caller's buffers, which the real call then overwrites.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .grouped_gemm import TileConfig

_cache: dict | None = None
# An entry written by a version whose TileConfig had other fields is tuned again rather than half-read.
_TILE_FIELDS = frozenset(field.name for field in dataclasses.fields(TileConfig))


def enabled() -> bool:
    return os.environ.get("SIMPLE_MOE_AUTOTUNE", "0").lower() in ("1", "true", "on", "yes")


def cache_path() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "simple_moe" / "tiles.json"
    return Path(os.environ.get("SIMPLE_MOE_AUTOTUNE_CACHE", default))


def candidate_configs(block_m: int, gated: bool):
    """The search space: decode tiles (BLOCK_M <= 64) vary columns, K depth and stages; prefill tiles vary shape and warps."""
    if block_m <= 64:
        for block_n, block_k, stages in itertools.product((32, 64, 128), (128, 256), (3, 5)):
            yield TileConfig(block_m, block_n, block_k, 1, 4, stages)
    else:
        for bm, bn, stages, warps in itertools.product((64, 128), (64, 128) if gated else (128, 256), (3, 4), (4, 8)):
            yield TileConfig(bm, bn, 64, 8, warps, stages)


def arrangement_variants(default: TileConfig, gated: bool):
    """The default tile with its operands arranged the other ways (`weights_left`; for gated GEMM1 also `fused_gate_up`): the
    H200 sweeps (tiles_operands_*_h200.json) moved GEMM1 by up to 21% with the arrangement alone, and the rules know SM90
    only."""
    for weights_left, fused_gate_up in itertools.product((False, True), (False, True) if gated else (False,)):
        yield dataclasses.replace(default, weights_left=weights_left, fused_gate_up=fused_gate_up)


def time_config(run: Callable[[], object]) -> float:
    """Median milliseconds of `run` on the GPU (L2 flushed between runs)."""
    import triton.testing

    return triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median")


def _load() -> dict:
    global _cache
    if _cache is None:
        try:
            _cache = json.loads(cache_path().read_text())
        except (OSError, ValueError):
            _cache = {}
    return _cache


def _save(cache: dict) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(cache, tmp, indent=1, sort_keys=True)
    os.replace(tmp.name, path)  # atomic: a reader never sees half a file


def problem_key(device: torch.device, arch: int, rows: int, num_experts: int, n: int, k: int, *flags) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    rows_bucket = 1 << max(0, rows - 1).bit_length()
    return "|".join(str(part) for part in (gpu, arch, rows_bucket, num_experts, n, k, *flags))


def tuned_config(key: str, run: Callable[[TileConfig], object], default: TileConfig, gated: bool) -> TileConfig:
    """The cached config for `key`, tuning it first (outside CUDA-graph capture) when the cache has none."""
    cache = _load()
    cached = cache.get(key)
    if isinstance(cached, dict) and set(cached) == _TILE_FIELDS:
        return TileConfig(**cached)
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return default
    best_ms, best = time_config(lambda: run(default)), default
    candidates = dict.fromkeys([*arrangement_variants(default, gated), *candidate_configs(default.block_m, gated)])
    for cfg in candidates:
        if cfg == default:
            continue
        try:
            ms = time_config(lambda: run(cfg))
        except Exception:  # a candidate the GPU cannot run (out of shared memory, registers): skip it
            continue
        if ms < best_ms:
            best_ms, best = ms, cfg
    cache[key] = dataclasses.asdict(best)
    _save(cache)
    return best


def clear_memory_cache() -> None:
    """Forget what was read from disk (tests, or after editing the file)."""
    global _cache
    _cache = None
