"""Test session setup. Without a GPU, Triton kernels run through the interpreter on the CPU; the
variable must be set before anything imports triton."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs on every run; the seed is printed on failure so a case can be replayed.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed


@pytest.fixture(autouse=True)
def _environment():
    # engine.distributed.init_distributed writes the launch variables (RANK, MASTER_ADDR, ...) into
    # os.environ, as DeepSpeed and torch's env:// read them; a test's values must not reach the next
    # test's in-process trainer (a leaked MASTER_ADDR of a SLURM test hung its rendezvous).
    # A test that leaves its one-rank process group up (as in-process trainer tests do, since DeepSpeed
    # keeps its own copy of the world group) keeps the variables that group was made with.
    import torch.distributed as dist

    saved = dict(os.environ)
    yield
    if os.environ != saved and not (dist.is_available() and dist.is_initialized()):
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _matmul_precision():
    # The trainer and the sampler turn TF32 on for a GPU run; a later test's fp32 references and kernels
    # must not inherit it (it would loosen what they compare).
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# Fast tests first: the files below start processes (DeepSpeed ranks, the AOT compiler), compile with
# torch.compile or with g++/nvcc (csrc), or train; they run after everything else, in this order.
SLOW_LAST = ["test_csrc_emulator.py", "test_csrc_adaln.py", "test_csrc_alignment_loss.py", "test_csrc_nvcc.py",
             "test_aot.py", "test_compile.py", "test_bf16_copies_compile.py",
             "test_bench_smoke.py", "test_bench_model.py", "test_bench_model_deepspeed.py", "test_evaluate.py",
             "test_data_repa.py", "test_pretrained.py",
             "test_wandb.py", "test_resume.py", "test_train_bf16_copies.py", "test_train.py",
             "test_train_distributed.py", "test_optim_distributed.py", "test_faults.py", "test_numerics_frozen.py",
             "test_multinode.py"]


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: SLOW_LAST.index(item.path.name) + 1 if item.path.name in SLOW_LAST else 0)
