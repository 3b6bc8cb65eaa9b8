"""The demo and the benchmark script on the CPU: `python -m simple_moe demo` through Triton's interpreter, `bench --cpu-smoke`
(the benchmark's own code at a tiny shape, fake timer), and the benchmark's report on synthetic GPU-like results."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _run(args, *, interpret: bool, timeout: float = 240):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_cpu_interpreter():
    proc = _run(["-m", "simple_moe", "demo"], interpret=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "mode: CPU: Triton's interpreter" in out
    lines = [line for line in out.splitlines() if line.rstrip().endswith(("PASS", "FAIL"))]
    assert len(lines) == 6 and all(line.rstrip().endswith("PASS") for line in lines), out  # 3 paths x fp32, fp16
    assert "6 of 6 passed" in out


def test_demo_report_exit_code():
    from simple_moe.demo import report

    row = {"path": "fast path (Triton)", "dtype": "fp16", "shape": (8, 2, 64, 32), "T": 4, "rel_err": 1e-4, "tolerance": 2e-3,
           "pass": True}
    assert report([row], "small") == 0
    assert report([row, dict(row, rel_err=5e-3, **{"pass": False})], "small") == 1


def test_do_bench_clean_l2_times_fn_after_the_read(monkeypatch):
    """`do_bench_clean_l2` (CUDA only, so its pieces are faked here): each timed run reads the spare buffer, then runs `fn`;
    the read alone is timed too and subtracted."""
    import triton.testing

    import simple_moe.bench as bench

    calls = []
    spare = torch.ones(16, dtype=torch.int8)
    monkeypatch.setattr(bench, "_clean_l2_buffer", lambda index: spare)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.Tensor, "sum", lambda self, **kw: calls.append("read"))

    def fake_do_bench(run, warmup, rep, return_mode):
        assert return_mode == "median"
        calls.clear()
        run()
        return {("read", "fn"): 0.125, ("read",): 0.1}[tuple(calls)]  # ms: the pair, the read alone

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    assert bench.do_bench_clean_l2(lambda: calls.append("fn")) == pytest.approx(0.025)


@pytest.mark.slow
def test_bench_cpu_smoke(tmp_path):
    """The benchmark's whole code path on the CPU: checks, every column, INT8, cold compile, skip rule, reports; then --plot-only."""
    out_dir = tmp_path / "results"
    proc = _run(["-m", "simple_moe", "bench", "--cpu-smoke", "--tokens", "1,80", "--loop-max-rows", "100", "--no-progress",
                 "--int8-dtypes", "fp16", "--out", str(out_dir)], interpret=False)  # restarts itself under the interpreter
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out_dir / "bench_cpu_smoke.json").read_text())
    rows = result["rows"]
    assert [r["T"] for r in rows] == [1, 80] and all(r["pass"] for r in rows)
    assert rows[0]["cold"] and not rows[1]["cold"]
    assert rows[1]["checked_tokens"] == 64  # T > 64: the sampled-token reference
    for r in rows:
        assert r["errors"]["ours"] < 2e-3 and r["graph_equals_eager"] and r["all_rows_written"]
        assert set(r["times_us"]) == {"ours", "graph", "cublas", "grouped_mm", "loop"}
        assert r["baselines_within_tolerance"]
        assert r["int8"]["status"] == "ok", r["int8"]
        for scheme in ("w8a16", "w8a8"):
            assert isinstance(r["int8"][scheme]["time_us"], float) and isinstance(r["int8"][scheme]["graph_us"], float)
            assert r["int8"][scheme]["err_vs_unquantized"] < 0.05
    assert rows[1]["times_us"]["loop"].startswith("skipped")  # 160 rows > --loop-max-rows 100
    assert result["environment"]["ceilings"]["source"] == "baselines.md (H100)"  # the CPU measures no ceilings
    md = (out_dir / "bench_cpu_smoke.md").read_text()
    assert "CPU SMOKE TEST" in md and "| smoke | 80 | fp16 |" in md and "W8A16 graph µs" in md
    assert all(r["gpu_state_after_ours"] == {} for r in rows)  # the fake timer reads no clock
    assert "W8A16 at T <= 64, speedup over the unquantised fast path (graph)" in md  # issue 5's targets, summarised
    assert set(result["summary"]["int8_speedup"]) == {"w8a16 eager", "w8a16 graph"}  # T=1, 80: no W8A8 point at T >= 1024
    png = out_dir / "bench_cpu_smoke.png"
    if png.exists():
        png.unlink()
        proc = _run(["-m", "simple_moe.bench", "--plot-only", str(out_dir / "bench_cpu_smoke.json")], interpret=False)
        assert proc.returncode == 0 and png.exists(), proc.stdout + proc.stderr


