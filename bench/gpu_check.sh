#!/usr/bin/env bash
# The one script to run on a machine with a CUDA GPU (e.g. a lent H200 with PyTorch + Triton
# preinstalled, no internet). From the repository root:
#
#     bash bench/gpu_check.sh            # results under $OUT (default: gpu-out/)
#
# 0. the self-check (python -m dsmr_kernels.check): the op on the CPU and on CUDA (Triton
#    kernels, the split-KV decode kernel, the generic path), every dtype, against a float64
#    reference, then a short timing against SDPA; one table, non-zero exit on a wrong result;
# 1. the Triton kernel tests on the GPU (TRITON_INTERPRET=0), one fixed config per kernel
#    (DSMR_AUTOTUNE=0) so the run compiles each kernel once per dtype/head dim instead of
#    autotuning every test shape;
# 2. the op at the paper's shapes against PyTorch SDPA and FlexAttention, and the decode kernel
#    against SDPA (bench/gpu_op.py, autotuned);
# 3. full vs two-scale training at the paper preset (bench/gpu_model.py);
# 4. the decode engine on CUDA: its logits against a float64 forward, tokens/s (bench/gpu_decode.py).
# Each step has its own time limit; a failing step is recorded and the next one still runs.
# Under 12 minutes on an H100/H200. Nothing is installed: the package is used from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0
PY="${PYTHON:-python}"
status=0

{
  echo "# GPU check $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: n/a"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
  git log -1 --format='commit %h %s' 2>/dev/null || true
} | tee "$OUT/env.txt"

# pytest may be missing on a bare GPU box: install it from a local wheel folder if one was carried.
if ! "$PY" -c "import pytest" 2>/dev/null; then
  if [ -d .gpu-wheels ]; then
    "$PY" -m pip install --no-index --find-links .gpu-wheels pytest >"$OUT/pip.txt" 2>&1 || true
  fi
fi

echo "== 0/4 self-check: python -m dsmr_kernels.check"
timeout 240 "$PY" -m dsmr_kernels.check 2>&1 | tee "$OUT/check.txt" | tail -40
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && { echo "self-check: exit $rc"; status=1; }

echo "== 1/4 kernel tests on CUDA"
if "$PY" -c "import pytest" 2>/dev/null; then
  tests=$(ls tests/dsmr_kernels/test_triton*.py)
  DSMR_AUTOTUNE=0 timeout 300 "$PY" -m pytest -q -p no:cacheprovider $tests 2>&1 | tee "$OUT/kernel_tests.txt" | tail -15
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "kernel tests: exit $rc"; status=1; }
else
  echo "pytest is not installed and no .gpu-wheels/ folder was carried: kernel tests skipped" | tee "$OUT/kernel_tests.txt"
  status=1
fi

echo "== 2/4 op vs SDPA / FlexAttention, decode vs SDPA"
timeout 240 "$PY" bench/gpu_op.py --out "$OUT" 2>&1 | tee "$OUT/gpu_op.log" | tail -30
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && { echo "gpu_op: exit $rc"; status=1; }

echo "== 3/4 model level: full vs two_scale at the paper preset"
timeout 200 "$PY" bench/gpu_model.py --out "$OUT" 2>&1 | tee "$OUT/gpu_model.log" | tail -12
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && { echo "gpu_model: exit $rc"; status=1; }

echo "== 4/4 decode engine on CUDA: logits vs a float64 forward, tokens/s vs model.forward"
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/dsmr/test_decode.py -k cuda 2>&1 | tee "$OUT/decode_tests.txt" | tail -5
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "decode tests: exit $rc"; status=1; }
fi
DSMR_AUTOTUNE=0 timeout 150 "$PY" bench/gpu_decode.py --out "$OUT" 2>&1 | tee "$OUT/gpu_decode.log" | tail -30
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && { echo "gpu_decode: exit $rc"; status=1; }

echo "results in $OUT/ (exit $status)"
exit $status
