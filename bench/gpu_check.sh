#!/usr/bin/env bash
# One GPU session's checks, in order of value, each under its own time limit:
#   1. build the extension for the machine's torch, 2. the CUDA tests (tests/test_cuda.py) and
#   the op tests, 3. the GPU benchmark (a bf16 0.5 B Llama, then the tiny Llama), JSON + logs.
# Usage (repo root, a python3 with CUDA torch): OUT=/some/dir bash bench/gpu_check.sh
# Wheels missing on the machine may wait in .whl/ (installed to /tmp/site first).
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
# The compiler on PATH (on the lent H200 image: GCC 13.3, as torch was built), not a CXX set by the
# image (/opt/gcc/bin/g++ there, whose build segfaulted on error messages; BENCHMARKS.md).
export CXX=${LORA_CXX:-g++}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  echo "CXX=$CXX: $($CXX --version | head -1)"
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
start=$(date +%s)
timeout 200 python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; echo "build rc=$? $(( $(date +%s) - start )) s" | tee -a "$OUT/machine.txt"
python3 -c "import lora_runtime as L; from lora_runtime.ops._extension import extension_error; print('extension loaded:', L.extension_loaded(), extension_error())" 2>&1 | tee -a "$OUT/machine.txt"
timeout 120 python3 -m pytest tests/test_cuda.py tests/ops/test_lora_linear.py tests/adapters/test_grouping.py -q -p no:cacheprovider -rs 2>&1 | tail -40 > "$OUT/tests.log"; tail -5 "$OUT/tests.log"
for model in llama-medium-bf16 tiny-llama; do
  timeout $( [ "$model" = tiny-llama ] && echo 110 || echo 160 ) python3 -m lora_runtime bench --device cuda --preset quick --models "$model" --model-budget 3 \
    --train-variants base,base_compiled,lora_eager,lora_compiled,peft_eager,peft_compiled,full \
    --memory-variants lora_eager,peft_eager,full $( [ "$model" = tiny-llama ] && echo --skip-op ) \
    --json "$OUT/bench-cuda-$model.json" > "$OUT/bench-$model.log" 2>&1; echo "bench $model rc=$?"
done
echo "total $(( $(date +%s) - start )) s"