def test_gpu_state_reads_nvml_or_nothing(monkeypatch):
    """The clock, power and temperature through torch's NVML wrappers (power in mW -> W); {} where NVML is missing."""
    from simple_moe.bench import gpu_state

    monkeypatch.setattr(torch.cuda, "clock_rate", lambda: 1605)
    monkeypatch.setattr(torch.cuda, "power_draw", lambda: 699_600)
    monkeypatch.setattr(torch.cuda, "temperature", lambda: 51)
    assert gpu_state() == {"sm_clock_mhz": 1605, "power_w": 700, "temperature_c": 51}

    def no_nvml():
        raise ModuleNotFoundError("pynvml does not seem to be installed")

    monkeypatch.setattr(torch.cuda, "clock_rate", no_nvml)
    assert gpu_state() == {}


def test_bench_keeps_the_int8_target_columns_behind_the_budget():
    """A point behind the time budget still measures the INT8 scheme whose issue-5 target covers its T."""
    from simple_moe.bench import int8_schemes_to_measure

    assert [int8_schemes_to_measure(t, lean=False) for t in (1, 256, 4096)] == [("w8a16", "w8a8")] * 3
    assert [int8_schemes_to_measure(t, lean=True) for t in (1, 64, 256, 1024)] == [("w8a16",), ("w8a16",), (), ("w8a8",)]


def test_bench_finds_compiled_kernels_to_clear():
    """The cold-compile measurement empties the in-memory cache of every @triton.jit kernel (JITFunction outside the interpreter)."""
    code = ("import simple_moe.bench as b, simple_moe.pipeline, simple_moe.grouped_gemm, simple_moe.routing, "
            "simple_moe.finalize; print(b.clear_triton_memory_caches())")
    proc = _run(["-c", code], interpret=False)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 3  # routing maps, grouped GEMM, finalize (and their @triton.jit helpers)


def test_bench_budget_scales_then_stops():
    from simple_moe.bench import Budget

    assert Budget(0).scale_for_next(10) == 1.0  # no budget
    budget = Budget(100.0)
    assert budget.scale_for_next(10) == 1.0  # nothing measured yet
    budget.record(12.0, 10.0, 1.0)  # 2 s fixed + 10 s of timing: 10 points in 100 s leave 8 s of timing each
    assert 0.7 <= budget.scale_for_next(10) <= 0.8
    budget.record(6.0, 2.0, 0.5)  # now 4 s fixed at this point (the average moves), 4 s of timing at full scale
    assert 0.1 <= budget.scale_for_next(20) <= 0.5
    assert Budget(0.5).scale_for_next(1) is None  # less than a second left


def _synthetic_row(shape, T, dtype, ours_us, graph_us, floor_us, **extra):
    row = {"shape": shape, "E": 8, "top_k": 2, "H": 4096, "I": 14336, "T": T, "dtype": dtype, "rows": 2 * T, "active_experts": 8,
           "tolerance": 1e-2 if dtype == "bf16" else 2e-3, "floor_us": floor_us, "bytes": 1.0, "flops": 1.0, "bound_by": "memory",
           "rep_ms": 100.0, "cold": T == 1, "first_call_s": 3.5, "all_rows_written": True, "checked_tokens": min(T, 64),
           "rel_err": 4e-3 if dtype == "bf16" else 5e-4, "extra_mib": 10.0, "bound_mib": 12.0, "within_bound": True,
           "graph_equals_eager": True,
           "times_us": {"ours": ours_us, "graph": graph_us, "cublas": 2 * ours_us, "grouped_mm": "n/a: RuntimeError: fp16",
                        "loop": "skipped: T*top_k=8192 > 4096 rows"},
           "errors": {"ours": 4e-3 if dtype == "bf16" else 5e-4, "graph": 4e-3 if dtype == "bf16" else 5e-4, "cublas": 5e-3}}
    row.update(extra)
    return row


