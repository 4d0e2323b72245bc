#!/usr/bin/env bash
# All GPU work of a session in one device call: the real-size bf16 GPU tests, the training-step and
# kernel benchmarks (each measuring the copy-bandwidth and bf16-matmul ceilings in the same run), the
# rest of the GPU tests, the trainer on the GPU, and the data loaders. Results go to $OUT (default
# bench/results/); commit them and run `python -m bench.report` to regenerate the README tables.
#
#   bash bench/carry_wheels.sh small        # here, once: DeepSpeed, torch-fidelity and what they need into .whl/ (~5 MB)
#   python -m kernels.cuda_build --fatbin   # here, once (nvcc, 24 s): csrc's sm_80 + sm_90a object, 18.5 s less there
#   bash bench/gpu_all.sh [STAGE ...]       # device tool: carry [".whl", "csrc/build"], timeout_s 600
#
# Stages, in order of value (default: all): env real train kernels tests sanitize engine data
#   env      nvidia-smi, versions                        real     every fused op at SiT-XL/2 sizes in bf16
#   train    bench.train_step: eager pair, compiled pair, kernels  bench.kernels, SiT-XL/2 256 px cases first
#            CUDA graphs (alone, then with every switch), the trainer's own step (DeepSpeed; needs the carried
#            DeepSpeed), one-switch variants
#   tests    the other kernel and model tests on the GPU (the csrc tests among them, on CUDA tensors)
#   sanitize compute-sanitizer memcheck, racecheck, synccheck over every CUDA C++ launcher (bench/csrc_sanitize.py)
#   engine   the trainer's tests and the main job (2 min)
#   data     bench.data (DALI nvJPEG only where carried: bench/carry_wheels.sh prepare, in 5 calls)
#
# A task is lent 15 minutes of device time in all (the machine's start included) and a call runs at
# most 10 minutes, so the whole plan shares one deadline, ALIGNFLOW_CALL_BUDGET seconds (default 540)
# from the start of the call. Each stage runs under `timeout` for what is left (at most its own cap),
# the benchmarks read the stage's end (ALIGNFLOW_DEADLINE) and record what they could not start as
# skipped, and every result file is rewritten as it grows, so a stage that is cut keeps what it
# measured. A stage with less time left than it needs to report anything (MIN) is not started (rc 125,
# not a failure; a cut stage's rc is 124 or 137); the summary at the end names those to run in a second
# call. The benchmarks write their JSON alone (the device returns at most 8 files): their markdown
# tables and charts come from `python -m bench.report` here.
#
# Beside the measured step, the cost model's prediction of it (`python -m bench.predict --every-variant`:
# the device preset named by the measured device, the bf16 matmul rate measured in this call, every
# variant under its own name; modelled, not measured): it starts in the background as soon as the train
# stage has written its first variant (the device name and ceiling), on one CPU core at the lowest
# priority (this machine has 16; the timed steps' host thread and loader keep theirs), a few traces of
# about a minute each, so that it costs no device time of its own: $OUT/model-<preset>-<date>.json.
# It is waited for before the summary (cut at the call's
# deadline); `python -m bench.report` then prints the model's error per variant and phase.
#
# The GPU image has torch, Triton, timm, pyyaml, pytest and pytest-xdist but no network; wheels carried
# in .whl/ are installed to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
CALL_BUDGET=${ALIGNFLOW_CALL_BUDGET:-540}
CALL_END=$(( $(date +%s) + CALL_BUDGET ))
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
[ ${#stages[@]} -eq 0 ] && stages=(env real train kernels tests sanitize engine data)

# the longest each stage may take, in seconds (less when the call's deadline is nearer), and the least
# time worth starting it with (the trainer's tests and two minutes of the main job want 150 s; a test
# stage cut in its first minute reports nothing; the sanitizer's three tools took 35 s).
# The budget of one 540 s call, from the first H200 run's stage times (2026-12-04: env 15 s, real 43 s,
# kernels 222 s for all 53 passes at 0.5 s a variant, of it 18.5 s building the fatbin object; tests 124 s,
# sanitize 35 s; in a second call): env 15 + real 43 + train <= 260 + kernels <= 100 = 418 s at most,
# leaving >= 122 s for tests and sanitize. Expected: train about 215 s (the eager pair 45 s, each compiled
# variant 80-90 s; alignflow-graphs then wants 120 s and the trainer rows 60 s, more than is left: a next
# call with ALIGNFLOW_CAP_train=500 and the train stage alone measures them) and kernels about
# 80 s (the build, the ceilings, then the 18 SiT-XL/2 256 px passes, 72 variants at 0.1 s of timed calls
# and ~0.5 s of compiles and warm-ups each; the other passes as time allows): 15 + 43 + 215 + 80 = 353 s,
# tests to 477 s, sanitize to 512 s. The kernels cap is what leaves the tests their time: uncapped, the
# stage ran 222 s and neither test stage started. ALIGNFLOW_CAP_<stage> replaces a cap (a call for one
# benchmark alone: ALIGNFLOW_CAP_kernels=500 bash bench/gpu_all.sh kernels measures every case).
declare -A CAP=([env]=30 [real]=180 [train]=260 [kernels]=100 [tests]=300 [sanitize]=240 [engine]=240 [data]=120)
declare -A MIN=([env]=10 [real]=60 [train]=60 [kernels]=40 [tests]=90 [sanitize]=45 [engine]=150 [data]=45)
for s in "${!CAP[@]}"; do
  override=ALIGNFLOW_CAP_$s
  [ -n "${!override:-}" ] && CAP[$s]=${!override}
done

stage() {
  set -o pipefail
  local rc=0
  case "$1" in
    env)
      nvidia-smi
      # the host that queues the kernels (eager steps were host-bound on the first H200 run) and the runtime
      echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores, kernel $(uname -r)"
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
      # optional packages: their absence is reported, not a failure
      python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1 || true
      python3 -c "import nvidia.dali as d; print('dali', d.__version__)" 2>&1 | tail -1 || true
      python3 -c "import torch_fidelity as t; print('torch-fidelity', t.__version__)" 2>&1 | tail -1 || true
      return 0 ;;
    real)
      # One process: its last test reads the spills of the JIT builds the real-size runs made.
      python3 -m pytest -q tests/kernels/test_gpu_real_sizes.py ;;
    train)
      # the AdamW-kernel variants (alignflow-graphs-all, alignflow-adamw-kernel) load csrc's fatbin object
      [ -e csrc/build/libalignflow_cuda.so ] || python3 -m kernels.cuda_build --fatbin || true
      python3 -m bench.train_step --skip-data --out "$OUT" ;;
    kernels)
      # the "cuda C++" variants need csrc's fatbin object: built here where nvcc is, else carried (csrc/README.md)
      [ -e csrc/build/libalignflow_cuda.so ] || python3 -m kernels.cuda_build --fatbin || true
      python3 -m bench.kernels --out "$OUT" ;;
    tests)
      # Every other kernel test, spread over processes where pytest-xdist is there (each compiles its own
      # Triton variants).
      # the csrc tests load the fatbin object: built once here, not by each worker
      [ -e csrc/build/libalignflow_cuda.so ] || python3 -m kernels.cuda_build --fatbin || true
      parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
      python3 -m pytest -q $parallel --ignore=tests/kernels/test_gpu_real_sizes.py tests/kernels \
        tests/engine/test_sit.py tests/engine/test_transport.py tests/engine/test_samplers.py ;;
    sanitize)
      # Each tool over bench/csrc_sanitize.py (every launcher, fp32 and bf16, checked against the
      # references), only our kernels instrumented (--kernel-regex), torch's caching allocator off so
      # that memcheck sees each tensor's own bounds. Untried on these machines: KINDS.md saw
      # compute-sanitizer refuse the device under gVisor, which this stage then reports.
      [ -e csrc/build/libalignflow_cuda.so ] || python3 -m kernels.cuda_build --fatbin || return 1
      local sanitizer
      sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
      [ -x "$sanitizer" ] || { echo "compute-sanitizer not found"; return 3; }
      for tool in memcheck racecheck synccheck; do
        echo "--- compute-sanitizer --tool $tool"
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 9 --kernel-regex kns=alignflow \
          python3 -m bench.csrc_sanitize || rc=1
      done
      return $rc ;;
    engine)
      # The trainer on a GPU (needs the carried DeepSpeed): its tests on one rank, then the main job's
      # config for two minutes on this one GPU (bf16, Triton kernels, DALI nvJPEG where carried).
      python3 -c "import deepspeed" 2>/dev/null || { echo "DeepSpeed is not here: carry .whl (bash bench/carry_wheels.sh small)"; return 3; }
      python3 -m pytest -q tests/engine/test_train.py || rc=1
      python3 -m deepspeed.launcher.runner --num_gpus 1 --module engine.train --config configs/builtin_cpu.yaml \
        train.output_dir=/tmp/alignflow-main train.max_minutes=2 logging.progress_bar=false || rc=1
      cp /tmp/alignflow-main/loss_curve.png "$OUT/main_job_loss_curve.png" 2>/dev/null
      cp /tmp/alignflow-main/samples.png "$OUT/main_job_samples.png" 2>/dev/null
      return $rc ;;
    data)
      python3 -m bench.data --out "$OUT" ;;
    *)
      echo "unknown stage '$1' (stages: env real train kernels tests sanitize engine data)"; return 2 ;;
  esac
}

