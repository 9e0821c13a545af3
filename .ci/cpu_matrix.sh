#!/usr/bin/env bash
# The CPU op/kernel tests again under CPU classes this machine may not be, with the real ATen and
# oneDNN kernels (no mocks): ATEN_CPU_CAPABILITY narrows ATen's vector ISA, ONEDNN_MAX_CPU_ISA
# oneDNN's GEMMs and MKL_ENABLE_INSTRUCTIONS MKL's (ATen's flash kernel multiplies bf16 blocks
# through MKL, which ignores oneDNN's cap; together they take AMX and AVX-512 BF16 away from the
# dispatcher's feature detection too), DSMR_CPU_CLASS forces a row of the decision table,
# OMP_NUM_THREADS the threads.
# Legs a CPU cannot execute (AVX-512 on an AVX2-only CPU) are skipped with a line saying so.
#
#     bash .ci/cpu_matrix.sh            # every leg this CPU can run (about 2 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
TESTS=(tests/dsmr_kernels/test_aten_contract.py tests/dsmr_kernels/test_cpu_dispatch.py
       tests/dsmr_kernels/test_cpu_flash.py tests/dsmr_kernels/test_cpu_paths.py
       tests/dsmr_kernels/test_cpu_tiled.py tests/dsmr_kernels/test_dispatch.py
       tests/dsmr_kernels/test_mask_cache.py tests/dsmr_kernels/test_module.py
       tests/dsmr_kernels/test_nonfinite.py tests/dsmr_kernels/test_op.py)
flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $flags " == *" $1 "* ]]; }
nproc_all=$(nproc 2>/dev/null || echo 2)

leg() {  # leg NAME VAR=VALUE...
  local name=$1; shift
  local t0=$SECONDS
  echo "== CPU class leg: $name ($*)"
  env "$@" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" 2>&1 | tail -3
  local rc=${PIPESTATUS[0]}
  echo "   ($((SECONDS - t0)) s)"
  return "$rc"
}

leg "AVX2 only (AMD Zen 3 class), all threads" ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 OMP_NUM_THREADS="$nproc_all"
leg "no vector ISA, 1 thread" ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 OMP_NUM_THREADS=1
if has avx512_bf16; then
  leg "AVX-512 BF16, no AMX (AMD Zen 4 class), 1 thread" ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 OMP_NUM_THREADS=1
else
  echo "== CPU class leg: AVX-512 BF16 skipped: this CPU has no avx512_bf16; the bf16 row is forced below instead"
fi
# Every row of the decision table, forced: the paths run on any x86 CPU (slowly where emulated).
leg "table row 'bf16' (tiled) forced, all threads" DSMR_CPU_CLASS=bf16 OMP_NUM_THREADS="$nproc_all"
if has amx_bf16; then
  leg "table row 'no_bf16' (upcast) forced on AMX, 1 thread" DSMR_CPU_CLASS=no_bf16 OMP_NUM_THREADS=1
else
  leg "table row 'amx' (calibrated flash/upcast/tiled) forced, 1 thread" DSMR_CPU_CLASS=amx OMP_NUM_THREADS=1
fi