H100 = "NVIDIA H100 80GB HBM3"  # the GPU of baselines.md
H200 = "NVIDIA H200"


def _synthetic_result(gpu, rows, ceilings):
    from simple_moe import bench

    env = {"gpu": gpu, "date": "2026-11-23T00:00:00+00:00", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
           "timer": "do_bench", "ceilings": ceilings.as_json()}
    return {"environment": env, "rows": rows, "summary": bench.summary(rows, gpu)}


def test_bench_report_on_gpu_like_results(tmp_path):
    """Markdown, summary and PNG on results shaped like a GPU run (Peer A rows, fp16/bf16 pairs, T=4096, INT8, skips)."""
    from simple_moe import bench

    rows = []
    for dtype in ("bf16", "fp16"):
        for T, ours in ((1, 300.0), (4096, 5000.0)):
            int8 = {"status": "ok", "w8a16": {"floor_us": 120.0, "time_us": 200.0, "graph_us": 180.0, "eff": 0.6,
                                              "err_vs_unquantized": 1e-2, "err_vs_dequantized_ref": 4e-3},
                    "w8a8": {"floor_us": 120.0, "time_us": "error: RuntimeError: boom"}} if dtype == "bf16" else None
            row = _synthetic_row("mixtral-8x7b", T, dtype, ours * (1.1 if dtype == "fp16" else 1.0), ours * 0.9,
                                 235.0 if T == 1 else 3815.0,
                                 gpu_state_after_ours={"sm_clock_mhz": 1980 if T == 1 else 1605, "power_w": 700})
            if int8:
                row["int8"] = int8
            bench._derive(row, H100)
            rows.append(row)
    rows.append(bench.skipped_row("qwen3-30b-a3b", (128, 8, 2048, 768), 1, torch.bfloat16, "skipped: time budget spent"))
    result = _synthetic_result(H100, rows, bench.BASELINE_CEILINGS)
    s = result["summary"]
    # The bf16 rows' W8A8 column raised: those points fail (an INT8 path that breaks is not a baseline's problem).
    assert s["measured"] == 4 and s["skipped"] == 1 and s["failed_checks"] == ["mixtral-8x7b T=1 bf16", "mixtral-8x7b T=4096 bf16"]
    assert s["peer_a_points"] == 2  # bf16 rows of a preset only
    assert [p["point"] for p in s["slower_than_peer_a"]] == ["mixtral-8x7b T=1"]  # 300 µs vs 268
    assert math.isclose(s["fp16_over_bf16_time_geomean"], 1.1)
    assert set(s["eff_at_T4096"]) == {"mixtral-8x7b bf16", "mixtral-8x7b fp16"}
    assert math.isclose(rows[0]["vs_peer_a"], 268 / 300)
    assert math.isclose(rows[0]["speedup_vs"]["cublas"], 2.0)
    md = bench.markdown(result)
    assert "| mixtral-8x7b | 1 | bf16 |" in md and "W8A16 µs" in md and "skipped: time budget spent" in md
    assert "n/a[" in md and "3.50*" in md
    assert "| SM MHz |" in md and "| PASS | 1605 |" in md  # the clock ours eager ran at, T=4096
    table = bench.readme_table(rows).splitlines()  # bf16 rows only; the skipped row left out
    assert len(table) == 4 and table[0].startswith("| shape | T | floor µs |")
    graph_t1 = rows[0]["times_us"]["graph"]
    assert table[2] == (f"| mixtral-8x7b | 1 | 235 | 300 | {graph_t1:.0f} | {235 / 300:.2f} | {235 / graph_t1:.2f} | 268 | "
                        f"{268 / 300:.2f} | n/a | 180 | {graph_t1 / 180:.2f} | — | — |")
    paths = bench.write_reports(result, str(tmp_path), "bench_test")
    assert os.path.exists(paths["json"]) and os.path.exists(paths["md"])
    pytest.importorskip("matplotlib")
    assert os.path.getsize(paths["png"]) > 10_000


@pytest.mark.parametrize("preset,num_tokens,active,floor_us", [
    ("mixtral-8x7b", 1, 2, 235), ("mixtral-8x7b", 4096, 8, 3815), ("qwen3-30b-a3b", 1, 8, 25),
    ("olmoe-1b-7b", 4096, 64, 545), ("deepseek-v2-lite", 4096, 64, 562), ("deepseek-v2-lite", 64, 64, 369)])
