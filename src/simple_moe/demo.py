"""`python -m simple_moe demo`: run one MoE layer through every path and check it against the float64 reference.

On a GPU: the Qwen3-30B-A3B expert shape (E=128, top_k=8, H=2048, I=768), T=64 tokens, bf16 and fp16, through the fast path
(eager and replayed from a CUDA graph) and through the cuBLAS and torch-loop GEMM callbacks.
Without a GPU: a small shape through Triton's interpreter (the same kernels, run by Python on the CPU; the demo restarts itself with
TRITON_INTERPRET=1 when needed), fp32 and fp16. `--no-interpret` runs the plain-torch CPU fallback instead.

Prints one line per (path, dtype): relative L2 error against `reference_moe`, the tolerance, PASS or FAIL; exits 1 on any FAIL.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

from ._host import positive_int, triton_interpreting

GPU_SHAPE = ("qwen3-30b-a3b", (128, 8, 2048, 768))  # E, top_k, H, I
GPU_TOKENS = 64
CPU_SHAPE = ("small", (8, 2, 64, 32))
CPU_TOKENS = 12
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative L2 error against float64
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def rerun_under_interpreter(module: str, argv: list[str]) -> int:
    """TRITON_INTERPRET must be set before triton is imported (simple_moe imports it): run `module` again in a child process."""
    import simple_moe

    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    src = os.path.dirname(os.path.dirname(os.path.abspath(simple_moe.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([src] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.call([sys.executable, "-m", module, *argv], env=env)


def make_layer(shape, num_tokens: int, dtype, device, seed: int = 0):
    """Inputs as in baselines.md: x = randn(T, H), w1 = randn(E, 2I, H)/sqrt(H), w2 = randn(E, H, I)/sqrt(I), softmax top-k."""
    from .routing import route

    num_experts, top_k, hidden, inter = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen, device=device, dtype=dtype)
    w1 = torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=device, dtype=dtype) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen, device=device, dtype=dtype) / inter**0.5
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device)
    scales, selected = route(logits, top_k)
    return x, selected, scales, w1, w2


def graph_replay(run, like: torch.Tensor) -> torch.Tensor:
    """Captures `run(output=...)` into a CUDA graph (warmed up on a side stream) and returns the replayed output."""
    static_out = torch.empty_like(like)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(output=static_out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(output=static_out)
    static_out.fill_(float("nan"))  # whatever the replay does not write stays NaN and fails the check
    graph.replay()
    torch.cuda.synchronize()
    return static_out


def check_paths(shape, num_tokens: int, dtypes, device, with_graph: bool, fast_label: str = "fast path (Triton)") -> list[dict]:
    from .callbacks import cublas_gemm, torch_loop_gemm
    from .pipeline import fused_moe_simple
    from .reference import reference_moe

    rows = []
    for dtype in dtypes:
        x, selected, scales, w1, w2 = make_layer(shape, num_tokens, dtype, device)
        ref = reference_moe(x, selected, scales, w1, w2)

        def fast(output=None):
            return fused_moe_simple(x, selected, scales, w1, w2, output=output)

        paths = [(fast_label, fast)]
        if with_graph:
            paths.append(("fast path, CUDA graph replay", lambda: graph_replay(fast, x)))
        paths += [("cuBLAS callbacks", lambda: fused_moe_simple(x, selected, scales, w1, w2, cublas_gemm, cublas_gemm)),
                  ("torch-loop callbacks", lambda: fused_moe_simple(x, selected, scales, w1, w2, torch_loop_gemm, torch_loop_gemm))]
        for name, run in paths:
            poisoned = None
            if name == fast_label:
                poisoned = torch.full_like(x, float("nan"))  # rows the kernels fail to write stay NaN
                out = fast(output=poisoned)
            else:
                out = run()
            err = ((out.double() - ref).norm() / ref.norm()).item()
            if err != err:  # NaN
                err = float("inf")
            rows.append({"path": name, "dtype": DTYPE_NAMES[dtype], "shape": shape, "T": num_tokens, "rel_err": err,
                         "tolerance": TOLERANCE[dtype], "pass": err < TOLERANCE[dtype]})
    return rows


def report(rows: list[dict], shape_name: str) -> int:
    """Prints the table; returns 1 when any row failed, else 0."""
    header = f"{'path':<30} {'dtype':<5} {'shape (T, E, top_k, H, I)':<28} {'rel err':>9} {'tolerance':>9}  result"
    print(header)
    print("-" * len(header))
    for r in rows:
        e, k, h, i = r["shape"]
        shape = f"{shape_name} ({r['T']},{e},{k},{h},{i})"
        print(f"{r['path']:<30} {r['dtype']:<5} {shape:<28} {r['rel_err']:>9.2e} {r['tolerance']:>9.0e}  "
              f"{'PASS' if r['pass'] else 'FAIL'}")
    failed = sum(not r["pass"] for r in rows)
    print(f"\n{len(rows) - failed} of {len(rows)} passed" + (f", {failed} FAILED" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m simple_moe demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=positive_int, default=None,
                   help=f"T (default {GPU_TOKENS} on a GPU, {CPU_TOKENS} on the CPU)")
    p.add_argument("--no-interpret", action="store_true", help="without a GPU: run the plain-torch fallback, not the interpreter")
    args = p.parse_args(argv)

    if torch.cuda.is_available() and not triton_interpreting():
        device = torch.device("cuda")
        (shape_name, shape), dtypes = GPU_SHAPE, (torch.bfloat16, torch.float16)
        mode = f"GPU: {torch.cuda.get_device_name(device)}, compiled Triton kernels"
    else:
        if not triton_interpreting() and not args.no_interpret:
            return rerun_under_interpreter("simple_moe.demo", argv)
        device = torch.device("cpu")
        (shape_name, shape), dtypes = CPU_SHAPE, (torch.float32, torch.float16)
        mode = ("CPU: Triton's interpreter (TRITON_INTERPRET=1): the same kernels run by Python; slow, small shape"
                if triton_interpreting() else "CPU: plain-torch fallback (no Triton kernels run)")
    num_tokens = args.tokens or (GPU_TOKENS if device.type == "cuda" else CPU_TOKENS)
    print(f"simple_moe demo -- mode: {mode}")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="simple_moe: tensors on cpu")
        interpreted = device.type == "cuda" or triton_interpreting()
        rows = check_paths(shape, num_tokens, dtypes, device, with_graph=device.type == "cuda",
                           fast_label="fast path (Triton)" if interpreted else "fast path (torch fallback)")
    return report(rows, shape_name)


if __name__ == "__main__":
    sys.exit(main())
