"""Tests of `python -m simple_moe check-build` and of the `python -m simple_moe` command line.

The compiling tests run check-build in a subprocess whose environment has no TRITON_INTERPRET: under the interpreter
`@triton.jit` builds interpreter objects, which cannot be compiled to a cubin.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from simple_moe import check_build as cb

REPO = Path(__file__).resolve().parents[1]


def _run_check_build(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "simple_moe", "check-build", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------------------------------
# Pure helpers

CANNED_SASS = """
\tcode for sm_80
\t\tFunction : mm_kernel
\t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM80 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM80)"
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;          /* 0x00000a00ff017624 */
                                                                                    /* 0x000fe400078e00ff */
        /*0010*/               @P1 BRA 0x310 ;                                      /* 0x0000014000001947 */
                                                                                    /* 0x000fea0003800000 */
        /*0020*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], [R4.64] ;      /* 0x0000000004037fae */
                                                                                    /* 0x0003e8000b901d44 */
        /*0030*/              @!P0 LDGSTS.E.BYPASS.LTC128B.128 [R3+0x800], [R6.64] ; /* 0x0080000006038fae */
                                                                                    /* 0x0003e8000b901d44 */
        /*0040*/                   LDSM.16.M88.4 R8, [R2] ;                         /* 0x000000000208783b */
                                                                                    /* 0x000e280000000200 */
        /*0050*/                   HMMA.16816.F32.BF16 R64, R32, R24.reuse, R64 ;   /* 0x000000182040723c */
                                                                                    /* 0x000fe20000041840 */
        /*0060*/                   HMMA.16816.F32.BF16 R68, R40, R24, R68 ;         /* 0x000000182844723c */
                                                                                    /* 0x000fe20000041844 */
        /*0070*/              @UP0 HGMMA.64x128x16.F32.BF16 R88, gdesc[UR12].tnspB, R88 ; /* 0x41e000000c5879f0 */
                                                                                    /* 0x000fe20008000858 */
        /*0080*/                   EXIT ;                                           /* 0x000000000000794d */
                                                                                    /* 0x000fea0003800000 */
"""

CANNED_PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'mm_kernel' for 'sm_80'
ptxas info    : Function properties for mm_kernel
    16 bytes stack frame, 24 bytes spill stores, 32 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 416 bytes cmem[0]
"""

CANNED_RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function mm_kernel:
  REG:108 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:592 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_count_sass_ops_counts_base_opcodes_with_predicates():
    counts = cb.count_sass_ops(CANNED_SASS)
    assert counts["HMMA"] == 2
    assert counts["LDGSTS"] == 2  # one of them predicated with @!P0
    assert counts["LDSM"] == 1
    assert counts["HGMMA"] == 1  # predicated with a uniform predicate
    assert counts["BRA"] == 1 and counts["EXIT"] == 1 and counts["IMAD"] == 1
    # The hex encodings and the header are not instructions.
    assert sum(counts.values()) == 9
    assert cb.reported_ops(counts) == {"HMMA": 2, "HGMMA": 1, "LDGSTS": 2, "LDSM": 1}


def test_tensor_core_detection():
    assert cb.has_tensor_core_ops({"HMMA": 4})
    assert cb.has_tensor_core_ops({"HGMMA": 1, "LDGSTS": 8})
    assert cb.has_tensor_core_ops({"QGMMA": 2})
    assert not cb.has_tensor_core_ops({"LDGSTS": 8, "LDSM": 4})
    assert not cb.has_tensor_core_ops({})
    assert not cb.has_tensor_core_ops(cb.reported_ops(cb.count_sass_ops("/*0000*/ FFMA R1, R2, R3, R4 ;")))


def test_smem_limit_check():
    assert cb.SMEM_LIMIT == {80: 166912, 86: 101376, 89: 101376, 90: 232448}
    for arch, limit in cb.SMEM_LIMIT.items():
        assert cb.smem_limit_error(arch, limit) is None
        assert cb.smem_limit_error(arch, 0) is None
        err = cb.smem_limit_error(arch, limit + 1)
        assert err is not None and str(limit) in err and f"sm_{arch}" in err
    # 147456 B fits an A100 / H100 block but not an RTX 3090 / 4090 one.
    assert cb.smem_limit_error(80, 147456) is None
    assert cb.smem_limit_error(90, 147456) is None
    assert cb.smem_limit_error(86, 147456) is not None
    assert cb.smem_limit_error(89, 147456) is not None