def test_bench_floor_matches_baselines_md(preset, num_tokens, active, floor_us):
    """The floor formula reproduces baselines.md's floor column (bf16; every expert active from T=64 on at these E)."""
    from simple_moe.bench import PRESETS, moe_floor

    num_experts, top_k, hidden, inter = PRESETS[preset]
    got = moe_floor(active, top_k, hidden, inter, num_tokens, torch.bfloat16)["floor_us"]
    assert abs(got - floor_us) <= 0.01 * floor_us + 1


def test_bench_floor_uses_the_ceilings_passed_in():
    """moe_floor divides by the rates of the ceilings it is given, not by baselines.md's."""
    from simple_moe.bench import BASELINE_CEILINGS, PRESETS, Ceilings, moe_floor

    _, top_k, hidden, inter = PRESETS["mixtral-8x7b"]
    base = BASELINE_CEILINGS
    faster_memory = Ceilings(2 * base.copy_bytes_per_s, base.matmul_flops_per_s, base.int8_ops_per_s, "test")
    faster_matmul = Ceilings(base.copy_bytes_per_s, {d: 2 * r for d, r in base.matmul_flops_per_s.items()},
                             base.int8_ops_per_s, "test")
    decode = moe_floor(2, top_k, hidden, inter, 1, torch.bfloat16)  # 1 token: reading the weights bounds it
    assert decode["bound_by"] == "memory"
    assert math.isclose(moe_floor(2, top_k, hidden, inter, 1, torch.bfloat16, ceilings=faster_memory)["floor_us"],
                        decode["floor_us"] / 2)
    assert math.isclose(moe_floor(2, top_k, hidden, inter, 1, torch.bfloat16, ceilings=faster_matmul)["floor_us"],
                        decode["floor_us"])
    prefill = moe_floor(8, top_k, hidden, inter, 4096, torch.bfloat16)  # 4096 tokens: the matmuls bound it
    assert prefill["bound_by"] == "compute"
    assert math.isclose(moe_floor(8, top_k, hidden, inter, 4096, torch.bfloat16, ceilings=faster_matmul)["floor_us"],
                        prefill["floor_us"] / 2)
    assert math.isclose(moe_floor(8, top_k, hidden, inter, 4096, torch.bfloat16, ceilings=faster_memory)["floor_us"],
                        prefill["floor_us"])


def test_bench_ceilings_are_measured_on_a_gpu_other_than_the_h100(monkeypatch):
    """baselines.md's ceilings on the CPU and on its H100 (nothing measured there); measured ones on any other GPU."""
    from simple_moe import bench

    measured = bench.Ceilings(4.3e12, {torch.bfloat16: 760e12, torch.float16: 670e12}, None, bench.MEASURED_SOURCE)
    calls = []
    monkeypatch.setattr(bench, "measure_ceilings", lambda device: calls.append(device) or measured)
    assert bench.ceilings_for(torch.device("cpu")) is bench.BASELINE_CEILINGS and calls == []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100)
    assert bench.ceilings_for(torch.device("cuda")) is bench.BASELINE_CEILINGS and calls == []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H200)
    assert bench.ceilings_for(torch.device("cuda")) is measured and len(calls) == 1


def _peer_a_rows(gpu):
    """Two bf16 Mixtral points with Peer A quotes: T=1 slower than Peer A (300 vs 268 µs), T=4096 faster (5000 vs 6191)."""
    from simple_moe import bench

    rows = []
    for T, ours, floor in ((1, 300.0, 235.0), (4096, 5000.0, 3815.0)):
        row = _synthetic_row("mixtral-8x7b", T, "bf16", ours, ours * 0.9, floor)
        bench._derive(row, gpu)
        rows.append(row)
    return rows


