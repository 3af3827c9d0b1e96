#!/usr/bin/env bash
# One command for a GPU machine without network (torch, triton, pybind11, pytest already there):
# build and install the package, record the machine, run the whole test suite on the GPU and every
# benchmark, and probe the copy bandwidth and bf16 matmul peak. Everything lands in OUT_DIR.
#   usage: bash benches/gpu_check.sh OUT_DIR        (budget: under 9 minutes)
set -uo pipefail
out="$(mkdir -p "${1:?usage: bash benches/gpu_check.sh OUT_DIR}" && cd "$1" && pwd)"
cd "$(dirname "$0")/.."
t0=$(date +%s)
left() { echo $((540 - ($(date +%s) - t0))); }
status=0

{
  date -u +%FT%TZ
  echo "command: bash benches/gpu_check.sh $*"
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi
  python -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__)"
} > "$out/env.txt" 2>&1

echo "== install =="
if ! HYBRIDKERNELS_REQUIRE_CUDA=1 MAX_JOBS=16 pip install --no-build-isolation --no-deps . > "$out/install.log" 2>&1; then
  tail -50 "$out/install.log"; echo "install failed"; exit 1
fi
(cd /tmp && hybridkernels info && hybridkernels info --json > "$out/info.json") | tee "$out/info.txt"

echo "== roofline probes =="
(cd /tmp && python - "$out/roofline.json" <<'PY'
import json, sys
from hybridkernels.benchmarking import copy_bandwidth_gbs, environment, matmul_peak_tflops
res = {"copy_bandwidth_gbs": copy_bandwidth_gbs("cuda"), "bf16_matmul_tflops": matmul_peak_tflops("cuda"),
       **environment("cuda")}
json.dump(res, open(sys.argv[1], "w"), indent=2)
print(json.dumps(res, indent=2))
PY
) || status=1

echo "== tests (GPU) =="
timeout $(( $(left) / 2 )) pytest tests -q -ra -p no:cacheprovider --junitxml="$out/tests.xml" > "$out/tests.log" 2>&1 || status=1
tail -15 "$out/tests.log"

echo "== benchmarks =="
timeout $(( $(left) - 20 )) pytest benches -q -p no:cacheprovider --benchmark-json="$out/bench.json" \
  --benchmark-columns=median,rounds > "$out/bench.log" 2>&1 || status=1
tail -40 "$out/bench.log"
echo "gpu_check: done in $(( $(date +%s) - t0 )) s, status $status; results in $out"
exit $status
