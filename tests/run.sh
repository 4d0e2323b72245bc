#!/usr/bin/env bash
# The test command of the README. Fast tests first; Triton kernels run on the CPU through the
# interpreter when there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -x --durations=15 tests "$@"