def test_bench_compares_peer_a_on_the_h100():
    from simple_moe import bench

    rows = _peer_a_rows(H100)
    result = _synthetic_result(H100, rows, bench.BASELINE_CEILINGS)
    s = result["summary"]
    assert s["peer_a_compared"] and s["peer_a_points"] == 2
    assert [p["point"] for p in s["slower_than_peer_a"]] == ["mixtral-8x7b T=1"]
    assert math.isclose(rows[0]["vs_peer_a"], 268 / 300)
    assert math.isclose(s["geomean_vs_peer_a"], math.sqrt(268 / 300 * 6191 / 5000))
    lines = "\n".join(bench._summary_lines(s, rows))
    assert "slower than Peer A at 1 points: mixtral-8x7b T=1" in lines and "not compared" not in lines
    md = bench.markdown(result)
    assert "vs peer A = peer A µs / ours µs" in md and "not compared" not in md


def test_bench_reports_no_peer_a_verdict_on_another_gpu():
    """Peer A's times are H100 quotes: on an H200 they are listed, and no speedup or 'slower than' verdict is drawn from them."""
    from simple_moe import bench

    rows = _peer_a_rows(H200)
    measured = bench.Ceilings(4.3e12, {torch.bfloat16: 757e12, torch.float16: 670e12}, 916e12, bench.MEASURED_SOURCE)
    result = _synthetic_result(H200, rows, measured)
    s = result["summary"]
    assert [r["peer_a_us"] for r in rows] == [268, 6191]  # the quotes stay in the JSON
    assert all(r["vs_peer_a"] is None and r["vs_peer_a_graph"] is None for r in rows)
    assert not s["peer_a_compared"]
    assert not any(k in s for k in ("slower_than_peer_a", "peer_a_points", "geomean_vs_peer_a", "geomean_vs_peer_a_graph"))
    lines = "\n".join(bench._summary_lines(s, rows))
    assert "Peer A was measured on an H100" in lines and "not compared on this GPU" in lines
    assert "slower than Peer A" not in lines and "speedup eager" not in lines
    md = bench.markdown(result)
    assert "Peer A was measured on an H100 (baselines.md) and is not compared on this GPU" in md
    assert "slower than Peer A" not in md and "peer A µs (H100 quote)" in md
    assert "| 268 | — |" in md  # the quote, and an empty vs-peer-A cell


def test_bench_markdown_names_the_ceilings_it_used():
    from simple_moe import bench

    rows = _peer_a_rows(H200)
    measured = bench.Ceilings(4.31e12, {torch.bfloat16: 745e12, torch.float16: 702e12}, None, bench.MEASURED_SOURCE)
    md = bench.markdown(_synthetic_result(H200, rows, measured))
    assert "bytes / 4.31 TB/s" in md and "745 TFLOP/s (bf16), 702 (fp16)" in md and "ceilings: measured in this run" in md
    assert "3.00 TB/s" not in md and "757" not in md and "916" not in md
    assert "or not measured: no W8A8 floor (W8A8)" in md  # torch._int_mm failed: no INT8 rate, no W8A8 floor
    md = bench.markdown(_synthetic_result(H100, _peer_a_rows(H100), bench.BASELINE_CEILINGS))
    assert "bytes / 3.00 TB/s" in md and "757 TFLOP/s (bf16), 670 (fp16)" in md and "ceilings: baselines.md (H100)" in md
    assert "916 TOPS" in md


# ---------------------------------------------------------------------------------------------------------------------------------
# The benchmark cannot pass on a wrong result (in process, through the interpreter, one tiny point)


def _bench_in_process(tmp_path, *extra):
    from simple_moe import bench

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("in-process bench runs need TRITON_INTERPRET=1 (CI's setting)")
    code = bench.main(["--cpu-smoke", "--tokens", "1", "--no-progress", "--out", str(tmp_path), *extra])
    return code, json.loads((tmp_path / "bench_cpu_smoke.json").read_text())


def test_bench_passes_the_unbroken_point(tmp_path):
    code, result = _bench_in_process(tmp_path, "--columns", "ours,graph,int8", "--int8-dtypes", "fp16")
    row = result["rows"][0]
    assert code == 0 and row["pass"] and row["eager_equals_checked"] and row["int8_pass"]
    assert all(row["int8"][s]["pass"] for s in ("w8a16", "w8a8"))
    assert row["int8"]["w8a8"]["err_vs_dequantized_ref"] < 2e-3  # the exact W8A8 reference (quantised activations)


