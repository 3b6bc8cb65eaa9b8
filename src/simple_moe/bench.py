"""`python -m simple_moe bench`: the fused MoE layer against its floor and its baselines, at the model shapes of baselines.md.

For every point (shape x tokens T x dtype), on one set of inputs drawn as baselines.md says (fixed seed):
1. correctness: the output of every column, on up to 64 sampled tokens, against the float64 `reference_moe` computed on those
   tokens only (relative L2 error); our output is written into a NaN-poisoned buffer and must come back finite everywhere;
2. the median time of each column with `triton.testing.do_bench` (which flushes L2 before every run):
   ours eager, ours replayed from a CUDA graph, ours with the cuBLAS callbacks, `torch._grouped_mm` with its own
   permute/unpermute, the torch-loop callbacks, and INT8 (W8A16, W8A8) when `simple_moe.quant` is there;
3. the floor of baselines.md, `max(bytes / copy bandwidth, flops / dense matmul rate)`, and efficiency = floor / time; the
   ceilings are baselines.md's on its H100, and measured at the start of the run (the same way) on any other GPU;
4. the first call's wall time (for the first T of each shape and dtype: a cold compile, Triton's caches emptied), and the peak
   extra device memory of one call against the bound `rows*(I+H)*elem + T*H*elem + O(E)` (workspace plus the output).
Peer A (vLLM's Triton fused_moe) is not installed on the lent machine: its times are quoted from baselines.md (bf16, H100), and
compared with ours only when this GPU is that H100; elsewhere the quotes are reported, not compared.

Writes `bench_<gpu>.json`, `bench_<gpu>.md` and `bench_<gpu>.png` under `--out`. `--plot-only FILE.json` redraws the PNG.
`--cpu-smoke` runs the same code at a tiny shape on the CPU through Triton's interpreter with a fake timer (the wall time of one
call): it proves the script, not the speed.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from ._host import triton_interpreting
from .grouped_gemm import MODEL_SHAPES

# ---------------------------------------------------------------------------------------------------------------------------------
# Facts from baselines.md (NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, measured 2026-11-23)

# name: (E, top_k, H, I), routed experts at TP=1: the four shapes of baselines.md, from the one table of model shapes
PRESETS = {name: MODEL_SHAPES[name] for name in ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite", "olmoe-1b-7b")}
DEFAULT_TOKENS = (1, 16, 64, 256, 1024, 4096)
PEER_A_SOURCE = "baselines.md: vLLM Triton fused_moe, default configs, bf16, H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, 2026-11-23"
PEER_A_US = {  # (preset, T): µs, bf16 only
    ("mixtral-8x7b", 1): 268, ("mixtral-8x7b", 16): 970, ("mixtral-8x7b", 64): 972,
    ("mixtral-8x7b", 256): 1333, ("mixtral-8x7b", 1024): 2270, ("mixtral-8x7b", 4096): 6191,
    ("qwen3-30b-a3b", 1): 269, ("qwen3-30b-a3b", 16): 355, ("qwen3-30b-a3b", 64): 432,
    ("qwen3-30b-a3b", 256): 508, ("qwen3-30b-a3b", 1024): 678, ("qwen3-30b-a3b", 4096): 927,
    ("deepseek-v2-lite", 1): 370, ("deepseek-v2-lite", 16): 470, ("deepseek-v2-lite", 64): 407,
    ("deepseek-v2-lite", 256): 432, ("deepseek-v2-lite", 1024): 496, ("deepseek-v2-lite", 4096): 1111,
    ("olmoe-1b-7b", 1): 247, ("olmoe-1b-7b", 16): 271, ("olmoe-1b-7b", 64): 326,
    ("olmoe-1b-7b", 256): 329, ("olmoe-1b-7b", 1024): 420, ("olmoe-1b-7b", 4096): 1064,
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}  # relative L2 error against float64
SMOKE_SHAPE = ("smoke", (4, 2, 64, 32))
SMOKE_TOKENS = (1, 5, 80)  # 80 > 64: the sampled-token check
SAMPLED_TOKENS = 64
COLUMNS = ("ours", "graph", "cublas", "grouped_mm", "loop", "int8")


# ---------------------------------------------------------------------------------------------------------------------------------
# The ceilings of the floor: baselines.md's on its H100, measured in the run on any other GPU


@dataclass(frozen=True)
class Ceilings:
    """The rates a floor divides by. `int8_ops_per_s` is None where torch._int_mm could not be measured."""

    copy_bytes_per_s: float  # device-to-device copy, bytes read + written
    matmul_flops_per_s: dict  # torch dtype -> dense matmul rate, 8192^3
    int8_ops_per_s: float | None  # torch._int_mm, 8192^3
    source: str

    def as_json(self) -> dict:
        rate = self.matmul_flops_per_s
        return {"copy_TBps": self.copy_bytes_per_s / 1e12, "bf16_TFLOPs": rate[torch.bfloat16] / 1e12,
                "fp16_TFLOPs": rate[torch.float16] / 1e12,
                "int8_TOPs": None if self.int8_ops_per_s is None else self.int8_ops_per_s / 1e12, "source": self.source}


BASELINES_GPU = "H100 80GB HBM3"  # the machine of baselines.md (torch.cuda.get_device_name: "NVIDIA H100 80GB HBM3")
BASELINE_CEILINGS = Ceilings(copy_bytes_per_s=3.00e12, matmul_flops_per_s={torch.bfloat16: 757e12, torch.float16: 670e12},
                             int8_ops_per_s=916e12, source="baselines.md (H100)")
MEASURED_SOURCE = "measured in this run"
CEILING_MATMUL_N = 8192
CEILING_COPY_BYTES = 2 * 2**30


def is_baselines_gpu(gpu_name: str) -> bool:
    """True on the GPU that baselines.md measured: its ceilings and Peer A's quoted times hold there only."""
    return BASELINES_GPU in gpu_name


def measure_ceilings(device) -> Ceilings:
    """The ceilings of this GPU, measured as baselines.md measures them: the median of `triton.testing.do_bench` over a
    device-to-device copy of a 2 GiB tensor (bytes read + written) and over dense 8192^3 products of random data
    (torch.matmul in bf16 and fp16; torch._int_mm in int8, None if it fails here). A ceiling is the fastest the GPU goes, so
    each product is timed after 200 ms of warm-up (the clocks leave idle first) and in both B layouts, and the faster kept:
    on the H200 torch._int_mm with a row-major B ran at 126 TOPS (bench_nvidia_h200.json, first run), a fraction of the
    rate it reaches with a column-major one."""
    import triton.testing

    def seconds(fn) -> float:
        return triton.testing.do_bench(fn, warmup=200, rep=200, return_mode="median") * 1e-3

    def copy_rate() -> float:  # its 4 GiB are freed on return
        src = torch.empty(CEILING_COPY_BYTES, dtype=torch.uint8, device=device).random_(0, 256)
        dst = torch.empty_like(src)
        return 2 * CEILING_COPY_BYTES / seconds(lambda: dst.copy_(src))

    copy = copy_rate()

    n = CEILING_MATMUL_N
    flops = 2 * n**3

    def fastest(product, a, b) -> float:  # B row-major, then B column-major (b.t() of a contiguous tensor)
        return flops / min(seconds(lambda: product(a, b)), seconds(lambda: product(a, b.t())))

    matmul_rates = {}
    for dtype in (torch.bfloat16, torch.float16):
        a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
        matmul_rates[dtype] = fastest(torch.matmul, a, b)
        del a, b
    try:
        a, b = (torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device) for _ in range(2))
        int8_rate = fastest(torch._int_mm, a, b)
        del a, b
    except Exception as err:  # noqa: BLE001 - no int8 tensor-core path here: the W8A8 floor goes unreported
        print(f"bench: int8 ceiling not measured ({_short(err)}); no W8A8 floor", file=sys.stderr)
        int8_rate = None
    torch.cuda.empty_cache()
    return Ceilings(copy, matmul_rates, int8_rate, MEASURED_SOURCE)


def ceilings_for(device) -> Ceilings:
    """baselines.md's ceilings on the CPU (smoke test: nothing to measure) and on its H100; measured ones on any other GPU."""
    if device.type != "cuda" or is_baselines_gpu(torch.cuda.get_device_name(device)):
        return BASELINE_CEILINGS
    return measure_ceilings(device)


# ---------------------------------------------------------------------------------------------------------------------------------
# The floor


