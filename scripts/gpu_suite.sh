#!/usr/bin/env bash
# The GPU suite in one command, for a CUDA machine where simple_moe is not installed (PYTHONPATH=src):
#
#   OUT=/some/dir bash scripts/gpu_suite.sh
#
#   1. tests     pytest -m gpu over tests/ (pytest-xdist workers when installed), junit XML, $OUT/gpu_tests_summary.md
#   2. memcheck  compute-sanitizer --tool memcheck on scripts/sanitizer_case.py
#   3. demo      python -m simple_moe demo
#   4. bench     python -m simple_moe bench --out $OUT, with the seconds left of the budget (--budget-s)
#
# Each stage has its own time limit and runs whatever happened before it. A table of the stages is printed last; logs and
# results are under $OUT. The whole script keeps to GPU_SUITE_BUDGET_S seconds (default 540 = 9 minutes).
# Per-stage limits (seconds): GPU_SUITE_TESTS_S (200), GPU_SUITE_SANITIZER_S (120), GPU_SUITE_DEMO_S (60).
# GPU_SUITE_BENCH=0: skip the benchmark stage (to run it in a call of its own, with a whole budget).
# GPU_SUITE_PACK=1: leave one $OUT/gpu_suite.tgz of every file instead (for transports that bring back only a few files).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/gpu_suite_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels only
PY=${PYTHON:-python3}
BUDGET=${GPU_SUITE_BUDGET_S:-540}
START=$SECONDS
STAGES=()

record() {  # name status seconds result
    STAGES+=("$(printf '%-10s %-6s %6ss  %s' "$1" "$2" "$3" "$4")")
}

left() { echo $((BUDGET - (SECONDS - START))); }

# ---- 0. what machine this is
{
    nvidia-smi -L 2>&1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>&1
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', \
triton.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
} | tee "$OUT/env.txt"

if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_suite: torch sees no CUDA device; this suite needs one (CI runs the interpreter tests: make test)" >&2
    exit 2
fi

# ---- 1. tests
t0=$SECONDS
limit=${GPU_SUITE_TESTS_S:-200}
extra=()
if $PY -c "import xdist" 2>/dev/null; then extra+=(-n "${GPU_SUITE_TEST_WORKERS:-4}"); fi
if $PY -c "import pytest_timeout" 2>/dev/null; then extra+=(--timeout=150); fi
echo "== tests: pytest -m gpu ${extra[*]} (limit ${limit}s)"
timeout -s INT -k 20 "$limit" $PY -m pytest -m gpu -q -rfE -p no:cacheprovider --continue-on-collection-errors \
    ${extra[@]+"${extra[@]}"} --junitxml="$OUT/gpu_tests.xml" tests/ >"$OUT/gpu_tests.log" 2>&1
rc=$?
tail -n 15 "$OUT/gpu_tests.log"
$PY - "$OUT" "$rc" <<'EOF'
import os, sys, xml.etree.ElementTree as ET
out, rc = sys.argv[1], int(sys.argv[2])
try:
    import torch, triton
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    versions = f"torch {torch.__version__}, Triton {triton.__version__}, CUDA {torch.version.cuda}"
except Exception as err:  # still write the summary
    gpu, versions = "unknown", f"({err})"
counts, failures = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}, []
seconds = None
xml_path = os.path.join(out, "gpu_tests.xml")
if os.path.exists(xml_path):
    for suite in ET.parse(xml_path).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        seconds = float(suite.get("time", 0)) + (seconds or 0)
        for case in suite.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                msg = (bad.get("message") or "").splitlines()[0][:200] if bad.get("message") else ""
                failures.append(f"{case.get('classname')}::{case.get('name')}: {msg}")
passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
log_tail = open(os.path.join(out, "gpu_tests.log"), errors="replace").read().strip().splitlines()[-1:] if os.path.exists(
    os.path.join(out, "gpu_tests.log")) else ["(no log)"]
lines = ["# GPU test summary", "", f"- GPU: {gpu}", f"- {versions}",
         f"- pytest exit code: {rc}" + (" (stopped by the time limit)" if rc in (124, 130, 137) else ""),
         f"- passed {passed}, failed {counts['failures']}, errors {counts['errors']}, skipped {counts['skipped']}"
         + (f" in {seconds:.0f} s" if seconds is not None else ""), f"- pytest's last line: {log_tail[0]}"]
if failures:
    lines += ["", "## Failures", ""] + [f"- {f}" for f in failures[:40]]
