#!/usr/bin/env bash
# Bring DeepSpeed and DALI (with what they need that the GPU image lacks) to the GPU machine.
#
# DeepSpeed and its missing needs are small (~5 MB), and so is torch-fidelity (85 KB): `small` puts
# them in .whl/, which travels with the one call of bench/gpu_all.sh (carry: [".whl"]) and is
# installed there to /tmp/site.
#
# DALI's CUDA 13 wheel alone is ~190 MiB and one device call carries at most 64 MiB, so the wheels
# travel as one tar cut into parts of PART_MIB (default 56) MiB, one part per call, into the warm
# machine's /tmp/carry; the last call joins them, checks the sha256 and installs to /tmp/site, where
# bench/gpu_all.sh finds them. The machine stays warm for only 30 s after a call: make the calls back
# to back, and start again from part 1 if one finds a fresh machine (`receive` says so). A task has
# 15 device minutes in all: carry DALI only after bench/gpu_all.sh's call has measured the rest.
#
#   here:    bash bench/carry_wheels.sh small            # DeepSpeed for CPython 3.12 -> .whl/
#   here:    bash bench/carry_wheels.sh prepare          # DeepSpeed and DALI -> .carry/1 .. .carry/K
#   device:  bash bench/carry_wheels.sh receive .carry/1  (carry: [".carry/1"]), then 2 .. K,
#            and in the call with part K: bash bench/carry_wheels.sh install && bash bench/gpu_all.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
PART_MIB=${PART_MIB:-56}
# DeepSpeed's sdist is built into a wheel here; the rest come from the registry as cp312 manylinux wheels.
DEEPSPEED_NEEDS=(hjson pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection "typing-extensions>=4.16")
# The evaluation metrics (engine.evaluate; the main job's encoder figure is its Frechet distance, and
# validation refuses an evaluating run without it). Pure Python, --no-deps: importing any of it runs the
# package's __init__, which imports torchvision, PIL and tqdm (in the image: timm needs the first two,
# DeepSpeed and huggingface_hub the third); its FID is numpy's eigvals, so no scipy (scipy is only the
# reference sqrtm of tests/engine/test_evaluate.py, which skips without it: ~35 MB, not carried).
EVAL_NEEDS=(torch-fidelity==0.4.0)
WHEELS=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16
        "nvidia-nvjpeg>=13,<14" astunparse==1.6.3 gast==0.7.0 libcst==1.9.0 makefun nvtx optree
        "${DEEPSPEED_NEEDS[@]}" "${EVAL_NEEDS[@]}")
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

download() {  # download DIR SPEC...: cp312 manylinux wheels, no dependencies
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $(printf -- "--platform %s " "${PLATFORMS[@]}") -d "$dir" "$@"
}

ignore() {  # keep a carried folder out of git (the device tool sends untracked files that git does not ignore)
  local exclude
  exclude=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$exclude")"
  grep -qx "$1" "$exclude" 2>/dev/null || echo "$1" >> "$exclude"
}

case "${1:-}" in
  small)
    rm -rf .whl && mkdir -p .whl && ignore "/.whl/"
    python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
    download .whl "${DEEPSPEED_NEEDS[@]}" "${EVAL_NEEDS[@]}"
    echo "$(ls .whl | wc -l) wheels in .whl ($(du -sh .whl | cut -f1)): carry [\".whl\"] with bench/gpu_all.sh"
    ;;
  prepare)
    rm -rf .carry && mkdir -p .carry/wheels && ignore "/.carry/"
    python3 -m pip wheel -q --no-deps -w .carry/wheels deepspeed==0.19.8
    download .carry/wheels "${WHEELS[@]}"
    tar -cf .carry/wheels.tar -C .carry wheels
    sha256sum .carry/wheels.tar | cut -d' ' -f1 > .carry/wheels.sha256
    split -b "${PART_MIB}M" -d -a 2 .carry/wheels.tar .carry/part.
    i=0
    for part in .carry/part.*; do
      i=$((i + 1)); mkdir -p ".carry/$i"; mv "$part" ".carry/$i/"; cp .carry/wheels.sha256 ".carry/$i/"
    done
    rm -rf .carry/wheels .carry/wheels.tar
    echo "$i parts in .carry/1 .. .carry/$i ($(du -sh .carry | cut -f1)); carry one per call"
    ;;
  receive)
    src=${2:?"receive needs the part folder, e.g. .carry/1"}
    mkdir -p /tmp/carry
    cp "$src"/part.* "$src"/wheels.sha256 /tmp/carry/
    echo "parts on this machine: $(ls /tmp/carry | grep -c '^part\.') ($(du -sh /tmp/carry | cut -f1))"
    ;;
  install)
    [ -f /tmp/carry/wheels.sha256 ] || { echo "no parts in /tmp/carry: this machine is fresh; start from part 1"; exit 1; }
    cat /tmp/carry/part.* > /tmp/carry/wheels.tar
    if [ "$(sha256sum /tmp/carry/wheels.tar | cut -d' ' -f1)" != "$(cat /tmp/carry/wheels.sha256)" ]; then
      echo "joined parts do not match the sha256: a part is missing or stale; start again from part 1"; exit 1
    fi
    tar -xf /tmp/carry/wheels.tar -C /tmp/carry
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      /tmp/carry/wheels/*.whl
    PYTHONPATH=/tmp/site python3 -c "import deepspeed, nvidia.dali as dali, torch_fidelity as tf; print('deepspeed', deepspeed.__version__, 'dali', dali.__version__, 'torch-fidelity', tf.__version__)"
    ;;
  *)
    sed -n '2,17p' "$0"; exit 2 ;;
esac