# The cost model's prediction, in the background (see the header); nothing where bench.model is not here.
predict_pid=
start_prediction() {
  if [ ! -f bench/model.py ] || [ ! -f bench/predict.py ]; then
    echo "=== model prediction: bench/model.py is not here; none made" | tee -a "$OUT/gpu_all.log"; return
  fi
  echo "=== model prediction waits in the background for the train stage's first result" | tee -a "$OUT/gpu_all.log"
  (
    until compgen -G "$OUT/train_step-*.json" > /dev/null; do
      [ "$(date +%s)" -ge "$CALL_END" ] && { echo "no train_step result in $OUT: nothing to model"; exit 1; }
      sleep 2
    done
    echo "started $(date -u +%FT%TZ)"
    # ALIGNFLOW_PREDICT_ARGS=--smoke: bench.model's narrow step (to try this script's plumbing on a CPU)
    OMP_NUM_THREADS=1 exec nice -n 19 python3 -m bench.predict "$OUT" --every-variant ${ALIGNFLOW_PREDICT_ARGS:-}
  ) > /tmp/alignflow-predict.log 2>&1 &
  predict_pid=$!
}
finish_prediction() {
  [ -n "$predict_pid" ] || return 0
  # every stage is done: without a train_step result there never will be one to model
  compgen -G "$OUT/train_step-*.json" > /dev/null || kill "$predict_pid" 2>/dev/null
  while kill -0 "$predict_pid" 2>/dev/null && [ "$(date +%s)" -lt $(( CALL_END - 3 )) ]; do sleep 1; done
  local how="rc"
  if kill -0 "$predict_pid" 2>/dev/null; then kill "$predict_pid"; how="cut at the call's deadline, rc"; fi
  wait "$predict_pid"; local rc=$?
  { tail -n 30 /tmp/alignflow-predict.log; echo "=== model prediction $how=$rc"; } | tee -a "$OUT/gpu_all.log"
}