@pytest.mark.parametrize("broken", ["timed_call", "int8", "graph", "point"])
def test_bench_fails_on_a_broken_column(broken, tmp_path, monkeypatch):
    """The timed eager call (which allocates its output: another plan than the checked call), an INT8 scheme, the CUDA graph,
    a whole point: each broken alone makes the run exit 1 with the point (or the run) marked failed."""
    from simple_moe import bench, pipeline

    real = pipeline.fused_moe_simple

    def wrong(*args, **kwargs):
        out = real(*args, **kwargs)
        if (broken == "timed_call" and kwargs.get("output") is None and kwargs.get("quant") is None and len(args) == 5
                or broken == "int8" and kwargs.get("quant") is not None):
            return torch.zeros_like(out)
        return out

    def no_graph(*args, **kwargs):
        raise RuntimeError("capture failed")

    def no_point(*args, **kwargs):
        raise RuntimeError("point failed")

    monkeypatch.setattr(pipeline, "fused_moe_simple", wrong)
    if broken == "graph":
        monkeypatch.setattr(bench, "capture_graph", no_graph)
    if broken == "point":
        monkeypatch.setattr(bench, "measure_point", no_point)
    code, result = _bench_in_process(tmp_path, "--columns", "ours,graph,int8", "--int8-dtypes", "fp16")
    assert code == 1
    if broken == "point":
        assert result["summary"]["measured"] == 0 and result["summary"]["errored_points"]
        return
    row = result["rows"][0]
    assert not row["pass"] and result["summary"]["failed_checks"] == ["smoke T=1 fp16"]
    assert {"timed_call": not row["eager_equals_checked"], "int8": not row["int8_pass"],
            "graph": isinstance(row["times_us"]["graph"], str)}[broken]


@pytest.mark.parametrize("argv, message", [
    (["--out", "{file}"], "--out: cannot write"),
    (["--budget-s", "-5"], "--budget-s"),
    (["--tokens", "1,x"], "--tokens"),
    (["--shape", "8,2,abc,14"], "--shape"),
    (["--int8-dtypes", "fp16,xyz"], "--int8-dtypes: unknown xyz"),
    (["--readme-table", "{file}.missing"], "--readme-table: no results JSON"),
    (["--plot-only", "{file}.missing"], "--plot-only: no results JSON"),
])
def test_bench_bad_arguments_stop_before_measuring(argv, message, tmp_path, monkeypatch):
    from simple_moe import bench

    def measuring(*args, **kwargs):
        raise AssertionError("measured before checking its arguments")

    monkeypatch.setattr(bench, "run_points", measuring)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(SystemExit, match=re.escape(message)):
        bench.main(["--cpu-smoke", "--out", str(tmp_path / "out")] + [a.format(file=a_file) for a in argv])


def test_bench_results_stem_keeps_the_full_table():
    from simple_moe import bench

    parse = bench.build_parser().parse_args
    gpu = "NVIDIA H100 80GB HBM3"
    assert bench.results_stem(parse([]), gpu, bench.COLUMNS) == "bench_nvidia_h100_80gb_hbm3"
    for argv in (["--quick"], ["--preset", "olmoe-1b-7b"], ["--tokens", "1"], ["--dtype", "bf16"], ["--int8-dtypes", "fp16"]):
        assert bench.results_stem(parse(argv), gpu, bench.COLUMNS) == "bench_nvidia_h100_80gb_hbm3_partial", argv
    assert bench.results_stem(parse([]), gpu, ("ours", "graph")).endswith("_partial")
    assert bench.results_stem(parse(["--cpu-smoke", "--tokens", "1"]), "cpu", bench.COLUMNS) == "bench_cpu_smoke"


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_demo_tokens_must_be_positive(value):
    from simple_moe import demo

    with pytest.raises(SystemExit) as stop:  # argparse's usage error (it used to run T=12 for 0 and crash for -1)
        demo.main(["--tokens", value])
    assert stop.value.code == 2


def test_results_json_carries_its_provenance(tmp_path, monkeypatch):
    from simple_moe import bench

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    path = tmp_path / "r.json"
    bench.write_results_json(str(path), {"points": [1, 2]})
    written = json.loads(path.read_text())
    assert written["gpu"] == "Some GPU" and written["points"] == [1, 2]
    assert {"date", "torch", "triton", "cuda", "commit"} <= set(written)
    with pytest.raises(ValueError, match="gpu"):  # a payload key would have hidden the GPU's name
        bench.write_results_json(str(path), {"gpu": "other"})
