"""Optional tile autotuning for the grouped GEMM, with an on-disk cache. Off by default.

The default tile choice is `grouped_gemm_tiles.gemm_tile_config`, a pure function whose rules come from the H100 and H200
sweeps. With `SIMPLE_MOE_AUTOTUNE=1` the first eager call for a new problem key times the heuristic's pick, the pick with its
operands arranged otherwise (`arrangement_variants`) and the candidates below with `triton.testing.do_bench` (median), keeps the
fastest, and writes it to a JSON file (`SIMPLE_MOE_AUTOTUNE_CACHE`, default `~/.cache/simple_moe/tiles.json`) that later calls
and later processes read. The key is the GPU name, the arch, the rows rounded up to a power of two, E, N, K, the dtypes and the
GEMM's flags, so one tuning covers a range of batch sizes.

Nothing is timed while a CUDA graph is being captured: a capture uses the cached config, or the heuristic's when there is none;
nor without a GPU to time on (the heuristic's config). Timing runs the GEMM on the caller's buffers, which the real call then
overwrites. The file is a cache, never trusted: an entry tuning could not have kept (other fields, values out of range, a tile
outside the search space) is tuned again, a file that is not a JSON object is replaced, and where the file cannot be written the
tuned configs stay in memory with a warning. Writers merge with what is on disk under a lock, so processes tuning side by side
keep each other's entries; the file's mode follows the umask (a shared cache stays readable).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

from ._host import env_flag
from .grouped_gemm_tiles import TileConfig

_cache: dict | None = None
# An entry written by a version whose TileConfig had other fields is tuned again rather than half-read.
_TILE_FIELDS = frozenset(field.name for field in dataclasses.fields(TileConfig))
_BOOL_FIELDS = frozenset(field.name for field in dataclasses.fields(TileConfig) if isinstance(field.default, bool))
# Ranges a tuned entry's ints must lie in (wider than the search space; a value outside cannot have come from tuning).
_POWER_OF_2_RANGES = {"block_m": (16, 512), "block_n": (16, 512), "block_k": (16, 512), "num_warps": (1, 16)}
_INT_RANGES = {"group_m": (1, 64), "num_stages": (1, 8), "programs_per_sm": (0, 32), "flat_tail_cost": (0, 100)}


def enabled() -> bool:
    return env_flag("SIMPLE_MOE_AUTOTUNE", False)


def cache_path() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "simple_moe" / "tiles.json"
    return Path(os.environ.get("SIMPLE_MOE_AUTOTUNE_CACHE", default)).expanduser()


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


class NoGpuClock(RuntimeError):
    """Raised by `time_config` where there is no CUDA device to time on (the CPU interpreter)."""


def time_config(run: Callable[[], object]) -> float:
    """Median milliseconds of `run` on the GPU (L2 flushed between runs)."""
    import triton.testing

    if not torch.cuda.is_available():
        raise NoGpuClock("autotuning times kernels on a CUDA device; there is none")
    return triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median")


def _read_file() -> dict:
    """The cache file's entries; {} for a missing, unreadable, truncated or non-object file (it is a cache: tuned again)."""
    try:
        loaded = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _load() -> dict:
    global _cache
    if _cache is None:
        _cache = _read_file()
    return _cache


@contextlib.contextmanager
def _writers_lock(path: Path):
    """An exclusive lock on `path`.lock for the read-merge-replace of `_save` (POSIX; elsewhere none), so that writers side by
    side do not drop each other's entries."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _save(cache: dict) -> None:
    """Merges `cache` into the file (this process's entries win) and writes it atomically, under a lock; where it cannot be
    written, warns and leaves the tuned configs in memory only."""
    path = cache_path()
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _writers_lock(path):
            cache.update({key: entry for key, entry in _read_file().items() if key not in cache})
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
                tmp_name = tmp.name
                json.dump(cache, tmp, indent=1, sort_keys=True)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_name, 0o666 & ~umask)  # as a plain open() would make it (the temporary file is 0600)
            os.replace(tmp_name, path)  # atomic: a reader never sees half a file
    except OSError as err:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
        warnings.warn(f"simple_moe autotune: cannot write {path} ({err}); the tuned tiles stay in this process's memory",
                      stacklevel=2)


def tile_from_entry(entry) -> TileConfig | None:
    """A cached entry as a TileConfig, or None where this version could not have written it: other fields, a non-bool flag,
    a non-int or out-of-range size (e.g. group_m 0, which would launch no row blocks, or a hand-edited block_n of 48)."""
    if not isinstance(entry, dict) or set(entry) != _TILE_FIELDS:
        return None
    for name, value in entry.items():
        if isinstance(value, bool) != (name in _BOOL_FIELDS) or not isinstance(value, int):
            return None
    for name, (low, high) in _POWER_OF_2_RANGES.items():
        value = entry[name]
        if not low <= value <= high or value & (value - 1):
            return None
    if any(not low <= entry[name] <= high for name, (low, high) in _INT_RANGES.items()):
        return None
    return TileConfig(**entry)


def tuning_choices(default: TileConfig, gated: bool) -> set:
    """Every config tuning could keep for a call whose heuristic pick is `default`: the pick, its arrangements and the
    candidates of every tile height. A cached entry outside it (hand-edited, or from another version whose heuristic differed)
    is tuned again rather than launched: it may not fit the GPU at all (e.g. a 256 x 256 x 256 tile at 16 warps, which ptxas
    refuses for sm_90)."""
    return {default, *arrangement_variants(default, gated),
            *(cfg for block_m in (16, 32, 64, 128) for cfg in candidate_configs(block_m, gated))}


def problem_key(device: torch.device, arch: int, rows: int, num_experts: int, n: int, k: int, *flags) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    rows_bucket = 1 << max(0, rows - 1).bit_length()
    return "|".join(str(part) for part in (gpu, arch, rows_bucket, num_experts, n, k, *flags))


def tuned_config(key: str, run: Callable[[TileConfig], object], default: TileConfig, gated: bool) -> TileConfig:
    """The cached config for `key`, tuning it first (outside CUDA-graph capture) when the cache has none."""
    cache = _load()
    cached = tile_from_entry(cache.get(key))
    if cached is not None and cached in tuning_choices(default, gated):
        return cached
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return default
    try:
        best_ms, best = time_config(lambda: run(default)), default
    except NoGpuClock:
        return default
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
