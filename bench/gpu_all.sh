#!/usr/bin/env bash
# All GPU work of a session in one call: GPU tests (real SiT-XL/2 sizes in bf16 included), the AOT
# check, kernel benchmarks and the training-step benchmark, each benchmark measuring the copy-bandwidth
# and bf16-matmul ceilings in the same run. Results go to $OUT (default bench/results/); commit them and
# run `python -m bench.report` to regenerate the README tables.
#
# The GPU image has torch, Triton, timm, pyyaml and pytest but no network: carry what else is wanted
# (deepspeed, nvidia-dali-cuda130 with its nvimgcodec/nvcomp wheels, diffusers) as wheels in .whl/
# (see the device tool's README); they are installed to /tmp/site when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
# One log plus the result files: the device tool brings back at most 8 files.
{
  nvidia-smi
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
  python3 -m pytest -q -x tests/kernels tests/engine/test_sit.py tests/engine/test_transport.py \
    tests/engine/test_sampling.py 2>&1 | tail -40
  python3 -m kernels.aot --json "$OUT/aot.json" | tail -3
  python3 -m bench.kernels --out "$OUT"
  python3 -m bench.train_step --out "$OUT"
} 2>&1 | tee "$OUT/gpu_all.log"
