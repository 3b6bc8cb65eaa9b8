"""benchmarks/ab_revision.py, the harness that times a base revision against this tree: with the same package on both sides,
both must run the same layer (same scheme, same bits) in every `--weights` mode. Run in a subprocess, because the harness
imports a second copy of the package."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
import torch
import simple_moe
import ab_revision as ab

base = ab.import_base(sys.argv[1])
sides = (("base", base), ("this", simple_moe))
gen = torch.Generator().manual_seed(0)
T, E, top_k, H, I = 5, 4, 2, 64, 32
x = torch.randn(T, H, generator=gen).half()
w1 = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).half()
w2 = (torch.randn(E, H, I, generator=gen) / I**0.5).half()
selected = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(T)]).int()
scales = torch.rand(T, top_k, generator=gen)
for quant in ("none", "w8a16", "w8a8"):
    for weights in ("shared", "own"):
        outs = {side: torch.full_like(x, float("nan")) for side, _ in sides}
        calls = ab.side_calls(sides, x, selected, scales, w1, w2, quant, None, weights, outs)
        for call in calls.values():
            call()
        assert not outs["this"].isnan().any(), (quant, weights)
        assert torch.equal(outs["base"], outs["this"]), (quant, weights, (outs["base"] - outs["this"]).abs().max())
print("sides agree")
"""


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the layer on the CPU through the interpreter")
def test_both_sides_run_the_same_layer(tmp_path):
    shutil.copytree(ROOT / "src" / "simple_moe", tmp_path / "simple_moe")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")]))
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "sides agree" in result.stdout, result.stdout + result.stderr