def test_register_check():
    assert cb.register_error(255, 8) is None  # 255 * 256 = 65280
    assert cb.register_error(None, 8) is None
    assert cb.register_error(255, 16) is not None


def test_parse_ptxas_log_and_res_usage():
    assert cb.parse_ptxas_log(CANNED_PTXAS_LOG) == {"regs": 255, "spill_stores": 24, "spill_loads": 32, "stack": 16}
    assert cb.parse_ptxas_log("") == {"regs": None, "spill_stores": None, "spill_loads": None, "stack": None}
    assert cb.parse_res_usage(CANNED_RES_USAGE) == {"regs": 108, "stack": 0, "static_smem": 1024, "local": 0}
    assert cb.parse_res_usage("nothing here") == {}


def test_parse_archs():
    assert cb.parse_archs("80,86,89,90") == (80, 86, 89, 90)
    assert cb.parse_archs("sm_90, 80,80") == (90, 80)
    assert cb.parse_archs([89]) == (89,)
    for bad in ("75", "100", "eighty", ""):
        with pytest.raises(ValueError):
            cb.parse_archs(bad)


def test_format_table_lists_every_row():
    rows = [
        cb.Result("grouped_gemm", "bf16 128x128x64", 80, 8, 3, True, ok=True, regs=157, spill_stores=0,
                  spill_loads=0, smem=65536, static_smem=0, ops={"HMMA": 64, "LDGSTS": 24}),
        cb.Result("finalize", "fp32 top_k=2", 90, 4, 1, False, ok=False, errors=["compile failed: boom"]),
    ]
    table = cb.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4
    assert "kernel" in lines[0] and "smem bytes" in lines[0] and "regs" in lines[0]
    assert "grouped_gemm" in lines[2] and "sm_80" in lines[2] and "65536" in lines[2] and "HMMA:64" in lines[2]
    assert "finalize" in lines[3] and "FAIL" in lines[3]


def test_empty_registry_fails(monkeypatch, capsys):
    monkeypatch.setattr(cb, "load_variants", lambda imports=(): {})
    assert cb.main(["--arch", "80"]) == 1
    assert "no kernel variants registered" in capsys.readouterr().err


def test_bad_arch_is_a_usage_error(capsys):
    assert cb.main(["--arch", "70"]) == 2
    assert "unsupported arch 70" in capsys.readouterr().err


def test_json_path_that_is_a_directory_is_refused_before_compiling(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cb, "run_jobs", lambda *a, **k: pytest.fail("compiled before checking --json"))
    assert cb.main(["--arch", "80", "--json", str(tmp_path)]) == 2
    assert "--json" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# The `python -m simple_moe` dispatcher


def test_main_forwards_remaining_argv(monkeypatch):
    from simple_moe import __main__ as cli

    seen = {}

    def fake_bench_main(argv):
        seen["argv"] = argv
        return 0

    fake = types.ModuleType("simple_moe.bench")
    fake.main = fake_bench_main
    monkeypatch.setitem(sys.modules, "simple_moe.bench", fake)
    assert cli.main(["bench", "--shape", "8,2,4096,14336", "--tokens", "1,16"]) == 0
    assert seen["argv"] == ["--shape", "8,2,4096,14336", "--tokens", "1,16"]

    fake_demo = types.ModuleType("simple_moe.demo")
    fake_demo.main = lambda argv: 3
    monkeypatch.setitem(sys.modules, "simple_moe.demo", fake_demo)
    assert cli.main(["demo"]) == 3


def test_main_rejects_unknown_command(capsys):
    from simple_moe import __main__ as cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "check-build" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------------
# Real compiles (subprocesses without TRITON_INTERPRET)


@pytest.mark.slow
def test_check_build_real_registry_sm80(tmp_path):
    out_json = tmp_path / "check_build.json"
    proc = _run_check_build("--arch", "80", "--jobs", "2", "--json", str(out_json))
    output = proc.stdout + proc.stderr
    assert "no kernel variants registered" not in output, "no kernel module registered its variants"
    assert proc.returncode == 0, output
    results = json.loads(out_json.read_text())["results"]
    assert results, output
    assert all(r["ok"] and r["arch"] == 80 for r in results)
    table_lines = proc.stdout.splitlines()
    for kernel in {r["kernel"] for r in results}:
        assert any(line.startswith(kernel + " ") for line in table_lines), f"{kernel} missing from the table"
    # Every tl.dot kernel really reached the tensor cores.
    for r in results:
        if r["has_matrix_loop"]:
            assert r["ops"].get("HMMA") or r["ops"].get("IMMA") or r["ops"].get("QMMA"), r
    assert "0 failure(s)" in proc.stdout


