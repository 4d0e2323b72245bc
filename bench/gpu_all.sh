#!/usr/bin/env bash
# All GPU work of a session in one call (see the README's "Benchmarks"): GPU tests at real sizes,
# the AOT check, kernel benchmarks and the training-step benchmark, with the copy-bandwidth and
# bf16-matmul ceilings measured in the same run. Results go to $OUT (default bench/results/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
python -m pip install -q pytest pyyaml >/dev/null 2>&1
python -m pytest -q -x tests/kernels 2>&1 | tail -30 | tee "$OUT/gpu-tests.txt"
python -m kernels.aot --json "$OUT/aot.json" > "$OUT/aot.txt" 2>&1; tail -1 "$OUT/aot.txt"
python -m bench.kernels --out "$OUT" 2>&1 | tee "$OUT/kernels.txt"
if [ -f bench/train_step.py ]; then
  python -m bench.train_step --out "$OUT" 2>&1 | tee "$OUT/train_step.txt"
fi