open(os.path.join(out, "gpu_tests_summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines[:7]))
with open(os.path.join(out, ".tests_result"), "w") as f:
    f.write(f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped")
EOF
result=$(cat "$OUT/.tests_result" 2>/dev/null || echo "no summary")
passed=$(grep -oE '^[0-9]+' "$OUT/.tests_result" 2>/dev/null || echo 0)
record tests "$([ $rc -eq 0 ] && [ "$passed" -gt 0 ] && echo ok || echo FAIL)" $((SECONDS - t0)) "$result (rc $rc)"

# ---- 2. compute-sanitizer memcheck
t0=$SECONDS
limit=${GPU_SUITE_SANITIZER_S:-120}
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -n 1)
if [ -z "$SAN" ]; then
    record memcheck SKIP 0 "compute-sanitizer not found"
else
    echo "== memcheck: $SAN (limit ${limit}s)"
    san_opts=(--tool memcheck --error-exitcode 3 --print-limit 20)
    # CUDA API errors that torch provokes and handles itself are not memory errors; drop them where the option exists.
    if "$SAN" --help 2>&1 | grep -q -- "--report-api-errors"; then san_opts+=(--report-api-errors no); fi
    # No caching allocator: every tensor its own allocation, so memcheck sees accesses past a tensor's end.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$limit" "$SAN" "${san_opts[@]}" $PY scripts/sanitizer_case.py \
        >"$OUT/sanitizer.log" 2>&1
    rc=$?
    tail -n 16 "$OUT/sanitizer.log"
    summary=$(grep -m1 "ERROR SUMMARY" "$OUT/sanitizer.log" || echo "no ERROR SUMMARY line")
    access=$(grep -c -E "Invalid __(global|shared|local)__|Misaligned|out of bounds|Out-of-range" "$OUT/sanitizer.log")
    status=FAIL
    if [ $rc -eq 0 ]; then status=ok; elif [ "$access" -eq 0 ] && grep -q "all outputs ok" "$OUT/sanitizer.log"; then status=WARN; fi
    record memcheck $status $((SECONDS - t0)) "$summary; memory-access reports: $access (rc $rc)"
fi

# ---- 3. demo
t0=$SECONDS
limit=${GPU_SUITE_DEMO_S:-60}
echo "== demo (limit ${limit}s)"
timeout -k 10 "$limit" $PY -m simple_moe demo >"$OUT/demo.log" 2>&1
rc=$?
cat "$OUT/demo.log"
record demo "$([ $rc -eq 0 ] && echo ok || echo FAIL)" $((SECONDS - t0)) "$(grep -m1 -E 'passed' "$OUT/demo.log" || echo 'no result line') (rc $rc)"

# ---- 4. benchmark, with what is left
t0=$SECONDS
remaining=$(left)
bench_budget=$((remaining - 30))  # leaves time for its reports and this script's table
if [ "${GPU_SUITE_BENCH:-1}" = 0 ]; then
    record bench SKIP 0 "GPU_SUITE_BENCH=0"
elif [ "$bench_budget" -lt 30 ]; then
    record bench SKIP 0 "only ${remaining}s left of ${BUDGET}s"
else
    echo "== bench (budget ${bench_budget}s)"
    # GPU_SUITE_BENCH_ARGS: extra options (e.g. --cpu-smoke to try this script on a machine without a GPU).
    timeout -s INT -k 15 $((bench_budget + 20)) $PY -m simple_moe bench --out "$OUT" --budget-s "$bench_budget" \
        ${GPU_SUITE_BENCH_ARGS:-} >"$OUT/bench_stdout.log" 2>"$OUT/bench.log"
    rc=$?
    cat "$OUT/bench_stdout.log"
    tail -n 5 "$OUT/bench.log" | tr '\r' '\n' | tail -n 3
    record bench "$([ $rc -eq 0 ] && echo ok || echo FAIL)" $((SECONDS - t0)) \
        "$(grep -m1 -E '^bench: [0-9]+ points' "$OUT/bench_stdout.log" | sed 's/; wrote.*//') (rc $rc)"
fi

# ---- the table
echo
echo "== gpu_suite: $(head -n 1 "$OUT/env.txt"), $((SECONDS - START))s of ${BUDGET}s; files in $OUT"
printf '%-10s %-6s %7s  %s\n' stage status time result
for line in "${STAGES[@]}"; do echo "$line"; done
failed=0
for line in "${STAGES[@]}"; do case "$line" in *" FAIL "*) failed=1 ;; esac; done
if [ "${GPU_SUITE_PACK:-0}" = 1 ]; then
    files=$(cd "$OUT" && ls -A | grep -v '^gpu_suite.tgz$')
    # shellcheck disable=SC2086  # file names from this script, no spaces
    (cd "$OUT" && tar czf gpu_suite.tgz $files && rm -rf $files)
fi
exit $failed
