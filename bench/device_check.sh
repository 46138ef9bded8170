#!/usr/bin/env bash
# The whole GPU check as ONE command for a lent H200 (device tool), under 8 minutes:
#   here, once:  bench/prepare_wheels.sh            (wheels the device lacks -> .whl/)
#   device run:  bash bench/device_check.sh          (carry: [".whl"], timeout_s: 540)
# Builds the CUDA extension, runs the GPU tests, the kernel benchmarks against their peers, the
# end-to-end bench (random full-size weights) and its HF peer, and writes $OUT/report.json
# (+ logs), refreshed after every stage. Commit report.json under bench/results/. Each stage
# has its own time limit (SIGINT first, so that pytest still writes what it measured).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
for root in /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-12.8; do
  [ -x "$root/bin/nvcc" ] && { export CUDA_HOME=$root; break; }
done
start=$(date +%s)
stage() { echo "== [$(( $(date +%s) - start ))s] $*"; }
report() { $PY -m bench.report "$OUT" > /dev/null 2>> "$OUT/report.log"; }
limit() { local s=$1; shift; timeout -s INT -k 15 "$s" "$@"; }

stage "python packages"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

stage "environment"
$PY - > "$OUT/env.json" <<'PYEOF'
import json, subprocess, torch, triton
p = torch.cuda.get_device_properties(0)
print(json.dumps({"gpu": p.name, "sms": p.multi_processor_count, "torch": torch.__version__,
                  "triton": triton.__version__, "cuda": torch.version.cuda,
                  "driver": subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()}))
PYEOF
cat "$OUT/env.json"

stage "install (builds the CUDA extension with this machine's nvcc and torch)"
limit 75 $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1
if ! $PY -c "import pixtral_fast.kernels" 2>> "$OUT/build.log"; then
  echo "editable install failed (see build.log): in-place build instead" | tee -a "$OUT/build.log"
  ln -sfn ../kernels pixtral_fast/kernels
  limit 75 $PY setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
limit 30 $PY -c "from pixtral_fast import ops, _cuda_decode as c; print('decode attention:', ops.decode_backend('cuda'), '-', c.status())" \
  2>&1 | tee -a "$OUT/build.log" | tail -3
report

stage "GPU tests"
limit 110 $PY -m pytest tests -m gpu -q -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
tail -25 "$OUT/gpu_tests.log"; report

stage "kernel benchmarks"
limit 100 $PY -m pytest bench -q -p no:cacheprovider --benchmark-only --benchmark-json="$OUT/bench.json" \
  --benchmark-columns=median,rounds > "$OUT/bench.log" 2>&1
grep -A80 "pixtral_fast vs peers" "$OUT/bench.log" | head -60; report

stage "end-to-end bench (pixtral_fast)"
limit 85 $PY -m pixtral_fast.cli bench --params tests/data/params.json --random-weights --batch 1 8 32 \
  --image-size 1024 --decode-steps 32 --out "$OUT/e2e.json" > /dev/null 2> "$OUT/e2e.log"
cat "$OUT/e2e.json"; report

stage "end-to-end peer (HF transformers)"
limit 45 $PY -m bench.hf_e2e --params tests/data/params.json --batch 1 8 --decode-steps 16 \
  > "$OUT/hf_e2e.json" 2> "$OUT/hf_e2e.log"
cat "$OUT/hf_e2e.json"; report

stage "report"
$PY -m bench.report "$OUT"
stage "done"
