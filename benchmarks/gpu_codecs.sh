#!/usr/bin/env bash
# One device run (see /work/.library/device): build the kernels with CMake, run the codec tests
# (GPU tests compare kernels with the references bit for bit), then measure throughput.
# Logs and JSON go to $OUT. Usage, from the repo root: bash benchmarks/gpu_codecs.sh
set -o pipefail
OUT=${OUT:-/tmp/gdscache-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/codecs/*.whl >/dev/null 2>&1; then  # pydantic & co. for `import gdscache` where they are missing
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/codecs/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv | tee "$OUT/gpu.txt"
cmake -S . -B build/cuda -DCMAKE_CUDA_ARCHITECTURES=90 > "$OUT/build.log" 2>&1 &&
  cmake --build build/cuda -j 8 >> "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
export GDSCACHE_CUDA_LIB="$PWD/build/cuda/libgdscache_cuda.so"
python3 -m pytest tests/codecs -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/pytest.log" | tail -25
python3 benchmarks/gpu_codecs.py --json "$OUT/gpu_codecs.json" 2>&1 | tee "$OUT/gpu_codecs.log"
