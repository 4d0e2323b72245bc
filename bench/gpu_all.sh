#!/usr/bin/env bash
# All GPU work of a session: GPU tests (real SiT-XL/2 sizes in bf16 first), the AOT check, the kernel
# benchmarks and the training-step benchmark, each benchmark measuring the copy-bandwidth and
# bf16-matmul ceilings in the same run. Results go to $OUT (default bench/results/); commit them and run
# `python -m bench.report` to regenerate the README tables.
#
#   bash bench/gpu_all.sh [STAGE ...]   stages: env tests aot kernels train data engine (default: all, in order)
#
# The device tool runs one command for at most 10 minutes, keeps the machine warm for 30 s after it, and
# gives a session 30 minutes of device time, so a session runs the stages as back-to-back calls, the
# measurements first (K parts from `bash bench/carry_wheels.sh prepare`, run here beforehand):
#   1.        bash bench/gpu_all.sh env tests     (the aot stage repeats what CI checks under Triton 3.6/3.8)
#   2.        bash bench/gpu_all.sh kernels
#   3.        bash bench/gpu_all.sh train            (its data rows without DALI until it is carried)
#   4..K+3.   bash bench/carry_wheels.sh receive .carry/i                     carry: [".carry/i"]
#   K+4.      bash bench/carry_wheels.sh install && bash bench/gpu_all.sh data engine
# Each stage runs under `timeout` (ALIGNFLOW_STAGE_TIMEOUT seconds, default 540) so that a stage that
# overruns is cut with its log intact instead of losing the call.
#
# The GPU image has torch, Triton, timm, pyyaml, pytest and pytest-xdist but no network. Wheels carried
# in .whl/ are installed to /tmp/site; bench/carry_wheels.sh brings DALI (over one call's 64 MiB) in
# parts and installs it to /tmp/site as well.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGE_TIMEOUT=${ALIGNFLOW_STAGE_TIMEOUT:-540}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
if [ -d /tmp/site ]; then
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  # carried CUDA libraries (nvjpeg, nvcomp, nvimgcodec) for the ones that are found by the loader path
  for lib in /tmp/site/nvidia/*/lib /tmp/site/nvidia/*/*/lib; do
    [ -d "$lib" ] && export LD_LIBRARY_PATH=$lib:${LD_LIBRARY_PATH:-}
  done
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env tests aot kernels train data engine)

stage() {
  set -o pipefail
  local rc=0
  case "$1" in
    env)
      nvidia-smi
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
      python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
      python3 -c "import nvidia.dali as d; print('dali', d.__version__)" 2>&1 | tail -1 ;;
    tests)
      # Real sizes first: the bf16 tensor-core paths at SiT-XL/2 shapes. Then every kernel test, spread
      # over processes where pytest-xdist is there (each compiles its own Triton variants).
      python3 -m pytest -q tests/kernels/test_gpu_real_sizes.py || rc=1
      parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
      python3 -m pytest -q $parallel --ignore=tests/kernels/test_gpu_real_sizes.py tests/kernels \
        tests/engine/test_sit.py tests/engine/test_transport.py tests/engine/test_sampling.py 2>&1 | tail -60 || rc=1
      return $rc ;;
    aot)
      python3 -m kernels.aot --json "$OUT/aot.json" | tail -3 ;;
    kernels)
      python3 -m bench.kernels --out "$OUT" ;;
    train)
      python3 -m bench.train_step --out "$OUT" ;;
    data)
      python3 -m bench.data --out "$OUT" ;;
    engine)
      # The trainer on a GPU (needs the carried DeepSpeed): its tests on one rank, then the main job's
      # config for two minutes on this one GPU (bf16, Triton kernels, DALI nvJPEG where carried).
      python3 -m pytest -q tests/engine/test_train.py 2>&1 | tail -30 || rc=1
      python3 -m deepspeed.launcher.runner --num_gpus 1 --module engine.train --config configs/builtin_cpu.yaml \
        train.output_dir=/tmp/alignflow-main train.max_minutes=2 logging.progress_bar=false 2>&1 | tail -40 || rc=1
      cp /tmp/alignflow-main/loss_curve.png "$OUT/main_job_loss_curve.png" 2>/dev/null
      cp /tmp/alignflow-main/samples.png "$OUT/main_job_samples.png" 2>/dev/null
      return $rc ;;
    *)
      echo "unknown stage '$1' (stages: env tests aot kernels train data engine)"; return 2 ;;
  esac
}

# One log plus the result files: the device tool brings back at most 8 files.
status=0
for s in "${stages[@]}"; do
  {
    echo "=== stage $s ($(date -u +%FT%TZ), limit ${STAGE_TIMEOUT}s)"
    export -f stage; export OUT
    timeout --signal=INT --kill-after=20 "$STAGE_TIMEOUT" bash -c "stage $s"
    rc=$?
    [ $rc -eq 124 ] && echo "=== stage $s cut at ${STAGE_TIMEOUT}s"
    echo "=== stage $s rc=$rc"
    exit $rc
  } 2>&1 | tee -a "$OUT/gpu_all.log"
  rc=${PIPESTATUS[0]}
  [ $rc -ne 0 ] && status=$rc
done
exit $status