# One log plus the result files: the device tool brings back what is under $OUT.
status=0
not_started=()
cut=()
touch "$OUT/gpu_all.log"
first_line=$(( $(wc -l < "$OUT/gpu_all.log") + 1 ))  # this call's part of the log
for s in "${stages[@]}"; do
  [ "$s" = train ] && [ -z "$predict_pid" ] && start_prediction
  left=$(( CALL_END - $(date +%s) ))
  limit=${CAP[$s]:-60}
  [ "$left" -lt "$limit" ] && limit=$left
  {
    if [ "$limit" -lt "${MIN[$s]:-20}" ]; then
      echo "=== stage $s not started: ${left}s left of the call's ${CALL_BUDGET}s, it wants ${MIN[$s]:-20}s (run it in another call)"
      exit 125
    fi
    echo "=== stage $s ($(date -u +%FT%TZ), limit ${limit}s, ${left}s left in the call)"
    export -f stage; export OUT
    # the benchmarks stop starting measurements a little before the stage is cut
    export ALIGNFLOW_DEADLINE=$(( $(date +%s) + limit - 5 ))
    timeout --signal=INT --kill-after=15 "$limit" bash -c 'stage "$1"' _ "$s"
    rc=$?
    # 124: stopped by the interrupt at the limit; 137: killed 15 s after it
    { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && echo "=== stage $s cut at ${limit}s"
    echo "=== stage $s rc=$rc"
    exit $rc
  } 2>&1 | tee -a "$OUT/gpu_all.log"
  rc=${PIPESTATUS[0]}
  if [ $rc -eq 125 ]; then not_started+=("$s"); elif [ $rc -ne 0 ]; then status=$rc; fi
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && cut+=("$s")
done
finish_prediction
# the call's summary, last in the output (a device call returns its tail): each stage's end, and what to
# run next (the stages not started, then those cut, which kept what they measured); a stage not started
# is not a failure
{
  echo "=== summary"
  tail -n +"$first_line" "$OUT/gpu_all.log" | grep -E '^=== (stage [a-z]+ (rc=|cut)|model prediction)'
  next=("${not_started[@]}" "${cut[@]}")
  [ ${#next[@]} -gt 0 ] && echo "=== next call: bash bench/gpu_all.sh ${next[*]} (not started: ${not_started[*]:-none}; cut: ${cut[*]:-none})"
  ls -l "$OUT"
} 2>&1 | tee -a "$OUT/gpu_all.log"
exit $status