def moe_floor(num_experts_active: int, top_k: int, hidden: int, inter: int, num_tokens: int, dtype: torch.dtype,
              weight_bytes: float = 2.0, ops_per_s: float | None = None, extra_bytes: float = 0.0, *,
              ceilings: Ceilings = BASELINE_CEILINGS) -> dict:
    """baselines.md: floor = max(bytes / copy bandwidth, flops / dense rate), bytes = active experts' weights once + in + out.

    The rates are those of `ceilings` (by default baselines.md's, on the H100); `ops_per_s` replaces the dense rate of `dtype`
    for a kernel on another tensor-core path (INT8)."""
    elem = dtype.itemsize
    nbytes = num_experts_active * 3 * hidden * inter * weight_bytes + 2 * num_tokens * hidden * elem + extra_bytes
    flops = 2 * num_tokens * top_k * 3 * hidden * inter
    rate = ops_per_s or ceilings.matmul_flops_per_s[dtype]
    memory_us, compute_us = nbytes / ceilings.copy_bytes_per_s * 1e6, flops / rate * 1e6
    return {"floor_us": max(memory_us, compute_us), "bytes": nbytes, "flops": flops,
            "bound_by": "memory" if memory_us >= compute_us else "compute"}


# ---------------------------------------------------------------------------------------------------------------------------------
# Timers and the time budget


class CudaTimer:
    """Median of `triton.testing.do_bench` in µs (CUDA events; L2 flushed before every run). `spent`: wall seconds inside."""

    fake = False
    description = "triton.testing.do_bench, median, L2 flushed before each run"

    def __init__(self):
        self.spent = 0.0

    def bench(self, fn, warmup_ms: float, rep_ms: float) -> float:
        import triton.testing

        start = time.perf_counter()
        try:
            return triton.testing.do_bench(fn, warmup=max(1, int(warmup_ms)), rep=max(1, int(rep_ms)),
                                           return_mode="median") * 1e3
        finally:
            self.spent += time.perf_counter() - start

    def sync(self) -> None:
        torch.cuda.synchronize()

    def state(self) -> dict:
        return gpu_state()


def gpu_state() -> dict:
    """The GPU's SM clock (MHz), board power (W) and temperature (C) now, through NVML (torch.cuda), or {} without NVML.

    Read right after a column's timing it says at which clock that column ran: on the H100 (700 W limit) the layer's
    prefill points draw the limit within do_bench's 125 ms and their clock falls from 1980 MHz to 1500-1800
    (benchmarks/kernel_times.py --load-rounds, kernel_times_bf16_t4096_h100.json)."""
    try:
        return {"sm_clock_mhz": torch.cuda.clock_rate(), "power_w": round(torch.cuda.power_draw() / 1000),
                "temperature_c": torch.cuda.temperature()}
    except Exception:  # noqa: BLE001 - no pynvml or no NVML on this machine: the timings stand without it
        return {}


DO_BENCH_FLUSH_BYTES = 256 * 2**20  # what do_bench writes to flush L2 before each run (Triton 3.6): several times any L2


@functools.lru_cache(maxsize=None)
def _clean_l2_buffer(device_index: int) -> torch.Tensor:
    return torch.ones(DO_BENCH_FLUSH_BYTES, dtype=torch.int8, device=torch.device("cuda", device_index))


