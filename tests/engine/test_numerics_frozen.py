"""The numerics are frozen: 50 fixed-seed steps of the README's main job (configs/builtin_cpu.yaml,
shrunk to a tiny model and batch, through `engine.train` under the deepspeed launcher, encoder
bootstrap, ZeRO-2, EMA and the final samples included) on one CPU rank and on two must give exactly the
loss terms, gradient norms and sample bytes recorded in numerics_frozen.json. Bitwise, not
`assert_close`: a refactor that is meant to change nothing must change nothing, and a change that moves
one bit shows here at the first step that moved.

Its sibling for the cost model, tests/test_bench_model.py::test_fused_step_counts_are_identical_to_the_record,
holds the fused step's bytes and launches to bench/results/model-baseline.json exactly.

The runs force the CPU, fp32, the PyTorch kernels and one thread per rank, so they are deterministic
on a machine; the reference also records the torch and DeepSpeed versions and the CPU's vector ISA,
because another ISA or version may round differently (the failure message then says so).

Re-recording (only for a commit whose purpose is to change the numerics: say so, and why, in its
body; never to make a refactor pass):

    ALIGNFLOW_RECORD_NUMERICS=1 PYTHONPATH=$PWD python -m pytest -q tests/engine/test_numerics_frozen.py

rewrites numerics_frozen.json from the code in the working tree (the tests then skip, saying so);
commit the file with the change. Run it twice to see the record is reproducible.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from tests.engine.trainer_fixtures import launch

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "numerics_frozen.json")
RECORD = os.environ.get("ALIGNFLOW_RECORD_NUMERICS") == "1"
STEPS = 50
TERMS = ("loss", "velocity", "alignment", "cls", "grad_norm", "lr")

# The main job's config with a tiny model and batch (about a second of work per step on one core).
OVERRIDES = [
    f"train.max_steps={STEPS}", "train.max_minutes=null", "train.device=cpu", "train.precision=fp32",
    "train.kernels_backend=torch", "train.seed=0", "train.bootstrap_encoder_steps=5",
    "data.builtin_images_per_class=8", "data.batch_size=4", "data.num_workers=0", "data.decoder=pil",
    "model.depth=2", "model.hidden_size=32", "model.encoder_depth=1", "model.projector_dim=32",
    "checkpoint.every=0", "logging.sample_every=0", "logging.log_every=10", "logging.progress_bar=false",
    "logging.tensorboard=false",
    "sample.num_images=8", "sample.batch_size=8", "sample.grid_images=8", "sample.num_steps=3",
]


# Packages whose versions go into the record beside torch's and DeepSpeed's: on 2026-12-04 a fresh
# environment (same torch, DeepSpeed and ISA) moved the encoder terms of step 1 at the code that had
# matched the record on 2026-12-03, so one of the others had changed, and the record did not say which.
PACKAGES = ("timm", "numpy", "pillow", "torchvision", "diffusers", "safetensors")


def environment() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import deepspeed

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            **{name: installed(name) for name in PACKAGES}}


def run(nproc: int, tmp_path, data_root) -> dict:
    run_dir = tmp_path / f"run{nproc}"
    overrides = [*OVERRIDES, f"train.output_dir={run_dir}", f"data.root={data_root}",
                 f"train.global_batch_size={4 * nproc}"]
    launch(["--config", "configs/builtin_cpu.yaml", *overrides], nproc=nproc,
           env_extra={"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}, timeout=900)  # a loaded CI machine
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    samples = np.load(run_dir / "samples.npz")
    return {
        # float.hex: exact, and readable in a diff
        "steps": [{k: float(r[k]).hex() for k in TERMS} for r in records],
        "samples_sha256": hashlib.sha256(np.ascontiguousarray(samples["arr_0"]).tobytes()).hexdigest(),
        "sample_labels": samples["labels"].tolist(),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Both runs at once (one thread per launcher): about half the wall time of one after the other, and
    each rank still computes alone in its own single-threaded process. The built-in data is generated
    once, under its own lock, for both."""
    from concurrent.futures import ThreadPoolExecutor

    tmp = tmp_path_factory.mktemp("numerics")
    with ThreadPoolExecutor(2) as pool:
        futures = {nproc: pool.submit(run, nproc, tmp, tmp / "builtin_data") for nproc in (1, 2)}
        return {nproc: future.result() for nproc, future in futures.items()}


def first_difference(got: list[dict], want: list[dict]) -> str:
    for step, (g, w) in enumerate(zip(got, want), start=1):
        moved = {k: (float.fromhex(w[k]), float.fromhex(g[k])) for k in w if g.get(k) != w[k]}
        if moved:
            return f"step {step} moved first (reference, now): {moved}"
    return f"{len(want)} reference steps, {len(got)} now"


@pytest.mark.parametrize("nproc", [1, 2])
def test_loss_sequence_is_bitwise_unchanged(runs, nproc):
    got = runs[nproc]
    if RECORD:
        table = json.load(open(REFERENCE)) if os.path.exists(REFERENCE) else {}
        table["environment"] = environment()
        table["overrides"] = OVERRIDES
        table[f"ranks_{nproc}"] = got
        with open(REFERENCE, "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
        pytest.skip(f"recorded {nproc}-rank numerics into {REFERENCE}")
    with open(REFERENCE) as f:
        table = json.load(f)
    want = table[f"ranks_{nproc}"]
    where = (f"recorded under {table['environment']}, running under {environment()}; re-record only for "
             f"a change meant to alter numerics (see this file's docstring)")
    assert table["overrides"] == OVERRIDES, f"the run's overrides changed since the record; {where}"
    assert got["steps"] == want["steps"], f"{first_difference(got['steps'], want['steps'])}; {where}"
    assert got["sample_labels"] == want["sample_labels"], where
    assert got["samples_sha256"] == want["samples_sha256"], f"the final samples changed; {where}"
