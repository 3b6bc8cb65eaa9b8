"""simple_moe inside Hugging Face transformers: prefill and decode times of a 4-layer Qwen3-MoE model at Qwen3-30B-A3B sizes.

    PYTHONPATH=src python3 examples/transformers_qwen3.py --out results/transformers_qwen3_h100
    PYTHONPATH=src TRITON_INTERPRET=1 python3 examples/transformers_qwen3.py --tiny --device cpu --dtypes fp32 --out /tmp/t

The model has Qwen3-30B-A3B's layer (hidden 2048, 128 experts of width 768, top-8, 32 query / 4 KV heads of 128, vocabulary
151936) with 4 of its 48 layers and random weights (no download). Each MoE layer runs with one experts implementation at a time:
- `simple_moe`: ours, registered through `simple_moe.integrations.transformers.register()`;
- `grouped_mm`: transformers' default (`torch.nn.functional.grouped_mm` / `torch._grouped_mm`);
- `eager`: the model's own per-expert loop.

Timings (milliseconds, median of `triton.testing.do_bench` on CUDA; median of wall-clock repeats on CPU):
- prefill: one forward of `batch x tokens` new tokens with `logits_to_keep=1` (what generate() does);
- decode: one forward of one new token per sequence on top of a `context`-token KV cache (DynamicCache, cropped back after each
  call so every repeat sees the same cache). Note generate() itself swaps `grouped_mm` for `batched_mm` while decoding; this
  benchmark times the implementation as named.
- with `--cuda-graph` (CUDA only): the same prefill shapes, and `batch x 1` token forwards without a KV cache (the MoE work of a
  decode step, without its attention over the cache), captured once in a CUDA graph and replayed: the device time without the
  host's launch overhead, which dominates a 4-layer model run eagerly. Implementations that cannot be captured (a host sync:
  `eager` always, `grouped_mm` where torch falls back to a per-expert loop) are recorded as not capturable.
Before timing, simple_moe's logits are checked against grouped_mm's on the prefill input (relative L2 error, recorded).

Writes `<out>.json` (environment, configuration, every measurement) and `<out>.md` (one table per dtype).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

IMPLEMENTATIONS = ("simple_moe", "grouped_mm", "eager")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

QWEN3_30B_A3B_4_LAYERS = dict(vocab_size=151936, hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
                              num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=4,
                              num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=32768)
TINY = dict(vocab_size=128, hidden_size=64, moe_intermediate_size=32, intermediate_size=64, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=512)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output path without extension: writes OUT.json and OUT.md")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma list of fp16, bf16, fp32")
    p.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    p.add_argument("--prefill", default="1x512,1x2048,4x2048", help="comma list of BATCHxTOKENS prefill shapes")
    p.add_argument("--decode", default="1,8,32,64", help="comma list of decode batch sizes")
    p.add_argument("--context", type=int, default=512, help="KV-cache length (tokens per sequence) before the decode step")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="also time CUDA-graph replays (CUDA only; --no-cuda-graph to skip)")
    p.add_argument("--graph-implementations", default="simple_moe,grouped_mm",
                   help="implementations to try capturing (eager always syncs with the host)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny model and shapes, to check the code path (e.g. on CPU)")
    p.add_argument("--warmup-ms", type=float, default=100.0, help="do_bench warmup (CUDA)")
    p.add_argument("--rep-ms", type=float, default=500.0, help="do_bench measuring time (CUDA)")
    p.add_argument("--cpu-repeats", type=int, default=3, help="timed repeats per measurement on CPU")
    args = p.parse_args(argv)
    if args.tiny:
        defaults = p.parse_args(["--out", args.out])
        if args.prefill == defaults.prefill:
            args.prefill = "1x16"
        if args.decode == defaults.decode:
            args.decode = "2"
        if args.context == defaults.context:
            args.context = 8
    return args


def build_model(config_kwargs: dict, dtype: torch.dtype, device: str):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(**config_kwargs)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the target dtype (no fp32 copy of a 6 GB model)
    try:
        with torch.device(device):
            model = Qwen3MoeForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_timer(device: str, args):
    if device.startswith("cuda"):
        import triton.testing

        def cuda_time(fn):
            return triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")

        return cuda_time

    def cpu_time(fn):
        fn()  # warm-up (compiles nothing on CPU, but fills caches and the interpreter's)
        samples = []
        for _ in range(args.cpu_repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    return cpu_time


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def decode_step(model, cache, tokens):
    """One new token per sequence on top of the cached ones, then that token is removed from the cache again.

    `crop(-n)` removes the last n tokens in every transformers 5.x (a positive argument meant an absolute length in <= 5.17 and
    is an error from 5.18 on)."""
    out = model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.crop(-tokens.shape[1])
    return out.logits


def graph_time(model, tokens, time_ms):
    """Captures `model(tokens)` (no KV cache, last position's logits) in a CUDA graph and times its replay.

    Returns (ms, None), or (None, reason) when the forward cannot be captured."""
    def forward():
        return model(input_ids=tokens, use_cache=False, logits_to_keep=1).logits

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (Triton compiles, allocator pools)
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            forward()
    except Exception as e:  # a host sync inside the forward invalidates the capture
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return time_ms(graph.replay), None


def environment(device: str) -> dict:
    import transformers
    import triton

    import simple_moe

    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton.__version__,
        "simple_moe": simple_moe.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "timer": "triton.testing.do_bench median" if device.startswith("cuda") else "wall-clock median",
    }


def run(args, report: dict) -> None:
    """Fills `report["checks"]` and `report["results"]` as it goes (main writes whatever is there, even after an error).

    All host-launched measurements of every dtype come first, the CUDA-graph ones last: a capture that fails could in principle
    leave the device in a bad state, and must not cost the other numbers."""
    from transformers import DynamicCache

    from simple_moe.integrations import transformers as smt

    smt.register()
    device = args.device
    config_kwargs = report["model"]
    time_ms = make_timer(device, args)
    prefill_shapes = [tuple(int(v) for v in s.split("x")) for s in args.prefill.split(",") if s]
    decode_batches = [int(b) for b in args.decode.split(",") if b]
    implementations = [i for i in args.implementations.split(",") if i]
    gen = torch.Generator().manual_seed(1)
    vocab = config_kwargs["vocab_size"]
    results, checks = report["results"], report["checks"]
    models = {}
    for dtype_name in [d for d in args.dtypes.split(",") if d]:
        model = models[dtype_name] = build_model(config_kwargs, DTYPES[dtype_name], device)
        # Correctness first: simple_moe's logits against grouped_mm's on the first prefill shape.
        batch, tokens = prefill_shapes[0]
        ids = torch.randint(0, vocab, (batch, tokens), generator=gen).to(device)
        with torch.no_grad():
            model.set_experts_implementation("grouped_mm")
            ref = model(ids).logits
            model.set_experts_implementation("simple_moe")
            ours = model(ids).logits
        checks.append({"dtype": dtype_name, "batch": batch, "tokens": tokens, "rel_err_vs_grouped_mm": rel_err(ours, ref)})
        print(f"[{dtype_name}] simple_moe vs grouped_mm logits: rel err {checks[-1]['rel_err_vs_grouped_mm']:.2e}", flush=True)
        del ref, ours
        for implementation in implementations:
            model.set_experts_implementation(implementation)
            with torch.no_grad():
                for batch, tokens in prefill_shapes:
                    ids = torch.randint(0, vocab, (batch, tokens), generator=gen).to(device)
                    ms = time_ms(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits)
                    results.append({"dtype": dtype_name, "implementation": implementation, "phase": "prefill",
                                    "batch": batch, "tokens": tokens, "ms": ms})
                    print(f"[{dtype_name}] {implementation:10s} prefill {batch}x{tokens}: {ms:9.3f} ms", flush=True)
                for batch in decode_batches:
                    context = torch.randint(0, vocab, (batch, args.context), generator=gen).to(device)
                    cache = DynamicCache(config=model.config)
                    model(input_ids=context, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    step = torch.randint(0, vocab, (batch, 1), generator=gen).to(device)
                    ms = time_ms(lambda: decode_step(model, cache, step))
                    results.append({"dtype": dtype_name, "implementation": implementation, "phase": "decode",
                                    "batch": batch, "tokens": 1, "context": args.context, "ms": ms})
                    print(f"[{dtype_name}] {implementation:10s} decode  bs={batch} ctx={args.context}: {ms:9.3f} ms", flush=True)
    if not (args.cuda_graph and device.startswith("cuda")):
        return
    shapes = [("prefill", b, t) for b, t in prefill_shapes] + [("decode", b, 1) for b in decode_batches]
    for dtype_name, model in models.items():
        for implementation in [i for i in args.graph_implementations.split(",") if i in implementations]:
            model.set_experts_implementation(implementation)
            for phase, batch, tokens in shapes:
                ids = torch.randint(0, vocab, (batch, tokens), generator=gen).to(device)
                with torch.no_grad():
                    ms, failure = graph_time(model, ids, time_ms)
                row = {"dtype": dtype_name, "implementation": implementation, "phase": f"{phase}_graph", "batch": batch,
                       "tokens": tokens, "ms": ms}
                if failure:
                    row["not_capturable"] = failure
                results.append(row)
                shown = f"{ms:9.3f} ms" if ms is not None else f"not capturable ({failure})"
                print(f"[{dtype_name}] {implementation:10s} {phase} {batch}x{tokens} in a CUDA graph: {shown}", flush=True)


def to_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Qwen3-MoE ({report['model']['num_hidden_layers']} layers, {report['model']['num_experts']} experts x "
             f"{report['model']['moe_intermediate_size']}, top-{report['model']['num_experts_per_tok']}, hidden "
             f"{report['model']['hidden_size']}) in transformers {env['transformers']}",
             "", f"{env['device']}, torch {env['torch']}, triton {env['triton']}; {env['timer']}; times in ms.", ""]
    if "error" in report:
        lines += [f"**Stopped early: {report['error']}**", ""]
    for check in report["checks"]:
        lines.append(f"- {check['dtype']}: simple_moe vs grouped_mm logits, rel. L2 error {check['rel_err_vs_grouped_mm']:.2e} "
                     f"({check['batch']}x{check['tokens']} tokens)")
    implementations = list(dict.fromkeys(r["implementation"] for r in report["results"]))
    for dtype in dict.fromkeys(r["dtype"] for r in report["results"]):
        rows = {}
        for r in report["results"]:
            if r["dtype"] != dtype:
                continue
            shape = {"prefill": f"prefill {r['batch']}x{r['tokens']}",
                     "decode": f"decode bs={r['batch']} ctx={r.get('context')}",
                     "prefill_graph": f"prefill {r['batch']}x{r['tokens']}, CUDA graph",
                     "decode_graph": f"{r['batch']}x1 tokens, no KV cache, CUDA graph"}[r["phase"]]
            rows.setdefault(shape, {})[r["implementation"]] = r["ms"]
        header = ["shape"] + implementations
        speedups = [f"simple_moe vs {i}" for i in implementations if i != "simple_moe" and "simple_moe" in implementations]
        lines += ["", f"## {dtype}", "", "| " + " | ".join(header + speedups) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(header) - 1 + len(speedups))) + "|"]
        for shape, times in rows.items():
            def cell(i):
                if i not in times:
                    return ""
                return "not capturable" if times[i] is None else f"{times[i]:.3f}"

            cells = [shape] + [cell(i) for i in implementations]
            for i in implementations:
                if i != "simple_moe" and "simple_moe" in implementations:
                    ok = times.get(i) is not None and times.get("simple_moe") is not None
                    cells.append(f"{times[i] / times['simple_moe']:.2f}x" if ok else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --tiny --device cpu with TRITON_INTERPRET=1 to test the script)")
    report = {"environment": environment(args.device), "model": dict(TINY if args.tiny else QWEN3_30B_A3B_4_LAYERS),
              "arguments": vars(args), "checks": [], "results": []}
    try:
        run(args, report)
    except BaseException as e:  # keep what was measured; the error goes into the report and is raised again
        report["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=2)
        with open(args.out + ".md", "w") as f:
            f.write(to_markdown(report))
        print(f"wrote {args.out}.json and {args.out}.md")
    return report


if __name__ == "__main__":
    main()