TOY_KERNELS = '''
import triton
import triton.language as tl
from simple_moe._variants import KernelVariant, register_variants


@triton.jit
def _toy_mm(a_ptr, b_ptr, c_ptr, K, stride_am, stride_bk, stride_cm,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * stride_bk + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(tl.bfloat16))


@triton.jit
def _toy_scale(x_ptr, y_ptr, n, s, BLOCK: tl.constexpr = 256):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m) * s, mask=m)


MM_SIG = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "K": "i32", "stride_am": "i32:16",
          "stride_bk": "i32:16", "stride_cm": "i32:16",
          "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
SCALE_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "s": "fp32"}  # BLOCK: its default


@register_variants
def _toy_variants():
    return [
        KernelVariant("toy_mm", "bf16 64x64x32", _toy_mm, MM_SIG, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32},
                      num_warps=4, num_stages=3, has_matrix_loop=True),
        # 128x256x64 bf16 in 4 stages: 144 KiB of shared memory, too much for sm_86 / sm_89.
        KernelVariant("toy_mm", "bf16 128x256x64 s4", _toy_mm, MM_SIG,
                      {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=4,
                      has_matrix_loop=True, archs=(80, 86)),
        KernelVariant("toy_scale", "fp32", _toy_scale, SCALE_SIG, {}, num_warps=4, num_stages=1, archs=(80,)),
        # Claims a tl.dot loop it does not have.
        KernelVariant("toy_scale", "claims dot", _toy_scale, SCALE_SIG, {}, has_matrix_loop=True, archs=(80,)),
        # A signature that misses an argument does not compile.
        KernelVariant("toy_scale", "bad signature", _toy_scale, {"x_ptr": "*fp32"}, {}, archs=(80,)),
    ]
'''


@pytest.mark.slow
def test_check_build_toy_kernels_all_checks(tmp_path):
    toy = tmp_path / "toy_kernels.py"
    toy.write_text(textwrap.dedent(TOY_KERNELS))
    out_json = tmp_path / "toy.json"
    proc = _run_check_build("--import", str(toy), "--kernel", "toy_mm,toy_scale", "--arch", "80,86,90",
                            "--jobs", "2", "--json", str(out_json))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    results = {(r["kernel"], r["variant"], r["arch"]): r for r in json.loads(out_json.read_text())["results"]}
    # toy_mm small: 3 archs; toy_mm big: 80, 86; toy_scale: 3 variants on sm_80 only.
    assert len(results) == 3 + 2 + 3, sorted(results)

    small80 = results[("toy_mm", "bf16 64x64x32", 80)]
    assert small80["ok"], small80
    assert small80["ops"].get("HMMA", 0) > 0 and small80["ops"].get("LDSM", 0) > 0, small80
    assert small80["ops"].get("LDGSTS", 0) > 0, small80  # cp.async pipelining of aligned loads
    assert small80["regs"] and small80["spill_stores"] == 0 and small80["smem"] > 0
    small90 = results[("toy_mm", "bf16 64x64x32", 90)]
    assert small90["ok"] and small90["ops"].get("HGMMA", 0) > 0, small90
    assert small90["static_smem"] >= 0 and small90["smem"] > 0

    big80, big86 = results[("toy_mm", "bf16 128x256x64 s4", 80)], results[("toy_mm", "bf16 128x256x64 s4", 86)]
    assert big80["ok"], big80
    assert big80["smem"] == big86["smem"] > cb.SMEM_LIMIT[86]
    assert not big86["ok"] and "exceeds the sm_86 per-block limit" in big86["errors"][0]

    assert results[("toy_scale", "fp32", 80)]["ok"]
    assert results[("toy_scale", "fp32", 80)]["ops"] == {}
    claims = results[("toy_scale", "claims dot", 80)]
    assert not claims["ok"] and "no tensor-core instruction" in claims["errors"][0]
    bad = results[("toy_scale", "bad signature", 80)]
    assert not bad["ok"] and "compile failed" in bad["errors"][0]

    assert "3 failure(s)" in proc.stdout
    assert "FAIL" in proc.stdout and "toy_mm" in proc.stdout
