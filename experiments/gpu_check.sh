#!/usr/bin/env bash
# One call on a lent GPU machine (issue 27): every Pallas kernel compiled (not interpreted) and checked
# against its reference, then timed, and whole models with impl="pallas" against impl="xla". Every result
# lands in OUT_DIR as JSON (at most 8 files: what the device tool brings back); the last lines printed are
# a short summary. Runs under the machine's own python3 (JAX with CUDA); finishes in under 8 minutes.
#
#   bash experiments/gpu_check.sh "$OUT"            # on the GPU machine (the device tool's output folder)
#   bash experiments/gpu_check.sh /tmp/out --quick  # rehearsal on a CPU: interpret mode, tiny shapes
#
# Time caps per step (seconds) can be set with TESTS_S, MODELS_S and BENCH_S; BENCH_ONLY picks bench cases.
set -u -o pipefail
OUT_DIR=${1:?usage: gpu_check.sh OUT_DIR [--quick]}
QUICK=${2:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "$QUICK" ]; then
    export JAX_PLATFORMS=cuda
    IMPL=pallas
    BENCH_ARGS=(--sweep --batches 7 --per-batch 10)
else
    export JAX_PLATFORMS=cpu
    IMPL=interpret
    BENCH_ARGS=(--quick)
fi
[ -n "${BENCH_ONLY:-}" ] && BENCH_ARGS+=(--only "$BENCH_ONLY") # e.g. "decode attention|ssd chunked"
stamp() { echo "[$(date +%T)] $*"; }

stamp "environment"
{
    nvidia-smi || true
    $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
    $PY -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|optax|orbax|triton|transformers|torch|hypothesis|pytest|numpy) '
    lscpu | grep -E 'Model name|^CPU\(s\)'
} >"$OUT_DIR/environment.txt" 2>&1
tail -4 "$OUT_DIR/environment.txt"

# 1. The kernel tests with the compiled kernels (float32 dots at full precision, so the tests' float32
#    tolerances apply: TF32 would differ by ~1e-3), in parallel processes sharing the GPU, and in the
#    background the whole models (correctness, same precision).
stamp "kernel tests (impl=$IMPL) and models, in parallel"
PYTEST_EXTRA=()
$PY -c "import xdist" 2>/dev/null && PYTEST_EXTRA+=(-n 6)
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST_EXTRA+=(--timeout=100)
(
    export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest
    timeout "${MODELS_S:-200}" $PY experiments/gpu_models.py --out "$OUT_DIR" ${QUICK:+--quick} >"$OUT_DIR/models.log" 2>&1
    echo "models exit $?" >>"$OUT_DIR/models.log"
) &
models_pid=$!
SSM_LLM_KERNEL_IMPL=$IMPL XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest \
    timeout "${TESTS_S:-200}" $PY -m pytest -q -p no:cacheprovider -rfE "${PYTEST_EXTRA[@]}" \
    --junitxml="$OUT_DIR/kernel_tests.xml" tests/kernels/test_*_gpu.py >"$OUT_DIR/kernel_tests.log" 2>&1
echo "pytest exit $?" >>"$OUT_DIR/kernel_tests.log"
tail -3 "$OUT_DIR/kernel_tests.log"
wait $models_pid
tail -12 "$OUT_DIR/models.log"

# 2. Kernel speed, alone on the GPU (default matmul precision, as users run it).
stamp "bench_kernels"
timeout "${BENCH_S:-200}" $PY experiments/bench_kernels.py --out "$OUT_DIR" "${BENCH_ARGS[@]}" >"$OUT_DIR/bench.log" 2>&1
echo "bench exit $?" >>"$OUT_DIR/bench.log"
rm -f "$OUT_DIR"/bench_kernels*.png # the JSON holds the numbers; keep under the tool's 8 files

# 3. One JSON of the test outcomes (from the JUnit XML), then the summary.
$PY - "$OUT_DIR" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out = Path(sys.argv[1])
tests = []
try:
    for case in ET.parse(out / "kernel_tests.xml").iter("testcase"):
        bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "seconds": float(case.get("time", 0)),
                      "outcome": "passed" if bad is None else bad.tag,
                      "message": None if bad is None else (bad.get("message") or "")[:1500]})
except (OSError, ET.ParseError) as err:
    tests.append({"test": "<junit xml>", "outcome": "error", "message": str(err)})
counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failure", "error", "skipped")}
(out / "kernel_tests.json").write_text(json.dumps({"counts": counts, "tests": tests}, indent=1))
print("kernel tests:", counts)
for t in tests:
    if t["outcome"] in ("failure", "error"):
        print("  ", t["outcome"], t["test"], "|", (t["message"] or "").replace("\n", " ")[:160])
EOF
rm -f "$OUT_DIR/kernel_tests.xml"
tail -45 "$OUT_DIR/bench.log"
stamp "done"
