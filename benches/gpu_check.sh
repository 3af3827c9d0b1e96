#!/usr/bin/env bash
# One command for a GPU machine without network (torch, triton, pybind11, pytest already there):
# build and install the package, record the machine, run the whole test suite on the GPU and every
# benchmark module, and probe the copy bandwidth and bf16 matmul peak. Everything lands in OUT_DIR.
#   usage: bash benches/gpu_check.sh OUT_DIR        (budget: under 9 minutes)
#
# Each step has its own time limit, capped by what is left of the 540 s budget. pytest is stopped
# with SIGINT at its limit (it still writes its summary, junit XML and benchmark JSON; SIGKILL 15 s
# later), and every benchmark module runs in its own pytest with its own JSON, so one module that
# fails, hangs or runs long costs only its own results. The benchmarks run their quick case lists
# (HYBRIDKERNELS_BENCH_QUICK=1); run `pytest benches/bench_X.py` alone for every case.
set -uo pipefail
out="$(mkdir -p "${1:?usage: bash benches/gpu_check.sh OUT_DIR}" && cd "$1" && pwd)"
cd "$(dirname "$0")/.."
t0=$(date +%s)
BUDGET=540
GRACE=15
left() { echo $((BUDGET - ($(date +%s) - t0))); }
status=0
summary=()

# run_limited NAME SECONDS CMD...: run CMD with at most min(SECONDS, time left - GRACE - 5) seconds.
run_limited() {
  local name=$1 want=$2
  shift 2
  local limit=$(($(left) - GRACE - 5))
  if ((limit < 20)); then
    summary+=("$name: skipped (out of time)")
    status=1
    return 1
  fi
  ((limit > want)) && limit=$want
  local start rc
  start=$(date +%s)
  timeout -s INT -k "$GRACE" "$limit" "$@"
  rc=$?
  local took=$(($(date +%s) - start))
  case $rc in
    0) summary+=("$name: ok (${took} s)") ;;
    124 | 137) summary+=("$name: stopped at its ${limit} s limit (partial results)"); status=1 ;;
    *) summary+=("$name: exit $rc (${took} s)"); status=1 ;;
  esac
  return $rc
}

{
  date -u +%FT%TZ
  echo "command: bash benches/gpu_check.sh $*"
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi
  python -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__)"
} > "$out/env.txt" 2>&1

echo "== install =="
if ! HYBRIDKERNELS_REQUIRE_CUDA=1 MAX_JOBS=16 timeout 240 pip install --no-build-isolation --no-deps . > "$out/install.log" 2>&1; then
  tail -50 "$out/install.log"; echo "install failed"; exit 1
fi
(cd /tmp && hybridkernels info && hybridkernels info --json > "$out/info.json") | tee "$out/info.txt"

echo "== roofline probes =="
# From /tmp: the installed package, not the source tree (which has no freshly built _C).
run_limited roofline 60 bash -c 'cd /tmp && exec python - "$1"' _ "$out/roofline.json" <<'PY'
import json, sys
from hybridkernels.benchmarking import copy_bandwidth_gbs, environment, matmul_peak_tflops
res = {"copy_bandwidth_gbs": copy_bandwidth_gbs("cuda"), "bf16_matmul_tflops": matmul_peak_tflops("cuda"),
       **environment("cuda")}
json.dump(res, open(sys.argv[1], "w"), indent=2)
print(json.dumps(res, indent=2))
PY

echo "== tests (GPU) =="
# The GPU code's tests first (pytest keeps the command line's file order), the rest after; the
# ahead-of-time compile check (-m compile) needs no GPU and runs in CI, so it is left out here.
first=(tests/test_attention.py tests/test_unmask.py tests/test_decode.py tests/test_kv_append.py
  tests/test_executor.py tests/test_planner.py tests/test_pipeline.py)
rest=()
for f in tests/test_*.py; do [[ " ${first[*]} " == *" $f "* ]] || rest+=("$f"); done
run_limited tests 120 pytest "${first[@]}" "${rest[@]}" -m "not compile" -q -ra -p no:cacheprovider \
  --junitxml="$out/tests.xml" > "$out/tests.log" 2>&1
tail -15 "$out/tests.log"

echo "== benchmarks =="
# (module, seconds): the estimated H100 time of its quick cases (process start, model creation,
# Triton compiles and autotuning included) plus a margin; in order of priority (the last ones run
# in whatever is left of the budget).
export HYBRIDKERNELS_BENCH_QUICK=1
for spec in attention:65 unmask:50 decode:40 executor:80 planner:90 pipeline:70 block_diffusion:45 dream:45 tp:20; do
  module=${spec%%:*}
  run_limited "bench_$module" "${spec##*:}" pytest "benches/bench_$module.py" -q -p no:cacheprovider \
    --benchmark-json="$out/bench_$module.json" --benchmark-columns=median,rounds \
    > "$out/bench_$module.log" 2>&1
  tail -5 "$out/bench_$module.log" 2>/dev/null
done
# One bench.json for benches/compare.py: every module's benchmarks, the first file's machine info.
python - "$out" <<'PY' || status=1
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
merged = None
for path in sorted(out.glob("bench_*.json")):
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"{path.name}: unreadable ({exc})")
        continue
    if merged is None:
        merged = data
    else:
        merged["benchmarks"] += data["benchmarks"]
if merged is not None:
    (out / "bench.json").write_text(json.dumps(merged, indent=2))
    print(f"bench.json: {len(merged['benchmarks'])} benchmarks")
PY

printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
echo "gpu_check: done in $(($(date +%s) - t0)) s, status $status; results in $out"
exit $status