def do_bench_clean_l2(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median ms of `fn` started on an L2 of clean lines, where `triton.testing.do_bench` starts it on the dirty lines its
    256 MB flush leaves (each one a write-back when `fn` evicts it). Each run reads another 256 MB after the flush, which
    evicts those lines (the write-backs land in the read) and leaves clean ones; the read's own median is subtracted. The
    difference of two medians: ~1 us noisier than do_bench. `benchmarks/l2_dirty.py` and `ab_revision.py --l2 clean`."""
    import triton.testing

    spare = _clean_l2_buffer(torch.cuda.current_device())

    def read():
        spare.sum(dtype=torch.int32)

    both = triton.testing.do_bench(lambda: (read(), fn()), warmup=warmup_ms, rep=rep_ms, return_mode="median")
    alone = triton.testing.do_bench(read, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return both - alone


class FakeTimer:
    """CPU smoke test: the wall time of one call. Exercises the code, measures nothing."""

    fake = True
    description = "FAKE (CPU smoke): wall time of one call through Triton's interpreter"

    def __init__(self):
        self.spent = 0.0

    def bench(self, fn, warmup_ms: float, rep_ms: float) -> float:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        self.spent += seconds
        return seconds * 1e6

    def sync(self) -> None:
        pass

    def state(self) -> dict:
        return {}


class Budget:
    """Scales do_bench's warm-up and repeat times so that the remaining points fit the remaining seconds.

    A point costs `fixed + scale * timed`: `fixed` (inputs, first call and compiles, references, graph capture) does not shrink
    with the scale, `timed` (the do_bench calls at full scale) does. Both are running averages over the points so far.
    """

    def __init__(self, seconds: float | None):
        self.deadline = None if not seconds else time.monotonic() + seconds
        self.fixed: float | None = None
        self.timed: float | None = None

    def scale_for_next(self, points_left: int) -> float | None:
        """None: no time left for another point. Else a factor in [0.1, 1] for warm-up and repeat times."""
        if self.deadline is None:
            return 1.0
        left = self.deadline - time.monotonic()
        if left < 1.0 or (self.fixed is not None and left < self.fixed + 0.1 * self.timed):
            return None  # not even one more point at the smallest scale
        if self.fixed is None:
            return 1.0
        allowance = left / max(points_left, 1)
        return max(0.1, min(1.0, (allowance - self.fixed) / max(self.timed, 1e-6)))

    def record(self, seconds: float, timed_seconds: float, scale: float) -> None:
        fixed, timed = max(0.0, seconds - timed_seconds), timed_seconds / max(scale, 0.1)
        if self.fixed is None:
            self.fixed, self.timed = fixed, timed
        else:
            self.fixed, self.timed = 0.7 * self.fixed + 0.3 * fixed, 0.7 * self.timed + 0.3 * timed


# ---------------------------------------------------------------------------------------------------------------------------------
# Inputs (baselines.md): x = randn(T, H), w1 = randn(E, 2I, H)/sqrt(H), w2 = randn(E, H, I)/sqrt(I), softmax top-k renormalised


def make_weights(shape, dtype, device, seed: int):
    num_experts, _, hidden, inter = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    w1 = torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=device, dtype=dtype).div_(math.sqrt(hidden))
    w2 = torch.randn(num_experts, hidden, inter, generator=gen, device=device, dtype=dtype).div_(math.sqrt(inter))
    return w1, w2


def make_tokens(shape, num_tokens: int, dtype, device, seed: int):
    from .routing import route

    num_experts, top_k, hidden, _ = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen, device=device, dtype=dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device, dtype=torch.float32)
    scales, selected = route(logits, top_k)
    return x, selected, scales


def sampled_tokens(num_tokens: int, device, seed: int) -> torch.Tensor:
    """All tokens when T <= 64, else 64 distinct random ones (sorted): the reference costs O(sample), not O(T)."""
    if num_tokens <= SAMPLED_TOKENS:
        return torch.arange(num_tokens, device=device)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(num_tokens, generator=gen)[:SAMPLED_TOKENS].sort().values.to(device)


def reference_on_tokens(x, selected, scales, w1, w2, tokens, expert_weights=None, quantize_rows=False):
    """float64 `reference_moe` (SwiGLU) for `tokens` only, on the experts those tokens use (ids renumbered; the same function).

    `expert_weights(used)` -> (fc1, fc2) of those experts, when the weights are not plain tensors (INT8: dequantised ones).
    `quantize_rows` (W8A8): the activations quantised per row as the kernels quantise them (`_w8a8_reference`).
    """
    from .reference import reference_moe

    sel = selected[tokens]
    used, renumbered = torch.unique(sel, return_inverse=True)
    fc1, fc2 = expert_weights(used) if expert_weights is not None else (w1[used], w2[used])
    ids = renumbered.to(torch.int32).view_as(sel)
    if quantize_rows:
        return _w8a8_reference(x[tokens], ids, scales[tokens], fc1, fc2)
    return reference_moe(x[tokens], ids, scales[tokens], fc1, fc2)


def _w8a8_reference(x, ids, scales, fc1, fc2):
    """The W8A8 layer (SwiGLU) in float64 on dequantised weights, its activations quantised where the kernels quantise them:
    the input per row, and GEMM1's output (stored in the activation dtype) per row again, by the row quantiser's torch twin
    (bit-identical to it). Float64 `[T, H]`."""
    from .activations import activation_torch, get_activation
    from .quant import quantize_activations_int8_torch

    def quantized(rows):
        q, row_scales = quantize_activations_int8_torch(rows)
        return q.double() * row_scales.double().unsqueeze(1)

    swiglu, x_quantized = get_activation("swiglu"), quantized(x)
    out = torch.zeros(x.shape[0], fc2.shape[1], dtype=torch.float64, device=x.device)
    for e in range(fc1.shape[0]):
        tokens, slots = torch.nonzero(ids == e, as_tuple=True)
        if tokens.numel():
            h = activation_torch(x_quantized[tokens] @ fc1[e].T, swiglu, None, "gate_first").to(x.dtype)
            out.index_add_(0, tokens, (quantized(h) @ fc2[e].T) * scales[tokens, slots].double().unsqueeze(1))
    return out


def rel_err(out_rows: torch.Tensor, ref_rows: torch.Tensor) -> float:
    err = ((out_rows.double() - ref_rows).norm() / ref_rows.norm().clamp_min(1e-300)).item()
    return err if math.isfinite(err) else float("inf")


# ---------------------------------------------------------------------------------------------------------------------------------
# Baseline: torch._grouped_mm with its own permute / unpermute


def grouped_mm_moe(x, selected, scales, w1, w2):
    """Sort the (token, k) pairs by expert, gather, two `torch._grouped_mm` with SwiGLU between, scale, scatter-add in fp32.

    No host sync: counts by scatter_add, offsets by an int32 cumsum on the device.
    """
    num_tokens, top_k = selected.shape
    num_experts = w1.shape[0]
    flat = selected.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    token = order // top_k
    x_perm = x.index_select(0, token)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = torch._grouped_mm(x_perm, w1.transpose(-2, -1), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    a = torch.nn.functional.silu(gate) * up
    y = torch._grouped_mm(a, w2.transpose(-2, -1), offs=offs)
    y = y.float() * scales.reshape(-1)[order].float().unsqueeze(1)
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token, y)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------------------
# INT8 (optional): simple_moe.quant, built by another part of the project. Everything here is guarded.


@dataclass
class Int8Scheme:
    name: str  # "w8a16" or "w8a8"
    run: object  # () -> [T, H] output
    dequantized: object  # used expert ids -> (fc1, fc2) float64 weights the int8 ones stand for (the reference's weights)
    scale_bytes: float  # bytes of weight scales read per active expert
    ops_per_s: float | None  # the matmul rate of its tensor-core path (None: not measured on this GPU)
    quantizes_activations: bool  # W8A8: the reference quantises the activations per row too


def int8_schemes(x, selected, scales, w1, w2, cache: dict, ceilings: Ceilings) -> tuple[list[Int8Scheme], str | None]:
    """W8A16 and W8A8 (per-channel weight scales) from `simple_moe.quant`, weights quantised once per weight tensor (`cache`),
    or ([], why not)."""
    try:
        from . import quant

        key = (w1.data_ptr(), w2.data_ptr())
        if key not in cache:
            cache.clear()
            q1, q2, w8a16 = quant.quantize_moe_weights(w1, w2, "w8a16")
            w8a8 = quant.W8A8(w8a16.fc1_scales, w8a16.fc2_scales)  # the same per-channel int8 weights and scales
            cache[key] = (q1, q2, w8a16, w8a8)
        q1, q2, w8a16, w8a8 = cache[key]
        dequantize = quant.dequantize_weights_int8
    except (ImportError, AttributeError) as err:
        return [], f"simple_moe.quant unavailable ({_short(err)})"
    from .pipeline import fused_moe_simple

    def dequantized(used):
        return (dequantize(q1[used], w8a16.fc1_scales[used], None, torch.float64),
                dequantize(q2[used], w8a16.fc2_scales[used], None, torch.float64))

    scale_bytes = (q1.shape[1] + q2.shape[1]) * w8a16.fc1_scales.element_size()
    return [Int8Scheme(name, (lambda scheme=scheme: fused_moe_simple(x, selected, scales, q1, q2, quant=scheme)), dequantized,
                       scale_bytes, rate, scheme.quantize_input)
            for name, scheme, rate in (("w8a16", w8a16, ceilings.matmul_flops_per_s[x.dtype]),
                                       ("w8a8", w8a8, ceilings.int8_ops_per_s))], None


# ---------------------------------------------------------------------------------------------------------------------------------
# Triton caches: a cold first call compiles every kernel of the layer from scratch


def clear_triton_memory_caches() -> int:
    """Empties the in-process compiled-kernel cache of every simple_moe @triton.jit kernel, and the direct-launch table that
    holds their compiled launchers (else a shape whose kernels an earlier shape compiled would not compile); returns how many
    kernels."""
    from triton.runtime.jit import JITFunction

    from . import _launch

    _launch._compiled.clear()
    cleared = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("simple_moe") or module is None:
            continue
        for value in vars(module).values():
            if isinstance(value, JITFunction) and hasattr(value, "device_caches"):
                value.device_caches.clear()
                cleared += 1
    return cleared


def cold_first_call(fn, timer) -> dict:
    """Wall time of `fn()` (synchronised) with Triton's on-disk cache pointed at a new empty folder and its in-memory caches emptied.

    Triton reads TRITON_CACHE_DIR through `triton.knobs.cache.dir` each time `triton.compile` makes a cache manager
    (runtime/cache.py: FileCacheManager.__init__), i.e. at compile time, so setting it right before the call is enough; the number
    of files the compile left in the folder proves it (0 on the CPU, where the interpreter compiles nothing).
    """
    old = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="simple_moe_cold_cache_") as cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
        try:
            kernels = clear_triton_memory_caches()
            timer.sync()
            start = time.perf_counter()
            out = fn()
            timer.sync()
            seconds = time.perf_counter() - start
        finally:
            if old is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old
        files = sum(len(f) for _, _, f in os.walk(cache_dir))
    return {"seconds": seconds, "cache_files": files, "kernels_cleared": kernels, "out": out}


def warm_first_call(fn, timer) -> dict:
    timer.sync()
    start = time.perf_counter()
    out = fn()
    timer.sync()
    return {"seconds": time.perf_counter() - start, "out": out}


# ---------------------------------------------------------------------------------------------------------------------------------
# CUDA graph and memory


class EagerReplay:
    """CPU smoke stand-in for a CUDA graph: replay() calls the function."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


def write_results_json(path: str, payload: dict) -> None:
    """Writes a benchmark script's results to `path` as JSON, the GPU name, the date, the torch, Triton and CUDA versions and
    the commit first (a payload key of the same name is a ValueError: it would hide them)."""
    import json

    import triton

    provenance = {"gpu": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "commit": _git_commit()}
    clash = provenance.keys() & payload.keys()
    if clash:
        raise ValueError(f"payload: keys {sorted(clash)} would hide the provenance of the same name")
    with open(path, "w") as f:
        json.dump({**provenance, **payload}, f, indent=1)


def capture_graph(fn, device):
    """Captures `fn` (static inputs, static output) into a CUDA graph after warming it up on a side stream."""
    if device.type != "cuda":
        return EagerReplay(fn)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def _alloc_bytes(nbytes: int) -> int:
    return (nbytes + 511) // 512 * 512  # the caching allocator's granularity


def workspace_bound(num_tokens, top_k, num_experts, hidden, inter, dtype) -> int:
    """Bytes one fast-path call may allocate: GEMM1 out [rows, I], GEMM2 out [rows, H], the output [T, H], the three int32 maps,
    the expert offsets, activation parameters [E, 3], and the routing's two per-chunk tables [chunks, E+1] (large batches)."""
    from . import routing

    elem = dtype.itemsize
    rows = num_tokens * top_k
    sizes = [rows * inter * elem, rows * hidden * elem, num_tokens * hidden * elem, rows * 4, rows * 4, rows * 4,
             (num_experts + 1) * 8, num_experts * 3 * 4]
    chunk = getattr(routing, "_SCATTER_CHUNK", None)
    if chunk:
        sizes += [-(-rows // chunk) * (num_experts + 1) * 4] * 2
    return sum(_alloc_bytes(s) for s in sizes)


def peak_extra_bytes(fn, device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return peak - before


# ---------------------------------------------------------------------------------------------------------------------------------
# One point


@dataclass
class Settings:
    columns: tuple
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    loop_warmup_ms: float = 5.0
    loop_rep_ms: float = 20.0
    loop_max_rows: int = 8192
    seed: int = 0
    int8_dtypes: tuple = (torch.bfloat16,)
    ceilings: Ceilings = BASELINE_CEILINGS  # the floor's rates for this GPU (ceilings_for)
    gpu: str = ""  # the device's name: Peer A's quoted H100 times are compared only on that H100


@dataclass
class ShapeState:
    """What lives for one (shape, dtype): the weights, and whether its cold first call was measured yet."""

    name: str
    shape: tuple
    dtype: torch.dtype
    w1: torch.Tensor
    w2: torch.Tensor
    cold_done: bool = False
    int8_cache: dict = field(default_factory=dict)


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text[:160]


# At or below this budget scale a point drops the torch loop and keeps only the INT8 scheme whose issue-5 target covers its T.
LEAN_SCALE = 0.25
# Issue 5's INT8 targets: where each scheme is judged against the unquantised fast path.
INT8_TARGET_TOKENS = {"w8a16": lambda t: t <= 64, "w8a8": lambda t: t >= 1024}


def int8_schemes_to_measure(num_tokens: int, lean: bool) -> tuple[str, ...]:
    """Both schemes; behind the time budget, only the one whose target covers this T (the other columns are extras there)."""
    return tuple(name for name, judged_at in INT8_TARGET_TOKENS.items() if not lean or judged_at(num_tokens))


def measure_point(state: ShapeState, num_tokens: int, settings: Settings, timer, device, scale: float) -> dict:
    from .callbacks import cublas_gemm, torch_loop_gemm
    from .pipeline import fused_moe_simple

    num_experts, top_k, hidden, inter = state.shape
    dtype, w1, w2 = state.dtype, state.w1, state.w2
    seed = settings.seed * 1_000_003 + num_tokens
    x, selected, scales = make_tokens(state.shape, num_tokens, dtype, device, seed)
    rows = num_tokens * top_k
    active = int(torch.unique(selected).numel())
    row = {"shape": state.name, "E": num_experts, "top_k": top_k, "H": hidden, "I": inter, "T": num_tokens,
           "dtype": _dtype_name(dtype), "rows": rows, "active_experts": active, "tolerance": TOLERANCE[dtype]}
    row.update(moe_floor(active, top_k, hidden, inter, num_tokens, dtype, ceilings=settings.ceilings))
    warmup, rep = settings.warmup_ms * scale, settings.rep_ms * scale
    row["rep_ms"] = rep
    lean = scale <= LEAN_SCALE  # behind the time budget: ours, the graph, the fast baselines, the INT8 scheme judged here

    # -- ours, first call (cold compile for the first T of this shape and dtype), into a NaN-poisoned output
    poisoned = torch.full((num_tokens, hidden), float("nan"), dtype=dtype, device=device)
    ours_into_poisoned = lambda: fused_moe_simple(x, selected, scales, w1, w2, output=poisoned)  # noqa: E731
    if not state.cold_done:
        first = cold_first_call(ours_into_poisoned, timer)
        row["cold"] = True
        row["cold_cache_files"] = first["cache_files"]
        row["cold_kernels_cleared"] = first["kernels_cleared"]
        state.cold_done = True
    else:
        first = warm_first_call(ours_into_poisoned, timer)
        row["cold"] = False
    row["first_call_s"] = first["seconds"]
    row["all_rows_written"] = bool(torch.isfinite(poisoned).all().item())

    tokens = sampled_tokens(num_tokens, device, seed)
    row["checked_tokens"] = int(tokens.numel())
    ref = reference_on_tokens(x, selected, scales, w1, w2, tokens)
    row["rel_err"] = rel_err(poisoned[tokens], ref)
    errors = {"ours": row["rel_err"]}
    times: dict = {}

    # -- ours, eager
    ours = lambda: fused_moe_simple(x, selected, scales, w1, w2)  # noqa: E731
    extra = peak_extra_bytes(ours, device)
    row["extra_mib"] = None if extra is None else extra / 2**20
    row["bound_mib"] = workspace_bound(num_tokens, top_k, num_experts, hidden, inter, dtype) / 2**20
    row["within_bound"] = None if extra is None else extra <= workspace_bound(num_tokens, top_k, num_experts, hidden, inter, dtype)
    times["ours"] = timer.bench(ours, warmup, rep)
    row["gpu_state_after_ours"] = timer.state()
    # The timed call allocates its output (a plan of its own): its result must be the checked one, bit for bit.
    row["eager_equals_checked"] = bool(torch.equal(ours(), poisoned))

    # -- ours, CUDA graph (static inputs and output)
    if "graph" in settings.columns:
        try:
            static_out = torch.empty(num_tokens, hidden, dtype=dtype, device=device)
            graph = capture_graph(lambda: fused_moe_simple(x, selected, scales, w1, w2, output=static_out), device)
            static_out.fill_(float("nan"))
            graph.replay()
            timer.sync()
            row["graph_equals_eager"] = bool(torch.equal(static_out, poisoned))
            errors["graph"] = rel_err(static_out[tokens], ref)
            times["graph"] = timer.bench(graph.replay, warmup, rep)
            del graph
        except Exception as err:  # noqa: BLE001 - a failed column must not lose the point
            times["graph"] = f"error: {_short(err)}"

    # -- baselines, each checked on the sampled tokens first
    baselines = []
    if "cublas" in settings.columns:
        baselines.append(("cublas", lambda: fused_moe_simple(x, selected, scales, w1, w2, cublas_gemm, cublas_gemm),
                          warmup, rep, None))
    if "grouped_mm" in settings.columns:
        baselines.append(("grouped_mm", lambda: grouped_mm_moe(x, selected, scales, w1, w2), warmup, rep, None))
    if "loop" in settings.columns:
        skip = "skipped: behind the time budget" if lean else None
        if rows > settings.loop_max_rows:
            skip = f"skipped: T*top_k={rows} > {settings.loop_max_rows} rows (slow torch loop; --loop-max-rows)"
        baselines.append(("loop", lambda: fused_moe_simple(x, selected, scales, w1, w2, torch_loop_gemm, torch_loop_gemm),
                          settings.loop_warmup_ms * scale, settings.loop_rep_ms * scale, skip))
    for name, fn, col_warmup, col_rep, skip in baselines:
        if skip:
            times[name] = skip
            continue
        try:
            out = fn()
            timer.sync()
            errors[name] = rel_err(out[tokens], ref)
            del out
            times[name] = timer.bench(fn, col_warmup, col_rep)
        except Exception as err:  # noqa: BLE001 - e.g. torch._grouped_mm without a kernel for this dtype or arch
            times[name] = f"n/a: {_short(err)}"

    # -- INT8 (only where simple_moe.quant exists)
    if "int8" in settings.columns and dtype in settings.int8_dtypes:
        wanted = int8_schemes_to_measure(num_tokens, lean)
        if wanted:
            row["int8"] = measure_int8(state, x, selected, scales, tokens, ref, active, timer, warmup, rep, settings.ceilings,
                                       wanted)
        else:
            row["int8"] = {"status": "skipped: behind the time budget"}

    row["times_us"] = times
    row["errors"] = errors
    _derive(row, settings.gpu)
    return row


def measure_int8(state, x, selected, scales, tokens, ref, active, timer, warmup, rep, ceilings: Ceilings,
                 wanted: tuple[str, ...]) -> dict:
    num_experts, top_k, hidden, inter = state.shape
    try:
        schemes, missing = int8_schemes(x, selected, scales, state.w1, state.w2, state.int8_cache, ceilings)
    except Exception as err:  # noqa: BLE001
        return {"status": f"error: {_short(err)}"}
    if missing:
        return {"status": f"n/a: {missing}"}
    result = {"status": "ok"}
    for scheme in schemes:
        if scheme.name not in wanted:
            result[scheme.name] = {"status": "skipped: behind the time budget"}
            continue
        if scheme.ops_per_s is None:  # no rate for its tensor-core path on this GPU: timed, but no floor and no efficiency
            entry = {"floor_us": None}
        else:
            entry = moe_floor(active, top_k, hidden, inter, x.shape[0], x.dtype, weight_bytes=1.0, ops_per_s=scheme.ops_per_s,
                              extra_bytes=active * scheme.scale_bytes, ceilings=ceilings)
        try:
            out = scheme.run()
            timer.sync()
            entry["err_vs_unquantized"] = rel_err(out[tokens], ref)
            # Exactly the dequantised weights (W8A8: and the activations quantised per row as the kernels do): judged
            # with the unquantised layer's tolerance, as the GPU tests do.
            exact = reference_on_tokens(x, selected, scales, None, None, tokens, expert_weights=scheme.dequantized,
                                        quantize_rows=scheme.quantizes_activations)
            entry["err_vs_dequantized_ref"] = rel_err(out[tokens], exact)
            entry["pass"] = entry["err_vs_dequantized_ref"] < TOLERANCE[x.dtype]
            del out
            entry["time_us"] = timer.bench(scheme.run, warmup, rep)
            entry["eff"] = entry["floor_us"] / entry["time_us"] if entry["floor_us"] else None
        except Exception as err:  # noqa: BLE001
            entry["time_us"], entry["pass"] = f"error: {_short(err)}", False
        else:
            # Replayed from a CUDA graph too: decode is host-bound in eager, and the issue's INT8 targets compare the kernels.
            try:
                entry["graph_us"] = timer.bench(capture_graph(scheme.run, x.device).replay, warmup, rep)
                entry["eff_graph"] = entry["floor_us"] / entry["graph_us"] if entry["floor_us"] else None
            except Exception as err:  # noqa: BLE001
                entry["graph_us"], entry["pass"] = f"error: {_short(err)}", False
        result[scheme.name] = entry
    return result


def int8_speedups(rows: list[dict]) -> dict:
    """INT8 time against ours unquantised at the same point and activation dtype (eager/eager and graph/graph): what issue 5's
    targets are about (W8A16 at T <= 64, W8A8 at T >= 1024)."""
    out = {}
    for name, in_range in INT8_TARGET_TOKENS.items():
        for mode, ours_key, int8_key in (("eager", "ours", "time_us"), ("graph", "graph", "graph_us")):
            points = {}
            for r in rows:
                e = r.get("int8", {}).get(name, {})
                ours, int8 = _num(r.get("times_us", {}).get(ours_key)), _num(e.get(int8_key))
                if in_range(r["T"]) and ours and int8:
                    points[f"{r['shape']} T={r['T']} {r['dtype']}"] = ours / int8
            out[f"{name} {mode}"] = points
    return out


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _derive(row: dict, gpu: str) -> None:
    """Efficiencies, speedups and checks of a measured row; `gpu` is the device's name (Peer A is compared on the H100 only)."""
    times = row["times_us"]
    ours, graph = _num(times.get("ours")), _num(times.get("graph"))
    row["eff"] = row["floor_us"] / ours if ours else None
    row["eff_graph"] = row["floor_us"] / graph if graph else None
    # Peer A's times are quotes from the H100 of baselines.md: kept everywhere, set against ours only on that GPU.
    peer = PEER_A_US.get((row["shape"], row["T"])) if row["dtype"] == "bf16" else None
    comparable = peer is not None and is_baselines_gpu(gpu)
    row["peer_a_us"] = peer
    row["vs_peer_a"] = peer / ours if comparable and ours else None
    row["vs_peer_a_graph"] = peer / graph if comparable and graph else None
    row["speedup_vs"] = {name: _num(t) / ours for name, t in times.items()
                         if name not in ("ours", "graph") and _num(t) and ours}
    # Our check: every row written, ours and its graph replay within tolerance, the replay and the timed eager call bitwise
    # equal to the checked call, a graph that was asked for captured, and each INT8 scheme measured within tolerance of its
    # exact reference.
    ours_errors = [e for name, e in row["errors"].items() if name in ("ours", "graph")]
    graph_failed = isinstance(times.get("graph"), str)
    int8 = row.get("int8", {})  # a scheme skipped behind the budget has no "pass" and no times
    row["int8_pass"] = not str(int8.get("status", "")).startswith("error") and all(
        e.get("pass", True) and not any(str(e.get(key, "")).startswith("error") for key in ("time_us", "graph_us"))
        for e in int8.values() if isinstance(e, dict))
    row["pass"] = (row["all_rows_written"] and all(e < row["tolerance"] for e in ours_errors)
                   and row.get("graph_equals_eager") is not False and row.get("eager_equals_checked") is not False
                   and not graph_failed and row["int8_pass"])
    # Baselines are checked the same way and reported, but they do not fail our run.
    row["baselines_within_tolerance"] = all(e < row["tolerance"] for name, e in row["errors"].items()
                                            if name not in ("ours", "graph"))


def skipped_row(name, shape, num_tokens, dtype, reason) -> dict:
    num_experts, top_k, hidden, inter = shape
    return {"shape": name, "E": num_experts, "top_k": top_k, "H": hidden, "I": inter, "T": num_tokens,
            "dtype": _dtype_name(dtype), "skipped": reason}


def _dtype_name(dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


# ---------------------------------------------------------------------------------------------------------------------------------
# The run


class Progress:
    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.bar, self.enabled = total, 0, None, enabled
        if not enabled:
            return
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, desc="bench", unit="point", dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def step(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label)
            self.bar.update(1)
        elif self.enabled:
            print(f"[bench {self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_points(shapes, tokens, dtypes, settings: Settings, timer, device, budget: Budget, progress: Progress,
               rows: list[dict]) -> list[dict]:
    """Measures every point into `rows` (appended as they finish, so an interrupted run keeps them)."""
    points_left = len(shapes) * len(tokens) * len(dtypes)
    for dtype in dtypes:  # bf16 first for every shape: what a short budget keeps
        for name, shape in shapes:
            state = None
            for num_tokens in tokens:
                scale = budget.scale_for_next(points_left)
                points_left -= 1
                label = f"{name} T={num_tokens} {_dtype_name(dtype)}"
                if scale is None:
                    rows.append(skipped_row(name, shape, num_tokens, dtype, "skipped: time budget spent"))
                    progress.step(label + " (skipped)")
                    continue
                start, timed_before = time.monotonic(), timer.spent
                try:
                    if state is None:
                        w1, w2 = make_weights(shape, dtype, device, settings.seed)
                        state = ShapeState(name, shape, dtype, w1, w2)
                    rows.append(measure_point(state, num_tokens, settings, timer, device, scale))
                except Exception as err:  # noqa: BLE001 - one broken point must not lose the others
                    rows.append(skipped_row(name, shape, num_tokens, dtype, f"error: {_short(err)}"))
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                budget.record(time.monotonic() - start, timer.spent - timed_before, scale)
                progress.step(label)
            del state
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def environment(device, timer, ceilings: Ceilings) -> dict:
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke test, Triton interpreter)",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "timer": timer.description,
        "ceilings": ceilings.as_json(),
        "peer_a_source": PEER_A_SOURCE,
        "inputs": "x=randn(T,H), w1=randn(E,2I,H)/sqrt(H), w2=randn(E,H,I)/sqrt(I), softmax(randn(T,E)) top-k renormalised",
        "commit": _git_commit(),
    }
    return env


def _git_commit() -> str | None:
    """The commit of the checkout simple_moe is imported from (None outside a git checkout); '+' marks local changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "."], cwd=here, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


# ---------------------------------------------------------------------------------------------------------------------------------
# Reports: Markdown and PNG


def _fmt(v, digits=1):
    if v is None:
        return "—"
    if isinstance(v, str):
        return "skip" if v.startswith("skipped") else ("n/a" if v.startswith("n/a") else "err")
    if isinstance(v, bool):
        return "yes" if v else "no"
    if abs(v) >= 100 or digits == 0:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def _geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


PEER_A_NOT_COMPARED = "Peer A was measured on an H100 (baselines.md) and is not compared on this GPU"


def summary(rows: list[dict], gpu: str) -> dict:
    """The run in numbers; `gpu` is the device's name: the verdicts against Peer A's quoted H100 times exist only on that H100."""
    measured = [r for r in rows if "skipped" not in r]
    out: dict = {"points": len(rows), "measured": len(measured), "skipped": len(rows) - len(measured),
                 "failed_checks": [f"{r['shape']} T={r['T']} {r['dtype']}" for r in measured if not r.get("pass")],
                 "errored_points": [f"{r['shape']} T={r['T']} {r['dtype']}: {r['skipped']}" for r in rows
                                    if str(r.get("skipped", "")).startswith("error")],
                 "baselines_off_tolerance": [f"{r['shape']} T={r['T']} {r['dtype']}: " + ", ".join(
                     f"{k} {e:.1e}" for k, e in r["errors"].items() if k not in ("ours", "graph") and e >= r["tolerance"])
                     for r in measured if not r.get("baselines_within_tolerance", True)]}
    for key in ("eff", "eff_graph"):
        vals = [r[key] for r in measured if r.get(key)]
        out[f"geomean_{key}"] = _geomean(vals)
        if vals:
            worst = min((r for r in measured if r.get(key)), key=lambda r: r[key])
            out[f"min_{key}"] = {"value": worst[key], "point": f"{worst['shape']} T={worst['T']} {worst['dtype']}"}
    out["peer_a_compared"] = is_baselines_gpu(gpu)
    if out["peer_a_compared"]:
        out["slower_than_peer_a"] = [
            {"point": f"{r['shape']} T={r['T']}", "ours_us": r["times_us"]["ours"], "peer_a_us": r["peer_a_us"]}
            for r in measured if r.get("vs_peer_a") is not None and r["vs_peer_a"] < 1.0]
        out["peer_a_points"] = sum(1 for r in measured if r.get("vs_peer_a") is not None)
        out["geomean_vs_peer_a"] = _geomean([r.get("vs_peer_a") for r in measured])
        out["geomean_vs_peer_a_graph"] = _geomean([r.get("vs_peer_a_graph") for r in measured])
    else:
        out["peer_a_not_compared"] = PEER_A_NOT_COMPARED
    baselines = sorted({k for r in measured for k in r.get("speedup_vs", {})})
    out["geomean_speedup_vs"] = {b: _geomean([r["speedup_vs"].get(b) for r in measured]) for b in baselines}
    by_key = {(r["shape"], r["T"], r["dtype"]): r for r in measured}
    ratios = [_num(by_key[(s, t, "fp16")]["times_us"]["ours"]) / _num(r["times_us"]["ours"])
              for (s, t, d), r in by_key.items() if d == "bf16" and (s, t, "fp16") in by_key
              and _num(by_key[(s, t, "fp16")]["times_us"]["ours"]) and _num(r["times_us"]["ours"])]
    out["fp16_over_bf16_time_geomean"] = _geomean(ratios)
    out["eff_at_T4096"] = {f"{r['shape']} {r['dtype']}": {"eff": r.get("eff"), "eff_graph": r.get("eff_graph")}
                           for r in measured if r["T"] == 4096}
    out["cold_first_call_s"] = {f"{r['shape']} {r['dtype']} (T={r['T']})": r["first_call_s"] for r in measured if r.get("cold")}
    out["max_extra_over_bound"] = max((r["extra_mib"] / r["bound_mib"] for r in measured if r.get("extra_mib") is not None),
                                      default=None)
    out["int8_speedup"] = {k: v for k, v in int8_speedups(measured).items() if v}
    return out


TABLE_HEADER = ["shape", "T", "dtype", "floor µs", "ours µs", "ours graph µs", "eff", "eff graph", "peer A µs (H100 quote)",
                "vs peer A", "cuBLAS cb µs", "grouped_mm µs", "torch loop µs", "compile s", "extra MiB", "bound MiB", "rel err",
                "check", "SM MHz"]
INT8_HEADER = ["W8A16 floor µs", "W8A16 µs", "W8A16 graph µs", "W8A16 eff graph", "W8A16 err fp/deq", "W8A8 floor µs",
               "W8A8 µs", "W8A8 graph µs", "W8A8 eff graph", "W8A8 err fp/deq"]
INT8_TARGETS = {"w8a16": ("W8A16 at T <= 64", 1.6), "w8a8": ("W8A8 at T >= 1024", 1.3)}  # issue 5


def markdown(result: dict) -> str:
    env, rows, summ = result["environment"], result["rows"], result["summary"]
    has_int8 = any(r.get("int8", {}).get("status") == "ok" for r in rows)
    header = TABLE_HEADER + (INT8_HEADER if has_int8 else [])
    ceil = env["ceilings"]
    int8_rate = "not measured: no W8A8 floor" if ceil["int8_TOPs"] is None else f"{ceil['int8_TOPs']:.0f} TOPS"
    if summ.get("peer_a_compared"):
        peer_a = "vs peer A = peer A µs / ours µs (> 1: ours faster)"
    else:
        peer_a = f"**{PEER_A_NOT_COMPARED}**: its µs are listed, vs peer A is left empty"
    lines = [f"# simple_moe benchmark: {env['gpu']}", "",
             f"{env['date']}; torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}; timer: {env['timer']}.", "",
             f"Floor = max(bytes / {ceil['copy_TBps']:.2f} TB/s, flops / dense rate) with bytes = distinct experts x 3HI x 2 B "
             f"+ 2TH x 2 B; dense rate {ceil['bf16_TFLOPs']:.0f} TFLOP/s (bf16), {ceil['fp16_TFLOPs']:.0f} (fp16); ceilings: "
             f"{ceil['source']}. eff = floor / time. Peer A = vLLM's Triton fused_moe, **quoted** from {PEER_A_SOURCE}; "
             f"{peer_a}. compile s = wall time of the "
             "first call at that point; `*` = cold (empty Triton caches). extra MiB = peak device memory one eager call "
             "allocates (output included); bound = GEMM1 rows x I + GEMM2 rows x H + output + maps. rel err = ours vs float64 "
             "reference on up to 64 sampled tokens. SM MHz = the SM clock (NVML) right after ours eager was timed: under the "
             "limit of the board's power it falls below the boost clock, and the tensor-core-bound kernels slow with it. "
             "INT8 (per-channel weight scales; W8A8 also quantises activations per row): "
             f"floor with weights at 1 byte (+ scales), rate {ceil['bf16_TFLOPs']:.0f} TFLOP/s (W8A16, bf16 MMA) or {int8_rate} "
             "(W8A8); err fp/deq = vs the float64 reference with the original / the dequantised weights (W8A8: and the "
             "activations quantised per row as the kernels quantise them); a deq error past the dtype's tolerance fails "
             "the point.", ""]
    if env.get("smoke"):
        lines += ["**CPU SMOKE TEST: times are meaningless (Triton interpreter, one call).**", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|")
    notes: dict[str, int] = {}

    def cell(v, digits=1):
        if isinstance(v, str):
            notes.setdefault(v, len(notes) + 1)
            return f"{_fmt(v)}[{notes[v]}]"
        return _fmt(v, digits)

    for r in rows:
        if "skipped" in r:
            lines.append("| " + " | ".join([r["shape"], str(r["T"]), r["dtype"], cell(r["skipped"])] + [""] * (len(header) - 4))
                         + " |")
            continue
        t = r["times_us"]
        compile_s = f"{r['first_call_s']:.2f}{'*' if r.get('cold') else ''}"
        cells = [r["shape"], str(r["T"]), r["dtype"], _fmt(r["floor_us"]), cell(t.get("ours")), cell(t.get("graph")),
                 _fmt(r.get("eff"), 2), _fmt(r.get("eff_graph"), 2), _fmt(r.get("peer_a_us"), 0), _fmt(r.get("vs_peer_a"), 2),
                 cell(t.get("cublas")), cell(t.get("grouped_mm")), cell(t.get("loop")), compile_s,
                 _fmt(r.get("extra_mib"), 1), _fmt(r.get("bound_mib"), 1), f"{r['rel_err']:.1e}",
                 "PASS" if r.get("pass") else "FAIL", _fmt(r.get("gpu_state_after_ours", {}).get("sm_clock_mhz"), 0)]
        if has_int8:
            q = r.get("int8", {})
            for name in ("w8a16", "w8a8"):
                e = q.get(name, {})
                errs = [e.get("err_vs_unquantized"), e.get("err_vs_dequantized_ref")]
                cells += [_fmt(e.get("floor_us")), cell(e.get("time_us")), cell(e.get("graph_us")), _fmt(e.get("eff_graph"), 2),
                          "/".join("—" if v is None else f"{v:.1e}" for v in errs)]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Notes:"] + [f"[{i}] {text}" for text, i in notes.items()]
    lines += ["", "## Summary", ""]
    lines += _summary_lines(summ, rows)
    return "\n".join(lines) + "\n"


def _summary_lines(s: dict, rows: list[dict]) -> list[str]:
    def f(v, d=2):
        return "—" if v is None else f"{v:.{d}f}"

    lines = [f"- points: {s['measured']} measured, {s['skipped']} skipped; correctness checks failed: "
             f"{len(s['failed_checks'])}" + (f" ({', '.join(s['failed_checks'])})" if s["failed_checks"] else "")]
    if s.get("errored_points"):
        lines.append("- points that raised (the run fails): " + "; ".join(s["errored_points"]))
    if s.get("baselines_off_tolerance"):
        lines.append("- baselines above our tolerance (reported only): " + "; ".join(s["baselines_off_tolerance"]))
    lines.append(f"- efficiency, geometric mean: eager {f(s.get('geomean_eff'))}, CUDA graph {f(s.get('geomean_eff_graph'))}")
    for key, label in (("min_eff", "eager"), ("min_eff_graph", "CUDA graph")):
        if key in s:
            lines.append(f"- minimum efficiency ({label}): {s[key]['value']:.2f} at {s[key]['point']}")
    if s.get("peer_a_compared"):
        lines.append(f"- vs Peer A (quoted, bf16, {s['peer_a_points']} points): geometric-mean speedup eager "
                     f"{f(s.get('geomean_vs_peer_a'))}, graph {f(s.get('geomean_vs_peer_a_graph'))}; slower than Peer A at "
                     f"{len(s['slower_than_peer_a'])} points" + (": " + ", ".join(
                         f"{p['point']} ({p['ours_us']:.0f} vs {p['peer_a_us']} µs)" for p in s["slower_than_peer_a"])
                         if s["slower_than_peer_a"] else ""))
    else:
        lines.append(f"- vs Peer A: none; {PEER_A_NOT_COMPARED}")
    if s.get("geomean_speedup_vs"):
        lines.append("- speedup of ours (eager) over each baseline, geometric mean: " + ", ".join(
            f"{k} {f(v)}" for k, v in s["geomean_speedup_vs"].items()))
    lines.append(f"- fp16 time / bf16 time (ours eager), geometric mean: {f(s.get('fp16_over_bf16_time_geomean'), 3)}")
    if s.get("eff_at_T4096"):
        lines.append("- efficiency at T=4096 (eager / graph): " + ", ".join(
            f"{k} {f(v['eff'])}/{f(v['eff_graph'])}" for k, v in s["eff_at_T4096"].items()))
    if s.get("cold_first_call_s"):
        lines.append("- cold first call (compile of every kernel, empty caches): " + ", ".join(
            f"{k} {v:.2f} s" for k, v in s["cold_first_call_s"].items()))
    if s.get("max_extra_over_bound") is not None:
        lines.append(f"- peak extra memory / bound, worst point: {s['max_extra_over_bound']:.2f}")
    for key, points in s.get("int8_speedup", {}).items():
        name, mode = key.split()
        label, target = INT8_TARGETS[name]
        met = sum(1 for v in points.values() if v >= target)
        lines.append(f"- {label}, speedup over the unquantised fast path ({mode}): geometric mean "
                     f"{f(_geomean(points.values()))}, >= {target}x at {met} of {len(points)} points; "
                     + ", ".join(f"{p} {v:.2f}x" for p, v in points.items()))
    measured = [r for r in rows if "skipped" not in r]
    graphed = [r for r in measured if "graph_equals_eager" in r]
    graph_mismatch = [f"{r['shape']} T={r['T']} {r['dtype']}" for r in graphed if not r["graph_equals_eager"]]
    not_graphed = len(measured) - len(graphed)
    verdict = ("NO at " + ", ".join(graph_mismatch) if graph_mismatch else
               f"yes at all {len(graphed)} replayed points" if graphed else "not replayed")
    lines.append("- CUDA graph replay bitwise equal to eager: " + verdict
                 + (f"; {not_graphed} measured points without a replay" if graphed and not_graphed else ""))
    return lines


def compact_table(rows: list[dict]) -> str:
    """A narrow text table for terminals and log tails (the Markdown file has every column)."""
    head = f"{'shape':<17} {'T':>5} {'dtype':<5} {'floor':>7} {'ours':>7} {'graph':>7} {'eff':>5} {'effG':>5} {'peerA':>6} " \
           f"{'vsA':>5} {'cuBLAS':>7} {'grpmm':>7} {'relerr':>8} chk"
    lines = [head + "   (times in µs; peerA: H100 quote from baselines.md, vsA on that H100 only)"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['shape']:<17} {r['T']:>5} {r['dtype']:<5} {r['skipped'][:60]}")
            continue
        t = r["times_us"]
        num = lambda v, w, d=0: f"{v:>{w}.{d}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{'-':>{w}}"  # noqa: E731
        lines.append(f"{r['shape']:<17} {r['T']:>5} {r['dtype']:<5} {num(r['floor_us'], 7)} {num(t.get('ours'), 7)} "
                     f"{num(t.get('graph'), 7)} {num(r.get('eff'), 5, 2)} {num(r.get('eff_graph'), 5, 2)} "
                     f"{num(r.get('peer_a_us'), 6)} {num(r.get('vs_peer_a'), 5, 2)} {num(t.get('cublas'), 7)} "
                     f"{num(t.get('grouped_mm'), 7)} {r['rel_err']:>8.1e} {'ok' if r.get('pass') else 'FAIL'}")
    return "\n".join(lines)


def readme_table(rows: list[dict], dtype: str = "bf16") -> str:
    """The README's table: one dtype's points, the columns the issues' targets are about (`x` = unquantised graph time over
    the INT8 graph time at the same point). `python -m simple_moe bench --readme-table results.json` prints it."""
    head = ["shape", "T", "floor µs", "ours µs", "ours graph µs", "eff", "eff graph", "peer A µs (quoted)", "ours vs peer A",
            "grouped_mm µs", "W8A16 graph µs", "W8A16 x", "W8A8 graph µs", "W8A8 x"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        if r.get("dtype") != dtype or "skipped" in r:
            continue
        t, graph = r["times_us"], _num(r["times_us"].get("graph"))
        cells = [r["shape"], str(r["T"]), _fmt(r["floor_us"]), _fmt(t.get("ours")), _fmt(t.get("graph")), _fmt(r.get("eff"), 2),
                 _fmt(r.get("eff_graph"), 2), _fmt(r.get("peer_a_us")), _fmt(r.get("vs_peer_a"), 2), _fmt(t.get("grouped_mm"))]
        for scheme in ("w8a16", "w8a8"):
            int8_graph = _num(r.get("int8", {}).get(scheme, {}).get("graph_us"))
            cells += [_fmt(int8_graph), _fmt(graph / int8_graph, 2) if graph and int8_graph else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> str | None:
    """One column per shape: time vs T (log-log) on top, efficiency vs T below. Returns None, or why nothing was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        return f"matplotlib not importable ({err}); run `python -m simple_moe.bench --plot-only FILE.json` elsewhere"
    rows = [r for r in result["rows"] if "skipped" not in r]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if not shapes:
        return "no measured points"
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes), 7.5), squeeze=False)
    styles = {"bf16": "-", "fp16": "--"}
    series = [("floor", "floor", "k"), ("ours", "ours", "C0"), ("graph", "ours (graph)", "C1"),
              ("peer_a", "peer A (H100 quote)", "C2"), ("cublas", "cuBLAS cb", "C3"), ("grouped_mm", "grouped_mm", "C4"),
              ("loop", "torch loop", "C5")]
    for col, shape in enumerate(shapes):
        top, bottom = axes[0][col], axes[1][col]
        for dtype in dict.fromkeys(r["dtype"] for r in rows):
            pts = sorted((r for r in rows if r["shape"] == shape and r["dtype"] == dtype), key=lambda r: r["T"])
            if not pts:
                continue
            for key, label, color in series:
                xs, ys = [], []
                for r in pts:
                    v = r["floor_us"] if key == "floor" else r.get("peer_a_us") if key == "peer_a" else _num(r["times_us"].get(key))
                    if v:
                        xs.append(r["T"])
                        ys.append(v)
                if xs:
                    top.plot(xs, ys, styles.get(dtype, ":"), color=color, marker="o", ms=3, label=f"{label} {dtype}")
            for key, label, color in (("eff", "ours", "C0"), ("eff_graph", "ours (graph)", "C1")):
                xs = [r["T"] for r in pts if r.get(key)]
                ys = [r[key] for r in pts if r.get(key)]
                if xs:
                    bottom.plot(xs, ys, styles.get(dtype, ":"), color=color, marker="o", ms=3, label=f"{label} {dtype}")
        top.set_xscale("log", base=2)
        top.set_yscale("log")
        top.set_title(shape)
        top.set_xlabel("tokens T")
        top.set_ylabel("time µs")
        top.grid(True, which="both", alpha=0.3)
        bottom.set_xscale("log", base=2)
        bottom.set_ylim(0, 1.05)
        bottom.set_xlabel("tokens T")
        bottom.set_ylabel("efficiency = floor / time")
        bottom.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=6)
    axes[1][0].legend(fontsize=6)
    fig.suptitle(f"simple_moe on {result['environment']['gpu']} ({result['environment']['date'][:10]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_reports(result: dict, out_dir: str, stem: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(result))
    why = plot(result, paths["png"])
    if why:
        print(f"bench: no PNG: {why}", file=sys.stderr)
        paths.pop("png")
    return paths


# ---------------------------------------------------------------------------------------------------------------------------------
# Command line


def _parse_shapes(args) -> list[tuple[str, tuple]]:
    if args.cpu_smoke and not args.shape and args.preset == "all":
        return [SMOKE_SHAPE]
    shapes = []
    if args.shape:
        for spec in args.shape:
            try:
                parts = [int(p) for p in spec.split(",")]
            except ValueError:
                parts = []
            if len(parts) != 4 or min(parts) < 1 or parts[1] > parts[0]:
                raise SystemExit(f"--shape: expected E,top_k,H,I with 1 <= top_k <= E, got {spec!r}")
            shapes.append((f"custom-{parts[0]}x{parts[1]}-{parts[2]}-{parts[3]}", tuple(parts)))
        if args.preset == "all":
            return shapes
    names = list(PRESETS) if args.preset == "all" else args.preset.split(",")
    for name in names:
        if name not in PRESETS:
            raise SystemExit(f"--preset: unknown {name!r}; expected one of {', '.join(PRESETS)} or all")
        shapes.append((name, PRESETS[name]))
    return shapes


def results_stem(args, gpu: str, columns) -> str:
    """The results' file name: bench_<gpu>, or bench_<gpu>_partial for a run of less than the default grid (so that it does
    not replace the full table the README cites), bench_cpu_smoke on the CPU."""
    if args.cpu_smoke:
        return "bench_cpu_smoke"
    partial = (args.preset != "all" or bool(args.shape) or bool(args.tokens) or args.dtype != "bf16,fp16" or args.quick
               or set(columns) != set(COLUMNS) or args.int8_dtypes != "bf16")
    return "bench_" + gpu_slug(gpu) + ("_partial" if partial else "")


def _check_out_dir(path: str) -> None:
    """`path` is a folder (made if missing) where a file can be written; SystemExit naming --out otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise SystemExit(f"--out: cannot write results into {path!r} ({err.strerror or err})") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simple_moe bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="all", help=f"comma list of {', '.join(PRESETS)}, or all (default)")
    p.add_argument("--shape", action="append", help="E,top_k,H,I (repeatable); replaces the presets unless --preset is given")
    p.add_argument("--tokens", default=None, help="comma list of T (default 1,16,64,256,1024,4096)")
    p.add_argument("--dtype", default="bf16,fp16", help="comma list of bf16, fp16 (default both)")
    p.add_argument("--out", default="benchmarks/results", help="output folder (default benchmarks/results)")
    p.add_argument("--columns", default=",".join(COLUMNS),
                   help=f"comma list of {', '.join(COLUMNS)} (ours always runs); drop slow baselines here")
    p.add_argument("--quick", action="store_true", help="short timings (warm-up 10 ms, repeat 30 ms) and no torch loop")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--loop-max-rows", type=int, default=8192, help="skip the torch loop above this many T*top_k rows")
    p.add_argument("--budget-s", type=float, default=0.0, help="wall-clock budget: timings shrink, then points are skipped")
    p.add_argument("--int8-dtypes", default="bf16", help="activation dtypes that get the INT8 columns (default bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shape on the CPU through Triton's interpreter, fake timer: tests the script, not the speed")
    p.add_argument("--plot-only", metavar="FILE.json", help="redraw the PNG from a results JSON, nothing else")
    p.add_argument("--readme-table", metavar="FILE.json", help="print the README's bf16 table from a results JSON, nothing else")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)

    for flag, path in (("--readme-table", args.readme_table), ("--plot-only", args.plot_only)):
        if path and not os.path.isfile(path):
            raise SystemExit(f"{flag}: no results JSON at {path!r}")
    if args.readme_table:
        with open(args.readme_table) as f:
            print(readme_table(json.load(f)["rows"]))
        return 0
    if args.plot_only:
        with open(args.plot_only) as f:
            result = json.load(f)
        stem = os.path.splitext(os.path.basename(args.plot_only))[0]
        out_dir = os.path.dirname(os.path.abspath(args.plot_only)) if args.out == "benchmarks/results" else args.out
        png = os.path.join(out_dir, f"{stem}.png")
        why = plot(result, png)
        print(f"bench: {why}" if why else f"bench: wrote {png}")
        return 1 if why else 0

    shapes = _parse_shapes(args)
    try:
        tokens = ([int(t) for t in args.tokens.split(",")] if args.tokens
                  else list(SMOKE_TOKENS if args.cpu_smoke else DEFAULT_TOKENS))
    except ValueError:
        raise SystemExit(f"--tokens: expected a comma list of positive ints, got {args.tokens!r}") from None
    if min(tokens) < 1:
        raise SystemExit("--tokens: expected positive token counts")
    if args.budget_s < 0:
        raise SystemExit(f"--budget-s: expected seconds >= 0 (0: no budget), got {args.budget_s}")
    _check_out_dir(args.out)  # before measuring: a run must not be lost to a folder it cannot write
    dtype_names = args.dtype.split(",") if not (args.cpu_smoke and args.dtype == "bf16,fp16") else ["fp16"]
    for name in dtype_names:
        if name not in DTYPES:
            raise SystemExit(f"--dtype: unknown {name!r}; expected bf16 or fp16")
    dtypes = [DTYPES[n] for n in dtype_names]
    columns = {c.strip() for c in args.columns.split(",") if c.strip()} | {"ours"}
    unknown = columns - set(COLUMNS)
    if unknown:
        raise SystemExit(f"--columns: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(COLUMNS)}")
    int8_names = args.int8_dtypes.split(",") if not (args.cpu_smoke and args.int8_dtypes == "bf16") else ["fp16"]
    unknown_int8 = [n for n in int8_names if n not in DTYPES]
    if unknown_int8:
        raise SystemExit(f"--int8-dtypes: unknown {', '.join(unknown_int8)}; expected bf16 and/or fp16")
    int8_dtypes = tuple(DTYPES[n] for n in int8_names)
    settings = Settings(columns=tuple(c for c in COLUMNS if c in columns), warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                        loop_max_rows=args.loop_max_rows, seed=args.seed, int8_dtypes=int8_dtypes)
    if args.quick:
        settings.warmup_ms, settings.rep_ms = 10.0, 30.0
        settings.columns = tuple(c for c in settings.columns if c != "loop")

    if args.cpu_smoke and not triton_interpreting():
        from .demo import rerun_under_interpreter

        return rerun_under_interpreter("simple_moe.bench", argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench: no CUDA device; use --cpu-smoke to test the script on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    timer = FakeTimer() if args.cpu_smoke else CudaTimer()
    started, budget = time.monotonic(), Budget(args.budget_s)  # the budget covers measuring the ceilings too
    settings.ceilings = ceilings_for(device)  # measured here on a GPU other than baselines.md's H100
    settings.gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"bench: ceilings ({settings.ceilings.source}): " + ", ".join(
        f"{k} {v:.2f}" for k, v in settings.ceilings.as_json().items() if isinstance(v, float)), file=sys.stderr)
    progress = Progress(len(shapes) * len(tokens) * len(dtypes), enabled=not args.no_progress)
    rows: list[dict] = []
    interrupted = False
    try:
        run_points(shapes, tokens, dtypes, settings, timer, device, budget, progress, rows)
    except KeyboardInterrupt:  # e.g. `timeout -s INT`: keep and report what was measured
        interrupted = True
        print(f"bench: interrupted after {len(rows)} points; writing what was measured", file=sys.stderr)
    finally:
        progress.close()
    env = environment(device, timer, settings.ceilings)
    env.update(smoke=bool(args.cpu_smoke), interrupted=interrupted, argv=argv, wall_s=time.monotonic() - started,
               columns=list(settings.columns), warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms)
    result = {"environment": env, "rows": rows, "summary": summary(rows, settings.gpu)}
    stem = results_stem(args, env["gpu"], settings.columns)
    paths = write_reports(result, args.out, stem)
    print(f"bench: {len(rows)} points in {env['wall_s']:.0f} s; wrote " + ", ".join(paths.values()))
    print(compact_table(rows))
    print("\n".join(_summary_lines(result["summary"], rows)))
    summ = result["summary"]
    ok = summ["measured"] > 0 and not summ["failed_checks"] and not summ["errored_points"] and not interrupted
    if not summ["measured"]:
        print("bench: no point was measured (time budget spent, or every point failed)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
